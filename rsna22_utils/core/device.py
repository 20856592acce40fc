"""Devices, mixed precision and random seeds: one choice each, used by training and inference alike."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

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


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on `device`: bf16 on CUDA compute capability >= 8 (Ampere on), fp16 below
    (Kaggle's T4 is 7.5, P100 6.0: `torch.cuda.is_bf16_supported()` answers True there by counting
    emulation, which is slow); None off CUDA (the kit runs fp32 on CPU)."""
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA with `amp_dtype`, a no-op elsewhere or when not `enabled`."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); make cuDNN deterministic so reruns match."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
