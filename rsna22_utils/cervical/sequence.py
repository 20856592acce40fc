"""The sequence family (stages 03, 04, 05): a 2.5D CNN + BiLSTM over windows of slices.

03 learns per-slice vertebra ratios from the segmented studies; 04 predicts them for every train
study and turns them into per-slice fracture labels; 05 learns vertebra + fracture on box crops.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from rsna22_utils.cervical.anatomy import VERTEBRAE
from rsna22_utils.cervical.box import study_crops
from rsna22_utils.cervical.configs import FractureTrainConfig, VertebraInferConfig, VertebraTrainConfig
from rsna22_utils.cervical.crops import native_crop_cache
from rsna22_utils.cervical.data import SequenceDataset, positive_slices, spread_window_predictions
from rsna22_utils.cervical.labels import fracture_slice_labels
from rsna22_utils.cervical.models import create_model, load_run, sequence_loss
from rsna22_utils.cervical.prepare import Prepared, open_cache, split_by_fold
from rsna22_utils.core.cache import StudyCache
from rsna22_utils.core.config import with_derived
from rsna22_utils.core.device import autocast, resolve_device
from rsna22_utils.core.registry import finished_runs, run_dir, stage_dir
from rsna22_utils.core.train import fit

logger = logging.getLogger(__name__)

VERTEBRA_STAGE, VERTEBRA_INFER_STAGE = "03_train_vertebra", "04_infer_vertebra"
PREDICTED = [f"{v}_pred" for v in VERTEBRAE]
FRACTURE = [f"{v}_frac" for v in VERTEBRAE]


class SequenceTask:
    """Sequence models: masked BCE per image; predictions per image of each validation window."""

    def __init__(
        self, dataset: SequenceDataset, names: list[str], fracture_loss_weight: float = 1.0, fracture_pos_weight: float = 1.0
    ) -> None:
        self.dataset, self.names = dataset, names
        fracture = torch.tensor([n.endswith("_frac") for n in names])
        self.target_weights = torch.where(fracture, fracture_loss_weight, 1.0)
        self.positive_weights = torch.where(fracture, fracture_pos_weight, 1.0)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return sequence_loss(model(batch), batch, self.target_weights, self.positive_weights)

    def predict(self, model: nn.Module, batch: dict) -> pd.DataFrame:
        probs = torch.sigmoid(model(batch)["logits"].float()).cpu().numpy()
        target = batch["target"].cpu().numpy()
        mask = batch["mask"].cpu().numpy() > 0.5
        frames = []
        for b in range(probs.shape[0]):
            uid = self.dataset.uids[int(batch["study"][b])]
            frame = pd.DataFrame(probs[b][mask[b]], columns=[f"{n}_pred" for n in self.names])
            frame[[f"{n}_true" for n in self.names]] = target[b][mask[b]]
            frame.insert(0, "step", np.flatnonzero(mask[b]))
            frame.insert(0, "start", int(batch["start"][b]))
            frame.insert(0, "StudyInstanceUID", uid)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        pred = predictions[[f"{n}_pred" for n in self.names]].to_numpy().clip(1e-6, 1 - 1e-6)
        true = predictions[[f"{n}_true" for n in self.names]].to_numpy()
        bce = -(true * np.log(pred) + (1 - true) * np.log(1 - pred)).mean()
        metrics = {"valid_bce": float(bce)}
        # soft targets: an image counts as positive where its target reaches half the column's peak
        positive = positive_slices(true, per_column=True)
        aucs = {}
        for i, name in enumerate(self.names):
            if 0 < positive[:, i].sum() < len(positive):
                aucs[name] = float(roc_auc_score(positive[:, i], pred[:, i]))
        vertebra = [v for k, v in aucs.items() if not k.endswith("_frac")]
        fracture = [v for k, v in aucs.items() if k.endswith("_frac")]
        if vertebra:
            metrics["mean_auc"] = float(np.mean(vertebra))
        if fracture:
            metrics["fracture_auc"] = float(np.mean(fracture))
        return metrics


def _vertebra_labels(prepared: Prepared, cache: StudyCache) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    ratios = prepared.read("vertebra_ratios").sort_values(["StudyInstanceUID", "slice_index"])
    labels = {uid: group[list(VERTEBRAE)].to_numpy(np.float32) for uid, group in ratios.groupby("StudyInstanceUID")}
    folds = ratios.groupby("StudyInstanceUID")["fold"].first().reset_index()
    missing = [uid for uid in labels if uid not in set(cache.uids)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} segmented studies are not in the study cache {cache.root}, e.g. {missing[:3]}")
    return labels, folds


def _fracture_labels(work_dir: str, prepared: Prepared) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    path = stage_dir(work_dir, VERTEBRA_INFER_STAGE) / "slice_labels.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run {VERTEBRA_INFER_STAGE} first")
    table = pd.read_parquet(path).sort_values(["StudyInstanceUID", "slice_index"])
    labels = {uid: group[PREDICTED + FRACTURE].to_numpy(np.float32) for uid, group in table.groupby("StudyInstanceUID")}
    folds = prepared.read("folds")[["StudyInstanceUID", "fold"]]
    return labels, folds[folds["StudyInstanceUID"].isin(labels)]


def _sequence_datasets(
    cfg: VertebraTrainConfig | FractureTrainConfig,
    labels: dict[str, np.ndarray],
    folds: pd.DataFrame,
    cache: StudyCache,
    positive: dict[str, np.ndarray],
    crops: dict[str, tuple] | None = None,
    ranges: dict[str, tuple[int, int]] | None = None,
) -> tuple[SequenceDataset, SequenceDataset | None]:
    """Random training windows (biased towards `positive` slices) and overlapping validation windows of one fold
    (inside `ranges`, default each whole study; no validation windows for a full-data run)."""
    train_table, valid_table = split_by_fold(folds, cfg.fold)
    train_uids = sorted(train_table["StudyInstanceUID"])
    common: dict[str, Any] = dict(seq_len=cfg.seq_len, slices_per_image=cfg.slices_per_image, crops=crops, ranges=ranges)
    if crops:
        common.update(crop_margin=cfg.crop_margin, output_size=cfg.crop_size)
    elif ranges is not None:  # native crops: cut already, resized to crop_size
        common.update(output_size=cfg.crop_size)
    train = SequenceDataset(
        train_uids,
        cache,
        labels,
        mode="train",
        samples_per_study=cfg.samples_per_study,
        positive_bias=cfg.positive_window_bias,
        augment=True,
        positive_labels=positive,
        **common,
    )
    if valid_table is None:  # a full-data run
        return train, None
    valid = SequenceDataset(sorted(valid_table["StudyInstanceUID"]), cache, labels, mode="infer", stride=cfg.infer_stride, **common)
    return train, valid


def train_vertebra(cfg: VertebraTrainConfig) -> dict:
    """03_train_vertebra: the 2.5D CNN + BiLSTM on per-slice vertebra ratios of the segmented studies."""
    prepared, cache, cache_settings = open_cache(cfg)
    cfg = with_derived(cfg, **cache_settings)
    labels, folds = _vertebra_labels(prepared, cache)
    train, valid = _sequence_datasets(cfg, labels, folds, cache, positive=labels)  # windows that show the spine
    logger.info("vertebra model fold %d: %d training / %d validation studies", cfg.fold, len(train.uids), len(valid.uids) if valid else 0)
    return fit(create_model(cfg), SequenceTask(valid, list(VERTEBRAE)), train, valid, cfg)


def train_fracture(cfg: FractureTrainConfig) -> dict:
    """05_train_fracture: the same model on box crops of every train study, 7 vertebra + 7 fracture targets."""
    prepared, cache, cache_settings = open_cache(cfg)
    cfg = with_derived(cfg, **cache_settings)
    labels, folds = _fracture_labels(cfg.work_dir, prepared)
    crops = study_crops(cfg.work_dir)[0] if cfg.crop_by_box else None
    ranges = None
    if cfg.crop_by_box and cfg.crop_source == "native":  # windows inside 02's slice range; random ones reach span // 4 beyond
        cache, ranges = native_crop_cache(cfg, cache, slice_margin=cfg.seq_len * cfg.slices_per_image // 4)
        crops, folds = None, folds[folds["StudyInstanceUID"].isin(cache.uids)]
    positive = {uid: lab[:, len(VERTEBRAE) :] for uid, lab in labels.items()}  # windows that show a fracture
    train, valid = _sequence_datasets(cfg, labels, folds, cache, positive, crops, ranges)
    logger.info("fracture model fold %d: %d training / %d validation studies", cfg.fold, len(train.uids), len(valid.uids) if valid else 0)
    model = create_model(cfg)
    if cfg.init_encoder_from:
        _init_encoder(model, cfg)
    task = SequenceTask(valid, list(VERTEBRAE) + FRACTURE, cfg.fracture_loss_weight, cfg.fracture_pos_weight)
    return fit(model, task, train, valid, cfg)


def _init_encoder(model: nn.Module, cfg: FractureTrainConfig) -> None:
    """Copy the CNN weights of a stage-03 run (`init_encoder_from`) into `model.encoder`."""
    run = Path(cfg.init_encoder_from)
    if cfg.init_encoder_from == "vertebra":
        run = run_dir(cfg.work_dir, VERTEBRA_STAGE, cfg.fold, cfg.seed)
    source, source_cfg = load_run(run, torch.device("cpu"))
    if source_cfg.backbone != cfg.backbone or source_cfg.slices_per_image != cfg.slices_per_image:
        raise ValueError(
            f"{run}: its CNN is {source_cfg.backbone} on {source_cfg.slices_per_image} slices per image, "
            f"this run's is {cfg.backbone} on {cfg.slices_per_image}: init_encoder_from needs the same"
        )
    model.encoder.load_state_dict(source.encoder.state_dict())
    logger.info("fracture model CNN initialised from %s", run)


def predict_sequences(
    models: list[nn.Module],
    dataset: SequenceDataset,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    desc: str = "windows",
    amp: bool = True,
) -> dict[str, np.ndarray]:
    """Overlapping windows through every model, averaged over models and windows -> per-slice probabilities."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    windows: dict[str, list[tuple[int, np.ndarray]]] = {}
    with torch.inference_mode(), autocast(device, amp):
        for batch in tqdm(loader, desc=desc, unit="batch"):
            images = batch["image"].to(device)
            probs = torch.stack([torch.sigmoid(m({"image": images})["logits"].float()) for m in models]).mean(0).cpu().numpy()
            for b in range(probs.shape[0]):
                uid = dataset.uids[int(batch["study"][b])]
                windows.setdefault(uid, []).append((int(batch["start"][b]), probs[b]))
    return spread_window_predictions(windows, dataset.n_slices, dataset.k)


