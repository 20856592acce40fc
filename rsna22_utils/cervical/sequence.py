"""The sequence family (stages 03, 04, 05): a 2.5D CNN + BiLSTM over windows of slices.

03 learns per-slice vertebra ratios from the segmented studies; 04 predicts them for every train
study and turns them into per-slice fracture labels; 05 learns vertebra + fracture on box crops.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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
from rsna22_utils.cervical.configs import FractureTrainConfig, VertebraInferConfig, VertebraTrainConfig
from rsna22_utils.cervical.crops import native_crop_cache
from rsna22_utils.cervical.data import DeviceInputs, SequenceDataset, positive_slices, sequence_inputs, spread_window_predictions
from rsna22_utils.cervical.labels import fracture_slice_labels
from rsna22_utils.cervical.models import create_model, load_run, sequence_loss
from rsna22_utils.cervical.prepare import Prepared, open_cache, split_by_fold
from rsna22_utils.cervical.stages import INFER_VERTEBRA, TRAIN_VERTEBRA
from rsna22_utils.cervical.study_box import study_crops
from rsna22_utils.core.cache import StudyCache
from rsna22_utils.core.config import with_derived
from rsna22_utils.core.device import autocast, resolve_device
from rsna22_utils.core.outputs import StageOutputs
from rsna22_utils.core.registry import finished_runs, out_of_fold_runs, run_dir
from rsna22_utils.core.train import Training

logger = logging.getLogger(__name__)

PREDICTED = [f"{v}_pred" for v in VERTEBRAE]
FRACTURE = [f"{v}_frac" for v in VERTEBRAE]

ANY_FRACTURE = "any_frac"  # the optional 05 output: any vertebra broken (target: the largest of the 7 fracture targets)


@dataclass(frozen=True)
class VertebraInference(StageOutputs):
    """The folder written by 04_infer_vertebra: per-slice C1..C7 predictions and fracture labels of every train study."""

    stage = INFER_VERTEBRA
    files = {"slice_labels": "slice_labels.parquet", "metrics": "metrics.json"}  # slice_labels: uid, slice_index, PREDICTED, FRACTURE


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP wraps the SequenceModel


class SequenceTask:
    """Sequence models: masked loss per step (image or slice); predictions per step of each validation window.

    `names` are the outputs in order: vertebrae (C1..C7), fracture (C1_frac..C7_frac) and
    `ANY_FRACTURE`, whose target this task derives from the fracture targets. `loss` "mse" sums the
    mean loss of each of these groups of outputs, as the 3rd place did.
    """

    def __init__(
        self,
        dataset: SequenceDataset,
        names: list[str],
        fracture_loss_weight: float = 1.0,
        fracture_pos_weight: float = 1.0,
        loss: str = "bce",
        positive_weight: float = 1.0,
    ) -> None:
        self.dataset, self.names = dataset, names
        self.loss_name, self.positive_weight = loss, positive_weight
        fracture = torch.tensor([n.endswith("_frac") for n in names])
        self.target_weights = torch.where(fracture, fracture_loss_weight, 1.0)
        self.positive_weights = torch.where(fracture, fracture_pos_weight, 1.0)
        self.groups = [slice(i, i + len(group)) for i, group in _output_groups(names)]
        self.fracture_columns = [i for i, n in enumerate(names) if n in FRACTURE]

    def targets(self, batch: dict) -> dict:
        """The batch with `ANY_FRACTURE`'s target appended when the model has that output."""
        if ANY_FRACTURE not in self.names:
            return batch
        target = batch["target"]
        return dict(batch, target=torch.cat([target, target[..., self.fracture_columns].amax(-1, keepdim=True)], dim=-1))

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        outputs = model(batch)  # the loader's batch: in validation, the forward `predict` already ran
        batch = self.targets(batch)
        return sequence_loss(outputs, batch, self.target_weights, self.positive_weights, self.loss_name, self.positive_weight, self.groups)

    def predict(self, model: nn.Module, batch: dict) -> pd.DataFrame:
        logits = model(batch)["logits"]
        batch = self.targets(batch)
        probs = _unwrapped(model).probabilities(logits.float()).cpu().numpy()
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
        vertebra = [v for k, v in aucs.items() if k in VERTEBRAE]
        fracture = [v for k, v in aucs.items() if k in FRACTURE]
        if vertebra:
            metrics["mean_auc"] = float(np.mean(vertebra))
        if fracture:
            metrics["fracture_auc"] = float(np.mean(fracture))
        if ANY_FRACTURE in aucs:
            metrics["any_fracture_auc"] = aucs[ANY_FRACTURE]
        return metrics


