"""00_prepare: every image's header in one table, studies ordered by z, folds by patient, the head-cropped cache.

The cache holds each study once, decoded and cropped to the head (the largest non-air connected
component, + `crop_border` px), resized to `cache_size` square and stored as uint8 with four channels:

    0      HU clipped to 0-255 (the seed's 8-bit images; the triplet input windows it when loading)
    1-3    the 3-window input: brain, subdural and bone windows of the full HU range

so no DICOM is decoded twice and either input reads the same file. Folder written (`Prepared`):

    images.parquet       one row per image: ID, split, PatientID, StudyInstanceUID, SeriesInstanceUID,
                         ImagePositionPatient (x, y, z), rescale, study order (slice_index, n_slices), labels (train), fold (train)
    folds.csv            PatientID, fold
    failures.csv         images that could not be read (ID, path, reason), when any
    cache/<size>px/<StudyInstanceUID>.npy     uint8 (slices head -> feet, size, size, 4)
    cache/<size>px/crops.csv                  each study's head box in the original pixels
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from rsna22_utils.core.cache import open_npy, remove_stale_npy, write_npy
from rsna22_utils.core.dicom import read_slice, window
from rsna22_utils.core.files import atomic_write
from rsna22_utils.core.pool import note_item, run_tasks
from rsna22_utils.intracranial.configs import PrepareConfig
from rsna22_utils.intracranial.labels import TEST_DIR, TRAIN_DIR, TRAIN_LABELS, wide_from_rows

logger = logging.getLogger(__name__)

SPLITS = {"train": TRAIN_DIR, "test": TEST_DIR}
HEADER_COLUMNS = [
    "ID",
    "split",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "x",
    "y",
    "z",
    "RescaleSlope",
    "RescaleIntercept",
    "path",
]
CACHE_CHANNELS = 4  # HU 0-255, brain, subdural, bone
CACHE_SETTINGS = ("cache_size", "crop_border", "head_threshold", "windows")
_FILES_PER_TASK = 256


@dataclass(frozen=True)
class Prepared:
    """The folder 00_prepare wrote, with one property per output so no stage guesses a path."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images.parquet"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    def cache_dir(self, size: int) -> Path:
        return self.root / "cache" / f"{size}px"

    def read_images(self) -> pd.DataFrame:
        if not self.images.is_file():
            raise FileNotFoundError(f"{self.images}: missing; run 00_prepare first (prepared_dir={self.root})")
        return pd.read_parquet(self.images)

    def cache_size(self) -> int:
        """The size of the one cache 00_prepare built."""
        found = sorted((self.root / "cache").glob("*px"))
        if len(found) != 1:
            raise FileNotFoundError(f"{self.root / 'cache'}: expected one cache folder, found {[p.name for p in found]}; run 00_prepare")
        return int(found[0].name[: -len("px")])

    def cache_spec(self, size: int) -> dict[str, Any]:
        """The settings the cache was built with (cache_settings)."""
        return json.loads((self.cache_dir(size) / "spec.json").read_text())

    def volume(self, size: int, study: str) -> np.ndarray:
        """A study's cached uint8 (slices, size, size, 4), memory-mapped."""
        return open_npy(str(self.cache_dir(size) / f"{study}.npy"))


# ----------------------------------------------------------------------------- headers


