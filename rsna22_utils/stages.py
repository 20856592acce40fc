"""The pipeline's stages: each wires prepared data, a model and the one trainer together.

Every stage is a function `stage(cfg) -> dict` (metrics / output paths) that reads its inputs
from earlier stages' folders and writes into `cfg.out_dir`; notebooks and the CLI (`python -m
rsna22_utils train STAGE -p key=value`) call the same functions, so a notebook is only
parameters + one call + plots.

    00_prepare          scan headers, folds, segmentation labels, study cache
    01_train_box        per-slice C1-C7 box model (one fold x seed)
    02_infer_box        all box models on every slice -> one box + slice range per study
    03_train_vertebra   2.5D CNN + BiLSTM on the vertebra ratio labels (one fold x seed)
    04_infer_vertebra   per-slice C1..C7 predictions for every train study -> slice fracture labels
    05_train_fracture   2.5D CNN + BiLSTM on box crops, 7 vertebra + 7 fracture targets
    06_train_study      frozen stage-05 CNN + BiLSTM/attention head on whole studies, metric as loss
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rsna22_utils.cache import CacheSpec, StudyCache
from rsna22_utils.data import BOX_COLUMNS, BoxSliceDataset, CacheSource, SequenceDataset, positive_slices, spread_window_predictions
from rsna22_utils.labels import fracture_slice_labels
from rsna22_utils.models import create_model

logger = logging.getLogger(__name__)

VERTEBRAE = [f"C{k}" for k in range(1, 8)]


# --------------------------------------------------------------------------- prepared data


@dataclass(frozen=True)
class Prepared:
    """The folder written by 00_prepare, with one property per table so no stage guesses a path."""

    root: Path

    @property
    def slices(self) -> Path:
        return self.root / "slices.parquet"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def slice_boxes(self) -> Path:
        return self.root / "slice_boxes.parquet"

    @property
    def vertebra_ratios(self) -> Path:
        return self.root / "vertebra_ratios.parquet"

    def cache(self, spec: CacheSpec | None = None) -> StudyCache:
        """The study cache (the one built with `spec`, or the only one present)."""
        base = self.root / "cache"
        if spec is not None:
            return StudyCache(base / spec.name)
        found = sorted(p.parent for p in base.glob("*/spec.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"{base}: expected one study cache, found {len(found)}; run 00_prepare first")
        return StudyCache(found[0])

    def read(self, name: str) -> pd.DataFrame:
        path = getattr(self, name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run 00_prepare (prepared_dir={self.root})")
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _cache_spec(cfg: Any) -> CacheSpec:
    return CacheSpec(image_size=int(cfg.image_size), windows=tuple(tuple(w) for w in cfg.windows))


def _open_cache(cfg: Any) -> tuple[Prepared, StudyCache]:
    """The prepared folder and its study cache; the config records the cache's size and windows.

    Models read slices at the cache's resolution, so `image_size` / `windows` of a training run
    are those of the cache (saved in the run's config.json for inference to reproduce).
    """
    prepared = Prepared(Path(cfg.prepared_dir))
    cache = prepared.cache()
    size, windows = cache.spec.image_size, [list(map(float, w)) for w in cache.spec.windows]
    if (cfg.image_size, [list(map(float, w)) for w in cfg.windows]) != (size, windows):
        logger.info("using the study cache's image_size %d and windows %s (config had %s, %s)", size, windows, cfg.image_size, cfg.windows)
    cfg.image_size, cfg.windows = size, windows
    return prepared, cache


def prepare(cfg: Any) -> dict[str, Any]:
    """00_prepare: scan every study, make/read folds, segmentation labels, build the study cache."""
    from rsna22_utils.cache import build_cache
    from rsna22_utils.labels import build_segmentation_labels, make_folds
    from rsna22_utils.scan import find_studies, scan_competition

    data_dir, out = Path(cfg.data_dir), Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared = Prepared(out)
    scan_failures = scan_competition(data_dir, prepared.slices, workers=cfg.workers or None)

    train = pd.read_csv(data_dir / "train.csv")
    folds = make_folds(train, n_folds=cfg.n_folds, seed=cfg.split_seed, fold_file=cfg.fold_file or None)
    folds.to_csv(prepared.folds, index=False)
    logger.info("folds of %d studies written to %s", len(folds), prepared.folds)

    outputs: dict[str, Any] = {"slices": prepared.slices, "folds": prepared.folds, "scan_failures": len(scan_failures)}
    if (data_dir / "segmentations").is_dir():
        outputs.update(build_segmentation_labels(data_dir, out, folds, workers=cfg.workers or None))
    else:
        logger.warning("%s has no segmentations/: the box and vertebra stages will have no labels", data_dir)

    studies = [study_dir for _, study_dir in find_studies(data_dir)]
    cache_root, cache_failures = build_cache(studies, out / "cache", _cache_spec(cfg), workers=cfg.workers or None)
    outputs.update(cache=cache_root, cache_failures=len(cache_failures))
    (out / "prepare.json").write_text(json.dumps({k: str(v) for k, v in outputs.items()}, indent=2))
    return outputs


# --------------------------------------------------------------------------- helpers


def _fit(model: nn.Module, task: Any, train_set: Dataset, valid_set: Dataset, cfg: Any, collate_fn: Callable | None = None) -> dict:
    from rsna22_utils.train import fit

    return fit(model, task, train_set, valid_set, cfg, collate_fn=collate_fn)


def _device(cfg: Any) -> torch.device:
    from rsna22_utils.train import resolve_device

    return resolve_device(cfg)


def _split(table: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if "fold" not in table or (table["fold"] < 0).all():
        raise ValueError("the labels carry no folds; rerun 00_prepare")
    train, valid = table[table["fold"] != fold], table[table["fold"] == fold]
    if train.empty or valid.empty:
        raise ValueError(f"fold {fold}: {len(train)} training and {len(valid)} validation rows; check n_folds")
    return train.reset_index(drop=True), valid.reset_index(drop=True)


def completed_runs(work_dir: str | Path, stage: str) -> list[Path]:
    """Run folders of a per-fold stage that hold final weights, sorted (fold, then seed)."""
    runs = sorted(p.parent for p in (Path(work_dir) / stage).glob("fold*-seed*/model.safetensors"))
    if not runs:
        raise FileNotFoundError(f"{Path(work_dir) / stage}: no finished run (model.safetensors); train {stage} first")
    return runs


def load_run(run_dir: Path, device: torch.device) -> tuple[nn.Module, Any]:
    """A finished run's network (rebuilt from its config.json, no pretrained download) with its weights, in eval mode."""
    from rsna22_utils.config import load_config
    from rsna22_utils.train import load_weights

    run_cfg = load_config(run_dir / "config.json")
    model = create_model(run_cfg, load_pretrained=False)
    load_weights(model, run_dir / "model.safetensors")
    return model.to(device).eval(), run_cfg


# --------------------------------------------------------------------------- 01/02 box


def _box_table(prepared: Prepared, cache: StudyCache) -> pd.DataFrame:
    """slice_boxes joined with each slice's original rows/cols (box pixels are original pixels)."""
    boxes = prepared.read("slice_boxes")
    sizes = cache.all_slices()[["StudyInstanceUID", "slice_index", "rows", "cols"]]
    table = boxes.merge(sizes, on=["StudyInstanceUID", "slice_index"], how="inner", validate="one_to_one")
    return table.fillna({c: 0.0 for c in BOX_COLUMNS})


class BoxTask:
    """Box model: loss, per-slice predictions in original pixels, and validation scores."""

    def __init__(self, valid_table: pd.DataFrame, box_weight: float = 5.0) -> None:
        self.valid_table, self.box_weight = valid_table, box_weight

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        from rsna22_utils.models import box_loss

        return box_loss(model(batch), batch, box_weight=self.box_weight)

    def predict(self, model: nn.Module, batch: dict) -> pd.DataFrame:
        out = model(batch)
        rows = self.valid_table.iloc[batch["index"].cpu().numpy()]
        return _box_rows(rows, torch.sigmoid(out["has_box"]).float().cpu().numpy(), out["box"].float().cpu().numpy())

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        from sklearn.metrics import roc_auc_score

        from rsna22_utils.infer import box_iou

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


def _box_rows(rows: pd.DataFrame, p_box: np.ndarray, box: np.ndarray) -> pd.DataFrame:
    """Model outputs (box as fractions of the image) -> table in original pixels."""
    out = rows[["StudyInstanceUID", "slice_index"]].reset_index(drop=True).copy()
    out["p_box"] = p_box
    cols, rows_px = rows["cols"].to_numpy(float), rows["rows"].to_numpy(float)
    for i, (name, scale) in enumerate(zip(BOX_COLUMNS, (cols, rows_px, cols, rows_px))):
        out[name] = box[:, i] * scale
    return out


def train_box(cfg: Any) -> dict:
    """01_train_box: has-box + C1-C7 box on single slices of the segmented studies, one fold x seed."""
    prepared, cache = _open_cache(cfg)
    train, valid = _split(_box_table(prepared, cache), cfg.fold)
    logger.info("box model fold %d: %d training slices, %d validation slices", cfg.fold, len(train), len(valid))
    source = CacheSource(cache)
    model = create_model(cfg)
    return _fit(model, BoxTask(valid, cfg.box_weight), BoxSliceDataset(train, source, augment=True), BoxSliceDataset(valid, source), cfg)


def box_examples(cfg: Any, n: int = 8) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """`n` validation slices that show the spine, with the trained run's boxes and the true ones (cache pixels)."""
    prepared, cache = _open_cache(cfg)
    _, valid = _split(_box_table(prepared, cache), cfg.fold)
    rows = valid[valid["has_box"] > 0.5]
    rows = rows.iloc[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)].reset_index(drop=True)
    dataset = BoxSliceDataset(rows, CacheSource(cache))
    model, _ = load_run(Path(cfg.out_dir), torch.device("cpu"))
    items = [dataset[i] for i in range(len(rows))]
    with torch.inference_mode():
        predicted = model({"image": torch.stack([item["image"] for item in items])})["box"].numpy()
    size = cache.spec.image_size
    images = [((item["image"][0].numpy() + 1) * 127.5).astype(np.uint8) for item in items]
    true = np.stack([item["box"].numpy() for item in items])
    return images, predicted * size, true * size