def _output_groups(names: list[str]) -> list[tuple[int, list[str]]]:
    """(first index, names) of each run of outputs of one kind: vertebra, fracture, any-fracture."""

    def kind(name: str) -> str:
        return "any" if name == ANY_FRACTURE else "fracture" if name.endswith("_frac") else "vertebra"

    groups: list[tuple[int, list[str]]] = []
    for i, name in enumerate(names):
        if groups and kind(groups[-1][1][-1]) == kind(name):
            groups[-1][1].append(name)
        else:
            groups.append((i, [name]))
    return groups


def _vertebra_labels(prepared: Prepared, cache: StudyCache) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    ratios = prepared.read("vertebra_ratios").sort_values(["StudyInstanceUID", "slice_index"])
    labels = {uid: group[list(VERTEBRAE)].to_numpy(np.float32) for uid, group in ratios.groupby("StudyInstanceUID")}
    folds = ratios.groupby("StudyInstanceUID")["fold"].first().reset_index()
    missing = [uid for uid in labels if uid not in set(cache.uids)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} segmented studies are not in the study cache {cache.root}, e.g. {missing[:3]}")
    return labels, folds


def _fracture_labels(work_dir: str, prepared: Prepared) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    table = VertebraInference.of(work_dir).read("slice_labels").sort_values(["StudyInstanceUID", "slice_index"])
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
    """Training windows (`window_sampling`; random ones biased towards `positive` slices) and overlapping validation
    windows of one fold (inside `ranges`, default each whole study; no validation windows for a full-data run)."""
    train_table, valid_table = split_by_fold(folds, cfg.fold)
    train_uids = sorted(train_table["StudyInstanceUID"])
    common = {**_window_inputs(cfg, crops, ranges), "uint8_images": True}  # the trainer normalises on the device (`_fit_sequences`)
    steps = None
    if cfg.window_sampling == "every" and cfg.window_step_range > 0:  # C1-C7 slice count of each study box
        box_ranges = study_crops(cfg.work_dir)[1]
        steps = {uid: max(1, round(cfg.window_step_range / max(1, last - first))) for uid, (first, last) in box_ranges.items()}
    train = SequenceDataset(
        train_uids,
        cache,
        labels,
        mode="train",
        window_sampling=cfg.window_sampling,
        samples_per_study=cfg.samples_per_study,
        positive_bias=cfg.positive_window_bias,
        window_step=cfg.window_step,
        window_steps=steps,
        slice_skip_p=cfg.slice_skip_p,
        slice_skip_max=cfg.slice_skip_max,
        augment=cfg.augment,
        positive_labels=positive,
        **common,
    )
    if valid_table is None:  # a full-data run
        return train, None
    valid = SequenceDataset(sorted(valid_table["StudyInstanceUID"]), cache, labels, mode="infer", stride=cfg.infer_stride, **common)
    return train, valid


