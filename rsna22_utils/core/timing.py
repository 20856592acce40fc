"""Timing tools shared by the benchmarks and the code they measure.

`LapTimer` is the hook through which shipped code (the submission's per-study path) reports how long
each of its parts took, so a benchmark times that code itself rather than a copy of it; `NO_TIMER`
is the no-op default. `one_core` pins a measurement to one CPU and one thread; `throughput` is
images per second of a step after a warm-up.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class LapTimer:
    """Seconds per named part: `lap(name, items)` charges the time since the previous lap (or `start`) to `name`.

    `sync` runs before each reading (e.g. `torch.cuda.synchronize`, so queued GPU work is charged to
    the part that queued it). Parts add up over laps and studies: `seconds`, `items` (what the part
    processed, e.g. images) and `counts` (how often it ran).
    """

    def __init__(self, sync: Callable[[], Any] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.items: dict[str, int] = defaultdict(int)
        self.counts: dict[str, int] = defaultdict(int)
        self._last = time.perf_counter()

    def start(self) -> None:
        """Begin a new lap here (time since the last lap is charged to nothing)."""
        self.sync()
        self._last = time.perf_counter()

    def lap(self, name: str, items: int = 0) -> None:
        """Charge the time since the last lap (or `start`), and `items` processed in it, to `name`."""
        self.sync()
        now = time.perf_counter()
        self.seconds[name] += now - self._last
        self.items[name] += items
        self.counts[name] += 1
        self._last = now

    def reset(self) -> None:
        """Forget every lap (after a warm-up)."""
        self.seconds.clear()
        self.items.clear()
        self.counts.clear()
        self.start()


class _NoTimer(LapTimer):
    """The default: laps cost a method call and record nothing."""

    def start(self) -> None:
        pass

    def lap(self, name: str, items: int = 0) -> None:
        pass


NO_TIMER: LapTimer = _NoTimer()


def throughput(step: Callable[[], Any], images_per_step: int, sync: Callable[[], Any], warmup: int, steps: int) -> float:
    """Images per second of `step()` over `steps` calls after `warmup` untimed ones (`sync` before each reading)."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return images_per_step * steps / (time.perf_counter() - t0)


@contextmanager
def one_core() -> Iterator[str]:
    """Pin this process to its first allowed CPU and every thread pool to one thread; restore after."""
    saved_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved_env})
    restore = []
    try:
        import torch  # lazy: optional here; without torch the other libraries are still pinned

        torch_threads = torch.get_num_threads()
        restore.append(lambda: torch.set_num_threads(torch_threads))
        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        import cv2  # lazy: optional here, as torch

        cv2_threads = cv2.getNumThreads()
        restore.append(lambda: cv2.setNumThreads(cv2_threads))
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
