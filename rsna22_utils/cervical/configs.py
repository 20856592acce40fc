"""The config of each RSNA 2022 stage: only the fields that stage uses, composed from field groups.

Defaults suit a GPU run of each stage; the demo's CPU settings and the profiles change them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rsna22_utils.core.config import (
    Backbone,
    Hardware,
    PreparedInput,
    StageConfig,
    TrainConfig,
    derived,
    derived_fields,
)
from rsna22_utils.core.kaggle import mount_path
from rsna22_utils.core.paths import KAGGLE_WORKING


def _bone_window() -> list[list[float]]:
    return [[400.0, 1800.0]]


def _check_windows(windows: list[list[float]], image_size: int) -> list[str]:
    out = []
    if not windows or any(len(w) != 2 or w[1] <= 0 for w in windows):
        out.append(f"windows must be a non-empty list of [center, width>0], got {windows}")
    if image_size < 16:
        out.append(f"image_size must be >= 16, got {image_size}")
    return out


# ----------------------------------------------------------------------------- groups of this competition


@dataclass
class CacheInput:
    """Stages whose networks read the study cache: its size and windows, recorded for inference."""

    image_size: int = derived(256, source="the study cache of 00_prepare")
    windows: list[list[float]] = derived(source="the study cache of 00_prepare", default_factory=_bone_window)

    def _check(self) -> list[str]:
        return _check_windows(self.windows, self.image_size)


BOX_RULES = ("kit", "original")


@dataclass
class StudyBoxRule:
    """How per-slice box predictions become one study box and slice range (02 and the submission).

    `box_rule`: "kit" = slice range = the longest run of median-filtered (box_smooth) p_box >=
    has_box_threshold, box = 5 % / 95 % quantiles of the corners in that run; "original" = the
    3rd place's: box = min x0, y0 / max x1, y1 over slices with p_box > has_box_threshold, slice
    range = first / last slice where the centred rolling mean of p_box (range_window slices, at
    least range_window // 2 + 1 of them) exceeds range_threshold (the whole study if none does).
    """

    has_box_threshold: float = 0.5  # p(slice shows the spine) above which a slice belongs to the study box
    box_smooth: int = 5  # kit rule: median filter (slices) over p_box before thresholding
    box_rule: str = "kit"  # kit | original
    range_threshold: float = 0.1  # original rule: rolling-mean p_box above which a slice is inside the range
    range_window: int = 5  # original rule: slices of the centred rolling mean

    def _check(self) -> list[str]:
        out = []
        if not 0.0 < self.has_box_threshold < 1.0:
            out.append(f"has_box_threshold must be in (0, 1), got {self.has_box_threshold}")
        if self.box_rule not in BOX_RULES:
            out.append(f"box_rule must be one of {', '.join(BOX_RULES)}, got {self.box_rule!r}")
        if not 0.0 <= self.range_threshold < 1.0:
            out.append(f"range_threshold must be in [0, 1), got {self.range_threshold}")
        if self.range_window < 1:
            out.append(f"range_window must be >= 1, got {self.range_window}")
        return out


@dataclass
class SequenceShape:
    """The 2.5D CNN + BiLSTM: windows of `seq_len` images, each `slices_per_image` adjacent slices.

    With `outputs_per_slice`, each image's CNN embedding is repeated for each of its slices, so the
    BiLSTM steps (and outputs, and targets) are slices, not images; `position_embedding` /
    `channel_embedding` add sinusoidal features of each step's slice position (in the study, or in
    the window: `position_of`) and of which slice of its image it is (per-slice steps only).
    """

    seq_len: int = 32  # images per sequence; a window spans seq_len * slices_per_image slices
    slices_per_image: int = 3  # adjacent slices stacked as the channels of one image (x windows)
    lstm_hidden: int = 256  # BiLSTM hidden size; 0 = its input size (CNN features + embeddings)
    head_dropout: float = 0.1  # dropout between the BiLSTM and the output layer
    outputs_per_slice: bool = False  # one BiLSTM step and output per slice instead of per image
    position_embedding: int = 0  # size of the sinusoidal slice-position embedding (0 = none)
    channel_embedding: int = 0  # size of the sinusoidal slice-within-image embedding (0 = none; needs outputs_per_slice)
    # study: the slice's relative position in the study (0..200); window: its step in the window
    # (what a fairseq-style sinusoidal embedding, which numbers its inputs' steps, makes of any input)
    position_of: str = "study"

    def _check(self) -> list[str]:
        out = []
        if self.seq_len < 1 or self.slices_per_image < 1:
            out.append(f"seq_len and slices_per_image must be >= 1, got {self.seq_len}, {self.slices_per_image}")
        if self.lstm_hidden < 0:
            out.append(f"lstm_hidden must be >= 0 (0 = the BiLSTM's input size), got {self.lstm_hidden}")
        if not 0.0 <= self.head_dropout < 1.0:
            out.append(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        for name in ("position_embedding", "channel_embedding"):
            size = getattr(self, name)
            if size < 0 or size % 2:
                out.append(f"{name} must be an even size >= 0 (half sines, half cosines), got {size}")
        if self.channel_embedding and not self.outputs_per_slice:
            out.append(f"channel_embedding={self.channel_embedding} needs outputs_per_slice=true (a step is then one slice of an image)")
        if self.position_of not in ("study", "window"):
            out.append(f"position_of must be 'study' or 'window', got {self.position_of!r}")
        return out


@dataclass
class SequenceLoss:
    """The sequence stages' per-step loss: BCE on logits, or MSE on raw outputs (read clipped to [0, 1])."""

    loss: str = "bce"  # bce | mse
    positive_weight: float = 1.0  # mse only: squared errors where the target is not 0 count this many times

    def _check(self) -> list[str]:
        out = []
        if self.loss not in ("bce", "mse"):
            out.append(f"loss must be 'bce' or 'mse', got {self.loss!r}")
        if self.positive_weight <= 0:
            out.append(f"positive_weight must be > 0, got {self.positive_weight}")
        elif self.loss == "bce" and self.positive_weight != 1.0:
            out.append(f"positive_weight={self.positive_weight} applies to loss='mse' only (with bce, 05 has fracture_pos_weight)")
        return out


