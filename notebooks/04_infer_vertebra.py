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
profile = ""  # a profile of settings, e.g. "original" (the 3rd place) or "demo"
overrides = {}


# %%
import os
import sys
from pathlib import Path

# on Kaggle the kit comes from its utils dataset, whatever its slug: the input folder holding rsna22_utils/
sys.path[:0] = sorted(str(p.parent) for p in Path(os.environ.get("RSNA22_KIT_KAGGLE_INPUT", "/kaggle/input")).glob("*/rsna22_utils"))[:1]
from rsna22_utils.core.notebooks import start_stage

session = start_stage("04_infer_vertebra", overrides, profile=profile)
session.config

# %%
metrics = session.run()
metrics

# %%
import matplotlib.pyplot as plt

from rsna22_utils.cervical.sequence import VertebraInference

labels = VertebraInference(session.out_dir).read("slice_labels")
study = labels["StudyInstanceUID"].iloc[0]
labels[labels["StudyInstanceUID"] == study].plot(x="slice_index", y=[f"C{k}_pred" for k in range(1, 8)], figsize=(10, 3), title=study)
plt.show()
