"""Where the kit's own files are (a clone, or the utils dataset on Kaggle): one home for these paths."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding rsna22_utils/ and notebooks/
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
