"""timm backbones built by name, with ImageNet weights that work offline (every competition's networks start here).

`pretrained` is a switch that works offline: False builds random weights, True loads ImageNet
weights from `pretrained_dir` (a folder written by `python -m rsna22_utils weights fetch`: the way
to get them on an offline Kaggle kernel, attached as a dataset), from `pretrained_path` (one file),
or else from timm's download (needs internet or timm's cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn


def create_backbone(
    name: str,
    in_chans: int,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    pretrained_dir: str | Path | None = None,
) -> nn.Module:
    """timm feature extractor (num_classes=0, global pooled) with offline-safe weight loading.

    ImageNet weights come from, in order: `pretrained_path` (one file), `{pretrained_dir}/{name}.safetensors`
    (or .pth) when `pretrained`, else timm's download. A missing local file is an error, never a random init.
    """
    kwargs: dict[str, Any] = {"in_chans": in_chans, "num_classes": 0}
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_path {path}: no such weights file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    elif pretrained and pretrained_dir:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_weights_file(name, pretrained_dir))}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        if pretrained and not (pretrained_path or pretrained_dir):
            raise RuntimeError(
                f"could not load pretrained weights for timm model {name!r} ({error}); offline, set "
                "pretrained=False, pretrained_dir=<folder of weights fetch> or pretrained_path=<local weights file>"
            ) from error
        raise


PRETRAINED_SUFFIXES = (".safetensors", ".pth")


def pretrained_weights_file(backbone: str, pretrained_dir: str | Path) -> Path:
    """`{pretrained_dir}/{backbone}.safetensors` (or .pth): where `weights fetch` saved the backbone's ImageNet weights."""
    folder = Path(pretrained_dir)
    for suffix in PRETRAINED_SUFFIXES:
        path = folder / f"{backbone}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"pretrained_dir {folder}: no ImageNet weights for backbone {backbone!r} ({folder / (backbone + '.safetensors')} "
        f"or .pth); on a machine with internet run `python -m rsna22_utils weights fetch --out {folder} --backbones {backbone}` "
        "and copy the folder here (on Kaggle: attach it as a dataset)"
    )


def feature_size(encoder: nn.Module) -> int:
    """Width of a pooled timm backbone's output (`head_hidden_size` when a conv head follows pooling, e.g. MobileNetV3)."""
    return int(getattr(encoder, "head_hidden_size", None) or encoder.num_features)
