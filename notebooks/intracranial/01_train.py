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
# # 01 · Train a slice classifier (one fold × seed)
# Triplets of adjacent slices (or one slice in three windows) → six logits, the competition's weighted
# log loss as loss; AdamW, cosine, early stopping. All folds and variants:
# `python -m rsna22_utils --competition intracranial run 01_train --profile original`

# %% tags=["parameters"]
profile = ""  # a profile of settings and sweeps, e.g. "original" (the seed's five networks) or "demo"
variant = ""  # which of the profile's networks, when it has several
fold = 0
seed = 0
overrides = {}

# %%
import os
import sys
from pathlib import Path

# on Kaggle the kit comes from its utils dataset, whatever its slug: the input folder holding rsna22_utils/
sys.path[:0] = sorted(str(p.parent) for p in Path(os.environ.get("RSNA22_KIT_KAGGLE_INPUT", "/kaggle/input")).glob("*/rsna22_utils"))[:1]
os.environ["RSNA22_KIT_COMPETITION"] = "intracranial"  # this notebook is a stage of this competition
from rsna22_utils.core.notebooks import start_stage

session = start_stage("01_train", overrides, profile=profile, variant=variant, fold=fold, seed=seed)
session.config

# %%
metrics = session.run()
{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

# %%
from IPython.display import Image, display

display(session.saved_config)
for figure in ("loss.png", "roc.png"):  # written by the stage
    if (session.out_dir / figure).is_file():
        display(Image(session.out_dir / figure))
