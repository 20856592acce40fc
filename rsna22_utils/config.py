"""One typed configuration system for every stage of the pipeline.

A stage (``00_prepare`` .. ``07_inference``) is a dataclass whose defaults suit it; a run is that
dataclass with a few overrides. The same call serves the CLI, notebooks and the runner:

    cfg = resolve_config("01_train_box", {"epochs": 1, "fold": 0})           # notebooks / runner
    cfg = resolve_config("01_train_box", parse_overrides(["epochs=1"]))     # CLI `-p epochs=1`

Overrides are coerced by the field's annotation (``"3"`` -> 3 for an int field, ``"true"`` -> True,
``"[[400,1800]]"`` -> [[400.0, 1800.0]]); an unknown key is an error that suggests close matches.
``out_dir`` is derived when empty: ``{work_dir}/{stage}/fold{fold}-seed{seed}`` for per-fold stages
(``PER_FOLD_STAGES``), ``{work_dir}/{stage}`` otherwise; ``prepared_dir`` (what 00_prepare wrote) is
``{work_dir}/00_prepare`` when empty, so one ``work_dir`` (the runner's ``--work-dir``) locates every stage.

Batch size convention: ``batch_size`` is the GLOBAL batch of one optimizer step. The trainer splits it
into ``grad_accum`` micro-steps on each of ``world_size`` processes, so the micro-batch is
``batch_size // (grad_accum * world_size)``; ``resolve_config`` requires ``batch_size % grad_accum == 0``
and the trainer checks divisibility by ``grad_accum * world_size`` once the world size is known.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import logging
import os
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KAGGLE_COMPETITION_DIR = "/kaggle/input/rsna-2022-cervical-spine-fracture-detection"
KAGGLE_WEIGHTS_DIR = "/kaggle/input/rsna22-weights"  # the weights dataset (kaggle-settings.json weights_dataset)
KAGGLE_WORKING_DIR = "/kaggle/working"


class ConfigError(ValueError):
    """A configuration value or key is invalid (the message says which and what is allowed)."""


def _bone_window() -> list[list[float]]:
    return [[400.0, 1800.0]]


@dataclass
class RunConfig:
    """Fields shared by every stage: paths, fold / seed, device, optimisation, model, checkpointing."""

    stage: str = ""
    # paths
    data_dir: str = "data/competition"  # competition folder (train.csv, train_images/, segmentations/ ...)
    prepared_dir: str = ""  # outputs of 00_prepare (labels, folds, study cache); "" -> {work_dir}/00_prepare
    work_dir: str = "runs"  # every stage writes under {work_dir}/{stage}
    out_dir: str = ""  # "" -> derived (see module docstring)
    # split
    fold: int = 0
    seed: int = 0
    n_folds: int = 5
    fold_file: str = ""  # a fold file to use (e.g. the 3rd place's train_folded_v01.csv); "" -> stratified split
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision, only ever used on CUDA (bf16 when supported, else fp16 + GradScaler)
    channels_last: bool = False
    num_workers: int = 2
    # optimisation
    epochs: int = 10
    batch_size: int = 32  # GLOBAL batch of one optimizer step (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05  # fraction of all optimizer steps with linear warm-up, then cosine
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    max_steps_per_epoch: int = 0  # optimizer steps per epoch; 0 = the whole train set
    # model
    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_path: str = ""  # offline timm weights file (Kaggle has no internet)
    image_size: int = 256  # slices of the study cache (set by 00_prepare; later stages use the cache's)
    windows: list[list[float]] = field(default_factory=_bone_window)  # HU (center, width) per cache channel
    # validation / checkpoints
    monitor: str = "valid_loss"  # a key of the epoch metrics (train_loss, valid_loss or one of Task.score)
    monitor_mode: str = "min"  # min | max
    save: str = "last"  # last | best: which epoch's weights and OOF predictions are kept
    valid_loss: bool = True  # also compute Task.loss on the validation set (one more forward per batch)
    resume: bool = True  # continue from {out_dir}/checkpoint.pt when present

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError when values are inconsistent (called by resolve_config / load_config)."""
        problems: list[str] = []
        if self.n_folds < 2:
            problems.append(f"n_folds must be >= 2, got {self.n_folds}")
        if not 0 <= self.fold < self.n_folds:
            problems.append(f"fold must be in [0, n_folds={self.n_folds}), got {self.fold}")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append(f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        elif self.batch_size % self.grad_accum:
            problems.append(
                f"batch_size ({self.batch_size}) is the global batch and must be divisible by grad_accum ({self.grad_accum})"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("lr must be > 0, weight_decay and grad_clip >= 0")
        if self.max_steps_per_epoch < 0 or self.num_workers < 0:
            problems.append("max_steps_per_epoch and num_workers must be >= 0")
        if self.monitor_mode not in ("min", "max"):
            problems.append(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")
        if self.save not in ("last", "best"):
            problems.append(f"save must be 'last' or 'best', got {self.save!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            problems.append(f"device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
        if not self.windows or any(len(w) != 2 or w[1] <= 0 for w in self.windows):
            problems.append(f"windows must be a non-empty list of [center, width>0], got {self.windows}")
        if self.image_size < 16:
            problems.append(f"image_size must be >= 16, got {self.image_size}")
        problems += self._validate_stage()
        if problems:
            raise ConfigError(f"invalid {type(self).__name__} for stage {self.stage!r}: " + "; ".join(problems))

    def _validate_stage(self) -> list[str]:
        return []


@dataclass
class PrepareConfig(RunConfig):
    """00_prepare: labels, folds and the decoded study cache (image_size x image_size, one channel per window)."""

    stage: str = "00_prepare"
    image_size: int = 256
    workers: int = 0  # processes that decode studies; 0 = all cores
    split_seed: int = 42  # seed of the stratified fold split (when no fold_file is given)


@dataclass
class BoxConfig(RunConfig):
    """01_train_box / 02_infer_box: 2D model that says, per axial slice, whether C1-C7 are visible and where."""

    stage: str = "01_train_box"
    backbone: str = "mobilenetv3_small_050"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    has_box_threshold: float = 0.5  # p(slice shows the spine) above which a slice belongs to the study box
    box_smooth: int = 5  # median filter (slices) over p_box before thresholding
    box_weight: float = 5.0  # weight of the box regression loss vs. the has-box loss
    infer_batch_size: int = 128

    def _validate_stage(self) -> list[str]:
        out = []
        if not 0.0 < self.has_box_threshold < 1.0:
            out.append(f"has_box_threshold must be in (0, 1), got {self.has_box_threshold}")
        return out


@dataclass
class SequenceConfig(RunConfig):
    """03_train_vertebra / 04_infer_vertebra / 05_train_fracture: CNN over slice windows + LSTM over the sequence."""

    stage: str = "03_train_vertebra"
    task: str = "vertebra"  # vertebra | fracture
    backbone: str = "efficientnet_b0"
    epochs: int = 15
    batch_size: int = 8
    lr: float = 3e-4
    seq_len: int = 32  # images per sequence; a window spans seq_len * slices_per_image slices
    slices_per_image: int = 3  # adjacent slices stacked as the channels of one image (x windows)
    samples_per_study: int = 2  # random training windows per study and epoch
    crop_by_box: bool = True  # crop every slice to the study box of 02_infer_box (05 only)
    crop_margin: float = 0.1  # fraction of the box size added on each side of the crop
    crop_size: int = 256  # crops are resized to crop_size x crop_size
    lstm_hidden: int = 256
    positive_window_bias: float = 0.5  # probability that a training window holds a positive slice
    fracture_loss_weight: float = 1.0  # 05: weight of the 7 fracture targets vs the 7 vertebra targets (rare, faint)
    fracture_pos_weight: float = 1.0  # 05: BCE pos_weight of the fracture targets (a break image vs a normal one)
    # 05: start the CNN from a stage-03 run's CNN ("" = from `pretrained`); "vertebra" = the
    # 03_train_vertebra run of the same fold and seed, else a run folder. Without ImageNet weights
    # (offline, CPU demo) a CNN that already knows the anatomy learns the breaks much sooner.
    init_encoder_from: str = ""
    infer_stride: int = 48  # slices between consecutive inference windows (overlaps are averaged)
    infer_batch_size: int = 4  # windows per inference batch

    def _validate_stage(self) -> list[str]:
        out = []
        if self.task not in ("vertebra", "fracture"):
            out.append(f"task must be 'vertebra' or 'fracture', got {self.task!r}")
        if self.seq_len < 1 or self.slices_per_image < 1 or not 1 <= self.infer_stride <= self.seq_len * self.slices_per_image:
            out.append("seq_len, slices_per_image >= 1 and 1 <= infer_stride <= seq_len * slices_per_image required")
        if self.fracture_loss_weight <= 0 or self.fracture_pos_weight <= 0:
            out.append(f"fracture_loss_weight and fracture_pos_weight must be > 0, got {self.fracture_loss_weight}, {self.fracture_pos_weight}")
        if not 0.0 <= self.positive_window_bias <= 1.0:
            out.append(f"positive_window_bias must be in [0, 1], got {self.positive_window_bias}")
        return out


@dataclass
class StudyConfig(RunConfig):
    """06_train_study: the stage-5 CNN (frozen) embeds every slice; an LSTM + attention reads the whole study."""

    stage: str = "06_train_study"
    fracture_run: str = ""  # the stage-05 run whose CNN is frozen; "" -> {work_dir}/05_train_fracture/fold{fold}-seed{seed}
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    max_len: int = 192  # images per study after resampling (longer sequences are interpolated)
    lstm_hidden: int = 256
    dropout: float = 0.2
    infer_batch_size: int = 4  # windows of seq_len images per embedding batch
    save_embeddings: bool = False  # keep the frozen CNN's embeddings in {out_dir}/embeddings.npz
    # add each target's evidence from the frozen stage-05 BiLSTM + head (its largest fracture logit
    # over the study) to the new head's logits, fitted by logistic regression before training
    slice_evidence: bool = True
    # copied from the stage-05 run's config at run time (the study model sees what its CNN saw):
    seq_len: int = 32
    slices_per_image: int = 3
    crop_by_box: bool = True
    crop_margin: float = 0.1
    crop_size: int = 256
    fracture_lstm_hidden: int = 256  # the stage-05 run's lstm_hidden (its BiLSTM is part of the evidence)
    monitor: str = "metric"

    def _validate_stage(self) -> list[str]:
        if self.max_len < 1:
            return [f"max_len must be >= 1, got {self.max_len}"]
        return []


@dataclass
class PredictConfig(RunConfig):
    """07_inference: the Kaggle submission notebook (offline, time-budgeted)."""

    stage: str = "07_inference"
    data_dir: str = KAGGLE_COMPETITION_DIR
    weights_dir: str = KAGGLE_WEIGHTS_DIR  # model.safetensors + config.json of every trained stage
    work_dir: str = KAGGLE_WORKING_DIR
    out: str = f"{KAGGLE_WORKING_DIR}/submission.csv"
    time_budget_hours: float = 8.0  # stop refining and write the fallback rows before this
    tta_flip: bool = True
    box_batch_size: int = 128
    sequence_batch_size: int = 4
    study_batch_size: int = 2
    num_workers: int = 2  # DataLoader processes that decode + encode test studies ahead of the models
    dicom_backend: str = "auto"  # auto (dicomsdl, pydicom fallback per file) | dicomsdl | pydicom

    def _validate_stage(self) -> list[str]:
        if self.time_budget_hours <= 0:
            return [f"time_budget_hours must be > 0, got {self.time_budget_hours}"]
        return []


STAGES: dict[str, type[RunConfig]] = {
    "00_prepare": PrepareConfig,
    "01_train_box": BoxConfig,
    "02_infer_box": BoxConfig,
    "03_train_vertebra": SequenceConfig,
    "04_infer_vertebra": SequenceConfig,
    "05_train_fracture": SequenceConfig,
    "06_train_study": StudyConfig,
    "07_inference": PredictConfig,
}

# Defaults that differ between stages served by the same class (applied before user overrides).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "02_infer_box": {"epochs": 0},
    "03_train_vertebra": {"task": "vertebra"},
    "04_infer_vertebra": {"task": "vertebra", "epochs": 0},
    "05_train_fracture": {"task": "fracture", "epochs": 20},
}

# Stages that run once per (fold, seed) and write to {work_dir}/{stage}/fold{fold}-seed{seed}.
PER_FOLD_STAGES: frozenset[str] = frozenset({"01_train_box", "03_train_vertebra", "05_train_fracture", "06_train_study"})


def field_types(cls: type[RunConfig]) -> dict[str, Any]:
    """Field name -> resolved annotation (the annotations are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_value(text: str) -> Any:
    """One `-p key=VALUE` value: '3' -> 3, '1e-3' -> 0.001, 'true'/'True' -> True, '[[400,1800]]' -> list, otherwise the string."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return list(value) if isinstance(value, tuple) else value


def parse_overrides(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """CLI `-p key=value` items -> dict; values parsed as JSON / Python literals when possible, else strings."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. -p epochs=3)")
        out[key] = parse_value(value)
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to the field type `tp` or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key {key!r}: cannot convert {value!r} ({type(value).__name__}) to {getattr(tp, '__name__', tp)}")
    if isinstance(value, str) and (origin is list or tp in (int, float, bool)):
        value = parse_value(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off"):
            return value.lower() in ("yes", "on")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, key) for v in value]
    if tp is Any:
        return value
    raise bad


def _unknown_key_error(key: str, cls: type[RunConfig], stage: str) -> ConfigError:
    valid = sorted(f.name for f in dataclasses.fields(cls))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} for stage {stage!r} ({cls.__name__}).{hint} Valid keys: {', '.join(valid)}")


def default_out_dir(stage: str, work_dir: str, fold: int, seed: int) -> str:
    """{work_dir}/{stage}/fold{fold}-seed{seed} for per-fold stages, {work_dir}/{stage} otherwise."""
    base = Path(work_dir) / stage
    return str(base / f"fold{fold}-seed{seed}") if stage in PER_FOLD_STAGES else str(base)


def resolve_config(stage: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Stage name + overrides -> the stage's typed, validated config (out_dir derived when empty)."""
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, list(STAGES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown stage {stage!r}.{hint} Stages: {', '.join(STAGES)}")
    cls = STAGES[stage]
    types = field_types(cls)
    values = {**STAGE_DEFAULTS.get(stage, {}), **dict(overrides or {})}
    given_stage = values.pop("stage", stage)
    if given_stage != stage:
        raise ConfigError(f"override stage={given_stage!r} contradicts the requested stage {stage!r}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise _unknown_key_error(key, cls, stage)
        kwargs[key] = _coerce(value, types[key], key)
    cfg = cls(stage=stage, **kwargs)
    if not cfg.out_dir:
        cfg.out_dir = default_out_dir(stage, cfg.work_dir, cfg.fold, cfg.seed)
    if not cfg.prepared_dir:
        cfg.prepared_dir = str(Path(cfg.work_dir) / "00_prepare")
    cfg.validate()
    return cfg


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write cfg as JSON (every field + "_class"), atomically; returns the path."""
    path = Path(path)
    payload = {"_class": type(cfg).__name__, **cfg.to_dict()}
    _atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    logger.info("wrote config %s", path)
    return path


# Settings added after runs had been saved: a saved config without the key was trained the old way,
# so it gets the old behaviour, not today's default (e.g. its weights hold no stage-05 evidence layers).
DEFAULTS_OF_OLDER_RUNS: dict[str, dict[str, Any]] = {"06_train_study": {"slice_evidence": False}}


def load_config(path: str | Path) -> RunConfig:
    """Read a config written by save_config (re-validated; keys unknown to this version are an error;
    keys it predates get `DEFAULTS_OF_OLDER_RUNS`)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read config JSON ({exc})") from None
    if not isinstance(payload, dict) or "stage" not in payload:
        raise ConfigError(f"{path}: not a config file (no 'stage' key)")
    class_name = payload.pop("_class", None)
    stage = payload["stage"]
    for key, value in DEFAULTS_OF_OLDER_RUNS.get(stage, {}).items():
        payload.setdefault(key, value)
    if stage in STAGES and class_name and class_name != STAGES[stage].__name__:
        logger.warning("%s: written by class %s, stage %s now uses %s", path, class_name, stage, STAGES[stage].__name__)
    try:
        return resolve_config(stage, payload)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_diff(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ: name -> (value in a, value in b); a field missing on one side is None there."""
    da, db = a.to_dict(), b.to_dict()
    if type(a) is not type(b):
        da["_class"], db["_class"] = type(a).__name__, type(b).__name__
    return {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)}