AUGMENTATIONS = ("light", "original")
INTENSITIES = ("window", "minmax")
WINDOW_SAMPLINGS = ("random", "every")


def _unit_norm() -> list[float]:
    return [0.5]


@dataclass
class Augmentation:
    """How training images are augmented (`data.box_augmentation` / `data.sequence_augmentation`)."""

    # light: mild affine + brightness/contrast | original: the 3rd place's hflip, shift/scale/rotate and
    # contrast (+ grid distortion and cutout holes on sequences)
    augment: str = "light"

    def _check(self) -> list[str]:
        return [] if self.augment in AUGMENTATIONS else [f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}"]


@dataclass
class Intensity:
    """How cached uint8 pixels become network inputs (`data.InputNorm`); saved with the run so inference repeats it.

    Input = (pixels / 255 - norm_mean) / norm_std per channel (one value = every channel); the
    defaults give pixels / 127.5 - 1.
    """

    intensity: str = "window"  # window: the cache's windowed pixels | minmax: each image (crop) and channel stretched to 0-255 first
    norm_mean: list[float] = field(default_factory=_unit_norm)  # per input channel, or one for all
    norm_std: list[float] = field(default_factory=_unit_norm)

    def _check(self) -> list[str]:
        out = []
        if self.intensity not in INTENSITIES:
            out.append(f"intensity must be one of {', '.join(INTENSITIES)}, got {self.intensity!r}")
        if not self.norm_mean or len(self.norm_mean) != len(self.norm_std):
            out.append(f"norm_mean and norm_std need the same number (>= 1) of values, got {self.norm_mean} and {self.norm_std}")
        if any(s <= 0 for s in self.norm_std):
            out.append(f"norm_std must be > 0, got {self.norm_std}")
        return out


