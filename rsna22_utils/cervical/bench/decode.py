"""The decode benchmark on this competition's files (`bench-decode`), and the real decode cost the
submission benchmark projects with: the real studies beside the repo (../shared/realdata/rsna2022)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rsna22_utils.core.paths import REPO_ROOT

REALDATA_RSNA = REPO_ROOT.parent / "shared" / "realdata" / "rsna2022"
DEFAULT_DECODE_MS = 6.0  # dicomsdl, one core, real JPEG Lossless 512 px slices (when ../shared/realdata is absent)


def default_paths() -> list[Path]:
    """Every real study folder beside the repo (../shared/realdata/rsna2022/{train,test}_images)."""
    folders = [REALDATA_RSNA / split for split in ("train_images", "test_images")]
    studies = sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_dir())
    if not studies:
        raise FileNotFoundError(f"no study folders under {folders[0]} or {folders[1]}: pass DICOM files or study folders explicitly")
    return studies


def real_decode_ms(n_files: int = 12) -> tuple[float, str]:
    """ms/slice of read_slice (dicomsdl, one core) on real competition files, or the default when absent."""
    from rsna22_utils.core.dicom import read_slice
    from rsna22_utils.core.timing import one_core

    files = sorted(REALDATA_RSNA.glob("train_images/*/*.dcm"))[:n_files]
    if not files:
        return DEFAULT_DECODE_MS, f"default {DEFAULT_DECODE_MS} ms (no real files at {REALDATA_RSNA})"
    times = []
    with one_core():
        for f in files:
            read_slice(f, backend="dicomsdl")  # warm
            t0 = time.perf_counter()
            for _ in range(3):
                read_slice(f, backend="dicomsdl")
            times.append((time.perf_counter() - t0) / 3)
    return 1e3 * statistics.median(times), f"measured on {len(files)} real files"


def _bench_decode(args: argparse.Namespace) -> int:
    from rsna22_utils.core.bench_decode import bench_decode

    bench_decode(args.paths or default_paths(), repeat=args.repeat)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """bench-decode."""
    p = subparsers.add_parser("bench-decode", help="decode speed (ms/slice, one core) of dicomsdl vs pydicom")
    p.add_argument("paths", type=Path, nargs="*", help="DICOM files or study folders (default: every real study in ../shared/realdata)")
    p.add_argument("--repeat", type=int, default=5)
    p.set_defaults(func=_bench_decode)
