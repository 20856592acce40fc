"""Typed stage configs built from small field groups: the groups, value parsing and coercion, saving.

A stage's config is a dataclass that composes only the groups it uses (`StageConfig` + e.g.
`FoldSeed`, `Hardware`, `Optimisation`, `Checkpointing`, `Backbone`); the registry
(`rsna22_utils.core.registry`) says which class serves which stage, and `core.resolve` builds a
stage's config from a profile and overrides (`resolve_config`) or reads a run's back (`load_config`).

Overrides are coerced by the field's annotation (``"3"`` -> 3 for an int field, ``"true"`` -> True,
``"[[400,1800]]"`` -> [[400.0, 1800.0]]). A key the stage does not have is an error: it names the
stages where the key applies, or suggests close matches. A *derived* field (`derived(...)`) is filled
in by the stage from its inputs (the study cache's image size, the stage-05 run a stage-06 run
freezes) and saved in the run's config.json; the user cannot set it, `load_config` reads it back.

``out_dir`` is derived when empty: ``registry.run_dir(work_dir, stage, fold, seed)``;
``prepared_dir`` (what the data-preparing stage wrote, e.g. 00_prepare) is ``{work_dir}/{that stage}``
when empty, so one ``work_dir`` (the runner's ``--work-dir``) locates every stage.

Batch size convention: ``batch_size`` is the GLOBAL batch of one optimizer step. The trainer splits it
into ``grad_accum`` micro-steps on each of ``world_size`` processes, so the micro-batch is
``batch_size // (grad_accum * world_size)``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.files import atomic_write_text

logger = logging.getLogger(__name__)

FULL_DATA_FOLD = -1  # trains on every fold, no validation set
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_]*$")  # "" is the stage's one unnamed variant


def derived(default: Any = None, *, source: str, default_factory: Any = None) -> Any:
    """A field the stage fills in from its inputs (`source` says from what); users cannot override it."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"derived": source})
    return field(default=default, metadata={"derived": source})


# ----------------------------------------------------------------------------- field groups


@dataclass
class StageConfig:
    """Every stage: its name and where runs are written."""

    stage: str = ""
    profile: str = ""  # the profile whose settings this config starts from ("" = the config class's defaults)
    work_dir: str = "runs"  # every stage writes under {work_dir}/{stage}
    out_dir: str = ""  # "" -> registry.run_dir(work_dir, stage, fold, seed, variant)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError naming every inconsistent value (each group checks its own fields)."""
        problems: list[str] = []
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("_check")
            if check is not None:
                problems += check(self)
        if problems:
            raise ConfigError(f"invalid {type(self).__name__} for stage {self.stage!r}: " + "; ".join(problems))


@dataclass
class PreparedInput:
    """Stages that read what 00_prepare wrote."""

    prepared_dir: str = ""  # "" -> {work_dir}/{the stage that prepares the data}


@dataclass
class FoldSeed:
    """Stages that run once per fold x seed (and per variant, when a profile names several)."""

    fold: int = 0  # the validation fold; -1 = a full-data run (trains on every fold, validates on none)
    seed: int = 0
    n_folds: int = 5
    variant: str = ""  # which of the profile's models of this stage ("" = the stage's only one)

    def _check(self) -> list[str]:
        out = []
        if self.n_folds < 2:
            out.append(f"n_folds must be >= 2, got {self.n_folds}")
        if not (0 <= self.fold < self.n_folds or self.fold == FULL_DATA_FOLD):
            out.append(f"fold must be in [0, n_folds={self.n_folds}) or {FULL_DATA_FOLD} (full data), got {self.fold}")
        if not VARIANT_NAME.match(self.variant):
            out.append(f"variant {self.variant!r}: use letters, digits and _ only")
        return out

    @property
    def full_data(self) -> bool:
        """A fold -1 run: every fold trains, none validates, the last epoch is kept."""
        return self.fold == FULL_DATA_FOLD