@dataclass
class SequenceSampling:
    """Training windows of the sequence stages, and the validation windows' stride."""

    # random: samples_per_study random windows per study and epoch | every: each epoch visits every window
    # that starts at a slice divisible by window_step, plus the first and the last window of each study
    window_sampling: str = "random"
    samples_per_study: int = 2  # random training windows per study and epoch (window_sampling=random)
    positive_window_bias: float = 0.5  # probability that a random training window holds a positive slice
    window_step: int = 12  # slices between the starts of training windows (window_sampling=every)
    # > 0: each study's window_step is round(window_step_range / its C1-C7 slice count), the slice range
    # of its 02_infer_box study box (then 02 runs before this stage); 0 = window_step for every study
    window_step_range: float = 0.0
    # probability that a training window takes every d-th slice (d drawn from 2..slice_skip_max, at most
    # what the rest of the study holds) instead of adjacent ones; 0 = never
    slice_skip_p: float = 0.0
    slice_skip_max: int = 4
    infer_stride: int = 48  # slices between consecutive validation windows (overlaps are averaged)

    def _check(self) -> list[str]:
        out = []
        if self.window_sampling not in WINDOW_SAMPLINGS:
            out.append(f"window_sampling must be one of {', '.join(WINDOW_SAMPLINGS)}, got {self.window_sampling!r}")
        if not 0.0 <= self.positive_window_bias <= 1.0:
            out.append(f"positive_window_bias must be in [0, 1], got {self.positive_window_bias}")
        if self.window_step < 1:
            out.append(f"window_step must be >= 1, got {self.window_step}")
        if self.window_step_range < 0:
            out.append(f"window_step_range must be >= 0, got {self.window_step_range}")
        if not 0.0 <= self.slice_skip_p <= 1.0:
            out.append(f"slice_skip_p must be in [0, 1], got {self.slice_skip_p}")
        if self.slice_skip_max < 2:
            out.append(f"slice_skip_max must be >= 2, got {self.slice_skip_max}")
        span = getattr(self, "seq_len", 1) * getattr(self, "slices_per_image", 1)
        if not 1 <= self.infer_stride <= span:
            out.append(f"infer_stride must be in [1, seq_len * slices_per_image = {span}], got {self.infer_stride}")
        return out


@dataclass
class BoxCrop:
    """Sequence inputs cropped to the study box of 02_infer_box."""

    crop_by_box: bool = True  # crop every slice to the study box
    crop_margin: float = 0.1  # fraction of the box size added on each side of the crop
    crop_size: int = 256  # crops are resized to crop_size x crop_size
    # where crops come from: "cache" = cut from the 00 study cache (image_size px, box as is);
    # "native" = the crop cache (cervical.crops): squared box at the DICOM's resolution, built on first use
    crop_source: str = "cache"
    crop_square: bool = False  # crop_source=cache: the squared box of the native crops (`geometry.square_crop`); native crops always are

    def _check(self) -> list[str]:
        out = []
        if self.crop_source not in ("cache", "native"):
            out.append(f"crop_source must be 'cache' or 'native', got {self.crop_source!r}")
        if self.crop_margin < 0:
            out.append(f"crop_margin must be >= 0, got {self.crop_margin}")
        return out


# ----------------------------------------------------------------------------- stages


@dataclass
class PrepareConfig(StageConfig):
    """00_prepare: headers, folds, segmentation labels and the decoded study cache (image_size px, one channel per window)."""

    data_dir: str = "data/competition"  # competition folder (train.csv, train_images/, segmentations/ ...)
    n_folds: int = 5
    fold_file: str = ""  # a fold file to use (e.g. the 3rd place's train_folded_v01.csv); "" -> balanced split
    split_seed: int = 42  # seed of the fold split (when no fold_file is given)
    image_size: int = 256
    windows: list[list[float]] = field(default_factory=_bone_window)  # HU (center, width) per cache channel
    workers: int = 0  # processes that decode studies; 0 = all cores
    # studies that may fail to scan or decode before the stage fails (its outputs are written either way)
    max_failed_studies: int = 0
    # a study keeps up to this fraction of files whose header cannot be read (or of another slice size) out,
    # each named in slices.dropped.csv, rather than fail (as 07_inference's max_dropped_slices)
    max_dropped_slices: float = 0.1
    drop_studies: list[str] = field(default_factory=list)  # train studies left out of the folds and labels every stage trains on

    def _check(self) -> list[str]:
        out = _check_windows(self.windows, self.image_size)
        if self.n_folds < 2:
            out.append(f"n_folds must be >= 2, got {self.n_folds}")
        if not 0.0 <= self.max_dropped_slices < 1.0:
            out.append(f"max_dropped_slices must be in [0, 1), got {self.max_dropped_slices}")
        return out


