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
# # 04 · Inference: the offline Kaggle submission
# Test DICOMs → head-cropped cache (built as the training cache was) → every 01 run with TTA → the 03 smoothing
# → `submission.csv` with exactly the sample submission's IDs. No internet. On Kaggle, set `data_dir` (the
# competition) and `weights_dir` (a dataset holding `01_train/<run>/` and `03_smooth/smoothing.json`) in `overrides`.

# %% tags=["parameters"]
profile = ""
overrides = {}

# %%
import os
import sys
from pathlib import Path

# on Kaggle the kit comes from its utils dataset, whatever its slug: the input folder holding rsna22_utils/
sys.path[:0] = sorted(str(p.parent) for p in Path(os.environ.get("RSNA22_KIT_KAGGLE_INPUT", "/kaggle/input")).glob("*/rsna22_utils"))[:1]
os.environ["RSNA22_KIT_COMPETITION"] = "intracranial"  # this notebook is a stage of this competition
from rsna22_utils.core.notebooks import start_stage

session = start_stage("04_inference", overrides, profile=profile)
session.config

# %%
session.run()
