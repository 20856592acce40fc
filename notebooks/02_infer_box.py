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
# # 02 · Infer the box model on every slice
# Every trained box model (all folds × seeds) on every slice of every study, averaged (with
# `out_of_fold`, a training study only gets the runs that did not train on it); per study
# one box around C1–C7 and the slice range where the spine starts and ends, by `box_rule`
# (`study_boxes.csv`: x0 y0 x1 y1 slnum_from slnum_to slnum_max).

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

session = start_stage("02_infer_box", overrides, profile=profile)
session.config

# %%
metrics = session.run()
{k: v for k, v in metrics.items() if k != "models"}

# %%
from IPython.display import Image, display

from rsna22_utils.cervical import qc
from rsna22_utils.cervical.study_box import BoxInference

out = BoxInference(session.out_dir)
display(out.read("study_boxes").head())
if out.path("box_eval").exists():  # synthetic data: true boxes of studies no box model saw
    evaluation = out.read("box_eval")
    display(Image(qc.plot_iou_histogram(evaluation["iou"], session.out_dir / "iou.png")))
