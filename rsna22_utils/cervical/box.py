"""The box family (stages 01 and 02): per-slice has-box + C1-C7 box, and one study box per study.

Box models run over slices with `study_box.predict_box_slices`, the same for stage 02 (from the
study cache) and for the submission (from a decoded test study).
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

from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.cervical.configs import BoxInferConfig, BoxTrainConfig
from rsna22_utils.cervical.data import BoxSliceDataset, CacheSource, DeviceInputs, InputNorm, common_input_norm
from rsna22_utils.cervical.geometry import box_iou
from rsna22_utils.cervical.models import box_loss, create_model, load_run
from rsna22_utils.cervical.prepare import Prepared, open_cache, split_by_fold
from rsna22_utils.cervical.stages import TRAIN_BOX
from rsna22_utils.cervical.study_box import BoxInference, evaluate_study_boxes, predict_box_slices, shared_input_slices, study_boxes
from rsna22_utils.core.cache import StudyCache
from rsna22_utils.core.config import with_derived
from rsna22_utils.core.device import resolve_device
from rsna22_utils.core.registry import finished_runs, out_of_fold_runs
from rsna22_utils.core.train import Training

logger = logging.getLogger(__name__)


def box_table(prepared: Prepared, cache: StudyCache) -> pd.DataFrame:
    """slice_boxes joined with each slice's original rows/cols (box pixels are original pixels).

    Labelled slices the cache lacks (studies 00_prepare was allowed to fail, `max_failed_studies`) are
    left out with a warning that counts them; a labelled study the cache lacks entirely without 00
    having reported it is an error (a cache from another run)."""
    boxes = prepared.read("slice_boxes")
    sizes = cache.all_slices()[["StudyInstanceUID", "slice_index", "rows", "cols"]]
    table = boxes.merge(sizes, on=["StudyInstanceUID", "slice_index"], how="inner", validate="one_to_one")
    if len(table) < len(boxes):
        missing = sorted(set(boxes["StudyInstanceUID"]) - set(table["StudyInstanceUID"]))
        reported = set(cache.failed_studies())
        unreported = [uid for uid in missing if uid not in reported]
        if unreported:
            raise ValueError(
                f"{prepared.slice_boxes}: {len(unreported)} labelled studies are not in the cache {cache.root} and 00_prepare "
                f"reported no failure for them (e.g. {unreported[:3]}): the cache is not the one these labels were built "
                "with; rerun 00_prepare"
            )
        logger.warning(
            "box labels: %d of %d labelled slices (%d studies that 00_prepare could not cache: %s) are left out",
            len(boxes) - len(table),
            len(boxes),
            len(missing),
            ", ".join(missing[:5]),
        )
    return table.fillna({c: 0.0 for c in BOX_COLUMNS})


def box_rows(rows: pd.DataFrame, p_box: np.ndarray, box: np.ndarray) -> pd.DataFrame:
    """Model outputs (box as fractions of the image) -> table in original pixels."""
    out = rows[["StudyInstanceUID", "slice_index"]].reset_index(drop=True).copy()
    out["p_box"] = p_box
    cols, rows_px = rows["cols"].to_numpy(float), rows["rows"].to_numpy(float)
    for i, (name, scale) in enumerate(zip(BOX_COLUMNS, (cols, rows_px, cols, rows_px))):
        out[name] = box[:, i] * scale
    return out


class BoxTask:
    """Box model: loss, per-slice predictions in original pixels, and validation scores."""

    def __init__(self, valid_table: pd.DataFrame, box_weight: float = 5.0, has_box_weight: float = 1.0) -> None:
        self.valid_table, self.box_weight, self.has_box_weight = valid_table, box_weight, has_box_weight

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return box_loss(model(batch), batch, box_weight=self.box_weight, has_box_weight=self.has_box_weight)

    def predict(self, model: nn.Module, batch: dict) -> pd.DataFrame:
        out = model(batch)
        rows = self.valid_table.iloc[batch["index"].cpu().numpy()]
        return box_rows(rows, torch.sigmoid(out["has_box"]).float().cpu().numpy(), out["box"].float().cpu().numpy())

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        truth = self.valid_table.set_index(["StudyInstanceUID", "slice_index"]).loc[
            pd.MultiIndex.from_frame(predictions[["StudyInstanceUID", "slice_index"]])
        ]
        has_box = truth["has_box"].to_numpy() > 0.5
        metrics = {"has_box_accuracy": float(((predictions["p_box"].to_numpy() > 0.5) == has_box).mean())}
        if 0 < has_box.sum() < len(has_box):
            metrics["has_box_auc"] = float(roc_auc_score(has_box, predictions["p_box"]))
        if has_box.any():
            iou = box_iou(predictions[BOX_COLUMNS].to_numpy()[has_box], truth[BOX_COLUMNS].to_numpy()[has_box])
            metrics["slice_iou"] = float(np.mean(iou))
        return metrics


def train_box(cfg: BoxTrainConfig) -> dict:
    """01_train_box: has-box + C1-C7 box on single slices of the segmented studies, one fold x seed."""
    return box_training(cfg).fit()


def box_training(cfg: BoxTrainConfig) -> Training:
    """One 01 run's model, task and datasets (its config with the cache's settings derived)."""
    prepared, cache, cache_settings = open_cache(cfg)
    cfg = with_derived(cfg, **cache_settings)
    train, valid = split_by_fold(box_table(prepared, cache), cfg.fold)
    logger.info("box model fold %d: %d training slices, %d validation slices", cfg.fold, len(train), 0 if valid is None else len(valid))
    source, k, norm = CacheSource(cache), cfg.box_input_slices, InputNorm.of(cfg)
    model = create_model(cfg)
    task = BoxTask(valid, cfg.box_weight, cfg.has_box_weight)
    inputs: dict[str, Any] = dict(input_slices=k, norm=norm, uint8_images=True)  # the trainer normalises on the device
    valid_set = None if valid is None else BoxSliceDataset(valid, source, **inputs)
    train_set = BoxSliceDataset(train, source, augment=cfg.augment, **inputs)
    return Training(model, task, train_set, valid_set, cfg, on_device=DeviceInputs(norm))


def box_examples(cfg: BoxTrainConfig, n: int = 8) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """`n` validation slices that show the spine, with the trained run's boxes and the true ones (cache pixels);
    a full-data run has no validation slices: then training slices (in-sample)."""
    prepared, cache, _ = open_cache(cfg)
    train, valid = split_by_fold(box_table(prepared, cache), cfg.fold)
    shown = train if valid is None else valid
    rows = shown[shown["has_box"] > 0.5]
    rows = rows.iloc[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)].reset_index(drop=True)
    model, run_cfg = load_run(Path(cfg.out_dir), torch.device("cpu"))
    norm = InputNorm.of(run_cfg)
    dataset = BoxSliceDataset(rows, CacheSource(cache), input_slices=run_cfg.box_input_slices, norm=norm)
    items = [dataset[i] for i in range(len(rows))]
    with torch.inference_mode():
        predicted = model({"image": torch.stack([item["image"] for item in items])})["box"].numpy()
    size = cache.spec.image_size
    centre = (run_cfg.box_input_slices // 2) * len(run_cfg.windows)  # the first window of the predicted slice
    images = [norm.to_uint8(item["image"])[..., centre] for item in items]
    true = np.stack([item["box"].numpy() for item in items])
    return images, predicted * size, true * size


def box_run_groups(study_folds: pd.Series, runs: list[Path], out_of_fold: bool) -> list[tuple[int | None, list[str], list[Path]]]:
    """(fold, its studies, the box runs that predict them) for 02: every run on every study (fold None), or out of fold.

    `study_folds`: each study's fold (index StudyInstanceUID; NaN for a study of no fold, e.g. a
    test study, which every run serves). Out of fold, a study of fold f gets `registry.out_of_fold_runs`:
    the runs of fold f (they trained on the other folds); a fold without one is an error.
    """
    if not out_of_fold:
        return [(None, list(study_folds.index), runs)]
    known = study_folds.dropna().astype(int)
    per_fold = out_of_fold_runs(runs, sorted(set(known)), TRAIN_BOX)
    groups: list[tuple[int | None, list[str], list[Path]]] = [(f, list(known.index[known == f]), found) for f, found in per_fold.items()]
    foldless = list(study_folds.index[study_folds.isna()])
    return groups + ([(None, foldless, runs)] if foldless else [])


def predict_table(
    table: pd.DataFrame,
    cache: StudyCache,
    groups: list[tuple[int | None, list[str], list[Path]]],
    loaded: dict[Path, tuple[nn.Module, Any]],
    cfg: BoxInferConfig,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean p_box (n,) and box fractions (n, 4) of every row of `table`, each study from its group's runs."""
    input_slices = shared_input_slices({run: run_cfg for run, (_, run_cfg) in loaded.items()})
    norm = common_input_norm([run_cfg for _, run_cfg in loaded.values()], list(loaded))
    p_box, boxes = np.zeros(len(table)), np.zeros((len(table), 4))
    uids = table["StudyInstanceUID"]
    for _, studies, runs in groups:
        rows = np.flatnonzero(uids.isin(studies).to_numpy())
        dataset = BoxSliceDataset(table.iloc[rows], CacheSource(cache), input_slices=input_slices, norm=norm)
        loader = DataLoader(dataset, batch_size=cfg.infer_batch_size, num_workers=cfg.num_workers, shuffle=False)
        batches = ((rows[batch["index"].numpy()], batch["image"]) for batch in tqdm(loader, desc=f"box x {len(runs)} models", unit="batch"))
        p, b = predict_box_slices([loaded[run][0] for run in runs], batches, len(table), device, cfg.amp, cfg.amp_dtype)
        p_box[rows], boxes[rows] = p[rows], b[rows]
    return p_box, boxes


