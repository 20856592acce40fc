"""Finished runs on disk: weights files, and loading a run (config + weights + model).

Training and the submission load runs the same way, and neither needs the trainer for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rsna22_utils.core.files import atomic_write
from rsna22_utils.core.registry import CONFIG, WEIGHTS
from rsna22_utils.core.resolve import load_config

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Model state_dict -> safetensors (CPU, contiguous copies so tied weights do not fail), atomically."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> Any:
    """Load a .safetensors file, a .pt/.pth state_dict, or a trainer checkpoint.pt into model (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # re-raised with the file name
        raise RuntimeError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = unwrap(model).load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise RuntimeError(f"{path}: weights do not match the model: {exc}") from None
    logger.info("loaded weights %s", path)
    return result


def load_run(run_dir: str | Path, device: torch.device, build: Callable[[Any], nn.Module]) -> tuple[nn.Module, Any]:
    """A finished run's network, rebuilt by `build(config)` from its config.json, with its weights, in eval mode.

    `build` must not fetch pretrained weights: the run's own weights replace them.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG)
    model = build(cfg)
    load_weights(model, run_dir / WEIGHTS)
    return model.to(device).eval(), cfg