def _window_inputs(cfg: Any, crops: dict[str, tuple] | None, ranges: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """How a sequence run's windows are cut (SequenceDataset arguments): shape, box crops and intensity
    (`data.sequence_inputs`), per-slice targets, slice ranges (native crops: cut already, resized to crop_size)."""
    return {**sequence_inputs(cfg, crops), "ranges": ranges, "per_slice": bool(getattr(cfg, "outputs_per_slice", False))}


def train_vertebra(cfg: VertebraTrainConfig) -> dict:
    """03_train_vertebra: the 2.5D CNN + BiLSTM on per-slice vertebra ratios of the segmented studies."""
    return vertebra_training(cfg).fit()


def vertebra_training(cfg: VertebraTrainConfig) -> Training:
    """One 03 run's model, task and datasets (its config with the cache's settings derived)."""
    prepared, cache, cache_settings = open_cache(cfg)
    cfg = with_derived(cfg, **cache_settings)
    labels, folds = _vertebra_labels(prepared, cache)
    crops = study_crops(cfg.work_dir)[0] if cfg.crop_by_box else None
    train, valid = _sequence_datasets(cfg, labels, folds, cache, positive=labels, crops=crops)  # windows that show the spine
    logger.info("vertebra model fold %d: %d training / %d validation studies", cfg.fold, len(train.uids), len(valid.uids) if valid else 0)
    task = SequenceTask(valid, list(VERTEBRAE), loss=cfg.loss, positive_weight=cfg.positive_weight)
    return Training(create_model(cfg), task, train, valid, cfg, on_device=DeviceInputs(train.norm))


def train_fracture(cfg: FractureTrainConfig) -> dict:
    """05_train_fracture: the same model on box crops of every train study, 7 vertebra + 7 fracture targets."""
    return fracture_training(cfg).fit()


def fracture_training(cfg: FractureTrainConfig) -> Training:
    """One 05 run's model (its CNN from `init_encoder_from` when set), task and datasets."""
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
    names = list(VERTEBRAE) + FRACTURE + ([ANY_FRACTURE] if cfg.any_fracture_head else [])
    task = SequenceTask(valid, names, cfg.fracture_loss_weight, cfg.fracture_pos_weight, cfg.loss, cfg.positive_weight)
    return Training(model, task, train, valid, cfg, on_device=DeviceInputs(train.norm))


def _init_encoder(model: nn.Module, cfg: FractureTrainConfig) -> None:
    """Copy the CNN weights of a stage-03 run (`init_encoder_from`) into `model.encoder`."""
    run = Path(cfg.init_encoder_from)
    if cfg.init_encoder_from == "vertebra":
        run = run_dir(cfg.work_dir, TRAIN_VERTEBRA, cfg.fold, cfg.seed)
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
    amp_dtype: str = "auto",
) -> dict[str, np.ndarray]:
    """Overlapping windows through every model, averaged over models and windows -> per-slice probabilities.

    A model with one output per image gives it to each of the image's slices, so models with
    per-image and per-slice outputs average slice by slice.
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    windows: dict[str, list[tuple[int, np.ndarray]]] = {}
    with torch.inference_mode(), autocast(device, amp, amp_dtype):
        for batch in tqdm(loader, desc=desc, unit="batch"):
            inputs = {"image": batch["image"].to(device), "slice_position": batch["slice_position"].to(device)}
            per_model = []
            for model in models:
                probs = _unwrapped(model).probabilities(model(inputs)["logits"].float())
                per_model.append(probs.repeat_interleave(dataset.span // probs.shape[1], dim=1))
            probs = torch.stack(per_model).mean(0).cpu().numpy()
            for b in range(probs.shape[0]):
                uid = dataset.uids[int(batch["study"][b])]
                windows.setdefault(uid, []).append((int(batch["start"][b]), probs[b]))
    return spread_window_predictions(windows, dataset.n_slices, 1)


def _runs_per_fold(runs: list[Path], study_folds: list[int], out_of_fold_only: bool) -> dict[int, list[Path]]:
    """Which runs predict the studies of each fold: those that did not train on it, or every run."""
    if not out_of_fold_only:
        return {fold: list(runs) for fold in study_folds}
    return out_of_fold_runs(runs, study_folds, TRAIN_VERTEBRA)


def vertebra_predictions(cfg: VertebraInferConfig, cache: StudyCache, fold_of: dict[str, int]) -> tuple[dict[str, np.ndarray], int]:
    """Per-slice C1..C7 of every study of `fold_of` (mean over the runs that predict its fold), and how many runs ran.

    Each run sees windows cut as it was trained (its seq_len, slices_per_image, and box crops when
    its config has `crop_by_box`), `infer_stride` slices apart; one run is in memory at a time.
    """
    device = resolve_device(cfg.device)
    runs = finished_runs(cfg.work_dir, TRAIN_VERTEBRA)
    per_fold = _runs_per_fold(runs, sorted(set(fold_of.values())), cfg.out_of_fold)
    total: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    used = 0
    for run in runs:
        uids = sorted(uid for uid, fold in fold_of.items() if run in per_fold[fold])
        if not uids:
            continue
        model, run_cfg = load_run(run, device)
        span = int(run_cfg.seq_len) * int(run_cfg.slices_per_image)
        if cfg.infer_stride > span:
            raise ValueError(f"{run}: infer_stride={cfg.infer_stride} leaves gaps between its windows of {span} slices")
        if getattr(run_cfg, "crop_by_box", False) and getattr(run_cfg, "crop_source", "cache") != "cache":
            raise ValueError(
                f"{run}: crop_source={run_cfg.crop_source!r}; 04 predicts every slice of a study and cuts box crops "
                "from the study cache only (crop_source='cache')"
            )
        crops = study_crops(cfg.work_dir)[0] if getattr(run_cfg, "crop_by_box", False) else None
        inputs = dict(_window_inputs(run_cfg, crops), per_slice=False)
        dataset = SequenceDataset(uids, cache, None, mode="infer", stride=cfg.infer_stride, **inputs)
        per_slice = predict_sequences(
            [model], dataset, device, cfg.infer_batch_size, cfg.num_workers, f"vertebra {run.name}", cfg.amp, cfg.amp_dtype
        )
        for uid, pred in per_slice.items():
            total[uid] = total.get(uid, 0.0) + pred
            count[uid] = count.get(uid, 0) + 1
        used += 1
        del model
    return {uid: total[uid] / count[uid] for uid in total}, used


def infer_vertebra(cfg: VertebraInferConfig) -> dict:
    """04_infer_vertebra: per-slice C1..C7 for every train study (mean over vertebra models and windows).

    With `out_of_fold`, a study is predicted only by the runs that did not train on its fold (as
    the 3rd place did), otherwise by every run. Clipped to [0, 1] (and, with
    `rescale_pseudo_labels`, rescaled to peak at 1 per study, as the ratio labels do) and
    multiplied by the study's fracture labels, they become approximate per-slice fracture labels
    `C1_frac..C7_frac` (the 3rd place's trick to train a slice model without slice labels); see
    `labels.fracture_slice_labels`. Writes `slice_labels.parquet` (StudyInstanceUID, slice_index, C*_pred, C*_frac).
    """
    prepared, cache, _ = open_cache(cfg)
    out = VertebraInference(Path(cfg.out_dir))
    Path(out.root).mkdir(parents=True, exist_ok=True)
    folds = prepared.read("folds")
    uids = sorted(set(folds["StudyInstanceUID"]) & set(cache.uids))
    fold_of = {uid: int(f) for uid, f in folds.set_index("StudyInstanceUID").loc[uids, "fold"].items()}
    per_slice, n_runs = vertebra_predictions(cfg, cache, fold_of)
    study_labels = folds.set_index("StudyInstanceUID")[list(VERTEBRAE)]
    frames = []
    for uid in uids:
        vertebra, fracture = fracture_slice_labels(per_slice[uid], study_labels.loc[uid].to_numpy(float), rescale=cfg.rescale_pseudo_labels)
        frame = pd.DataFrame(vertebra, columns=PREDICTED)
        frame[FRACTURE] = fracture
        frame.insert(0, "slice_index", np.arange(len(vertebra)))
        frame.insert(0, "StudyInstanceUID", uid)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table.to_parquet(out.path("slice_labels"), index=False)
    logger.info("per-slice vertebra predictions and fracture labels of %d studies written to %s", len(uids), out.path("slice_labels"))
    metrics: dict[str, Any] = {"models": n_runs, "studies": len(uids)}
    ratios_path = prepared.vertebra_ratios
    if ratios_path.exists():  # how well the predictions match the segmentation labels (in-sample for segmented studies unless out_of_fold)
        ratios = pd.read_parquet(ratios_path).merge(table, on=["StudyInstanceUID", "slice_index"])
        metrics["mae_vs_segmentation"] = float(np.mean(np.abs(ratios[list(VERTEBRAE)].to_numpy() - ratios[PREDICTED].to_numpy())))
    out.path("metrics").write_text(json.dumps(metrics, indent=2))
    return metrics