@dataclass
class BoxTrainConfig(TrainConfig, Backbone, CacheInput, Augmentation, Intensity):
    """01_train_box: 2D model that says, per axial slice, whether C1-C7 are visible and where."""

    backbone: str = "mobilenetv3_small_050"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    box_weight: float = 5.0  # weight of the L1 box loss (slices with a box)
    has_box_weight: float = 1.0  # weight of the has-box BCE (every slice)
    # consecutive slices centred on the predicted one (clamped at the study's ends), stacked as the
    # input channels (x windows); 02 and the submission read it from the run's config
    box_input_slices: int = 1

    def _check(self) -> list[str]:
        out = []
        if self.box_input_slices < 1 or self.box_input_slices % 2 == 0:
            out.append(f"box_input_slices must be odd and >= 1 (centred on the predicted slice), got {self.box_input_slices}")
        if self.box_weight < 0 or self.has_box_weight < 0 or self.box_weight + self.has_box_weight == 0:
            out.append(f"box_weight and has_box_weight must be >= 0, not both 0, got {self.box_weight}, {self.has_box_weight}")
        return out


@dataclass
class BoxInferConfig(StageConfig, PreparedInput, Hardware, StudyBoxRule):
    """02_infer_box: every box run on every slice -> one box + slice range per study."""

    data_dir: str = "data/competition"  # read for the synthetic generator's truth (box_eval.csv), when present
    infer_batch_size: int = 128
    # a training study of fold f gets only the box runs that did not train on it (those of fold f);
    # false: every run on every study (fold -1 runs included), so training studies get in-sample boxes
    out_of_fold: bool = True


@dataclass
class VertebraTrainConfig(
    TrainConfig, Backbone, CacheInput, SequenceShape, SequenceSampling, SequenceLoss, BoxCrop, Augmentation, Intensity
):
    """03_train_vertebra: CNN over slice windows + BiLSTM -> per-slice C1..C7 ratios."""

    backbone: str = "efficientnet_b0"
    crop_by_box: bool = False  # whole slices; true = the study box of 02_infer_box (then 02 runs before 03)

    def _check(self) -> list[str]:
        if self.crop_source != "cache":
            return [f"crop_source must be 'cache' for 03_train_vertebra (its crops come from the study cache), got {self.crop_source!r}"]
        return []

    epochs: int = 15
    batch_size: int = 8
    lr: float = 3e-4


@dataclass
class VertebraInferConfig(StageConfig, PreparedInput, Hardware):
    """04_infer_vertebra: every vertebra run over overlapping windows -> per-slice predictions and fracture labels."""

    infer_stride: int = 48  # slices between consecutive windows (overlaps are averaged)
    infer_batch_size: int = 4  # windows per batch
    # rescale each study's vertebra predictions to peak 1 before they become fracture labels
    rescale_pseudo_labels: bool = True
    # predict each study only with the runs that did not train on its fold (else with every run: in-sample
    # pseudo-labels for the studies a run trained on)
    out_of_fold: bool = True

    def _check(self) -> list[str]:
        return [f"infer_stride must be >= 1, got {self.infer_stride}"] if self.infer_stride < 1 else []


