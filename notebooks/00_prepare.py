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
# # 00 · Prepare
# Reads every study's DICOM headers (slice order by ImagePositionPatient z), writes the folds
# (`fold_file`, e.g. the 3rd place's `train_folded_v01.csv`, or a stratified split), the
# segmentation labels (per-slice C1–C7 boxes and vertebra ratios) and the study cache that
# every later stage reads instead of DICOMs.
#
# `python -m rsna22_utils run 00_prepare -p data_dir=... -p image_size=256`

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

session = start_stage("00_prepare", overrides, profile=profile)
session.config

# %%
outputs = session.run()
outputs

# %%
from rsna22_utils.cervical.prepare import Prepared

prepared = Prepared(session.out_dir)
slices = prepared.read("slices")
print(slices.groupby("split")["StudyInstanceUID"].nunique().rename("studies"))
print(slices.groupby("StudyInstanceUID").size().describe().rename("slices per study"))
prepared.read("folds")["fold"].value_counts().sort_index()
