"""Tiny learnable toy problem for the trainer tests; run as a script (also under torchrun) it trains once.

    python -m torch.distributed.run --nproc_per_node 2 tests/core/ddp_toy.py OUT_DIR [key=value ...]

Regression y = x @ w + noise with a small MLP; its first layer can be frozen (`freeze=true`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rsna22_utils.core.config import parse_overrides
from rsna22_utils.core.resolve import resolve_config
from rsna22_utils.core.train import fit

N_FEATURES = 8


class ToyDataset(Dataset):
    """n samples of y = x @ w + 0.1 noise, fixed by `seed`."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        w = torch.linspace(-1, 1, N_FEATURES, dtype=torch.float32)
        self.x = torch.randn(n, N_FEATURES, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"id": torch.tensor(i), "x": self.x[i], "y": self.y[i]}


class ToyModel(nn.Module):
    def __init__(self, freeze: bool = False) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.stem = nn.Linear(N_FEATURES, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)
        if freeze:
            self.stem.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.stem(x)))).squeeze(-1)


class ToyTask:
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.mse_loss(model(batch["x"]), batch["y"])

    def predict(self, model: nn.Module, batch: dict) -> pd.DataFrame:
        return pd.DataFrame(
            {"id": batch["id"].cpu().numpy(), "pred": model(batch["x"]).float().cpu().numpy(), "target": batch["y"].cpu().numpy()}
        )

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        err = predictions["pred"] - predictions["target"]
        return {"mse": float((err**2).mean()), "mae": float(err.abs().mean())}


def toy_config(out_dir: str | Path, **overrides):
    """Stage-1 config with toy-sized defaults."""
    base = {
        "out_dir": str(out_dir),
        "epochs": 2,
        "batch_size": 8,
        "lr": 0.01,
        "warmup_fraction": 0.1,
        "num_workers": 0,
        "device": "cpu",
        "weight_decay": 0.01,
    }
    return resolve_config("01_train_box", {**base, **overrides})


def run(out_dir: str | Path, n_train: int = 64, n_valid: int = 24, freeze: bool = False, task=None, model=None, **overrides):
    """Train the toy model once; returns (model, metrics)."""
    model = model or ToyModel(freeze=freeze)
    metrics = fit(model, task or ToyTask(), ToyDataset(n_train, 0), ToyDataset(n_valid, 1), toy_config(out_dir, **overrides))
    return model, metrics


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(sys.argv[1], **parse_overrides(sys.argv[2:]))
