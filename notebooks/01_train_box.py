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
# # 01 · Train the box model (one fold × seed)
# `box_input_slices` consecutive windowed slices → has-box logit (`has_box_weight` × BCE on every
# slice) + C1–C7 box (`box_weight` × L1 only where a box exists), on the segmented studies. All folds and seeds:
# `python -m rsna22_utils run 01_train_box --folds 0 1 2 3 4 --seeds 0 1 2`

# %% tags=["parameters"]
profile = ""  # a profile of settings and sweeps, e.g. "original" (the 3rd place) or "demo"
variant = ""  # which of the profile's models of this stage, when it has several
fold = 0  # -1 = full data (no validation)
seed = 0
overrides = {}


# %%
import os
import sys
from pathlib import Path

# on Kaggle the kit comes from its utils dataset, whatever its slug: the input folder holding rsna22_utils/
sys.path[:0] = sorted(str(p.parent) for p in Path(os.environ.get("RSNA22_KIT_KAGGLE_INPUT", "/kaggle/input")).glob("*/rsna22_utils"))[:1]
from rsna22_utils.core.notebooks import start_stage

session = start_stage("01_train_box", overrides, profile=profile, variant=variant, fold=fold, seed=seed)
session.config

# %%
metrics = session.run()
{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

# %%
from IPython.display import Image, display

from rsna22_utils.cervical import qc
from rsna22_utils.cervical.box import box_examples
from rsna22_utils.cervical.qc import show_training_run

show_training_run(session)  # the config the run saved (derived values included) and its loss curves
images, predicted, true = box_examples(session.saved_config, n=8)
display(Image(qc.draw_boxes_grid(images, predicted, true, session.out_dir / "boxes.png")))
