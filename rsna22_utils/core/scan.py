"""Scan a competition folder: every study's DICOM headers into one table, one row per slice.

Runs studies in parallel worker processes with a progress bar; a study that cannot be read is
reported (study, file, reason) and the scan goes on with the others, also when a file kills its
worker process (`core.pool.run_tasks` reruns the tasks it took down and names that file).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsna22_utils.core.files import atomic_write, write_failures
from rsna22_utils.core.pool import run_tasks

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train_images", "test_images")


@dataclass(frozen=True)
class ScanFailure:
    """A study the scan could not read."""

    split: str
    study: str
    file: str
    reason: str


def find_studies(data_dir: Path) -> list[tuple[str, Path]]:
    """(split, study folder) for every study under train_images/ and test_images/, sorted."""
    data_dir = Path(data_dir)
    studies = [
        (split, study_dir)
        for split in SPLIT_FOLDERS
        if (data_dir / split).is_dir()
        for study_dir in sorted((data_dir / split).iterdir())
        if study_dir.is_dir()
    ]
    if not studies:
        raise FileNotFoundError(f"{data_dir}: no study folders under {' or '.join(SPLIT_FOLDERS)}/")
    return studies


def _scan_one(split: str, study_dir: Path, max_dropped: float = 0.0) -> tuple[pd.DataFrame, list[ScanFailure]]:
    """One study's slice table, and the files it left out (`dicom.read_headers`)."""
    from rsna22_utils.core.dicom import read_headers  # lazy: the CLI imports this module to register `scan`

    table, dropped = read_headers(study_dir, max_dropped=max_dropped)
    table.insert(0, "split", split.removesuffix("_images"))
    table["slice_index"] = range(len(table))
    return table, [ScanFailure(split, study_dir.name, Path(error.path).name, error.reason) for error in dropped]


def _label(task: tuple[str, Path, float]) -> str:
    split, study_dir, _ = task
    return f"study {split}/{study_dir.name}"


def _failure(split: str, study_dir: Path, error: BaseException) -> ScanFailure:
    file = getattr(error, "path", None) or getattr(error, "filename", None) or ""
    return ScanFailure(split, study_dir.name, Path(file).name if file else "", f"{type(error).__name__}: {error}")


def dropped_files_path(out: Path) -> Path:
    """Where `scan_competition(out=...)` lists the files it left out of studies it kept."""
    return Path(out).with_name(Path(out).stem + ".dropped.csv")


def scan_competition(data_dir: Path, out: Path, workers: int | None = None, max_dropped: float = 0.0) -> list[ScanFailure]:
    """Write one row per slice of every study to `out` (.parquet or .csv); return the failures.

    Failures are also written beside the output as `<out stem>.failures.csv`. A study may leave out up
    to `max_dropped` (a fraction) of its files whose header cannot be read or whose slice size is not
    the study's: the study is kept, those files are listed in `dropped_files_path(out)` (one warning).
    """
    import pandas as pd  # lazy: the CLI imports this module to register `scan`

    data_dir, out = Path(data_dir), Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"{out}: output must end in .parquet or .csv")
    studies = find_studies(data_dir)
    workers = workers or os.cpu_count() or 1
    tables: list[pd.DataFrame] = []
    failures: list[ScanFailure] = []
    dropped: list[ScanFailure] = []
    tasks = [(split, study_dir, max_dropped) for split, study_dir in studies]
    for index, result, error in run_tasks(_scan_one, tasks, workers, desc="scan studies", unit="study", label=_label):
        if error is None:
            tables.append(result[0])
            dropped += result[1]
            continue
        split, study_dir = studies[index]
        failure = _failure(split, study_dir, error)
        failures.append(failure)
        logger.warning("skipped study %s/%s: %s %s", split, failure.study, failure.file, failure.reason)

    out.parent.mkdir(parents=True, exist_ok=True)
    failures_path = out.with_name(out.stem + ".failures.csv")
    if write_failures(failures_path, [asdict(f) for f in failures]):
        logger.warning("%d of %d studies failed; listed in %s", len(failures), len(studies), failures_path)
    if write_failures(dropped_files_path(out), [asdict(f) for f in dropped]):
        logger.warning(
            "%d unreadable files left out of %d studies (at most %.0f%% of a study's); listed in %s",
            len(dropped),
            len({(f.split, f.study) for f in dropped}),
            100 * max_dropped,
            dropped_files_path(out),
        )
    if not tables:
        logger.error("no study could be read under %s; nothing written to %s", data_dir, out)
        return failures
    table = pd.concat(tables, ignore_index=True).sort_values(["split", "StudyInstanceUID", "slice_index"], kind="stable")
    if out.suffix == ".parquet":
        atomic_write(out, lambda tmp: table.to_parquet(tmp, index=False))
    else:
        atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
    logger.info("wrote %d slices of %d studies to %s", len(table), table["StudyInstanceUID"].nunique(), out)
    return failures


def _cmd_scan(args: argparse.Namespace) -> int:
    failures = scan_competition(args.data_dir, args.out, workers=args.workers)
    return 1 if failures and not args.out.exists() else 0


def add_commands(subparsers: Any) -> None:
    """Add `scan DATA_DIR --out FILE` to the CLI."""
    p = subparsers.add_parser("scan", help="read every study's DICOM headers into one table (one row per slice)")
    p.add_argument("data_dir", type=Path, help="competition folder holding train_images/ and/or test_images/")
    p.add_argument("--out", type=Path, required=True, help="output .parquet (or .csv)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    p.set_defaults(func=_cmd_scan)
