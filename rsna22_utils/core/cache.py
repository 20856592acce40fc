"""The study cache: every study decoded once into a compact, memory-mappable form.

Training reads slices from here instead of decoding DICOMs every epoch (the 3rd place decoded
on the fly). One cache holds every study resized to `image_size` x `image_size` and windowed to
uint8, one channel per (center, width) window:

    <cache_dir>/<spec.name>/
        spec.json                  the CacheSpec the cache was built with
        volumes/<uid>.npy          uint8 (slices, image_size, image_size, n_windows), head -> feet
        slices/<uid>.parquet       the study's per-slice table (read_study order) + `slice_index`

A study is keyed by its folder name (as in the scan's table). It is complete when its .npy exists
(written to a temp name and renamed last, the temp file removed on any error), so an interrupted
build resumes where it stopped; a file that kills a worker process fails only its study.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from rsna22_utils.core.dicom import read_study, window
from rsna22_utils.core.files import atomic_write, atomic_write_text, remove_stale_temp_files, write_failures
from rsna22_utils.core.pool import run_tasks

logger = logging.getLogger(__name__)

BONE_WINDOW = (400, 1800)


@dataclass(frozen=True)
class CacheSpec:
    """How studies are stored: output size (square) and HU windows (one uint8 channel each)."""

    image_size: int = 256
    windows: tuple[tuple[int, int], ...] = field(default=(BONE_WINDOW,))

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", tuple((int(c), int(w)) for c, w in self.windows))
        if self.image_size < 16:
            raise ValueError(f"cache image_size must be at least 16, got {self.image_size}")
        if not self.windows:
            raise ValueError("a cache needs at least one (center, width) window")

    @classmethod
    def of(cls, cfg: Any) -> CacheSpec:
        """The spec a config's `image_size` / `windows` describe (how a run's model saw its slices)."""
        return cls(image_size=int(cfg.image_size), windows=tuple(tuple(w) for w in cfg.windows))

    @property
    def name(self) -> str:
        """Folder name that identifies the spec, e.g. `256px_w400-1800`."""
        return f"{self.image_size}px_" + "_".join(f"w{c}-{w}" for c, w in self.windows)


def encode_study(volume_hu: np.ndarray, spec: CacheSpec) -> np.ndarray:
    """HU volume (slices, rows, cols) -> cached uint8 (slices, size, size, n_windows)."""
    size = spec.image_size
    out = np.empty((volume_hu.shape[0], size, size, len(spec.windows)), dtype=np.uint8)
    interpolation = cv2.INTER_AREA if volume_hu.shape[1] > size else cv2.INTER_LINEAR
    for i, hu in enumerate(volume_hu):
        resized = cv2.resize(hu.astype(np.float32), (size, size), interpolation=interpolation)
        out[i] = window(resized, spec.windows)
    return out


def _write_study(study_dir: Path, root: Path, spec: CacheSpec, slices: pd.DataFrame | None = None) -> str:
    volume, table = read_study(study_dir, slices=slices)
    uid = study_dir.name
    table = table.reset_index(drop=True).assign(slice_index=np.arange(len(table)))
    encoded = encode_study(volume, spec)
    atomic_write(root / "slices" / f"{uid}.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    write_npy(root / "volumes" / f"{uid}.npy", encoded)  # last: marks the study done
    return uid


def write_npy(path: Path, array: np.ndarray) -> Path:
    """Save `array` as a memory-mappable .npy, atomically (a reader never sees a half-written file)."""
    return atomic_write(path, lambda tmp: _save_npy(tmp, array))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to the temp name
        np.save(f, array)


def remove_stale_npy(folder: Path) -> int:
    """Delete temp files an interrupted `write_npy` left in `folder`; returns how many."""
    stale = remove_stale_temp_files(folder, ".npy") + [*Path(folder).glob("*.tmp.npy")]  # temp names of older kits
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def build_cache(
    study_dirs: list[Path],
    cache_dir: Path,
    spec: CacheSpec,
    workers: int | None = None,
    slices: pd.DataFrame | None = None,
) -> tuple[Path, list[tuple[str, str]]]:
    """Decode every study once into `cache_dir/<spec.name>/`; returns (cache root, failures).

    Studies already cached are skipped (resumable); a study that fails is reported as
    (study folder, reason), listed in `<root>/failures.csv`, and the others go on. `slices` (a scan
    table, one row per slice keyed by StudyInstanceUID = folder name) makes each study decode
    exactly the scan's files in the scan's order instead of reading its headers again; a study the
    scan could not read is then a failure.
    """
    root = Path(cache_dir) / spec.name
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    (root / "slices").mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temp_files(root / "volumes", ".npy") + remove_stale_temp_files(root / "slices", ".parquet")
    stale += [*(root / "volumes").glob("*.tmp.npy"), *(root / "slices").glob("*.tmp")]  # temp names of older kits
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temp files of an interrupted cache build in %s", len(stale), root)
    spec_path = root / "spec.json"
    if spec_path.exists():
        if CacheSpec(**json.loads(spec_path.read_text())) != spec:
            raise ValueError(f"{spec_path}: cache built with another spec; use another cache_dir")
    else:
        atomic_write_text(spec_path, json.dumps(asdict(spec)))
    todo = [Path(d) for d in study_dirs if not (root / "volumes" / f"{Path(d).name}.npy").exists()]
    logger.info("study cache %s: %d studies cached, %d to decode", root, len(study_dirs) - len(todo), len(todo))
    failures: list[tuple[str, str]] = []
    tasks: list[tuple] = [(d, root, spec) for d in todo]
    if slices is not None:
        by_study = dict(iter(slices.groupby("StudyInstanceUID", sort=False)))
        unscanned = [d for d in todo if d.name not in by_study]
        for d in unscanned:
            failures.append((str(d), "not in the scan's slice table (the scan could not read it)"))
        tasks = [(d, root, spec, by_study[d.name]) for d in todo if d.name in by_study]
    for index, _, error in run_tasks(_write_study, tasks, workers or os.cpu_count() or 1, desc="cache studies", unit="study"):
        if error is not None:  # reported, the build goes on
            failures.append((str(tasks[index][0]), f"{type(error).__name__}: {error}"))
            logger.warning("could not cache %s: %s", tasks[index][0], failures[-1][1])
    failures_path = root / "failures.csv"
    if write_failures(failures_path, [{"study": study, "reason": reason} for study, reason in failures]):
        logger.warning("%d of %d studies could not be cached; listed in %s", len(failures), len(study_dirs), failures_path)
    logger.info("study cache ready in %s (%d failures)", root, len(failures))
    return root, failures


class StudyCache:
    """Read access to a built cache: memory-mapped volumes and per-slice tables by study."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        spec_path = self.root / "spec.json"
        if not spec_path.exists():
            raise FileNotFoundError(f"{self.root}: not a study cache (no spec.json); build it with 00_prepare")
        self.spec = CacheSpec(**json.loads(spec_path.read_text()))

    @property
    def uids(self) -> list[str]:
        """Studies present in the cache, sorted."""
        return sorted(
            p.name[: -len(".npy")]
            for p in (self.root / "volumes").glob("*.npy")
            if not p.name.startswith(".") and not p.name.endswith(".tmp.npy")
        )

    def volume(self, uid: str) -> np.ndarray:
        """uint8 (slices, size, size, n_windows), memory-mapped (nothing is read until indexed)."""
        return open_npy(str(self.root / "volumes" / f"{uid}.npy"))

    def slices(self, uid: str) -> pd.DataFrame:
        """The study's per-slice table in volume order (column `slice_index`)."""
        return pd.read_parquet(self.root / "slices" / f"{uid}.parquet")

    def failed_studies(self) -> list[str]:
        """Studies the build reported it could not cache (`failures.csv`, keyed by folder name)."""
        path = self.root / "failures.csv"
        return [Path(study).name for study in pd.read_csv(path, dtype=str)["study"]] if path.is_file() else []

    def all_slices(self) -> pd.DataFrame:
        """Per-slice tables of all cached studies, concatenated."""
        return pd.concat([self.slices(uid) for uid in self.uids], ignore_index=True)


@lru_cache(maxsize=64)
def open_npy(path: str) -> np.ndarray:
    """A cached .npy, memory-mapped read-only (opened once per process and path)."""
    return np.load(path, mmap_mode="r")
