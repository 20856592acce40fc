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
# # 05 · Train the slice fracture model (one fold × seed)
# The same 2.5D CNN + BiLSTM on sequences cropped by the study box, trained on 14 per-slice targets: the vertebra predictions of 04 and the approximate fracture labels (prediction × the study's fracture label).
# All folds and seeds: `python -m rsna22_utils run 05_train_fracture --folds 0 1 2 3 4 --seeds 0 1 2`

# %% tags=["parameters"]
fold = 0
seed = 0
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
cfg = resolve_config("05_train_fracture", {**overrides, "fold": fold, "seed": seed})
cfg

# %%
metrics = run_stage_function("05_train_fracture", cfg)
{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

# %%
out = Path(cfg.out_dir)
display(Image(qc.plot_loss_curves({f"fold{fold}-seed{seed}": out / "history.csv"}, out / "loss.png")))