def infer_box(cfg: Any) -> dict:
    """02_infer_box: every box model on every slice of every study, averaged -> study boxes.

    Writes `slice_predictions.parquet` and `study_boxes.csv` (x0 y0 x1 y1 in original pixels,
    slnum_from / slnum_to / slnum_max as 0-based slice positions head -> feet). When the data
    holds the synthetic generator's truth, also `box_eval.csv` on the studies no box model was
    trained on.
    """
    from rsna22_utils.infer import evaluate_study_boxes, study_boxes

    prepared, cache = _open_cache(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = cache.all_slices()
    for column in ("has_box", *BOX_COLUMNS):
        table[column] = 0.0
    dataset = BoxSliceDataset(table, CacheSource(cache))
    loader = DataLoader(dataset, batch_size=cfg.infer_batch_size, num_workers=cfg.num_workers, shuffle=False)
    device = _device(cfg)
    runs = completed_runs(cfg.work_dir, "01_train_box")
    p_sum, box_sum = np.zeros(len(table)), np.zeros((len(table), 4))
    for run in runs:
        model, _ = load_run(run, device)
        with torch.inference_mode():
            for batch in tqdm(loader, desc=f"box {run.name}", unit="batch"):
                index = batch["index"].numpy()
                result = model({"image": batch["image"].to(device)})
                p_sum[index] += torch.sigmoid(result["has_box"]).float().cpu().numpy()
                box_sum[index] += result["box"].float().cpu().numpy()
    predictions = _box_rows(table, p_sum / len(runs), box_sum / len(runs))
    predictions.to_parquet(out / "slice_predictions.parquet", index=False)
    boxes = study_boxes(predictions, threshold=cfg.has_box_threshold, smooth=cfg.box_smooth)
    boxes.to_csv(out / "study_boxes.csv", index=False)
    logger.info("%d models -> boxes of %d studies written to %s", len(runs), len(boxes), out / "study_boxes.csv")
    metrics: dict[str, Any] = {"models": [str(r) for r in runs], "studies": len(boxes)}

    truth_path = Path(cfg.data_dir) / "_synthetic" / "studies.csv"
    if truth_path.exists():
        truth = pd.read_csv(truth_path)
        trained_on = set(prepared.read("slice_boxes")["StudyInstanceUID"])
        truth = truth[~truth["StudyInstanceUID"].isin(trained_on)]
        evaluation = evaluate_study_boxes(boxes, truth[["StudyInstanceUID", *BOX_COLUMNS, "slnum_from", "slnum_to"]])
        evaluation.to_csv(out / "box_eval.csv", index=False)
        metrics.update(
            eval_studies=len(evaluation),
            median_iou=float(evaluation["iou"].median()),
            median_from_error=float(evaluation["from_error"].median()),
            median_to_error=float(evaluation["to_error"].median()),
            median_range_error=float(np.median(np.maximum(evaluation["from_error"], evaluation["to_error"]))),
        )
        logger.info(
            "study boxes on %d studies no box model saw: median IoU %.3f, median slice-range error %.1f (from) / %.1f (to)",
            len(evaluation), metrics["median_iou"], metrics["median_from_error"], metrics["median_to_error"],
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def read_study_boxes(work_dir: str | Path) -> pd.DataFrame:
    path = Path(work_dir) / "02_infer_box" / "study_boxes.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run 02_infer_box first")
    return pd.read_csv(path)


# --------------------------------------------------------------------------- 03/04/05 sequences


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
        from rsna22_utils.models import sequence_loss

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
        from sklearn.metrics import roc_auc_score

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
    labels = {uid: group[VERTEBRAE].to_numpy(np.float32) for uid, group in ratios.groupby("StudyInstanceUID")}
    folds = ratios.groupby("StudyInstanceUID")["fold"].first().reset_index()
    missing = [uid for uid in labels if uid not in set(cache.uids)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} segmented studies are not in the study cache {cache.root}, e.g. {missing[:3]}")
    return labels, folds


def _fracture_labels(cfg: Any, prepared: Prepared) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    path = Path(cfg.work_dir) / "04_infer_vertebra" / "slice_labels.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run 04_infer_vertebra first")
    table = pd.read_parquet(path).sort_values(["StudyInstanceUID", "slice_index"])
    columns = [f"{v}_pred" for v in VERTEBRAE] + [f"{v}_frac" for v in VERTEBRAE]
    labels = {uid: group[columns].to_numpy(np.float32) for uid, group in table.groupby("StudyInstanceUID")}
    folds = prepared.read("folds")[["StudyInstanceUID", "fold"]]
    return labels, folds[folds["StudyInstanceUID"].isin(labels)]