def default_num_workers() -> int:
    """Loader processes when a config does not say: one per CPU core this process may use (shared by the
    torchrun processes of this machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


AMP_DTYPES = ("auto", "fp16", "bf16")


@dataclass
class Hardware:
    """Stages that run networks: device, mixed precision, cuDNN kernels and loader processes."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # mixed precision, only on CUDA
    amp_dtype: str = "auto"  # auto (= fp16 + gradient scaler on every CUDA device) | fp16 | bf16 (compute capability >= 8)
    # true: cuDNN's reproducible kernels (bit-identical reruns on one GPU); false: cuDNN times its kernels and
    # keeps the fastest (cudnn.benchmark). No effect on CPU, which is always reproducible.
    deterministic: bool = False
    num_workers: int = field(default_factory=default_num_workers)  # loader processes (default: one per CPU core)

    def _check(self) -> list[str]:
        out = []
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            out.append(f"device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
        if self.amp_dtype not in AMP_DTYPES:
            out.append(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.num_workers < 0:
            out.append("num_workers must be >= 0")
        return out


@dataclass
class Optimisation:
    """Training stages: AdamW with warm-up + cosine, accumulation, clipping."""

    epochs: int = 10
    batch_size: int = 32  # GLOBAL batch of one optimizer step (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05  # fraction of all optimizer steps with linear warm-up, then cosine
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    max_steps_per_epoch: int = 0  # optimizer steps per epoch; 0 = the whole train set
    channels_last: bool = False  # NHWC images and weights (faster convolutions on tensor cores; not measured per network yet)
    compile: bool = False  # torch.compile the training model (not measured on a GPU yet; the first steps compile)

    def _check(self) -> list[str]:
        out = []
        if self.epochs < 0:
            out.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            out.append(f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        elif self.batch_size % self.grad_accum:
            out.append(f"batch_size ({self.batch_size}) is the global batch and must be divisible by grad_accum ({self.grad_accum})")
        if not 0.0 <= self.warmup_fraction < 1.0:
            out.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            out.append("lr must be > 0, weight_decay and grad_clip >= 0")
        if self.max_steps_per_epoch < 0:
            out.append("max_steps_per_epoch must be >= 0")
        return out


@dataclass
class Checkpointing:
    """Training stages: which epoch is kept, validation loss, resume."""

    monitor: str = "valid_loss"  # a key of the epoch metrics (train_loss, valid_loss or one of Task.score)
    monitor_mode: str = "min"  # min | max
    save: str = "last"  # last | best: which epoch's weights and OOF predictions are kept
    valid_loss: bool = True  # also compute Task.loss on the validation set (one more forward per batch)
    resume: bool = True  # continue from {out_dir}/checkpoint.pt when present
    # stop once `monitor` has not improved for this many epochs (0 = train every epoch); needs save="best"
    early_stopping_patience: int = 0

    def _check(self) -> list[str]:
        out = []
        if self.early_stopping_patience < 0:
            out.append(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        elif self.early_stopping_patience and self.save != "best":
            out.append("early_stopping_patience needs save='best' (the epoch it stops after is not the one to keep)")
        if self.monitor_mode not in ("min", "max"):
            out.append(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")
        if self.save not in ("last", "best"):
            out.append(f"save must be 'last' or 'best', got {self.save!r}")
        return out


@dataclass
class Backbone:
    """Stages that build a timm backbone."""

    backbone: str = "resnet18"
    pretrained: bool = False  # start from ImageNet weights (from pretrained_path, pretrained_dir or timm's download)
    pretrained_path: str = ""  # offline timm weights file (Kaggle has no internet)
    # offline folder of ImageNet weights, {pretrained_dir}/{backbone}.safetensors, written by
    # `python -m rsna22_utils weights fetch` ("" = timm downloads them)
    pretrained_dir: str = ""


@dataclass
class TrainConfig(StageConfig, PreparedInput, FoldSeed, Hardware, Optimisation, Checkpointing):
    """What the trainer (`core.train.fit`) reads; every training stage's config is one of these."""

    def _check(self) -> list[str]:
        if self.full_data and self.save != "last":
            return [f"a full-data run (fold {self.fold}) has no validation set to pick an epoch by: save must be 'last', got {self.save!r}"]
        return []


# ----------------------------------------------------------------------------- values


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the annotations are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def derived_fields(cls: type) -> dict[str, str]:
    """Field name -> where the stage takes it from, for the fields users cannot set."""
    return {f.name: f.metadata["derived"] for f in dataclasses.fields(cls) if "derived" in f.metadata}


def settable_fields(cls: type) -> list[str]:
    """The fields a user may set (-p, overrides, profiles) for a config class."""
    hidden = derived_fields(cls)
    return [f.name for f in dataclasses.fields(cls) if f.name not in hidden and f.name != "stage"]


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


def coerce_value(value: Any, tp: Any, key: str) -> Any:
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
        return [coerce_value(v, inner, key) for v in value]
    if tp is Any:
        return value
    raise bad


def with_derived(cfg: Any, **values: Any) -> Any:
    """A copy of `cfg` with derived fields filled in (the given config is never changed); logs what changed."""
    changed = {k: v for k, v in values.items() if getattr(cfg, k) != v}
    if changed:
        logger.info("%s: derived %s", cfg.stage, ", ".join(f"{k}={v}" for k, v in changed.items()))
    new = dataclasses.replace(cfg, **values)
    new.validate()
    return new


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write cfg as JSON (every field + "_class"), atomically; returns the path."""
    path = Path(path)
    payload = {"_class": type(cfg).__name__, **cfg.to_dict()}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    logger.info("wrote config %s", path)
    return path


# Settings that say where or how fast a run goes, not what it computes: a run may resume under other values.
RESULT_NEUTRAL = frozenset(
    {
        "device",
        "num_workers",
        "deterministic",
        "compile",
        "work_dir",
        "out_dir",
        "prepared_dir",
        "resume",
        "valid_loss",
        "pretrained_path",
        "pretrained_dir",
    }
)


def config_diff(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ: name -> (value in a, value in b); a field missing on one side is None there."""
    da, db = a.to_dict(), b.to_dict()
    if type(a) is not type(b):
        da["_class"], db["_class"] = type(a).__name__, type(b).__name__
    return {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)}
