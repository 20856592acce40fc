# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Per-slice vertebra predictions → slice fracture labels
# Every vertebra model on overlapping windows of every train study, averaged over windows and
# models → `C1_pred..C7_pred` per slice; multiplied by the study's fracture labels they become
# approximate per-slice fracture labels `C1_frac..C7_frac` (`slice_labels.parquet`).

# %% tags=["parameters"]
overrides = {}

# %%
import sys
from pathlib import Path

try:
    import rsna22_utils  # noqa: F401  (a clone: ./kit and the runner put the repo on the path)
except ImportError:  # on Kaggle: the utils dataset
    sys.path.insert(0, "/kaggle/input/rsna22-utils")
from IPython.display import Image, display

from rsna22_utils import qc, setup_logging
from rsna22_utils.config import resolve_config
from rsna22_utils.stages import run_stage_function

setup_logging()

# %%
cfg = resolve_config("04_infer_vertebra", overrides)
metrics = run_stage_function("04_infer_vertebra", cfg)
metrics

# %%
import matplotlib.pyplot as plt
import pandas as pd

labels = pd.read_parquet(Path(cfg.out_dir) / "slice_labels.parquet")
study = labels["StudyInstanceUID"].iloc[0]
labels[labels["StudyInstanceUID"] == study].plot(x="slice_index", y=[f"C{k}_pred" for k in range(1, 8)], figsize=(10, 3), title=study)
plt.show()
