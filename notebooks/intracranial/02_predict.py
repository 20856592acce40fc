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
# # 02 · Predict with TTA
# Every 01 run with TTA (identity, hflip, rotations ±10°): each training image by the runs of its fold
# (out of fold), the test images by the mean of the runs.

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

session = start_stage("02_predict", overrides, profile=profile)
session.config

# %%
session.run()