@dataclass
class FractureTrainConfig(
    TrainConfig, Backbone, CacheInput, SequenceShape, SequenceSampling, SequenceLoss, BoxCrop, Augmentation, Intensity
):
    """05_train_fracture: the sequence model on box crops, 7 vertebra + 7 fracture targets."""

    backbone: str = "efficientnet_b0"
    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-4
    fracture_loss_weight: float = 1.0  # weight of the 7 fracture targets vs the 7 vertebra targets (rare, faint)
    fracture_pos_weight: float = 1.0  # BCE pos_weight of the fracture targets (a break image vs a normal one)
    # start the CNN from a stage-03 run's CNN ("" = from `pretrained`); "vertebra" = the 03_train_vertebra
    # run of the same fold and seed, else a run folder
    init_encoder_from: str = ""
    any_fracture_head: bool = False  # an 8th fracture output per step: any vertebra broken (target: max of the 7)

    def _check(self) -> list[str]:
        if self.fracture_loss_weight <= 0 or self.fracture_pos_weight <= 0:
            return [
                f"fracture_loss_weight and fracture_pos_weight must be > 0, got {self.fracture_loss_weight}, {self.fracture_pos_weight}"
            ]
        return []


_FROM_05 = "its stage-05 run (fracture_run)"


@dataclass
class StudyTrainConfig(TrainConfig, CacheInput, Augmentation):
    """06_train_study: the stage-05 CNN (frozen) embeds every slice; a BiLSTM + attention reads the whole study."""

    fracture_run: str = ""  # the stage-05 run whose CNN is frozen; "" -> that of the same variant, fold and seed
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    monitor: str = "metric"
    max_len: int = 192  # images per study after resampling (longer sequences are interpolated)
    lstm_hidden: int = 256  # the head's BiLSTM hidden size; 0 = the CNN's feature size
    # attention pooling: mlp (Linear-Tanh-Linear per step) | linear (one projection + a bias per step, tanh)
    attention: str = "mlp"
    dropout: float = 0.2
    infer_batch_size: int = 4  # windows of seq_len images per embedding batch
    save_embeddings: bool = False  # keep the frozen CNN's embeddings in {out_dir}/embeddings.npz
    # add each target's evidence from the frozen stage-05 BiLSTM + head (its largest fracture logit
    # over the study) to the new head's logits, fitted by logistic regression before training
    slice_evidence: bool = True
    # the studies the evidence weights are fitted on, as which stage-05 run sees them: "in_sample" = the
    # training studies through this fold's 05 run, which trained on them (their evidence is stronger than
    # that of the new studies the weights are applied to: overconfident); "out_of_fold" = each training
    # study through the 05 run of its own fold, which never saw it (needs that run for every training fold)
    evidence_fit: str = "in_sample"
    slice_margin: int = 0  # slices embedded before slnum_from and after slnum_to (the study box's slice range)
    # re-embed each training study's images with the frozen CNN at every step, augmented (as the 3rd place
    # did), instead of embedding every study once before training (false: fast, no augmentation)
    embed_on_the_fly: bool = False
    frozen_bn_update: bool = False  # the frozen CNN's batch-norm statistics keep updating in training (embed_on_the_fly)
    cnn_chunk_size: int = 64  # images per frozen-CNN forward when embedding on the fly (bounds memory)
    # the frozen CNN and how it sees images: those of the stage-05 run, so that this config alone rebuilds the model
    backbone: str = derived("resnet18", source=_FROM_05)
    seq_len: int = derived(32, source=_FROM_05)
    slices_per_image: int = derived(3, source=_FROM_05)
    crop_by_box: bool = derived(True, source=_FROM_05)
    crop_margin: float = derived(0.1, source=_FROM_05)
    crop_size: int = derived(256, source=_FROM_05)
    crop_source: str = derived("cache", source=_FROM_05)
    crop_square: bool = derived(False, source=_FROM_05)
    intensity: str = derived("window", source=_FROM_05)
    norm_mean: list[float] = derived(source=_FROM_05, default_factory=_unit_norm)
    norm_std: list[float] = derived(source=_FROM_05, default_factory=_unit_norm)
    fracture_lstm_hidden: int = derived(256, source=_FROM_05)
    outputs_per_slice: bool = derived(False, source=_FROM_05)
    position_embedding: int = derived(0, source=_FROM_05)
    channel_embedding: int = derived(0, source=_FROM_05)
    position_of: str = derived("study", source=_FROM_05)
    any_fracture_head: bool = derived(False, source=_FROM_05)

    def _check(self) -> list[str]:
        out = [f"max_len must be >= 1, got {self.max_len}"] if self.max_len < 1 else []
        if self.slice_margin < 0:
            out.append(f"slice_margin must be >= 0, got {self.slice_margin}")
        if self.cnn_chunk_size < 1:
            out.append(f"cnn_chunk_size must be >= 1, got {self.cnn_chunk_size}")
        if self.frozen_bn_update and not self.embed_on_the_fly:
            out.append("frozen_bn_update=true needs embed_on_the_fly=true (precomputed embeddings never run the CNN in training)")
        if self.lstm_hidden < 0:
            out.append(f"lstm_hidden must be >= 0 (0 = the CNN's feature size), got {self.lstm_hidden}")
        if self.attention not in ("mlp", "linear"):
            out.append(f"attention must be 'mlp' or 'linear', got {self.attention!r}")
        if self.evidence_fit not in ("in_sample", "out_of_fold"):
            out.append(f"evidence_fit must be 'in_sample' or 'out_of_fold', got {self.evidence_fit!r}")
        return out


