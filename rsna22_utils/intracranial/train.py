"""01_train: one slice classifier per fold x seed with the core trainer, the competition metric as its loss.

Out-of-fold predictions (ID + the six probabilities) are saved by the trainer; the run's folder also
gets the QC figures: `roc.png` (ROC per label of the kept epoch's OOF) and `loss.png`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rsna22_utils.core.config import with_derived
from rsna22_utils.core.qc import plot_loss_curves, plot_roc
from rsna22_utils.core.train import fit
from rsna22_utils.intracranial.configs import ClassifierTrainConfig
from rsna22_utils.intracranial.data import ImageDataset
from rsna22_utils.intracranial.labels import IMAGE_ID, LABELS
from rsna22_utils.intracranial.metric import per_label_auc, score_wide, weighted_log_loss
from rsna22_utils.intracranial.models import create_network
from rsna22_utils.intracranial.prepare import Prepared, split_by_fold

logger = logging.getLogger(__name__)


class ClassifierTask:
    """The trainer's task: weighted log loss on logits; OOF rows = ID + probabilities; score = the metric + AUC per label."""

    def __init__(self, valid: pd.DataFrame | None) -> None:
        self.valid = valid

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_log_loss(model(batch["image"]).float(), batch["target"])

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> pd.DataFrame:
        probabilities = torch.sigmoid(model(batch["image"]).float()).cpu().numpy()
        ids = self.valid[IMAGE_ID].to_numpy()[batch["index"].cpu().numpy()]
        return pd.DataFrame({IMAGE_ID: ids, **{label: probabilities[:, k] for k, label in enumerate(LABELS)}})

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        labels = self.valid[self.valid[IMAGE_ID].isin(set(predictions[IMAGE_ID]))]
        scores = {"metric": score_wide(labels, predictions)}
        scores.update({f"auc_{label}": value for label, value in per_label_auc(labels, predictions).items()})
        return scores


def _spread(images: pd.DataFrame, n: int) -> pd.DataFrame:
    """`n` images evenly spread over the table's studies and slices (every study keeps some)."""
    if not n or n >= len(images):
        return images
    step = len(images) / n
    return images.iloc[np.floor(np.arange(n) * step).astype(int)].reset_index(drop=True)


def train_classifier(cfg: ClassifierTrainConfig) -> dict[str, Any]:
    """Train one run (fold x seed) on every image of the other folds; writes the trainer's outputs and QC figures."""
    prepared = Prepared(Path(cfg.prepared_dir))
    spec = prepared.cache_spec(prepared.cache_size())
    cfg = with_derived(
        cfg,
        cache_size=spec["cache_size"],
        crop_border=spec["crop_border"],
        head_threshold=spec["head_threshold"],
        cache_windows=spec["windows"],
    )
    train, valid = split_by_fold(prepared.read_images(), cfg.fold)
    if valid is not None:
        valid = _spread(valid.sort_values(["StudyInstanceUID", "slice_index"]), cfg.max_valid_images)
    task = ClassifierTask(valid)
    metrics = fit(
        create_network(cfg),
        task,
        ImageDataset(train, prepared, cfg, augment=True),
        None if valid is None else ImageDataset(valid, prepared, cfg),
        cfg,
    )
    out = Path(cfg.out_dir)
    plot_loss_curves({out.name: out / "history.csv"}, out / "loss.png")
    if valid is not None and (out / "oof.parquet").is_file():
        oof = pd.read_parquet(out / "oof.parquet")
        labels = valid.set_index(IMAGE_ID).loc[oof[IMAGE_ID]].reset_index()
        plot_roc(labels, oof, out / "roc.png", LABELS, bold="any", unit="images")
    return metrics