def _box_crops(cfg: Any) -> tuple[dict[str, tuple], dict[str, tuple[int, int]]]:
    boxes = read_study_boxes(cfg.work_dir).set_index("StudyInstanceUID")
    crops = {uid: tuple(row[BOX_COLUMNS]) for uid, row in boxes.iterrows()}
    ranges = {uid: (int(row["slnum_from"]), int(row["slnum_to"])) for uid, row in boxes.iterrows()}
    return crops, ranges


def _sequence_datasets(cfg: Any, labels: dict[str, np.ndarray], folds: pd.DataFrame, cache: StudyCache, crops=None, ranges=None):
    train_uids = sorted(folds.loc[folds["fold"] != cfg.fold, "StudyInstanceUID"])
    valid_uids = sorted(folds.loc[folds["fold"] == cfg.fold, "StudyInstanceUID"])
    if not train_uids or not valid_uids:
        raise ValueError(f"fold {cfg.fold}: {len(train_uids)} training and {len(valid_uids)} validation studies")
    common = dict(
        seq_len=cfg.seq_len, slices_per_image=cfg.slices_per_image, crops=crops, crop_margin=cfg.crop_margin,
        output_size=cfg.crop_size if crops else None,
    )
    # vertebra windows should show the spine; fracture windows should show a fracture
    positive = labels if cfg.task == "vertebra" else {uid: lab[:, 7:] for uid, lab in labels.items()}
    train = SequenceDataset(
        train_uids, cache, labels, mode="train", samples_per_study=cfg.samples_per_study,
        positive_bias=cfg.positive_window_bias, ranges=ranges, augment=True, positive_labels=positive, **common,
    )
    valid = SequenceDataset(valid_uids, cache, labels, mode="infer", stride=cfg.infer_stride, ranges=ranges, **common)
    return train, valid


