"""The RSNA 2022 pipeline: its stages, in order, registered with the kit (the one stage table).

    00_prepare          scan headers, folds, segmentation labels, study cache
    01_train_box        per-slice C1-C7 box model (one fold x seed)
    02_infer_box        all box models on every slice -> one box + slice range per study
    03_train_vertebra   2.5D CNN + BiLSTM on the vertebra ratio labels (one fold x seed)
    04_infer_vertebra   per-slice C1..C7 predictions for every train study -> slice fracture labels
    05_train_fracture   2.5D CNN + BiLSTM on box crops, 7 vertebra + 7 fracture targets
    06_train_study      frozen stage-05 CNN + BiLSTM/attention head on whole studies, metric as loss
    07_inference        the offline Kaggle submission

Adding a stage: its name as a constant and one `Stage` entry here (other modules import the name), one
config class (configs.py), one stage function, one notebook `notebooks/<name>.py`. Adding a command: an
`add_commands(subparsers)` in its module, listed in `COMMAND_MODULES`.
"""

from __future__ import annotations

from rsna22_utils.cervical import configs
from rsna22_utils.core.registry import Stage, register

# The stage names: the only place they are spelt (modules import these; profiles' JSON and the notebooks spell them too)
PREPARE = "00_prepare"
TRAIN_BOX = "01_train_box"
INFER_BOX = "02_infer_box"
TRAIN_VERTEBRA = "03_train_vertebra"
INFER_VERTEBRA = "04_infer_vertebra"
TRAIN_FRACTURE = "05_train_fracture"
TRAIN_STUDY = "06_train_study"
INFERENCE = "07_inference"

_PACKAGE = "rsna22_utils.cervical"

# The competition's command-line modules: the CLI calls `add_commands(subparsers)` of each (beside the core's).
COMMAND_MODULES: tuple[str, ...] = (
    f"{_PACKAGE}.commands",
    f"{_PACKAGE}.bench.decode",
    f"{_PACKAGE}.bench.epoch",
    f"{_PACKAGE}.bench.backbones",
    f"{_PACKAGE}.bench.cost",
    f"{_PACKAGE}.bench.inference",
    f"{_PACKAGE}.bench.train",
)
_NETWORK = f"{_PACKAGE}.models:create_network"
_PREVIEW = f"{_PACKAGE}.preview:preview_derived"

STAGES: tuple[Stage, ...] = tuple(
    register(stage, _PACKAGE)
    for stage in (
        Stage(PREPARE, configs.PrepareConfig, f"{_PACKAGE}.prepare:prepare", prepares=True),
        Stage(
            TRAIN_BOX,
            configs.BoxTrainConfig,
            f"{_PACKAGE}.box:train_box",
            per_fold=True,
            trains=True,
            submission=True,
            network=_NETWORK,
            preview=_PREVIEW,
        ),
        Stage(INFER_BOX, configs.BoxInferConfig, f"{_PACKAGE}.box:infer_box"),
        Stage(
            TRAIN_VERTEBRA,
            configs.VertebraTrainConfig,
            f"{_PACKAGE}.sequence:train_vertebra",
            per_fold=True,
            trains=True,
            network=_NETWORK,
            preview=_PREVIEW,
        ),
        Stage(INFER_VERTEBRA, configs.VertebraInferConfig, f"{_PACKAGE}.sequence:infer_vertebra"),
        Stage(
            TRAIN_FRACTURE,
            configs.FractureTrainConfig,
            f"{_PACKAGE}.sequence:train_fracture",
            per_fold=True,
            trains=True,
            network=_NETWORK,
            preview=_PREVIEW,
        ),
        Stage(
            TRAIN_STUDY,
            configs.StudyTrainConfig,
            f"{_PACKAGE}.study:train_study",
            per_fold=True,
            trains=True,
            submission=True,
            older_run_defaults={"slice_evidence": False},  # runs from before the stage-05 evidence hold no evidence layers
            network=_NETWORK,
            preview=_PREVIEW,
        ),
        Stage(INFERENCE, configs.SubmissionConfig, f"{_PACKAGE}.submission:predict_submission", kaggle_internet=False),
    )
)
