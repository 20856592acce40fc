"""Shared fixtures: the real competition files beside the repo, and small synthetic competitions."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """Root of ../shared/realdata; skips the test with a reason when it is absent."""
    if not (REALDATA / "rsna2022").is_dir():
        pytest.skip(f"real competition files not found at {REALDATA} (only present beside the repo in CI)")
    return REALDATA


@pytest.fixture(scope="session")
def rsna_real(realdata: Path) -> Path:
    """The real RSNA 2022 folder (csv/, train_images/, test_images/)."""
    return realdata / "rsna2022"