def train_vertebra(cfg: Any) -> dict:
    """03_train_vertebra: the 2.5D CNN + BiLSTM on per-slice vertebra ratios of the segmented studies."""
    prepared, cache = _open_cache(cfg)
    labels, folds = _vertebra_labels(prepared, cache)
    train, valid = _sequence_datasets(cfg, labels, folds, cache)
    logger.info("vertebra model fold %d: %d training / %d validation studies", cfg.fold, len(train.uids), len(valid.uids))
    return _fit(create_model(cfg), SequenceTask(valid, VERTEBRAE), train, valid, cfg)


def train_fracture(cfg: Any) -> dict:
    """05_train_fracture: the same model on box crops of every train study, 7 vertebra + 7 fracture targets."""
    prepared, cache = _open_cache(cfg)
    labels, folds = _fracture_labels(cfg, prepared)
    crops, ranges = _box_crops(cfg)
    train, valid = _sequence_datasets(cfg, labels, folds, cache, crops if cfg.crop_by_box else None)
    names = [f"{v}" for v in VERTEBRAE] + [f"{v}_frac" for v in VERTEBRAE]
    logger.info("fracture model fold %d: %d training / %d validation studies", cfg.fold, len(train.uids), len(valid.uids))
    model = create_model(cfg)
    if cfg.init_encoder_from:
        _init_encoder(model, cfg)
    return _fit(model, SequenceTask(valid, names, cfg.fracture_loss_weight, cfg.fracture_pos_weight), train, valid, cfg)


