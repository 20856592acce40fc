"""00_prepare: scan every study, folds, segmentation labels, the study cache; and the folder it writes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rsna22_utils.cervical.configs import PrepareConfig
from rsna22_utils.cervical.labels import build_segmentation_labels, check_study_labels, drop_studies, make_folds
from rsna22_utils.cervical.stages import PREPARE
from rsna22_utils.core.cache import CacheSpec, StudyCache, build_cache
from rsna22_utils.core.config import FULL_DATA_FOLD
from rsna22_utils.core.outputs import StageOutputs
from rsna22_utils.core.scan import dropped_files_path, find_studies, scan_competition

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared(StageOutputs):
    """The folder written by 00_prepare (`prepared_dir`), with one property per table so no stage guesses a path."""

    stage = PREPARE
    files = {
        "slices": "slices.parquet",
        "folds": "folds.csv",
        "slice_boxes": "slice_boxes.parquet",
        "vertebra_ratios": "vertebra_ratios.parquet",
    }

    @property
    def slices(self) -> Path:
        return self.path("slices")

    @property
    def folds(self) -> Path:
        return self.path("folds")

    @property
    def slice_boxes(self) -> Path:
        return self.path("slice_boxes")

    @property
    def vertebra_ratios(self) -> Path:
        return self.path("vertebra_ratios")

    def cache(self, spec: CacheSpec | None = None) -> StudyCache:
        """The study cache (the one built with `spec`, or the only one present)."""
        base = self.root / "cache"
        if spec is not None:
            return StudyCache(base / spec.name)
        found = sorted(p.parent for p in base.glob("*/spec.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"{base}: expected one study cache, found {len(found)}; run 00_prepare first")
        return StudyCache(found[0])


def open_cache(cfg: Any) -> tuple[Prepared, StudyCache, dict[str, Any]]:
    """The prepared folder, its study cache, and the cache's settings for the run's config.

    Models read slices at the cache's resolution, so `image_size` / `windows` of a training run are
    those of the cache: the stage derives them (`core.config.with_derived`) and saves them in the
    run's config.json for inference to reproduce.
    """
    prepared = Prepared(Path(cfg.prepared_dir))
    cache = prepared.cache()
    settings = {"image_size": cache.spec.image_size, "windows": [list(map(float, w)) for w in cache.spec.windows]}
    return prepared, cache, settings


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """00_prepare: scan every study, make/read folds, segmentation labels, build the study cache."""
    data_dir, out = Path(cfg.data_dir), Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared = Prepared(out)
    studies = [study_dir for _, study_dir in find_studies(data_dir)]
    scan_failures = scan_competition(data_dir, prepared.slices, workers=cfg.workers or None, max_dropped=cfg.max_dropped_slices)
    if len(scan_failures) == len(studies):
        raise RuntimeError(f"{data_dir}: no study could be read; reasons in {prepared.slices.with_name('slices.failures.csv')}")
    slices = prepared.read("slices")  # the one table (and study key = folder name) that labels and cache follow

    train = pd.read_csv(data_dir / "train.csv")
    check_study_labels(train, data_dir / "train.csv")
    train = drop_studies(train, cfg.drop_studies)
    folds = make_folds(train, n_folds=cfg.n_folds, seed=cfg.split_seed, fold_file=cfg.fold_file or None)
    folds.to_csv(prepared.folds, index=False)
    logger.info("folds of %d studies written to %s", len(folds), prepared.folds)

    outputs: dict[str, Any] = {"slices": prepared.slices, "folds": prepared.folds, "scan_failures": len(scan_failures)}
    dropped = dropped_files_path(prepared.slices)
    if dropped.exists():  # files left out of studies that were kept, one warning at the scan; counted here
        outputs.update(dropped_files=len(pd.read_csv(dropped)), dropped_files_list=dropped)
    if (data_dir / "segmentations").is_dir():
        outputs.update(build_segmentation_labels(data_dir, out, folds, workers=cfg.workers or None, slices=slices, drop=cfg.drop_studies))
    else:
        logger.warning("%s has no segmentations/: the box and vertebra stages will have no labels", data_dir)

    cache_root, cache_failures = build_cache(studies, out / "cache", CacheSpec.of(cfg), workers=cfg.workers or None, slices=slices)
    outputs.update(cache=cache_root, cache_failures=len(cache_failures))
    if cache_failures:
        logger.warning(
            "00_prepare: %d of %d studies are not in the cache (%s), %d of them unreadable by the scan (%s); the stages go on without them",
            len(cache_failures),
            len(studies),
            cache_root / "failures.csv",
            len(scan_failures),
            prepared.slices.with_name("slices.failures.csv"),
        )
    (out / "prepare.json").write_text(json.dumps({k: str(v) for k, v in outputs.items()}, indent=2))
    _fail_past_allowance(cfg, len(studies), scan_failures, cache_failures, out)
    return outputs


def _fail_past_allowance(cfg: PrepareConfig, n_studies: int, scan_failures: list, cache_failures: list, out: Path) -> None:
    """More failed studies than `max_failed_studies` fail the stage (non-zero exit), after every output is
    written: a user learns it now, not from a box model trained on two thirds of the data."""
    reasons = {Path(study).name: reason for study, reason in cache_failures}
    reasons.update({failure.study: failure.reason for failure in scan_failures})
    if len(reasons) <= cfg.max_failed_studies:
        if reasons:
            logger.warning("00_prepare: %d studies failed, allowed by max_failed_studies=%d", len(reasons), cfg.max_failed_studies)
        return
    shown = "; ".join(f"{uid}: {reason}" for uid, reason in list(reasons.items())[:3])
    raise PrepareFailed(
        f"00_prepare: {len(reasons)} of {n_studies} studies failed (e.g. {shown}); every output is written under {out} "
        f"(lists: slices.failures.csv, cache/*/failures.csv). Fix or remove them, or allow them with "
        f"-p max_failed_studies={len(reasons)}"
    )


class PrepareFailed(RuntimeError):
    """00_prepare finished with more failed studies than allowed."""


def split_by_fold(table: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Rows of other folds (training) and of `fold` (validation); an error when either is empty.

    Fold -1 (a full-data run): every row trains, there is no validation set (None).
    """
    if "fold" not in table or (table["fold"] < 0).all():
        raise ValueError("the labels carry no folds; rerun 00_prepare")
    if fold == FULL_DATA_FOLD:
        train = table[table["fold"] >= 0]
        if train.empty:
            raise ValueError("full-data run: no labelled rows to train on")
        return train.reset_index(drop=True), None
    train, valid = table[table["fold"] != fold], table[table["fold"] == fold]
    if train.empty or valid.empty:
        raise ValueError(f"fold {fold}: {len(train)} training and {len(valid)} validation rows; check n_folds")
    return train.reset_index(drop=True), valid.reset_index(drop=True)
