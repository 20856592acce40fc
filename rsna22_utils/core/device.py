"""Devices, mixed precision and random seeds: one choice each, used by training and inference alike."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from rsna22_utils.core.config import AMP_DTYPES
from rsna22_utils.core.errors import ConfigError


def resolve_device(want: str) -> torch.device:
    """A config's `device` -> torch.device; "auto" = CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    given = want
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={given!r} but CUDA is not available here (use device=cpu or auto)")
        return torch.device(f"cuda:{local_rank}") if want == "cuda" else torch.device(want)
    if want == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but MPS is not available here")
    return torch.device(want)


def amp_dtype(device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """The autocast dtype of the `amp_dtype` setting on `device`; None off CUDA (the kit runs fp32 on CPU).

    auto = fp16 (with a gradient scaler in training) on every CUDA device: on an H200 fp16 trained and
    predicted faster than bf16 for all four of the 3rd place's networks (1.1-1.4x, issue 22), and
    Kaggle's T4 (7.5) / P100 (6.0) have no native bf16 (`torch.cuda.is_bf16_supported()` answers True
    there by counting emulation, which is slow). bf16 needs compute capability >= 8.
    """
    if choice not in AMP_DTYPES:
        raise ConfigError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {choice!r}")
    if device.type != "cuda":
        return None
    if choice == "bf16":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ConfigError(f"amp_dtype=bf16 but {device} (compute capability {major}.{minor}) has no native bf16: use fp16 or auto")
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, enabled: bool = True, dtype: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA in the `amp_dtype` setting's dtype (`dtype`), a no-op elsewhere or when not `enabled`."""
    chosen = amp_dtype(device, dtype) if enabled else None
    if chosen is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=chosen)


def set_cudnn(deterministic: bool) -> None:
    """`deterministic`: cuDNN picks reproducible kernels; else it times its kernels on the first batches and
    keeps the fastest (`cudnn.benchmark`; results may then differ between reruns). No effect on CPU."""
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); with `deterministic`, cuDNN reruns match too (`set_cudnn`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    set_cudnn(deterministic)
