"""Decode-speed benchmark: dicomsdl vs pydicom, ms per slice on one core, by transfer syntax.

Both backends run interleaved on the same files in the same process (so caches, CPU frequency and
neighbours affect them alike); each file's time is the median of `repeat` full `read_slice` calls
(open + parse + decode + HU conversion), which is what a data loader pays per slice.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd

from rsna22_utils.dicom import TRANSFER_SYNTAX_NAMES, DicomReadError, read_slice

logger = logging.getLogger(__name__)

BACKENDS = ("dicomsdl", "pydicom")
REALDATA_RSNA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "rsna2022"


def default_paths() -> list[Path]:
    """Every real study folder beside the repo (../shared/realdata/rsna2022/{train,test}_images)."""
    folders = [REALDATA_RSNA / split for split in ("train_images", "test_images")]
    studies = sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_dir())
    if not studies:
        raise FileNotFoundError(
            f"no study folders under {folders[0]} or {folders[1]}: pass DICOM files or study folders explicitly"
        )
    return studies


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.dcm"), key=lambda p: (len(p.stem), p.stem))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such DICOM file or study folder")
    if not files:
        raise FileNotFoundError(f"no .dcm files in {', '.join(map(str, paths))}")
    return files


@contextmanager
def one_core() -> Iterator[str]:
    """Pin this process to its first allowed CPU and every thread pool to one thread; restore after."""
    saved_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved_env})
    restore = []
    try:
        import torch

        restore.append(lambda n=torch.get_num_threads(): torch.set_num_threads(n))
        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        import cv2

        restore.append(lambda n=cv2.getNumThreads(): cv2.setNumThreads(n))
        cv2.setNumThreads(1)
    except ImportError:
        pass
    where = "one thread (no CPU pinning on this OS)"
    if saved_affinity:
        cpu = min(saved_affinity)
        os.sched_setaffinity(0, {cpu})
        where = f"CPU {cpu}"
    try:
        yield where
    finally:
        if saved_affinity:
            os.sched_setaffinity(0, saved_affinity)
        for fn in restore:
            fn()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_decode(paths: list[Path] | None = None, repeat: int = 5) -> pd.DataFrame:
    """ms/slice of dicomsdl vs pydicom on one core, per transfer syntax; prints and returns the table.

    `paths`: DICOM files and/or study folders (default: every real study in ../shared/realdata).
    Columns: transfer_syntax, name, files, dicomsdl_ms, pydicom_ms, speedup (pydicom / dicomsdl),
    where each ms figure is the mean over files of the per-file median of `repeat` decodes.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    files = _expand(list(paths) if paths else default_paths())
    syntax = {}
    for f in files:
        try:
            syntax[f] = read_slice(f, backend="pydicom")[1]["transfer_syntax"]  # also warms the plugins
            read_slice(f, backend="dicomsdl")
        except DicomReadError as e:
            raise DicomReadError(e.path, f"cannot benchmark: {e.reason}") from None
    times: dict[tuple[Path, str], list[float]] = {(f, b): [] for f in files for b in BACKENDS}
    with one_core() as where:
        logger.info("benchmarking %d files x %d repeats on %s", len(files), repeat, where)
        for r in range(repeat):
            for f in files:
                order = BACKENDS if (r + files.index(f)) % 2 == 0 else BACKENDS[::-1]  # alternate who goes first
                for backend in order:
                    t0 = time.perf_counter()
                    read_slice(f, backend=backend)
                    times[(f, backend)].append(time.perf_counter() - t0)
    rows = [
        {"transfer_syntax": syntax[f], "file": str(f), "backend": b, "ms": 1e3 * statistics.median(times[(f, b)])}
        for f in files
        for b in BACKENDS
    ]
    per_file = pd.DataFrame(rows)
    table = per_file.pivot_table(index="transfer_syntax", columns="backend", values="ms", aggfunc="mean")
    table["files"] = per_file[per_file["backend"] == BACKENDS[0]].groupby("transfer_syntax").size()
    table = table.reset_index().rename(columns={b: f"{b}_ms" for b in BACKENDS})
    table.columns.name = None
    table.insert(1, "name", table["transfer_syntax"].map(lambda s: TRANSFER_SYNTAX_NAMES.get(s, "unknown")))
    table["speedup"] = table["pydicom_ms"] / table["dicomsdl_ms"]
    table = table[["transfer_syntax", "name", "files", "dicomsdl_ms", "pydicom_ms", "speedup"]]
    print(f"decode ms/slice, one core ({where}), median of {repeat}, {len(files)} files (read_slice: open + decode + HU)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return table