def _init_encoder(model: nn.Module, cfg: Any) -> None:
    """Copy the CNN weights of a stage-03 run (`init_encoder_from`) into `model.encoder`."""
    run = Path(cfg.init_encoder_from)
    if cfg.init_encoder_from == "vertebra":
        run = Path(cfg.work_dir) / "03_train_vertebra" / f"fold{cfg.fold}-seed{cfg.seed}"
    source, source_cfg = load_run(run, torch.device("cpu"))
    if source_cfg.backbone != cfg.backbone or source_cfg.slices_per_image != cfg.slices_per_image:
        raise ValueError(
            f"{run}: its CNN is {source_cfg.backbone} on {source_cfg.slices_per_image} slices per image, "
            f"this run's is {cfg.backbone} on {cfg.slices_per_image}: init_encoder_from needs the same"
        )
    model.encoder.load_state_dict(source.encoder.state_dict())
    logger.info("fracture model CNN initialised from %s", run)


def predict_sequences(
    models: list[nn.Module], dataset: SequenceDataset, device: torch.device, batch_size: int, num_workers: int = 0, desc: str = "windows"
) -> dict[str, np.ndarray]:
    """Overlapping windows through every model, averaged over models and windows -> per-slice probabilities."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    windows: dict[str, list[tuple[int, np.ndarray]]] = {}
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch"):
            images = batch["image"].to(device)
            probs = torch.stack([torch.sigmoid(m({"image": images})["logits"].float()) for m in models]).mean(0).cpu().numpy()
            for b in range(probs.shape[0]):
                uid = dataset.uids[int(batch["study"][b])]
                windows.setdefault(uid, []).append((int(batch["start"][b]), probs[b]))
    return spread_window_predictions(windows, dataset.n_slices, dataset.k)


def infer_vertebra(cfg: Any) -> dict:
    """04_infer_vertebra: per-slice C1..C7 for every train study (mean over vertebra models and windows).

    Rescaled to peak at 1 per study (as the ratio labels do) and multiplied by the study's fracture
    labels they become approximate per-slice fracture labels `C1_frac..C7_frac` (the 3rd place's
    trick to train a slice model without slice labels); see `labels.fracture_slice_labels`.
    Writes `slice_labels.parquet` (StudyInstanceUID, slice_index, C*_pred, C*_frac).
    """
    prepared, cache = _open_cache(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg)
    models = [load_run(run, device)[0] for run in completed_runs(cfg.work_dir, "03_train_vertebra")]
    folds = prepared.read("folds")
    uids = sorted(set(folds["StudyInstanceUID"]) & set(cache.uids))
    dataset = SequenceDataset(uids, cache, None, seq_len=cfg.seq_len, slices_per_image=cfg.slices_per_image, mode="infer", stride=cfg.infer_stride)
    per_slice = predict_sequences(models, dataset, device, cfg.infer_batch_size, cfg.num_workers, desc="vertebra windows")
    study_labels = folds.set_index("StudyInstanceUID")[VERTEBRAE]
    frames = []
    for uid in uids:
        vertebra, fracture = fracture_slice_labels(per_slice[uid], study_labels.loc[uid].to_numpy(float))
        frame = pd.DataFrame(vertebra, columns=[f"{v}_pred" for v in VERTEBRAE])
        frame[[f"{v}_frac" for v in VERTEBRAE]] = fracture
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
        metrics["mae_vs_segmentation"] = float(np.mean(np.abs(ratios[VERTEBRAE].to_numpy() - ratios[[f"{v}_pred" for v in VERTEBRAE]].to_numpy())))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# --------------------------------------------------------------------------- 06 study


class StudyEmbeddings(Dataset):
    """Precomputed per-image embeddings of each study (the CNN is frozen) + its 8 labels."""

    def __init__(self, uids: list[str], embeddings: dict[str, np.ndarray], labels: pd.DataFrame | None, max_len: int) -> None:
        from rsna22_utils.metric import TARGETS

        self.uids, self.embeddings, self.max_len = uids, embeddings, max_len
        self.targets = None if labels is None else labels.set_index("StudyInstanceUID").loc[uids, list(TARGETS)].to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from rsna22_utils.models import fit_length

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
            values = [torch.nn.functional.pad(v, (0, 0, 0, length - v.shape[0]) if v.dim() == 2 else (0, length - v.shape[0])) for v in values]
        batch[key] = torch.stack(values)
    return batch


class StudyTask:
    """Study model: the competition metric as loss; OOF rows in the submission's columns."""

    def __init__(self, dataset: StudyEmbeddings, labels: pd.DataFrame) -> None:
        self.dataset, self.labels = dataset, labels

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        from rsna22_utils.metric import competition_loss

        return competition_loss(model(batch)["logits"].float(), batch["target"].float())

    def predict(self, model: nn.Module, batch: dict) -> pd.DataFrame:
        from rsna22_utils.metric import TARGETS

        probs = torch.sigmoid(model(batch)["logits"].float()).cpu().numpy()
        frame = pd.DataFrame(probs, columns=list(TARGETS))
        frame.insert(0, "StudyInstanceUID", [self.dataset.uids[int(i)] for i in batch["study"]])
        return frame

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        from rsna22_utils.metric import per_target_auc, prior_predictions, score, solution_from_labels, submission_from_predictions

        labels = self.labels[self.labels["StudyInstanceUID"].isin(predictions["StudyInstanceUID"])]
        solution = solution_from_labels(labels)
        metrics = {"metric": score(solution, submission_from_predictions(predictions))}
        prior = prior_predictions(self.labels, list(predictions["StudyInstanceUID"]))
        metrics["prior_metric"] = score(solution, submission_from_predictions(prior))
        metrics.update({f"auc_{k}": v for k, v in per_target_auc(labels, predictions).items()})
        return metrics


