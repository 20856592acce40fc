"""Native-resolution box crops: each study's slices inside its slice range, cut to its squared study box.

The 00 cache holds whole slices at `image_size` (256 px by default): a 512 px cache of the real
train set would be ~160 GB. Stages 05-07 only look at the study box inside the slice range, so the
crop cache keeps just that, at the DICOM's own resolution, windowed to uint8 like the 00 cache
(`crop_source="native"`); a dataset resizes it to `crop_size` when it loads a window. The submission
cuts the same crop from the test study it decoded (`crop_volume`), so training and inference see the
same pixels.

    <work_dir>/02_infer_box/crops/<spec.name>/<uid>/<x0>_<y0>_<x1>_<y1>_z<first>-<last>.npy
        uint8 (last - first + 1, y1 - y0, x1 - x0, n_windows): slices first..last (0-based
        positions of the 00 cache) cut to the squared box (x0..x1, y0..y1 in native pixels)

The file name is the geometry, so a study is reused when a file with its crop and a slice range
that covers the one asked for exists (05 stores a wider range than 06 needs; 06 reads 05's), and
rebuilt when 02's box changed (older files of the study are then removed). Files are written
atomically (`core.cache.write_npy`), so an interrupted build resumes and parallel folds building the
same study never see a half-written file. The build decodes only the slices it keeps.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna22_utils.cervical.geometry import square_crop
from rsna22_utils.cervical.study_box import BoxInference, study_crops
from rsna22_utils.core.cache import CacheSpec, StudyCache, open_npy, remove_stale_npy, write_npy
from rsna22_utils.core.dicom import read_study, window
from rsna22_utils.core.pool import run_tasks

logger = logging.getLogger(__name__)

CROP_SOURCES = ("cache", "native")
_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)_z(\d+)-(\d+)\.npy$")


def stored_range(first: int, last: int, n_slices: int, slice_margin: int) -> tuple[int, int]:
    """Slices first - margin .. last + margin, clipped to the study."""
    return max(0, int(first) - slice_margin), min(int(n_slices) - 1, int(last) + slice_margin)


def crop_volume(volume: np.ndarray, crop: tuple[int, int, int, int], z: tuple[int, int], windows: Any | None = None) -> np.ndarray:
    """Slices z[0]..z[1] of a volume (slices, rows, cols[, channels]) cut to `crop`; an int16 HU volume
    is windowed to uint8 (slices, h, w, n_windows) with `windows` (as the crop cache stores it)."""
    x0, y0, x1, y1 = crop
    part = volume[z[0] : z[1] + 1, y0:y1, x0:x1]
    return window(part, windows) if windows is not None else np.ascontiguousarray(part)


class CropVolume:
    """A study's crops posing as its whole volume (`shape[0]` = the study's slices): indexing slices
    outside the stored range gives black slices, as positions outside a study do in `SequenceDataset`."""

    def __init__(self, array: np.ndarray, first: int, n_slices: int) -> None:
        self.array, self.first = array, int(first)
        self.shape = (int(n_slices), *array.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        z, rest = key[0], key[1:]
        if not isinstance(z, slice):
            z = slice(int(z), int(z) + 1)
            return self[(z, *rest)][0]
        start, stop, step = z.indices(self.shape[0])
        if step != 1:
            raise IndexError("CropVolume takes slice ranges of step 1")
        template = self.array[(slice(0, 1), *rest)]
        out = np.zeros((max(0, stop - start), *template.shape[1:]), dtype=self.array.dtype)
        lo, hi = max(start, self.first), min(stop, self.first + len(self.array))
        if lo < hi:
            out[lo - start : hi - start] = self.array[(slice(lo - self.first, hi - self.first), *rest)]
        return out


@dataclass(frozen=True)
class CropSpec:
    """What a crop cache holds: the 00 cache's windows and the box margin (native pixels, never resized)."""

    windows: tuple[tuple[int, int], ...]
    crop_margin: float = 0.0

    @property
    def name(self) -> str:
        return f"native_m{self.crop_margin:g}_" + "_".join(f"w{c}-{w}" for c, w in self.windows)


class CropCache:
    """Read access in the shape `SequenceDataset` reads a study cache: `.spec`, `.uids`, `.volume(uid)`
    (a CropVolume), `.slices(uid)` (the 00 cache's table). Datasets on it take `crops=None` and
    `output_size=crop_size`: the crop is already cut."""

    def __init__(self, spec: CacheSpec, volumes: dict[str, CropVolume], slices: Any) -> None:
        self.spec, self._volumes, self._slices = spec, volumes, slices

    @property
    def uids(self) -> list[str]:
        return sorted(self._volumes)

    def volume(self, uid: str) -> CropVolume:
        return self._volumes[uid]

    def slices(self, uid: str) -> pd.DataFrame:
        return self._slices(uid)

    def nbytes(self) -> int:
        """Bytes of the crops held (the .npy payloads)."""
        return int(sum(v.array.nbytes for v in self._volumes.values()))

    def n_stored_slices(self) -> int:
        return int(sum(len(v.array) for v in self._volumes.values()))


def crop_cache_dir(work_dir: str | Path, spec: CropSpec) -> Path:
    """Where the crop cache of `spec` lives: beside the study boxes it is cut from."""
    return BoxInference.of(work_dir).crop_cache(spec.name)


