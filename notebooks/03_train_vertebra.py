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
# # 03 · Train the slice vertebra model (one fold × seed)
# 2.5D CNN + BiLSTM over sequences of 32 images (3 adjacent slices as channels), trained on the per-slice vertebra ratios of the segmented
# studies.
# All folds and seeds: `python -m rsna22_utils run 03_train_vertebra --folds 0 1 2 3 4 --seeds 0 1 2`

# %% tags=["parameters"]
fold = 0
seed = 0
overrides = {}


# %%
try:
    from rsna22_utils.core.notebooks import start_stage
except ImportError:  # on Kaggle: the kit's utils dataset
    import sys

    sys.path.insert(0, "/kaggle/input/rsna22-utils")
    from rsna22_utils.core.notebooks import start_stage

session = start_stage("03_train_vertebra", overrides, fold=fold, seed=seed)
session.config

# %%
metrics = session.run()
{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

# %%
session.saved_config

# %%
from IPython.display import Image, display

from rsna22_utils.cervical import qc

out = session.out_dir
display(Image(qc.plot_loss_curves({out.name: out / "history.csv"}, out / "loss.png")))