def _window_shape(configs: list[Any], runs: list[Path]) -> tuple[int, int]:
    """The (seq_len, slices_per_image) every run shares; an error naming the run that differs."""
    shapes = {(int(c.seq_len), int(c.slices_per_image)) for c in configs}
    if len(shapes) != 1:
        raise ValueError(f"the runs in {runs[0].parent} have different windows (seq_len, slices_per_image): {sorted(shapes)}")
    return shapes.pop()


def infer_vertebra(cfg: VertebraInferConfig) -> dict:
    """04_infer_vertebra: per-slice C1..C7 for every train study (mean over vertebra models and windows).

    Rescaled to peak at 1 per study (as the ratio labels do) and multiplied by the study's fracture
    labels they become approximate per-slice fracture labels `C1_frac..C7_frac` (the 3rd place's
    trick to train a slice model without slice labels); see `labels.fracture_slice_labels`.
    Writes `slice_labels.parquet` (StudyInstanceUID, slice_index, C*_pred, C*_frac).
    """
    prepared, cache, _ = open_cache(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    runs = finished_runs(cfg.work_dir, VERTEBRA_STAGE)
    models, configs = zip(*(load_run(run, device) for run in runs))
    seq_len, slices_per_image = _window_shape(list(configs), runs)
    if cfg.infer_stride > seq_len * slices_per_image:
        raise ValueError(f"infer_stride={cfg.infer_stride} leaves gaps between windows of {seq_len * slices_per_image} slices")
    folds = prepared.read("folds")
    uids = sorted(set(folds["StudyInstanceUID"]) & set(cache.uids))
    dataset = SequenceDataset(uids, cache, None, seq_len=seq_len, slices_per_image=slices_per_image, mode="infer", stride=cfg.infer_stride)
    per_slice = predict_sequences(list(models), dataset, device, cfg.infer_batch_size, cfg.num_workers, "vertebra windows", cfg.amp)
    study_labels = folds.set_index("StudyInstanceUID")[list(VERTEBRAE)]
    frames = []
    for uid in uids:
        vertebra, fracture = fracture_slice_labels(per_slice[uid], study_labels.loc[uid].to_numpy(float))
        frame = pd.DataFrame(vertebra, columns=PREDICTED)
        frame[FRACTURE] = fracture
        frame.insert(0, "slice_index", np.arange(len(vertebra)))
        frame.insert(0, "StudyInstanceUID", uid)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table.to_parquet(out / "slice_labels.parquet", index=False)
    logger.info("per-slice vertebra predictions and fracture labels of %d studies written to %s", len(uids), out / "slice_labels.parquet")
    metrics: dict[str, Any] = {"models": len(models), "studies": len(uids)}
    ratios_path = prepared.vertebra_ratios
    if ratios_path.exists():  # how well the predictions match the segmentation labels (in-sample for segmented studies)
        ratios = pd.read_parquet(ratios_path).merge(table, on=["StudyInstanceUID", "slice_index"])
        metrics["mae_vs_segmentation"] = float(np.mean(np.abs(ratios[list(VERTEBRAE)].to_numpy() - ratios[PREDICTED].to_numpy())))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