def _existing(folder: Path, crop: tuple[int, int, int, int], z: tuple[int, int]) -> tuple[Path, int] | None:
    """A stored file of this crop whose slice range covers z: (path, its first slice)."""
    for path in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if match:
            values = tuple(int(v) for v in match.groups())
            if values[:4] == tuple(crop) and values[4] <= z[0] and values[5] >= z[1]:
                return path, values[4]
    return None


def _write_crop(study_dir: str, rows: pd.DataFrame, crop: tuple[int, int, int, int], windows: tuple, path: Path) -> int:
    volume, _ = read_study(study_dir, slices=rows)
    write_npy(path, crop_volume(volume, crop, (0, len(volume) - 1), windows))
    for old in path.parent.glob("*.npy"):  # crops of an earlier box of this study
        match = _NAME.match(old.name)
        if old != path and match and tuple(int(v) for v in match.groups()[:4]) != tuple(crop):
            old.unlink(missing_ok=True)
    return path.stat().st_size


def open_crop_cache(
    cache: StudyCache,
    root: str | Path,
    boxes: dict[str, tuple],
    ranges: dict[str, tuple[int, int]],
    crop_margin: float,
    slice_margin: int,
    workers: int | None = None,
) -> CropCache:
    """The crop cache of every study in `boxes` (and the 00 cache), building what is missing.

    Each study keeps slices `ranges[uid]` +- `slice_margin` cut to `square_crop(boxes[uid], margin=crop_margin)`,
    decoded once more from its DICOMs (the files and order of the 00 cache's slice table)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cached = set(cache.uids)
    found: dict[str, tuple[Path, int, int]] = {}
    tasks: list[tuple] = []
    for uid in sorted(set(boxes) & cached):
        table = cache.slices(uid)
        rows, cols, n = int(table["rows"].iloc[0]), int(table["cols"].iloc[0]), len(table)
        crop = square_crop(boxes[uid], rows, cols, crop_margin)
        z = stored_range(*ranges[uid], n, slice_margin)
        folder = root / uid
        remove_stale_npy(folder) if folder.is_dir() else None
        hit = _existing(folder, crop, z)
        if hit is None:
            path = folder / f"{crop[0]}_{crop[1]}_{crop[2]}_{crop[3]}_z{z[0]}-{z[1]}.npy"
            part = table[(table["slice_index"] >= z[0]) & (table["slice_index"] <= z[1])].sort_values("slice_index")
            tasks.append((str(Path(part["path"].iloc[0]).parent), part, crop, cache.spec.windows, path))
            hit = (path, z[0])
        found[uid] = (hit[0], hit[1], n)
    logger.info("crop cache %s: %d studies stored, %d to decode", root, len(found) - len(tasks), len(tasks))
    failures, written = [], 0
    for index, size, error in run_tasks(_write_crop, tasks, workers or os.cpu_count() or 1, desc="crop studies", unit="study"):
        if error is not None:
            failures.append(f"{tasks[index][0]}: {type(error).__name__}: {error}")
        else:
            written += size
    if failures:
        raise RuntimeError(f"{len(failures)} studies could not be cropped into {root}, e.g. {failures[:3]}")
    if tasks:
        logger.info("crop cache: wrote %d studies, %.1f MB", len(tasks), written / 1e6)
    volumes = {uid: CropVolume(open_npy(str(path)), first, n) for uid, (path, first, n) in found.items()}
    return CropCache(cache.spec, volumes, cache.slices)


def native_crop_cache(cfg: Any, cache: StudyCache, slice_margin: int) -> tuple[CropCache, dict[str, tuple[int, int]]]:
    """The crop cache a run of `cfg` (crop_margin, work_dir, num_workers) reads, with each study's slice range
    from 02_infer_box; stores `slice_margin` slices beyond the range (built on first use)."""
    boxes, ranges = study_crops(cfg.work_dir)
    spec = CropSpec(cache.spec.windows, float(cfg.crop_margin))
    crop_cache = open_crop_cache(
        cache, crop_cache_dir(cfg.work_dir, spec), boxes, ranges, spec.crop_margin, slice_margin, cfg.num_workers or None
    )
    return crop_cache, ranges


@dataclass(frozen=True)
class NativeSpec:
    """A decoded study at its own resolution, windowed to uint8 as the crop cache stores it: what
    `memory_crop_cache` cuts a native run's crop from (the submission's workers ship it once per study)."""

    windows: tuple[tuple[int, int], ...]

    @property
    def name(self) -> str:
        return "native_" + "_".join(f"w{c}-{w}" for c, w in self.windows)

    def encode(self, volume_hu: np.ndarray) -> np.ndarray:
        """HU (slices, rows, cols) -> uint8 (slices, rows, cols, n_windows), a slice at a time (no float copy of the study)."""
        out = np.empty((*volume_hu.shape, len(self.windows)), dtype=np.uint8)
        for i, hu in enumerate(volume_hu):
            out[i] = window(hu, self.windows)
        return out


def memory_crop_cache(
    spec: CacheSpec,
    uid: str,
    volume: np.ndarray,
    slices: pd.DataFrame,
    box: tuple,
    first_last: tuple[int, int],
    crop_margin: float,
    slice_margin: int,
) -> CropCache:
    """One decoded study (a full-resolution uint8 volume windowed like `spec`) as the crop cache would hold it (the submission)."""
    crop = square_crop(box, volume.shape[1], volume.shape[2], crop_margin)
    z = stored_range(*first_last, len(volume), slice_margin)
    return CropCache(spec, {uid: CropVolume(crop_volume(volume, crop, z), z[0], len(volume))}, lambda _: slices)