def _read_headers(split: str, paths: list[str]) -> tuple[list[dict], list[dict]]:
    """Header rows of some files (no pixels) and the files that could not be read."""
    import pydicom

    rows, failures = [], []
    tags = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "RescaleSlope", "RescaleIntercept"]
    for path in paths:
        note_item(path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            position = [float(v) for v in ds.ImagePositionPatient]
            rows.append(
                {
                    "ID": Path(path).stem,
                    "split": split,
                    "PatientID": str(ds.PatientID),
                    "StudyInstanceUID": str(ds.StudyInstanceUID),
                    "SeriesInstanceUID": str(getattr(ds, "SeriesInstanceUID", "")),
                    "x": position[0],  # ImagePositionPatient
                    "y": position[1],
                    "z": position[2],
                    "RescaleSlope": float(ds.RescaleSlope),
                    "RescaleIntercept": float(ds.RescaleIntercept),
                    "path": path,
                }
            )
        except Exception as error:  # reported per file, the scan goes on
            failures.append({"ID": Path(path).stem, "path": path, "reason": f"header: {type(error).__name__}: {error}"})
    return rows, failures


def scan_headers(data_dir: Path, workers: int, splits: tuple[str, ...] = tuple(SPLITS)) -> tuple[pd.DataFrame, list[dict]]:
    """One row per image of stage_2_train/ and stage_2_test/ (HEADER_COLUMNS), and the unreadable files."""
    tasks = []
    for split, folder in ((split, SPLITS[split]) for split in splits):
        files = sorted(str(p) for p in (data_dir / folder).glob("*.dcm")) if (data_dir / folder).is_dir() else []
        tasks += [(split, files[i : i + _FILES_PER_TASK]) for i in range(0, len(files), _FILES_PER_TASK)]
    if not tasks:
        raise FileNotFoundError(f"{data_dir}: no DICOM files under {' or '.join(SPLITS.values())}/")
    rows, failures = [], []
    for index, result, error in run_tasks(
        _read_headers, tasks, workers, desc="read headers", unit="chunk", label=lambda t: f"{t[0]} files"
    ):
        if error is not None:
            failures += [{"ID": Path(p).stem, "path": p, "reason": f"{type(error).__name__}: {error}"} for p in tasks[index][1]]
            continue
        rows += result[0]
        failures += result[1]
    return pd.DataFrame(rows, columns=HEADER_COLUMNS), failures


def order_studies(headers: pd.DataFrame) -> pd.DataFrame:
    """Each study's images head -> feet (descending z, ties by ID): `slice_index` 0..n_slices-1."""
    table = headers.sort_values(["StudyInstanceUID", "z", "ID"], ascending=[True, False, True], kind="stable").reset_index(drop=True)
    table["slice_index"] = table.groupby("StudyInstanceUID").cumcount()
    table["n_slices"] = table.groupby("StudyInstanceUID")["ID"].transform("size")
    return table


# ----------------------------------------------------------------------------- labels and folds


def attach_labels(images: pd.DataFrame, labels_csv: Path) -> pd.DataFrame:
    """The train images' six labels from stage_2_train.csv; a train image without labels is an error naming it."""
    try:
        rows = pd.read_csv(labels_csv, dtype={"ID": str})
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{labels_csv}: cannot read the train labels ({exc})") from None
    wide = wide_from_rows(rows, str(labels_csv))
    out = images.merge(wide, on="ID", how="left")
    unlabelled = out[(out["split"] == "train") & out["any"].isna()]
    if len(unlabelled):
        raise ValueError(f"{labels_csv}: {len(unlabelled)} train image(s) have no labels, e.g. {list(unlabelled['ID'][:5])}")
    without_file = len(set(wide["ID"]) - set(images["ID"]))
    if without_file:
        logger.warning("%s: %d labelled images have no readable DICOM; left out", labels_csv, without_file)
    return out


def make_folds(images: pd.DataFrame, n_folds: int, seed: int, fold_file: str = "") -> pd.DataFrame:
    """PatientID -> fold: a given fold file (PatientID or StudyInstanceUID + fold), or folds grouped by patient
    that spread the `any` images evenly (sklearn's StratifiedGroupKFold)."""
    train = images[images["split"] == "train"]
    if fold_file:
        given = pd.read_csv(fold_file)
        key = next((k for k in ("PatientID", "StudyInstanceUID") if k in given.columns), None)
        if key is None or "fold" not in given.columns:
            raise ValueError(f"{fold_file}: a fold file needs a fold column and PatientID or StudyInstanceUID, has {list(given.columns)}")
        folds = train[["PatientID", key]].drop_duplicates().merge(given[[key, "fold"]].drop_duplicates(key), on=key, how="left")
        missing = folds[folds["fold"].isna()]
        if len(missing):
            raise ValueError(f"{fold_file}: {len(missing)} train {key}(s) have no fold, e.g. {list(missing[key][:5])}")
        folds = folds[["PatientID", "fold"]].drop_duplicates()
        split = folds.groupby("PatientID")["fold"].nunique()
        if (split > 1).any():
            raise ValueError(
                f"{fold_file}: patients in several folds (folds must group by patient), e.g. {list(split[split > 1].index[:5])}"
            )
        return folds.astype({"fold": int}).sort_values("PatientID").reset_index(drop=True)
    from sklearn.model_selection import StratifiedGroupKFold

    if train["PatientID"].nunique() < n_folds:
        raise ValueError(f"{train['PatientID'].nunique()} train patients cannot fill {n_folds} folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.zeros(len(train), dtype=np.int64)
    for k, (_, valid) in enumerate(splitter.split(train, train["any"].astype(int), groups=train["PatientID"])):
        fold[valid] = k
    folds = pd.DataFrame({"PatientID": train["PatientID"].to_numpy(), "fold": fold}).drop_duplicates()
    return folds.sort_values("PatientID").reset_index(drop=True)


# ----------------------------------------------------------------------------- cache


def head_box(volume: np.ndarray, threshold: float, border: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the head of a HU volume (slices, rows, cols), `border` px added, x1/y1 exclusive.

    On each slice the head is the largest connected component above `threshold` HU (the head-rest
    and the table are separate components across an air gap); the box is the union over the slices
    whose head is at least half the study's largest, so the small cross-sections near the skull
    base (where a head-rest may be the larger component) cannot widen it.
    """
    from scipy import ndimage

    boxes, areas = [], []
    for hu in volume:
        labelled, n = ndimage.label(hu > threshold)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        rows, cols = ndimage.find_objects(labelled)[largest - 1]
        boxes.append((cols.start, rows.start, cols.stop, rows.stop))
        areas.append(int(sizes[largest - 1]))
    height, width = volume.shape[1:]
    if not boxes:
        return 0, 0, width, height
    keep = [box for box, area in zip(boxes, areas) if area >= 0.5 * max(areas)]
    x0, y0 = min(b[0] for b in keep), min(b[1] for b in keep)
    x1, y1 = max(b[2] for b in keep), max(b[3] for b in keep)
    return max(0, x0 - border), max(0, y0 - border), min(width, x1 + border), min(height, y1 + border)


def encode_study(volume: np.ndarray, box: tuple[int, int, int, int], size: int, windows: list[list[float]]) -> np.ndarray:
    """HU (slices, rows, cols) -> the cached uint8 (slices, size, size, 4): the head crop, resized, HU 0-255 + three windows."""
    x0, y0, x1, y1 = box
    out = np.empty((len(volume), size, size, CACHE_CHANNELS), dtype=np.uint8)
    for i, hu in enumerate(volume):
        crop = hu[y0:y1, x0:x1].astype(np.float32)
        interpolation = cv2.INTER_AREA if max(crop.shape) > size else cv2.INTER_LINEAR
        resized = cv2.resize(crop, (size, size), interpolation=interpolation)
        out[i, ..., 0] = np.clip(resized, 0, 255).astype(np.uint8)
        out[i, ..., 1:] = window(resized, [tuple(w) for w in windows])
    return out


def _cache_study(study: str, paths: list[str], root: Path, settings: dict[str, Any]) -> tuple[str, tuple[int, int, int, int]]:
    """Decode one study's images (head -> feet), find the head, write its cache file; returns (study, box)."""
    slices = []
    for path in paths:
        note_item(path)
        hu, _ = read_slice(path)
        if slices and hu.shape != slices[0].shape:
            raise ValueError(f"{path}: image shape {hu.shape} differs from the study's first image {slices[0].shape}")
        slices.append(hu)
    volume = np.stack(slices)
    box = head_box(volume, settings["head_threshold"], settings["crop_border"])
    write_npy(root / f"{study}.npy", encode_study(volume, box, settings["cache_size"], settings["windows"]))
    return study, box


def cache_settings(cfg: PrepareConfig) -> dict[str, Any]:
    """What the cache's pixels depend on (written as the cache's spec.json; inference rebuilds a cache the same way)."""
    return {key: getattr(cfg, key) for key in CACHE_SETTINGS}


def build_cache(images: pd.DataFrame, prepared: Prepared, settings: dict[str, Any], workers: int) -> list[dict]:
    """Cache every study not cached yet (resumable) as `settings` (cache_settings) say; returns the studies that failed."""
    root = prepared.cache_dir(settings["cache_size"])
    root.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_npy(root)
    if removed:
        logger.info("removed %d temp files of an interrupted cache build in %s", removed, root)
    crops_path = root / "crops.csv"
    crops = pd.read_csv(crops_path) if crops_path.is_file() else pd.DataFrame(columns=["StudyInstanceUID", "x0", "y0", "x1", "y1"])
    spec = root / "spec.json"
    if spec.is_file() and json.loads(spec.read_text()) != settings:
        raise ValueError(f"{spec}: the cache was built with other settings ({spec.read_text().strip()}); use another work_dir")
    atomic_write(spec, lambda tmp: tmp.write_text(json.dumps(settings) + "\n"))
    done = {p.stem for p in root.glob("*.npy") if not p.name.startswith(".")} & set(crops["StudyInstanceUID"].astype(str))
    tasks = [
        (study, list(group["path"]), root, settings) for study, group in images.groupby("StudyInstanceUID", sort=True) if study not in done
    ]
    logger.info("cache %s: %d studies cached, %d to decode", root, len(done), len(tasks))
    boxes, failures = [], []
    for index, result, error in run_tasks(
        _cache_study, tasks, workers, desc="cache studies", unit="study", label=lambda t: f"study {t[0]}"
    ):
        if error is not None:
            failures.append({"StudyInstanceUID": tasks[index][0], "reason": f"{type(error).__name__}: {error}"})
            logger.warning("could not cache study %s: %s", tasks[index][0], failures[-1]["reason"])
            continue
        study, box = result
        boxes.append({"StudyInstanceUID": study, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3]})
    crops = pd.concat([crops, pd.DataFrame(boxes)], ignore_index=True) if boxes else crops
    atomic_write(crops_path, lambda tmp: crops.to_csv(tmp, index=False))
    logger.info("wrote the study cache %s (%d studies, head boxes in %s)", root, len(crops), crops_path)
    return failures


# ----------------------------------------------------------------------------- the stage


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """00_prepare: headers -> study order -> labels -> folds -> cache; fails past `max_failed_images` after writing everything."""
    data_dir, out = Path(cfg.data_dir), Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared = Prepared(out)
    workers = cfg.workers or os.cpu_count() or 1
    headers, failures = scan_headers(data_dir, workers)
    images = attach_labels(order_studies(headers), data_dir / TRAIN_LABELS)
    folds = make_folds(images, cfg.n_folds, cfg.split_seed, cfg.fold_file)
    atomic_write(prepared.folds, lambda tmp: folds.to_csv(tmp, index=False))
    images = images.merge(folds, on="PatientID", how="left")
    images["fold"] = images["fold"].fillna(-1).astype(int)  # test images: no fold
    cache_failures = build_cache(images, prepared, cache_settings(cfg), workers)
    failed_studies = {f["StudyInstanceUID"] for f in cache_failures}
    failures += [
        {"ID": row.ID, "path": row.path, "reason": f"study not cached: {reason}"}
        for study, reason in ((f["StudyInstanceUID"], f["reason"]) for f in cache_failures)
        for row in images[images["StudyInstanceUID"] == study].itertuples()
    ]
    images = images[~images["StudyInstanceUID"].isin(failed_studies)].reset_index(drop=True)
    atomic_write(prepared.images, lambda tmp: images.to_parquet(tmp, index=False))
    failures_path = out / "failures.csv"
    if failures:
        pd.DataFrame(failures).to_csv(failures_path, index=False)
    elif failures_path.exists():
        failures_path.unlink()
    train = images[images["split"] == "train"]
    summary = {
        "data_dir": str(data_dir.resolve()),
        "images": len(images),
        "train_images": len(train),
        "test_images": int((images["split"] == "test").sum()),
        "studies": int(images["StudyInstanceUID"].nunique()),
        "patients": int(images["PatientID"].nunique()),
        "any_prevalence": float(train["any"].mean()) if len(train) else float("nan"),
        "failed_images": len(failures),
        "cache": str(prepared.cache_dir(cfg.cache_size)),
    }
    (out / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %s (%d images, %d studies) and %s", prepared.images, len(images), summary["studies"], prepared.folds)
    if len(failures) > cfg.max_failed_images:
        shown = "; ".join(f"{f['path']}: {f['reason']}" for f in failures[:3])
        raise RuntimeError(
            f"00_prepare: {len(failures)} images could not be read (e.g. {shown}); every output is written under {out} "
            f"(list: {failures_path}). Fix or remove them, or allow them with -p max_failed_images={len(failures)}"
        )
    return summary


def split_by_fold(images: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(train, valid) images of a run of `fold` (fold -1: every train image, no validation)."""
    train = images[images["split"] == "train"]
    if fold < 0:
        return train.reset_index(drop=True), None
    return train[train["fold"] != fold].reset_index(drop=True), train[train["fold"] == fold].reset_index(drop=True)
