"""The RSNA 2019 intracranial haemorrhage pipeline: its stages, in order, registered with the kit.

    00_prepare   headers of every image, studies ordered by z, folds by patient, the head-cropped uint8 cache
    01_train     one slice classifier per fold x seed (variants: the seed's five CNN families)
    02_predict   every run with TTA: training images out of fold, test images by the mean of the runs
    03_smooth    slice-position smoothing fitted on the out-of-fold predictions -> submission.csv
    04_inference the offline Kaggle submission: test DICOMs -> cache -> runs with TTA -> smoothing

Notebooks: `notebooks/intracranial/<stage>.py`.
"""

from __future__ import annotations

from rsna22_utils.core.paths import NOTEBOOKS_DIR
from rsna22_utils.core.registry import Stage, register
from rsna22_utils.intracranial import configs

_PACKAGE = "rsna22_utils.intracranial"

# Each stage's name, spelt here only: every other module names a stage through these.
PREPARE = "00_prepare"
TRAIN = "01_train"
PREDICT = "02_predict"
SMOOTH = "03_smooth"
INFERENCE = "04_inference"
_NOTEBOOKS = NOTEBOOKS_DIR / "intracranial"

# The competition's command-line modules: the CLI calls `add_commands(subparsers)` of each (beside the core's).
COMMAND_MODULES: tuple[str, ...] = (f"{_PACKAGE}.commands",)

STAGES: tuple[Stage, ...] = tuple(
    register(stage, _PACKAGE)
    for stage in (
        Stage(PREPARE, configs.PrepareConfig, f"{_PACKAGE}.prepare:prepare", prepares=True, notebooks_dir=_NOTEBOOKS),
        Stage(
            TRAIN,
            configs.ClassifierTrainConfig,
            f"{_PACKAGE}.train:train_classifier",
            per_fold=True,
            trains=True,
            submission=True,
            network=f"{_PACKAGE}.models:untrained_network",
            notebooks_dir=_NOTEBOOKS,
        ),
        Stage(PREDICT, configs.PredictConfig, f"{_PACKAGE}.predict:predict", notebooks_dir=_NOTEBOOKS),
        Stage(SMOOTH, configs.SmoothConfig, f"{_PACKAGE}.smooth:smooth", notebooks_dir=_NOTEBOOKS, submission_files=("smoothing.json",)),
        Stage(INFERENCE, configs.InferenceConfig, f"{_PACKAGE}.inference:infer", kaggle_internet=False, notebooks_dir=_NOTEBOOKS),
    )
)
