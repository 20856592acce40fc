"""02_predict: every 01 run with TTA (identity, hflip, rotations -10 / +10), averaged.

Each training image is predicted by the runs that validated on its fold (out of fold: what 03 fits
its smoothing on, honestly); the test images by the mean of the serving runs (the full-data runs
when there are any, else every fold's run: the seed's mean of the folds). Writes
`oof_predictions.parquet` and `test_predictions.parquet` (ID + the six probabilities) and
`metrics.json` (the out-of-fold metric vs the prevalence prior).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rsna22_utils.core.device import resolve_device
from rsna22_utils.core.files import atomic_write
from rsna22_utils.core.registry import finished_runs, out_of_fold, parse_run_name, serving_runs
from rsna22_utils.core.runs import load_run
from rsna22_utils.intracranial.configs import PredictConfig
from rsna22_utils.intracranial.data import ImageDataset, tta_views
from rsna22_utils.intracranial.labels import IMAGE_ID, LABELS
from rsna22_utils.intracranial.metric import prior_predictions, score_wide
from rsna22_utils.intracranial.models import untrained_network
from rsna22_utils.intracranial.prepare import Prepared
from rsna22_utils.intracranial.stages import TRAIN

logger = logging.getLogger(__name__)

OOF_PREDICTIONS = "oof_predictions.parquet"
TEST_PREDICTIONS = "test_predictions.parquet"


@torch.no_grad()
def predict_images(run: Path, images: pd.DataFrame, prepared: Prepared, cfg: Any, device: torch.device) -> np.ndarray:
    """(images, 6) probabilities of one run, the mean over the TTA views."""
    model, run_cfg = load_run(run, device, untrained_network)
    loader = DataLoader(ImageDataset(images, prepared, run_cfg), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    out = np.empty((len(images), len(LABELS)), dtype=np.float64)
    start = 0
    for batch in tqdm(loader, desc=f"predict {run.name}", leave=False):
        views = tta_views(batch["image"].to(device), cfg.tta)
        probabilities = torch.stack([torch.sigmoid(model(view).float()) for view in views]).mean(dim=0)
        out[start : start + len(probabilities)] = probabilities.cpu().numpy()
        start += len(probabilities)
    return out


def mean_of_runs(runs: list[Path], images: pd.DataFrame, prepared: Prepared, cfg: Any, device: torch.device) -> pd.DataFrame:
    """ID + the six probabilities of `images`: the mean over `runs` of each run's TTA mean (cfg: tta, batch_size, num_workers)."""
    probabilities = np.mean([predict_images(run, images, prepared, cfg, device) for run in runs], axis=0)
    return pd.DataFrame({IMAGE_ID: images[IMAGE_ID].to_numpy(), **{label: probabilities[:, k] for k, label in enumerate(LABELS)}})


def predict(cfg: PredictConfig) -> dict[str, Any]:
    """02_predict: out-of-fold predictions of the training images, and the test images' mean of the runs."""
    prepared = Prepared(Path(cfg.prepared_dir))
    images = prepared.read_images()
    runs = finished_runs(cfg.work_dir, TRAIN)
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = images[images["split"] == "train"]
    folds = sorted({key.fold for run in runs if (key := parse_run_name(run.name)) is not None and key.fold >= 0})
    oof_parts = []
    for fold in folds:
        fold_images = train[train["fold"] == fold]
        if len(fold_images):
            oof_parts.append(mean_of_runs(out_of_fold(runs, fold), fold_images, prepared, cfg, device))
    result: dict[str, Any] = {"runs": [run.name for run in runs], "tta": cfg.tta}
    if oof_parts:
        oof = pd.concat(oof_parts, ignore_index=True)
        atomic_write(out / OOF_PREDICTIONS, lambda tmp: oof.to_parquet(tmp, index=False))
        labels = train[train[IMAGE_ID].isin(set(oof[IMAGE_ID]))]
        result.update(
            oof_images=len(oof),
            oof_metric=score_wide(labels, oof),
            prior_metric=score_wide(labels, prior_predictions(train, labels[IMAGE_ID])),
        )
        logger.info("wrote %s: out-of-fold metric %.4f (prior %.4f)", out / OOF_PREDICTIONS, result["oof_metric"], result["prior_metric"])
        missing = len(train) - len(oof)
        if missing:
            logger.warning("02_predict: %d training images are in folds no run validated on: no out-of-fold prediction", missing)
    test = images[images["split"] == "test"]
    if len(test):
        serving = serving_runs(runs)
        predictions = mean_of_runs(serving, test, prepared, cfg, device)
        atomic_write(out / TEST_PREDICTIONS, lambda tmp: predictions.to_parquet(tmp, index=False))
        result.update(test_images=len(test), test_runs=[run.name for run in serving])
        logger.info("wrote %s (%d test images, mean of %d runs)", out / TEST_PREDICTIONS, len(test), len(serving))
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