def embed_studies(
    encoder: nn.Module, cache: StudyCache, uids: list[str], cfg: Any, crops: dict, ranges: dict, device: torch.device
) -> dict[str, np.ndarray]:
    """Frozen CNN embeddings of every 3-slice image inside each study's slice range (chunks of seq_len images)."""
    dataset = SequenceDataset(
        uids, cache, None, seq_len=cfg.seq_len, slices_per_image=cfg.slices_per_image, mode="infer",
        stride=cfg.seq_len * cfg.slices_per_image, ranges=ranges, crops=crops if cfg.crop_by_box else None,
        crop_margin=cfg.crop_margin, output_size=cfg.crop_size if cfg.crop_by_box else None,
    )
    loader = DataLoader(dataset, batch_size=max(1, cfg.infer_batch_size), num_workers=cfg.num_workers, shuffle=False)
    chunks: dict[str, list[tuple[int, np.ndarray]]] = {}
    with torch.inference_mode():
        for batch in tqdm(loader, desc="embed studies", unit="batch"):
            images = batch["image"].to(device)
            features = encoder(images.flatten(0, 1)).view(*images.shape[:2], -1).float().cpu().numpy()
            for b in range(features.shape[0]):
                uid = dataset.uids[int(batch["study"][b])]
                keep = batch["mask"][b].numpy() > 0.5
                chunks.setdefault(uid, []).append((int(batch["start"][b]), features[b][keep]))
    embeddings = {}
    for uid, parts in chunks.items():
        parts.sort(key=lambda part: part[0])
        first, last = ranges[uid]
        sequence = np.concatenate([p for _, p in parts])
        embeddings[uid] = sequence[: max(1, (last - first + 1 + cfg.slices_per_image - 1) // cfg.slices_per_image)]
    return embeddings


# Stage-05 settings a stage-06 run copies into its own config (the frozen CNN and how it sees images).
STUDY_SETTINGS_FROM_FRACTURE_RUN = ("backbone", "seq_len", "slices_per_image", "crop_by_box", "crop_margin", "crop_size")


def study_head(cfg: Any, sequence_model: nn.Module) -> nn.Module:
    """A stage-06 config's StudyHead on a stage-05 SequenceModel (with its frozen evidence layers if `slice_evidence`)."""
    from rsna22_utils.models import SliceEvidence, StudyHead

    evidence = SliceEvidence(sequence_model.lstm, sequence_model.head) if cfg.slice_evidence else None
    return StudyHead(sequence_model.embedding_size, lstm_hidden=cfg.lstm_hidden, dropout=cfg.dropout, evidence=evidence)


def train_study(cfg: Any) -> dict:
    """06_train_study: stage-05 CNN frozen, a new BiLSTM + attention + max pooling head (+ the stage-05 evidence), metric as loss."""
    from rsna22_utils.models import StudyModel

    prepared, cache = _open_cache(cfg)
    device = _device(cfg)
    fracture_run = Path(cfg.fracture_run or Path(cfg.work_dir) / "05_train_fracture" / f"fold{cfg.fold}-seed{cfg.seed}")
    sequence_model, fracture_cfg = load_run(fracture_run, device)
    if int(fracture_cfg.fold) != int(cfg.fold):
        raise ValueError(f"{fracture_run}: trained for fold {fracture_cfg.fold}, not fold {cfg.fold}: its CNN has seen this fold")
    # the study model sees images exactly as stage 05 did, and its config.json alone rebuilds it (07_inference)
    for name in STUDY_SETTINGS_FROM_FRACTURE_RUN:
        setattr(cfg, name, getattr(fracture_cfg, name))
    cfg.fracture_lstm_hidden = int(fracture_cfg.lstm_hidden)

    folds = prepared.read("folds")
    crops, ranges = _box_crops(cfg)
    uids = sorted(set(folds["StudyInstanceUID"]) & set(cache.uids) & set(ranges))
    embeddings = embed_studies(sequence_model.encoder, cache, uids, cfg, crops, ranges, device)
    if cfg.save_embeddings:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(Path(cfg.out_dir) / "embeddings.npz", **embeddings)
    train_uids = [u for u in uids if int(folds.set_index("StudyInstanceUID").loc[u, "fold"]) != cfg.fold]
    valid_uids = [u for u in uids if u not in set(train_uids)]
    train = StudyEmbeddings(train_uids, embeddings, folds, cfg.max_len)
    valid = StudyEmbeddings(valid_uids, embeddings, folds, cfg.max_len)
    sequence_model = sequence_model.cpu()
    head = study_head(cfg, sequence_model)
    if head.evidence is None:
        head.start_from_prior(torch.from_numpy(train.targets.mean(axis=0)))
    else:  # starts from the prior itself, then fits the evidence weights
        evidence = torch.cat([head.evidence(item["embeddings"][None], item["mask"][None]) for item in train])
        head.start_from_evidence(evidence, torch.from_numpy(train.targets))
        logger.info("evidence weights (patient_overall, C1..C7): %s", [round(float(w), 2) for w in head.evidence_weight])
    model = StudyModel(sequence_model.encoder, head, max_len=cfg.max_len)
    logger.info("study model fold %d: %d training / %d validation studies", cfg.fold, len(train), len(valid))
    return _fit(model, StudyTask(valid, folds), train, valid, cfg, collate_fn=pad_collate)


# --------------------------------------------------------------------------- registry

STAGE_FUNCTIONS: dict[str, Callable[[Any], dict]] = {
    "00_prepare": prepare,
    "01_train_box": train_box,
    "02_infer_box": infer_box,
    "03_train_vertebra": train_vertebra,
    "04_infer_vertebra": infer_vertebra,
    "05_train_fracture": train_fracture,
    "06_train_study": train_study,
}


def run_stage_function(stage: str, cfg: Any) -> dict:
    """Run one stage with a resolved config (what notebooks and `python -m rsna22_utils train` do)."""
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_FUNCTIONS)}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    return STAGE_FUNCTIONS[stage](cfg)
