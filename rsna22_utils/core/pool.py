"""Process pools that survive a dead worker, and worker processes that end with their parent.

A C++ decoder that aborts (dicomsdl on a malformed file) or the OOM killer takes its worker process
with it, and `concurrent.futures` then fails every task still in the pool with BrokenProcessPool.
`run_tasks` keeps at most `workers` tasks in flight, so after a break only those are suspects; each
suspect is rerun alone in a fresh process, which pins the death on one task and, through
`note_item`, on the file that task was reading; the remaining tasks go on in a new pool.
Workers log through a queue to this process, so their warnings reach its handlers (console, tqdm,
a notebook, pytest) whatever the start method.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

_CRUMB_BYTES = 4096
_crumb: Any = None  # shared char array of an isolated rerun: the item its task is working on


class WorkerDied(RuntimeError):
    """A worker process ended without returning (a signal, os._exit, the OOM killer); `path` is what it was reading."""

    def __init__(self, task: str, exitcode: int | None, path: str = "") -> None:
        self.task, self.exitcode, self.path = task, exitcode, path
        where = f"while reading {path}" if path else f"while running {task}"
        super().__init__(f"worker process died ({describe_exit(exitcode)}) {where}")

    def __reduce__(self) -> tuple:
        return type(self), (self.task, self.exitcode, self.path)


def describe_exit(exitcode: int | None) -> str:
    """`exit code 3` or `signal SIGABRT` for a multiprocessing exit code."""
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def note_item(item: str | Path) -> None:
    """Record what this worker is reading, so a crash can be pinned on it (a no-op outside an isolated rerun)."""
    if _crumb is not None:
        _crumb.value = str(item).encode("utf-8", "replace")[: _CRUMB_BYTES - 1]


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid` dies, so a killed parent leaves no worker running.

    Linux: the kernel sends SIGKILL (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _init_worker(parent_pid: int, log_queue: Any, log_level: int) -> None:
    die_with_parent(parent_pid)
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(log_queue)]  # not the parent's handlers a fork copied
    root.setLevel(log_level)


class _Relay(logging.Handler):
    """Hands a worker's log record to the logger of the same name here (its level was checked in the worker)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


class _WorkerLogs:
    """A queue the workers log into and a thread that relays their records to this process's loggers."""

    def __init__(self) -> None:
        self.queue = multiprocessing.get_context().Queue()
        self.listener = logging.handlers.QueueListener(self.queue, _Relay())
        self.initargs = (os.getpid(), self.queue, logging.getLogger().getEffectiveLevel())

    def __enter__(self) -> _WorkerLogs:
        self.listener.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.stop()  # relays what is still queued
        self.queue.close()
        self.queue.join_thread()


def _isolated_main(fn: Callable, task: tuple, send: Any, crumb: Any, initargs: tuple) -> None:
    global _crumb
    _init_worker(*initargs)
    _crumb = crumb
    try:
        message = (True, fn(*task))
    except Exception as error:  # returned to the parent as the task's error
        message = (False, error)
    try:
        send.send(message)
    except Exception as error:  # an unpicklable result or exception: its text still crosses
        send.send((False, RuntimeError(f"{type(message[1]).__name__}: {message[1]} (could not be sent back: {error})")))
    send.close()


def run_isolated(fn: Callable, task: tuple, label: str) -> tuple[Any, BaseException | None]:
    """fn(*task) alone in a fresh process -> (result, None) or (None, error); a death is a `WorkerDied`."""
    with _WorkerLogs() as logs:
        return _run_isolated(fn, task, label, logs.initargs)


def _run_isolated(fn: Callable, task: tuple, label: str, initargs: tuple) -> tuple[Any, BaseException | None]:
    context = multiprocessing.get_context()
    crumb = context.Array("c", _CRUMB_BYTES, lock=False)
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_main, args=(fn, task, send, crumb, initargs), daemon=True)
    process.start()
    send.close()
    try:
        ok, payload = receive.recv()
    except EOFError:  # the process died without answering
        process.join()
        return None, WorkerDied(label, process.exitcode, crumb.value.decode("utf-8", "replace"))
    finally:
        receive.close()
    process.join()
    return (payload, None) if ok else (None, payload)


def run_tasks(
    fn: Callable,
    tasks: Sequence[tuple],
    workers: int,
    desc: str,
    unit: str = "task",
    label: Callable[[tuple], str] = lambda task: str(task[0]),
) -> Iterator[tuple[int, Any, BaseException | None]]:
    """fn(*task) for every task in `workers` processes; yields (task index, result, error) as each ends.

    An exception raised by fn comes back as that task's error. A worker that dies breaks only the
    tasks then in flight: each is rerun alone (`run_isolated`), the one that dies again gets a
    `WorkerDied` naming the file it was reading, and the remaining tasks go on in a fresh pool.
    Workers end with this process and log through it. `label(task)` names a task in messages.
    """
    workers = max(1, int(workers))
    pending = deque(enumerate(tasks))
    with tqdm(total=len(tasks), desc=desc, unit=unit) as bar, _WorkerLogs() as logs:
        while pending:
            suspects: list[tuple[int, tuple]] = []
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=logs.initargs)
            in_flight: dict[Future, tuple[int, tuple]] = {}
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < workers:
                        index, task = pending.popleft()
                        in_flight[pool.submit(fn, *task)] = (index, task)
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        index, task = in_flight.pop(future)
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            suspects.append((index, task))
                            continue
                        except Exception as error:  # the task's own failure, reported by the caller
                            yield index, None, error
                        else:
                            yield index, result, None
                        bar.update()
                    if suspects:  # every task still in flight went down with the pool
                        suspects += [in_flight.pop(future) for future in list(in_flight)]
                        break
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            if suspects:
                logger.warning("a %s worker process died; rerunning the %d tasks it took down one by one", desc, len(suspects))
            for index, task in sorted(suspects):
                result, error = _run_isolated(fn, task, label(task), logs.initargs)
                if isinstance(error, WorkerDied):
                    logger.error("%s: %s", label(task), error)
                yield index, result, error
                bar.update()


def run_all(
    fn: Callable, tasks: Sequence[tuple], workers: int, desc: str, unit: str, label: Callable[[tuple], str], failed: str
) -> list[Any]:
    """fn(*task) for every task (`run_tasks`), the results in task order; any failure raises one RuntimeError,
    after every task ran: `failed` with {n} the number of failed tasks, then the first few (`label(task)`, reason)."""
    results: list[Any] = [None] * len(tasks)
    failures: list[str] = []
    for index, result, error in run_tasks(fn, tasks, workers, desc=desc, unit=unit, label=label):
        if error is not None:
            failures.append(f"{label(tasks[index])}: {type(error).__name__}: {error}")
        else:
            results[index] = result
    if failures:
        raise RuntimeError(f"{failed.format(n=len(failures))}, e.g. {failures[:3]}")
    return results
