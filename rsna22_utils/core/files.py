"""Atomic file writes: a reader (or a crash) never sees a half-written file, and no temp file outlives an error.

Also the lock of a run folder (`run_lock`) and a build's failure list (`write_failures`). Kept free of
heavy imports: scan and cache workers write through it without loading torch.
"""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"  # every temp file this module makes is `.<name>.<random>.tmp` beside its target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename (never a half-written file).

    The temp file is removed on any error (a full disk, an exception in `write`, Ctrl-C).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def remove_stale_temp_files(folder: str | Path, target_suffix: str) -> list[Path]:
    """Delete `atomic_write` temp files of `*<target_suffix>` targets in `folder` (left by a killed process)."""
    stale = sorted(Path(folder).glob(f".*{target_suffix}.*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_failures(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> bool:
    """The failures of a build as a CSV (one row per failure, the keys of the first as columns), atomically.

    With no failures a `path` left by an earlier build is removed, so the file lists only the last build's.
    Returns whether the file was written.
    """
    path = Path(path)
    if not rows:
        path.unlink(missing_ok=True)
        return False

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
    return True


LOCK_FILE = ".run.lock"


class RunLocked(RuntimeError):
    """Another process holds the lock of a run folder."""


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold `{folder}/.run.lock` while a run writes there: a second process on the same run stops with
    a clear message instead of training alongside (the OS releases the lock if the holder dies)."""
    import fcntl  # lazy: POSIX only; the rest of the module works anywhere

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunLocked(f"{folder}: another process is running this run ({holder}); wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
