"""The slice classifier: a timm backbone (by name, from the profile) + dropout + one linear layer to the six labels."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rsna22_utils.core.backbones import create_backbone, feature_size
from rsna22_utils.intracranial.labels import LABELS


class SliceClassifier(nn.Module):
    """(batch, 3, H, W) in [0, 1] -> (batch, 6) logits in LABELS order."""

    def __init__(self, encoder: nn.Module, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(feature_size(encoder), len(LABELS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(images)))


def create_network(cfg: Any, pretrained: bool | None = None) -> SliceClassifier:
    """The network of a 01_train config (ImageNet weights when `cfg.pretrained`, unless `pretrained` says otherwise)."""
    encoder = create_backbone(
        cfg.backbone,
        in_chans=3,
        pretrained=cfg.pretrained if pretrained is None else pretrained,
        pretrained_path=cfg.pretrained_path or None,
        pretrained_dir=cfg.pretrained_dir or None,
    )
    return SliceClassifier(encoder, cfg.drop_rate)


def untrained_network(cfg: Any) -> SliceClassifier:
    """The network of a config with random weights (a trained run loads its own; `config show --count-params`)."""
    return create_network(cfg, pretrained=False)
