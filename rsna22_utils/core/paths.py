"""Where the kit's own files are (a clone, or the utils dataset on Kaggle): one home for these paths."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding rsna22_utils/ and notebooks/
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

# Kaggle mounts each dataset (and the competition) at <input>/<slug>; the slugs come from
# kaggle-settings.json (core.kaggle). The variable points a test at a folder laid out the same way;
# notebook headers read it too, before the kit is importable.
KAGGLE_INPUT_ENV = "RSNA22_KIT_KAGGLE_INPUT"
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"


def kaggle_input_dir() -> Path:
    """Where Kaggle mounts the notebook's inputs: /kaggle/input, or $RSNA22_KIT_KAGGLE_INPUT when set."""
    return Path(os.environ.get(KAGGLE_INPUT_ENV) or KAGGLE_INPUT)
