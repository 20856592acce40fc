"""Shared fixtures: the real competition files beside the repo, and the tiny synthetic pipeline (helpers: tests/helpers.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.helpers import REALDATA, TINY_COMMON, TINY_FOLDS, TINY_STAGES, tiny_settings


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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic competition (8 train + 3 test studies, 48 px) through stages 00-06 with tiny settings, once.

    Returns {"data_dir", "work_dir", "config_changes"}; work_dir holds `<stage>/fold0-seed0/` runs like a
    real `runs/` folder (01 and 03 also `fold1-seed0/`: 02 and 04 predict each study out of fold; usable
    as the inference weights folder), and a 07_inference submission;
    config_changes maps every stage to what running it changed in the config it was given (nothing).
    Tests must not write into either folder.
    """
    from rsna22_utils.cervical.synth import generate_competition
    from rsna22_utils.core.config import config_diff
    from rsna22_utils.core.registry import execute
    from rsna22_utils.core.resolve import resolve_config

    root = tmp_path_factory.mktemp("tiny_pipeline")
    data_dir, work_dir = root / "competition", root / "runs"
    generate_competition(data_dir, n_studies=8, n_test_studies=3, image_size=48, median_slices=60, seed=3, workers=1)
    common = {**TINY_COMMON, "data_dir": str(data_dir), "work_dir": str(work_dir), "prepared_dir": str(work_dir / "00_prepare")}
    submission = {"weights_dir": str(work_dir), "out": str(work_dir / "07_inference" / "submission.csv")}
    changes = {}
    for stage, overrides in {**TINY_STAGES, "07_inference": submission}.items():
        for fold in TINY_FOLDS.get(stage, [0]):
            cfg = resolve_config(stage, tiny_settings(stage, {**common, **overrides, "fold": fold, "seed": 0}))
            given = copy.deepcopy(cfg)
            execute(stage, cfg)
            changes[stage] = {**changes.get(stage, {}), **config_diff(given, cfg)}
    return {"data_dir": data_dir, "work_dir": work_dir, "config_changes": changes}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the tiny pipeline (every stage trained once, minutes on CPU) is `slow`."""
    for item in items:
        if "tiny_pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
