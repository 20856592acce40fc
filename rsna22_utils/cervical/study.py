"""The study family (stage 06): the frozen stage-05 CNN embeds each study's box crops (`embed`), a
BiLSTM + attention head reads the whole study, the competition metric is the loss.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from rsna22_utils.cervical.anatomy import TARGETS
from rsna22_utils.cervical.configs import StudyTrainConfig, settings_from_fracture_run
from rsna22_utils.cervical.crops import native_crop_cache
from rsna22_utils.cervical.data import DeviceInputs, augment_sequence, sequence_augmentation
from rsna22_utils.cervical.embed import embed_studies, study_windows
from rsna22_utils.cervical.metric import (
    competition_loss,
    per_target_auc,
    prior_predictions,
    score,
    solution_from_labels,
    submission_from_predictions,
)
from rsna22_utils.cervical.models import StudyModel, fit_length, load_run, study_model
from rsna22_utils.cervical.prepare import open_cache, split_by_fold
from rsna22_utils.cervical.stages import TRAIN_FRACTURE
from rsna22_utils.cervical.study_box import study_crops
from rsna22_utils.core.config import with_derived
from rsna22_utils.core.device import resolve_device
from rsna22_utils.core.registry import run_dir
from rsna22_utils.core.train import Training

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- training


class StudyEmbeddings(Dataset):
    """Precomputed per-image embeddings of each study (the CNN is frozen) + its 8 labels (+ its stage-05
    evidence when given: `out_of_fold_evidence`)."""

    def __init__(
        self,
        uids: list[str],
        embeddings: dict[str, np.ndarray],
        labels: pd.DataFrame | None,
        max_len: int,
        evidence: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.uids, self.embeddings, self.max_len, self.evidence = uids, embeddings, max_len, evidence
        self.targets = None if labels is None else labels.set_index("StudyInstanceUID").loc[uids, list(TARGETS)].to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sequence = torch.from_numpy(self.embeddings[self.uids[index]]).float()[None]
        sequence, mask = fit_length(sequence, torch.ones(1, sequence.shape[1]), self.max_len)
        item = {"embeddings": sequence[0], "mask": mask[0], "study": torch.tensor(index)}
        if self.evidence is not None:
            item["evidence"] = torch.from_numpy(self.evidence[self.uids[index]]).float()
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


class StudyImages(Dataset):
    """Each study's images (3-slice box crops inside its slice range, as `embed_studies` sees them), for
    the frozen CNN to embed at every step (`embed_on_the_fly`); augmented alike across a study's images."""

    def __init__(
        self,
        uids: list[str],
        windows: Any,
        labels: pd.DataFrame | None,
        augment: bool | str = False,
        uint8_images: bool = False,
        evidence: dict[str, np.ndarray] | None = None,
    ) -> None:
        """`augment`: False, True (light) or an augmentation set's name (`data.sequence_augmentation`);
        `uint8_images`: items hold uint8 (images, H, W, C) that `DeviceInputs(windows.norm, "images")` finishes on the device;
        `evidence`: each study's stage-05 evidence, given with its images (`out_of_fold_evidence`)."""
        self.uids, self.windows, self.augment, self.uint8_images = uids, windows, augment, uint8_images
        self.evidence = evidence
        self.starts: dict[str, list[int]] = {}
        for uid, start in windows.items:
            self.starts.setdefault(uid, []).append(start)
        self.targets = None if labels is None else labels.set_index("StudyInstanceUID").loc[uids, list(TARGETS)].to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.uids)

    def images(self, uid: str) -> np.ndarray:
        """uint8 (images, H, W, C) of one study, in order, as many as `embed.join_windows` keeps."""
        parts = [image[mask] for image, mask in (self.windows.window(uid, s) for s in sorted(self.starts[uid]))]
        first, last = self.windows.ranges[uid]
        return np.concatenate(parts)[: max(1, -(-(last - first + 1) // self.windows.k))]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        images = self.images(self.uids[index])
        if self.augment:
            images = augment_sequence(images, sequence_augmentation(len(images), "light" if self.augment is True else self.augment))
        item = {"images": self.windows.norm.item_images(images, self.uint8_images), "study": torch.tensor(index)}  # as 05 saw them
        if self.evidence is not None:
            item["evidence"] = torch.from_numpy(self.evidence[self.uids[index]]).float()
        if self.targets is not None:
            item["target"] = torch.from_numpy(self.targets[index])
        return item


def images_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every study's images in one (total images, C, H, W) tensor + `lengths` (images per study)."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "images"}
    batch["images"] = torch.cat([item["images"] for item in items])
    batch["lengths"] = torch.tensor([len(item["images"]) for item in items])
    return batch


class OnTheFlyStudyModel(StudyModel):
    """A StudyModel (same weights, same saved keys) whose training batches are images: the frozen CNN
    embeds them `chunk_size` at a time without gradients; with `bn_update` it stays in train mode, so
    its batch-norm statistics follow the study crops (the 3rd place's frozen CNN did)."""

    def __init__(self, model: StudyModel, chunk_size: int = 64, bn_update: bool = False) -> None:
        super().__init__(model.encoder, model.head, max_len=model.max_len)
        self.chunk_size, self.bn_update = chunk_size, bn_update

    def train(self, mode: bool = True) -> OnTheFlyStudyModel:
        super().train(mode)
        self.encoder.train(mode and self.bn_update)
        return self

    def embed(self, images: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total images, C, H, W) + images per study -> padded embeddings (studies, steps <= max_len, F) and mask."""
        parts = []
        with torch.no_grad():
            for chunk in images.split(self.chunk_size):
                if len(chunk) == 1 and self.encoder.training:  # batch norm cannot train on one image
                    parts.append(self.encoder(chunk.repeat(2, 1, 1, 1))[:1])
                else:
                    parts.append(self.encoder(chunk))
        features = torch.cat(parts).float()
        sizes = [int(n) for n in lengths]
        embeddings = features.new_zeros(len(sizes), max(sizes), features.shape[1])
        mask = features.new_zeros(len(sizes), max(sizes))
        for i, study in enumerate(features.split(sizes)):
            embeddings[i, : len(study)], mask[i, : len(study)] = study, 1.0
        return fit_length(embeddings, mask, self.max_len)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "images" not in batch:
            return super().forward(batch)
        embeddings, mask = self.embed(batch["images"], batch["lengths"])
        return {"logits": self.head(embeddings, mask, batch.get("evidence"))}


class StudyTask:
    """Study model: the competition metric as loss; OOF rows in the submission's columns."""

    def __init__(self, dataset: StudyEmbeddings | StudyImages, labels: pd.DataFrame) -> None:
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
    return study_training(cfg).fit()


def study_training(cfg: StudyTrainConfig, start_head: bool = True) -> Training:
    """One 06 run's model, task and datasets. With `start_head` False (embed_on_the_fly only) nothing is
    embedded up front and the head keeps its initial weights: the run's data path and steps, for benchmarks."""
    if not start_head and not cfg.embed_on_the_fly:
        raise ValueError("06 without embed_on_the_fly trains on embeddings made up front: start_head=False needs embed_on_the_fly")
    prepared, cache, cache_settings = open_cache(cfg)
    device = resolve_device(cfg.device)
    sequence_model, cfg = _frozen_fracture_model(cfg, cache_settings, device)
    folds = prepared.read("folds")
    crops, ranges = study_crops(cfg.work_dir)
    uids = sorted(set(folds["StudyInstanceUID"]) & set(cache.uids) & set(ranges))
    cache, crops, ranges = study_inputs(cfg, cache, crops, ranges)
    train_table, valid_table = split_by_fold(folds[folds["StudyInstanceUID"].isin(uids)], cfg.fold)
    train_uids = sorted(train_table["StudyInstanceUID"])
    valid_uids = None if valid_table is None else sorted(valid_table["StudyInstanceUID"])
    logger.info("study model fold %d: %d training / %d validation studies", cfg.fold, len(train_uids), len(valid_uids or []))
    train_evidence = None
    if start_head and cfg.slice_evidence and cfg.evidence_fit == "out_of_fold":
        train_evidence = out_of_fold_evidence(cfg, cache, crops, ranges, train_table, device)
    if start_head:
        embeddings = embed_studies(sequence_model.encoder, cache, uids, cfg, crops, ranges, device)
        if cfg.save_embeddings:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(cfg.out_dir) / "embeddings.npz", **embeddings)
        train = StudyEmbeddings(train_uids, embeddings, folds, cfg.max_len, train_evidence)
        valid = None if valid_uids is None else StudyEmbeddings(valid_uids, embeddings, folds, cfg.max_len)
        model = study_model(cfg, sequence_model.cpu())
        _start_head(model, train, train_evidence)
        if not cfg.embed_on_the_fly:
            return Training(model, StudyTask(valid, folds), train, valid, cfg, collate_fn=pad_collate)
    else:
        model = study_model(cfg, sequence_model.cpu())
    train_windows = study_windows(train_uids, cache, ranges, crops, cfg)
    train_images = StudyImages(train_uids, train_windows, folds, augment=cfg.augment, uint8_images=True, evidence=train_evidence)
    valid_images = None
    if valid_uids is not None:
        valid_images = StudyImages(valid_uids, study_windows(valid_uids, cache, ranges, crops, cfg), folds, uint8_images=True)
    model = OnTheFlyStudyModel(model, cfg.cnn_chunk_size, cfg.frozen_bn_update)
    on_device = DeviceInputs(train_windows.norm, "images")  # the uint8 images become network inputs on the device
    return Training(model, StudyTask(valid_images, folds), train_images, valid_images, cfg, images_collate, on_device)


def _frozen_fracture_model(cfg: StudyTrainConfig, cache_settings: dict[str, Any], device: torch.device) -> tuple[nn.Module, Any]:
    """The stage-05 run this 06 run freezes (same fold, variant and seed, or `fracture_run`), and the 06
    config with what it takes from that run derived: the study model sees images exactly as stage 05
    did, and its config.json alone rebuilds it (07_inference)."""
    fracture_run = Path(cfg.fracture_run) if cfg.fracture_run else run_dir(cfg.work_dir, TRAIN_FRACTURE, cfg.fold, cfg.seed, cfg.variant)
    sequence_model, fracture_cfg = load_run(fracture_run, device)
    if int(fracture_cfg.fold) != int(cfg.fold):
        raise ValueError(f"{fracture_run}: trained for fold {fracture_cfg.fold}, not fold {cfg.fold}: its CNN has seen this fold")
    return sequence_model, with_derived(cfg, **cache_settings, **settings_from_fracture_run(fracture_cfg))


def _start_head(model: StudyModel, train: StudyEmbeddings, train_evidence: dict[str, np.ndarray] | None = None) -> None:
    """The head's starting weights: the training prior, or the logistic fits of the stage-05 evidence
    (`train_evidence` when given, else what this run's frozen stage-05 layers compute)."""
    head = model.head
    if head.evidence is None:
        head.start_from_prior(torch.from_numpy(train.targets.mean(axis=0)))
    else:  # starts from the prior itself, then fits the evidence weights
        if train_evidence is not None:
            evidence = torch.from_numpy(np.stack([train_evidence[uid] for uid in train.uids]))
        else:
            evidence = torch.cat([head.evidence(item["embeddings"][None], item["mask"][None]) for item in train])
        head.start_from_evidence(evidence, torch.from_numpy(train.targets))
        logger.info("evidence weights (patient_overall, C1..C7): %s", [round(float(w), 2) for w in head.evidence_weight.detach()])


def out_of_fold_evidence(
    cfg: StudyTrainConfig, cache: Any, crops: dict, ranges: dict, studies: pd.DataFrame, device: torch.device
) -> dict[str, np.ndarray]:
    """Each study's stage-05 evidence (8 values, `SliceEvidence`) from the 05 run of its own fold (`studies`:
    StudyInstanceUID, fold), which never trained on it.

    This fold's 05 run trained on the 06 training studies, so its evidence there is stronger than on
    the new studies the fitted weights are applied to; the run of a study's own fold sees it as a
    new study. Every 05 run must see images as this fold's run does (same crops, intensity, sizes).
    """
    out: dict[str, np.ndarray] = {}
    for fold, group in studies.groupby("fold"):
        run = run_dir(cfg.work_dir, TRAIN_FRACTURE, int(fold), cfg.seed, cfg.variant)
        if not (run / "config.json").is_file():
            raise FileNotFoundError(
                f"{run}: no finished stage-05 run of fold {fold}, seed {cfg.seed}; evidence_fit='out_of_fold' needs the 05 run"
                " of every training fold (run it, or set evidence_fit='in_sample')"
            )
        sequence_model, fracture_cfg = load_run(run, device)
        differ = sorted(k for k, v in settings_from_fracture_run(fracture_cfg).items() if getattr(cfg, k) != v)
        if differ:
            raise ValueError(
                f"{run}: its {', '.join(differ)} differ from those of this fold's stage-05 run; out-of-fold evidence needs the same inputs"
            )
        uids = sorted(group["StudyInstanceUID"])
        embeddings = embed_studies(sequence_model.encoder, cache, uids, cfg, crops, ranges, device)
        evidence = study_model(cfg, sequence_model.cpu()).head.evidence
        with torch.no_grad():
            for uid in uids:
                sequence = torch.from_numpy(embeddings[uid]).float()[None]
                sequence, mask = fit_length(sequence, torch.ones(1, sequence.shape[1]), cfg.max_len)  # as training sees it
                out[uid] = evidence(sequence, mask)[0].numpy()
        logger.info("out-of-fold evidence of %d training studies of fold %s from %s", len(uids), fold, run)
    return out


def study_inputs(cfg: StudyTrainConfig, cache: Any, crops: dict, ranges: dict) -> tuple[Any, dict, dict]:
    """Where 06 reads its images (the 00 cache, or the crop cache of `crop_source="native"`), the boxes to
    cut there (none for native crops: already cut), and each study's range widened by `slice_margin`."""
    n_slices = {uid: len(cache.slices(uid)) for uid in ranges if uid in set(cache.uids)} if cfg.slice_margin else {}
    wide = {
        uid: (max(0, a - cfg.slice_margin), min(n_slices[uid] - 1, b + cfg.slice_margin)) if cfg.slice_margin else (a, b)
        for uid, (a, b) in ranges.items()
        if not cfg.slice_margin or uid in n_slices
    }
    if cfg.crop_by_box and cfg.crop_source == "native":
        return native_crop_cache(cfg, cache, cfg.slice_margin)[0], {}, wide
    return cache, crops, wide
