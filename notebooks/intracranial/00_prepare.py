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
# # 00 · Prepare (RSNA 2019 intracranial haemorrhage)
# Every image's header into one table, each study's images ordered by z, folds grouped by PatientID, and
# every study decoded once into the cache: the head (largest non-air component + 10 px) cropped, resized,
# HU 0-255 as uint8 plus the brain / subdural / bone windows.

# %% tags=["parameters"]
profile = ""  # a profile of settings, e.g. "original" (the seed's) or "demo"
overrides = {}

# %%
import os
import sys
from pathlib import Path

# on Kaggle the kit comes from its utils dataset, whatever its slug: the input folder holding rsna22_utils/
sys.path[:0] = sorted(str(p.parent) for p in Path(os.environ.get("RSNA22_KIT_KAGGLE_INPUT", "/kaggle/input")).glob("*/rsna22_utils"))[:1]
os.environ["RSNA22_KIT_COMPETITION"] = "intracranial"  # this notebook is a stage of this competition
from rsna22_utils.core.notebooks import start_stage

session = start_stage("00_prepare", overrides, profile=profile)
session.config

# %%
summary = session.run()
summary

# %%
import pandas as pd

images = pd.read_parquet(session.out_dir / "images.parquet")
images.groupby("split").agg(images=("ID", "size"), studies=("StudyInstanceUID", "nunique"), patients=("PatientID", "nunique"))