def infer_box(cfg: BoxInferConfig) -> dict:
    """02_infer_box: the box models on every slice of every study, averaged -> study boxes.

    Every run serves every study, or (`out_of_fold`) a training study only the runs that did not
    train on it. Writes `slice_predictions.parquet` and `study_boxes.csv` (x0 y0 x1 y1 in original
    pixels, slnum_from / slnum_to / slnum_max as 0-based slice positions head -> feet). When the data
    holds the synthetic generator's truth, also `box_eval.csv` on the studies no box model was
    trained on.
    """
    prepared, cache, _ = open_cache(cfg)
    out = BoxInference(Path(cfg.out_dir))
    Path(out.root).mkdir(parents=True, exist_ok=True)
    table = cache.all_slices()
    for column in ("has_box", *BOX_COLUMNS):
        table[column] = 0.0
    runs = finished_runs(cfg.work_dir, TRAIN_BOX)
    folds = prepared.read("folds").set_index("StudyInstanceUID")["fold"]
    study_folds = pd.Series(folds.reindex(cache.uids).to_numpy(dtype=float), index=cache.uids)
    groups = box_run_groups(study_folds, runs, cfg.out_of_fold)
    device = resolve_device(cfg.device)
    loaded = {run: load_run(run, device) for run in runs}
    p_box, boxes = predict_table(table, cache, groups, loaded, cfg, device)
    predictions = box_rows(table, p_box, boxes)
    predictions.to_parquet(out.path("slice_predictions"), index=False)
    boxes = study_boxes(predictions, cfg)
    boxes.to_csv(out.path("study_boxes"), index=False)
    logger.info("%d models -> boxes of %d studies written to %s", len(runs), len(boxes), out.path("study_boxes"))
    metrics: dict[str, Any] = {"models": [str(r) for r in runs], "studies": len(boxes)}
    if cfg.out_of_fold:
        metrics["out_of_fold"] = {"no fold" if f is None else f"fold {f}": [str(r) for r in group] for f, _, group in groups}

    truth_path = Path(cfg.data_dir) / "_synthetic" / "studies.csv"
    if truth_path.exists():
        truth = pd.read_csv(truth_path)
        trained_on = set(prepared.read("slice_boxes")["StudyInstanceUID"])
        truth = truth[~truth["StudyInstanceUID"].isin(trained_on)]
        evaluation = evaluate_study_boxes(boxes, truth[["StudyInstanceUID", *BOX_COLUMNS, "slnum_from", "slnum_to"]])
        evaluation.to_csv(out.path("box_eval"), index=False)
        metrics.update(
            eval_studies=len(evaluation),
            median_iou=float(evaluation["iou"].median()),
            median_from_error=float(evaluation["from_error"].median()),
            median_to_error=float(evaluation["to_error"].median()),
            median_range_error=float(np.median(np.maximum(evaluation["from_error"], evaluation["to_error"]))),
        )
        logger.info(
            "study boxes on %d studies no box model saw: median IoU %.3f, median slice-range error %.1f (from) / %.1f (to)",
            len(evaluation),
            metrics["median_iou"],
            metrics["median_from_error"],
            metrics["median_to_error"],
        )
    out.path("metrics").write_text(json.dumps(metrics, indent=2))
    return metrics
