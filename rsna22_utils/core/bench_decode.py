"""Decode-speed benchmark: dicomsdl vs pydicom, ms per slice on one core, by transfer syntax.

Both backends run interleaved on the same files in the same process (so caches, CPU frequency and
neighbours affect them alike); each file's time is the median of `repeat` full `read_slice` calls
(open + parse + decode + HU conversion), which is what a data loader pays per slice.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import pandas as pd

from rsna22_utils.core.dicom import TRANSFER_SYNTAX_NAMES, DicomReadError, read_slice
from rsna22_utils.core.timing import one_core

logger = logging.getLogger(__name__)

BACKENDS = ("dicomsdl", "pydicom")


def dicom_files(paths: list[Path]) -> list[Path]:
    """The .dcm files of `paths` (files, or study folders whose slices come in file-number order)."""
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


def _decode_times(files: list[Path], repeat: int) -> tuple[dict[tuple[Path, str], list[float]], str]:
    """Seconds of every read_slice call per (file, backend), the backends interleaved on one core."""
    times: dict[tuple[Path, str], list[float]] = {(f, b): [] for f in files for b in BACKENDS}
    with one_core() as where:
        logger.info("benchmarking %d files x %d repeats on %s", len(files), repeat, where)
        for r in range(repeat):
            for i, f in enumerate(files):
                order = BACKENDS if (r + i) % 2 == 0 else BACKENDS[::-1]  # alternate who goes first
                for backend in order:
                    t0 = time.perf_counter()
                    read_slice(f, backend=backend)
                    times[(f, backend)].append(time.perf_counter() - t0)
    return times, where


def bench_decode(paths: list[Path], repeat: int = 5) -> pd.DataFrame:
    """ms/slice of dicomsdl vs pydicom on one core, per transfer syntax; prints and returns the table.

    `paths`: DICOM files and/or study folders. Columns: transfer_syntax, name, files, dicomsdl_ms,
    pydicom_ms, speedup (pydicom / dicomsdl), where each ms figure is the mean over files of the
    per-file median of `repeat` decodes.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    files = dicom_files(list(paths))
    syntax = {}
    for f in files:
        try:
            syntax[f] = read_slice(f, backend="pydicom")[1]["transfer_syntax"]  # also warms the plugins
            read_slice(f, backend="dicomsdl")
        except DicomReadError as e:
            raise DicomReadError(e.path, f"cannot benchmark: {e.reason}") from None
    times, where = _decode_times(files, repeat)
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