@dataclass
class SubmissionConfig(StageConfig, Hardware, StudyBoxRule):
    """07_inference: the Kaggle submission notebook (offline, time-budgeted)."""

    # where Kaggle mounts the competition and the weights dataset (slugs of kaggle-settings.json)
    data_dir: str = field(default_factory=lambda: str(mount_path("competition")))
    weights_dir: str = field(default_factory=lambda: str(mount_path("weights")))  # every run the submission loads
    work_dir: str = KAGGLE_WORKING
    out: str = f"{KAGGLE_WORKING}/submission.csv"
    time_budget_hours: float = 8.0  # stop refining and write the fallback rows before this
    tta_flip: bool = True
    box_batch_size: int = 128
    sequence_batch_size: int = 4
    max_dropped_slices: float = 0.1  # a study with up to this fraction of unreadable slices is predicted from the rest
    dicom_backend: str = "auto"  # auto (dicomsdl, pydicom fallback per file) | dicomsdl | pydicom
    # more failed test studies (unreadable, unpredictable, no folder) than this fraction, or all of them,
    # fail the run instead of submitting priors; fewer get the prior each
    max_failed_fraction: float = 0.05
    # models loaded (0 = every serving run): fewer, chosen in advance, when the whole ensemble would not
    # fit Kaggle's 9 h (`bench-inference --profile`); variants take turns (ensemble.runs_in_variant_turns)
    max_box_models: int = 0
    max_study_models: int = 0
    # a serving run that the weights' manifest.json (or the runner's _runs.json) lists but the folder lacks fails
    # the run before the first study; true: submit without it (one warning naming it, noted in the summary)
    allow_missing_models: bool = False

    def _check(self) -> list[str]:
        out = []
        if self.max_box_models < 0 or self.max_study_models < 0:
            out.append(f"max_box_models and max_study_models must be >= 0 (0 = all), got {self.max_box_models}, {self.max_study_models}")
        if self.time_budget_hours <= 0:
            out.append(f"time_budget_hours must be > 0, got {self.time_budget_hours}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            out.append(f"max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        if not 0.0 <= self.max_dropped_slices < 1.0:
            out.append(f"max_dropped_slices must be in [0, 1), got {self.max_dropped_slices}")
        if self.dicom_backend not in ("auto", "dicomsdl", "pydicom"):
            out.append(f"dicom_backend must be auto, dicomsdl or pydicom, got {self.dicom_backend!r}")
        return out


# ----------------------------------------------------------------------------- what 06 takes from 05


def settings_from_fracture_run(fracture: FractureTrainConfig) -> dict:
    """What a stage-06 config records of the stage-05 run it freezes (its fields derived from that run),
    so that its config alone rebuilds the model and repeats how the CNN saw images."""
    names = [name for name, source in derived_fields(StudyTrainConfig).items() if source == _FROM_05 and name != "fracture_lstm_hidden"]
    return {**{name: getattr(fracture, name) for name in names}, "fracture_lstm_hidden": int(fracture.lstm_hidden)}
