"""04_inference: the offline Kaggle submission, from the test DICOMs alone.

Test headers -> studies ordered by z -> the head-cropped cache built as the training cache was (the
settings every 01 run recorded) -> every serving 01 run with TTA, averaged -> the 03 smoothing
(`03_smooth/smoothing.json`) -> `submission.csv` with exactly the sample submission's IDs. It uses the
same functions as 00, 02 and 03, so the submission sees what the validation saw.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from rsna22_utils.core.device import resolve_device
from rsna22_utils.core.paths import kaggle_input_dir
from rsna22_utils.core.registry import CONFIG, finished_runs, serving_runs
from rsna22_utils.core.resolve import load_config
from rsna22_utils.intracranial.configs import InferenceConfig
from rsna22_utils.intracranial.labels import SAMPLE_SUBMISSION
from rsna22_utils.intracranial.predict import mean_of_runs
from rsna22_utils.intracranial.prepare import Prepared, build_cache, order_studies, scan_headers
from rsna22_utils.intracranial.smooth import SMOOTHING_FILE, Smoother, neighbour_features, write_submission
from rsna22_utils.intracranial.stages import SMOOTH, TRAIN

logger = logging.getLogger(__name__)

KAGGLE_COMPETITION = "rsna-intracranial-hemorrhage-detection"  # the competition's folder under /kaggle/input


def infer(cfg: InferenceConfig) -> dict[str, Any]:
    """04_inference: submission.csv for the test images of `data_dir` from the runs in `weights_dir`."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else kaggle_input_dir() / KAGGLE_COMPETITION
    weights = Path(cfg.weights_dir or cfg.work_dir)
    runs = serving_runs(finished_runs(weights, TRAIN))
    smoother = Smoother.from_json(weights / SMOOTH / SMOOTHING_FILE)
    trained = load_config(runs[0] / CONFIG)
    settings = {"cache_size": trained.cache_size, "crop_border": trained.crop_border, "head_threshold": trained.head_threshold}
    settings["windows"] = trained.cache_windows
    out = Path(cfg.out_dir)
    workers = cfg.workers or os.cpu_count() or 1
    headers, failures = scan_headers(data_dir, workers, splits=("test",))
    images = order_studies(headers)
    failed = {f["StudyInstanceUID"] for f in build_cache(images, Prepared(out), settings, workers)}
    images = images[~images["StudyInstanceUID"].isin(failed)].reset_index(drop=True)
    predictions = mean_of_runs(runs, images, Prepared(out), cfg, resolve_device(cfg.device))
    final = smoother.predict(neighbour_features(predictions, images, smoother.neighbours), predictions["ID"].to_numpy())
    submission = Path(cfg.out) if cfg.out else out / "submission.csv"
    result = write_submission(final, data_dir / SAMPLE_SUBMISSION, submission, fill=smoother.prevalence)
    result.update(runs=[run.name for run in runs], unreadable_images=len(failures), uncached_studies=len(failed))
    if failures or failed:
        logger.warning(
            "04_inference: %d unreadable test images, %d studies not cached: the training prevalence fills them", len(failures), len(failed)
        )
    return result
