"""The config of each intracranial stage: only the fields that stage uses, composed from the core's field groups.

Defaults are the seed's values on a GPU (`profiles/original.json` names each model's); the demo profile
shrinks them for a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rsna22_utils.core.config import Backbone, Hardware, PreparedInput, StageConfig, TrainConfig, derived

INPUTS = ("triplet", "windows")  # three adjacent slices in one window | one slice in three windows
TTA = ("identity", "hflip", "rot-10", "rot10")


def _three_windows() -> list[list[float]]:
    return [[40.0, 80.0], [80.0, 200.0], [600.0, 2000.0]]  # brain, subdural, bone (level, width)


@dataclass
class PrepareConfig(StageConfig):
    """00_prepare: every image's header, study order by z, folds by patient, the head-cropped uint8 cache."""

    data_dir: str = "data/rsna-intracranial-hemorrhage-detection"  # stage_2_train.csv, stage_2_train/, stage_2_test/
    n_folds: int = 5
    fold_file: str = ""  # CSV with PatientID (or StudyInstanceUID) and fold; "" -> folds grouped by PatientID here
    split_seed: int = 42
    cache_size: int = 512  # px of the cached (square) head crop
    crop_border: int = 10  # px of the original image kept around the head
    head_threshold: float = -500.0  # HU above which a pixel is not air (the head is the largest such component)
    windows: list[list[float]] = field(default_factory=_three_windows)  # the 3-window input's (level, width) channels
    workers: int = 0  # processes that read and decode; 0 = all cores
    max_failed_images: int = 0  # images that may fail to read before the stage fails (its outputs are written either way)

    def _check(self) -> list[str]:
        out = []
        if self.n_folds < 2:
            out.append(f"n_folds must be >= 2, got {self.n_folds}")
        if self.cache_size < 16 or self.crop_border < 0:
            out.append(f"cache_size must be >= 16 and crop_border >= 0, got {self.cache_size}, {self.crop_border}")
        if len(self.windows) != 3 or any(len(w) != 2 or w[1] <= 0 for w in self.windows):
            out.append(f"windows must be three [level, width>0] pairs, got {self.windows}")
        return out


@dataclass
class ImageInput:
    """What a network sees: which input, at what size, and (triplets) the window applied when loading."""

    input: str = "triplet"  # triplet | windows
    image_size: int = 512
    triplet_window: list[float] = field(default_factory=lambda: [80.0, 200.0])  # subdural (level, width), all three channels
    # how the 00 cache was built (its spec.json), recorded so that inference rebuilds test images the same way
    cache_size: int = derived(512, source="the cache of 00_prepare")
    crop_border: int = derived(10, source="the cache of 00_prepare")
    head_threshold: float = derived(-500.0, source="the cache of 00_prepare")
    cache_windows: list[list[float]] = derived(source="the cache of 00_prepare", default_factory=_three_windows)

    def _check(self) -> list[str]:
        out = []
        if self.input not in INPUTS:
            out.append(f"input must be one of {', '.join(INPUTS)}, got {self.input!r}")
        if self.image_size < 16:
            out.append(f"image_size must be >= 16, got {self.image_size}")
        if len(self.triplet_window) != 2 or self.triplet_window[1] <= 0:
            out.append(f"triplet_window must be [level, width>0], got {self.triplet_window}")
        return out


@dataclass
class Augmentation:
    """The seed's training augmentation: horizontal flip, rotation, random resized crop."""

    hflip: float = 0.5  # probability
    rotate: float = 15.0  # degrees, uniform in [-rotate, rotate]
    crop_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.8, 1.2])

    def _check(self) -> list[str]:
        out = []
        if not 0 <= self.hflip <= 1 or self.rotate < 0:
            out.append(f"hflip must be in [0, 1] and rotate >= 0, got {self.hflip}, {self.rotate}")
        for name in ("crop_scale", "crop_ratio"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                out.append(f"{name} must be [low, high] with 0 < low <= high, got {low_high}")
        return out


@dataclass
class ClassifierTrainConfig(TrainConfig, Backbone, ImageInput, Augmentation):
    """01_train: one CNN per fold x seed on every image of the other folds, the metric as its loss."""

    backbone: str = "efficientnet_b0"
    drop_rate: float = 0.2  # dropout before the classifier
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2  # AdamW's default
    warmup_fraction: float = 0.0
    save: str = "best"
    monitor: str = "valid_loss"
    early_stopping_patience: int = 3
    max_valid_images: int = 0  # validate on this many images of the fold (0 = all), evenly spread over studies

    def _check(self) -> list[str]:
        return [] if 0 <= self.drop_rate < 1 and self.max_valid_images >= 0 else ["drop_rate must be in [0, 1), max_valid_images >= 0"]


@dataclass
class PredictConfig(StageConfig, PreparedInput, Hardware):
    """02_predict: every 01 run with TTA; each training image by the runs of its fold, the test images by the mean of the runs."""

    tta: list[str] = field(default_factory=lambda: list(TTA))
    batch_size: int = 64

    def _check(self) -> list[str]:
        unknown = [t for t in self.tta if t not in TTA]
        return [f"tta must be a non-empty list of {', '.join(TTA)}, got {self.tta}"] if unknown or not self.tta else []


@dataclass
class SmoothConfig(StageConfig, PreparedInput):
    """03_smooth: each image's prediction refined from its neighbours' in the study, fitted on the out-of-fold predictions."""

    neighbours: int = 2  # slices each side whose predictions are features (the study's edge repeats itself)
    regularisation: float = 1.0  # inverse L2 strength (sklearn's C) of the per-label logistic regressions
    data_dir: str = ""  # where stage_2_sample_submission.csv is ("" = the competition folder 00_prepare read)

    def _check(self) -> list[str]:
        return [] if self.neighbours >= 0 and self.regularisation > 0 else ["neighbours must be >= 0 and regularisation > 0"]


@dataclass
class InferenceConfig(StageConfig, Hardware):
    """04_inference: the offline Kaggle submission: test DICOMs -> head-cropped cache -> every 01 run with TTA -> smoothing."""

    data_dir: str = ""  # the competition folder with stage_2_test/ and the sample submission ("" = Kaggle's mount)
    weights_dir: str = ""  # folder holding 01_train/<run>/ and 03_smooth/smoothing.json ("" = work_dir)
    out: str = ""  # submission.csv to write ("" = {out_dir}/submission.csv)
    tta: list[str] = field(default_factory=lambda: list(TTA))
    batch_size: int = 64
    workers: int = 0  # processes that read and decode; 0 = all cores

    def _check(self) -> list[str]:
        unknown = [t for t in self.tta if t not in TTA]
        return [f"tta must be a non-empty list of {', '.join(TTA)}, got {self.tta}"] if unknown or not self.tta else []
