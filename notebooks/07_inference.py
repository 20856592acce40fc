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
# # 07 · Inference: the Kaggle submission
# Every test study is decoded (dicomsdl) and windowed by background workers while the models run:
# all box models → study box and C1–C7 slice range → box crops, 3 slices per image → every study
# model (frozen stage-05 CNN + study head), mean of probabilities (+ horizontal flip).
# Before the first study the run fails loudly, with one message, when a decoder the test studies
# need, the weights dataset, a model, or the self-test (every model on a synthetic study of real
# size) fails. After that a study that cannot be read gets the train prevalence, unless more than
# `max_failed_fraction` of the studies fail; the time budget picks full / one model / the prior
# before each study. The last line sums up: studies in full / reduced / prior, and why.
# Locally: `python -m rsna22_utils predict --data-dir D --weights runs --out submission.csv`

# %% tags=["parameters"]
profile = ""  # a profile of settings, e.g. "original" (the 3rd place) or "demo"
overrides = {}

# %%
import os
import sys
import time
from pathlib import Path

# on Kaggle the kit comes from its utils dataset, whatever its slug: the input folder holding rsna22_utils/
sys.path[:0] = sorted(str(p.parent) for p in Path(os.environ.get("RSNA22_KIT_KAGGLE_INPUT", "/kaggle/input")).glob("*/rsna22_utils"))[:1]
from rsna22_utils import setup_logging
from rsna22_utils.core.kaggle import mount_path
from rsna22_utils.core.notebooks import start_stage
from rsna22_utils.core.wheels import install_wheels

setup_logging()
# offline: the DICOM decoders of the wheels dataset, one wheel at a time (before anything imports a decoder);
# a decoder the test set needs and still lacks stops the run before the first study
install_wheels(mount_path("wheels") / "wheels")
session = start_stage("07_inference", overrides, profile=profile)
session.config

# %%
started = time.perf_counter()
submission = session.run()
print(f"{len(submission)} rows -> {session.config.out} in {time.perf_counter() - started:.1f} s; {submission.attrs['summary']}")
submission.head(16)
