"""The study family (stage 06): the frozen stage-05 CNN embeds each study's box crops (`embed`), a
BiLSTM + attention head reads the whole study, the competition metric is the loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from rsna22_utils.cervical.anatomy import TARGETS
from rsna22_utils.cervical.box import study_crops
from rsna22_utils.cervical.configs import StudyTrainConfig
from rsna22_utils.cervical.embed import embed_studies
from rsna22_utils.cervical.metric import (
    competition_loss,
    per_target_auc,
    prior_predictions,
    score,
    solution_from_labels,
    submission_from_predictions,
)
from rsna22_utils.cervical.models import fit_length, load_run, study_model
from rsna22_utils.cervical.prepare import open_cache, split_by_fold
from rsna22_utils.core.config import with_derived
from rsna22_utils.core.device import resolve_device
from rsna22_utils.core.registry import run_dir
from rsna22_utils.core.train import fit

logger = logging.getLogger(__name__)

FRACTURE_STAGE = "05_train_fracture"
# Stage-05 settings a stage-06 run records in its own config (the frozen CNN and how it sees images).
SETTINGS_FROM_FRACTURE_RUN = ("backbone", "seq_len", "slices_per_image", "crop_by_box", "crop_margin", "crop_size")


# ----------------------------------------------------------------------------- training


class StudyEmbeddings(Dataset):
    """Precomputed per-image embeddings of each study (the CNN is frozen) + its 8 labels."""

    def __init__(self, uids: list[str], embeddings: dict[str, np.ndarray], labels: pd.DataFrame | None, max_len: int) -> None:
        self.uids, self.embeddings, self.max_len = uids, embeddings, max_len
        self.targets = None if labels is None else labels.set_index("StudyInstanceUID").loc[uids, list(TARGETS)].to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sequence = torch.from_numpy(self.embeddings[self.uids[index]]).float()[None]
        sequence, mask = fit_length(sequence, torch.ones(1, sequence.shape[1]), self.max_len)
        item = {"embeddings": sequence[0], "mask": mask[0], "study": torch.tensor(index)}
        if self.targets is not None:
            item["target"] = torch.from_numpy(self.targets[index])
        return item


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items, zero-padding variable-length `embeddings` / `mask` to the longest in the batch."""
    length = max(item["mask"].shape[0] for item in items)
    batch: dict[str, torch.Tensor] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key in ("embeddings", "mask"):
            values = [
                torch.nn.functional.pad(v, (0, 0, 0, length - v.shape[0]) if v.dim() == 2 else (0, length - v.shape[0])) for v in values
            ]
        batch[key] = torch.stack(values)
    return batch


class StudyTask:
    """Study model: the competition metric as loss; OOF rows in the submission's columns."""

    def __init__(self, dataset: StudyEmbeddings, labels: pd.DataFrame) -> None:
        self.dataset, self.labels = dataset, labels

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return competition_loss(model(batch)["logits"].float(), batch["target"].float())

    def predict(self, model: nn.Module, batch: dict) -> pd.DataFrame:
        probs = torch.sigmoid(model(batch)["logits"].float()).cpu().numpy()
        frame = pd.DataFrame(probs, columns=list(TARGETS))
        frame.insert(0, "StudyInstanceUID", [self.dataset.uids[int(i)] for i in batch["study"]])
        return frame

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        labels = self.labels[self.labels["StudyInstanceUID"].isin(predictions["StudyInstanceUID"])]
        solution = solution_from_labels(labels)
        metrics = {"metric": score(solution, submission_from_predictions(predictions))}
        prior = prior_predictions(self.labels, list(predictions["StudyInstanceUID"]))
        metrics["prior_metric"] = score(solution, submission_from_predictions(prior))
        metrics.update({f"auc_{k}": v for k, v in per_target_auc(labels, predictions).items()})
        return metrics


def train_study(cfg: StudyTrainConfig) -> dict:
    """06_train_study: stage-05 CNN frozen, a new BiLSTM + attention + max pooling head (+ the stage-05 evidence), metric as loss."""
    prepared, cache, cache_settings = open_cache(cfg)
    device = resolve_device(cfg.device)
    fracture_run = Path(cfg.fracture_run) if cfg.fracture_run else run_dir(cfg.work_dir, FRACTURE_STAGE, cfg.fold, cfg.seed, cfg.variant)
    sequence_model, fracture_cfg = load_run(fracture_run, device)
    if int(fracture_cfg.fold) != int(cfg.fold):
        raise ValueError(f"{fracture_run}: trained for fold {fracture_cfg.fold}, not fold {cfg.fold}: its CNN has seen this fold")
    # the study model sees images exactly as stage 05 did, and its config.json alone rebuilds it (07_inference)
    cfg = with_derived(
        cfg,
        **cache_settings,
        **{name: getattr(fracture_cfg, name) for name in SETTINGS_FROM_FRACTURE_RUN},
        fracture_lstm_hidden=int(fracture_cfg.lstm_hidden),
    )

    folds = prepared.read("folds")
    crops, ranges = study_crops(cfg.work_dir)
    uids = sorted(set(folds["StudyInstanceUID"]) & set(cache.uids) & set(ranges))
    embeddings = embed_studies(sequence_model.encoder, cache, uids, cfg, crops, ranges, device)
    if cfg.save_embeddings:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(Path(cfg.out_dir) / "embeddings.npz", **embeddings)
    train_table, valid_table = split_by_fold(folds[folds["StudyInstanceUID"].isin(uids)], cfg.fold)
    train = StudyEmbeddings(sorted(train_table["StudyInstanceUID"]), embeddings, folds, cfg.max_len)
    valid = None if valid_table is None else StudyEmbeddings(sorted(valid_table["StudyInstanceUID"]), embeddings, folds, cfg.max_len)
    model = study_model(cfg, sequence_model.cpu())
    head = model.head
    if head.evidence is None:
        head.start_from_prior(torch.from_numpy(train.targets.mean(axis=0)))
    else:  # starts from the prior itself, then fits the evidence weights
        evidence = torch.cat([head.evidence(item["embeddings"][None], item["mask"][None]) for item in train])
        head.start_from_evidence(evidence, torch.from_numpy(train.targets))
        logger.info("evidence weights (patient_overall, C1..C7): %s", [round(float(w), 2) for w in head.evidence_weight])
    logger.info("study model fold %d: %d training / %d validation studies", cfg.fold, len(train), len(valid) if valid else 0)
    return fit(model, StudyTask(valid, folds), train, valid, cfg, collate_fn=pad_collate)
