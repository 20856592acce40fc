"""Steady-state throughput of one training run, by part: its data alone, its network alone, and both.

Measured on the run's own parts (`train.TrainingSteps`: the trainer's DataLoader and optimizer step),
in images per second, where what counts as an image is the competition's to say (`images_of`):

- data, one worker: the loader with one worker process, batches only (what each worker adds);
- data, all workers: the loader with the config's `num_workers`;
- network: the trainer's step on one batch kept on the device (the loader out of the way);
- trainer: the loader with the config's workers feeding the trainer's step, as `fit` runs.

Every figure excludes a warm-up (worker start-up, CUDA kernels and allocator, cuDNN's choices). The
slower of data (all workers) and network is the bottleneck: the trainer cannot beat it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rsna22_utils.core.train import Training, TrainingSteps


@dataclass
class _Counted:
    """Batches from `batches`, counting the images handed out since the last `reset`."""

    batches: Iterator[Any]
    images_of: Callable[[Any], int]
    images: int = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = next(self.batches)
        self.images += self.images_of(batch)
        return batch

    def reset(self) -> None:
        self.images = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_throughput(steps: TrainingSteps, images_of: Callable[[Any], int], num_workers: int, batches: int, warmup: int) -> float:
    """Images/s the trainer's loader delivers with `num_workers` workers, after `warmup` batches and one per
    worker (all workers start together: their first batches arrive at once)."""
    warmup = max(warmup, num_workers + 1)
    counted = _Counted(iter(steps.loader(num_workers, warmup + batches)), images_of)
    for _ in range(warmup):
        next(counted)
    counted.reset()
    t0 = time.perf_counter()
    for _ in range(batches):
        next(counted)
    return counted.images / (time.perf_counter() - t0)


def network_throughput(steps: TrainingSteps, images_of: Callable[[Any], int], n_steps: int, warmup: int) -> float:
    """Images/s of the trainer's optimizer step on one loader batch kept on the device."""
    batch = steps.to_device(next(iter(steps.loader(0, 1))))
    return _timed_steps(steps, _Counted(itertools.repeat(batch), images_of), n_steps, warmup)


def trainer_throughput(steps: TrainingSteps, images_of: Callable[[Any], int], n_steps: int, warmup: int) -> float:
    """Images/s of the trainer's steps fed by its loader with the config's workers, as `fit` runs them."""
    micro_batches = (warmup + n_steps) * steps.cfg.grad_accum
    return _timed_steps(steps, _Counted(iter(steps.loader(steps.cfg.num_workers, micro_batches)), images_of), n_steps, warmup)


def _timed_steps(steps: TrainingSteps, counted: _Counted, n_steps: int, warmup: int) -> float:
    """Images/s of `n_steps` optimizer steps on `counted`'s batches, after `warmup` untimed ones."""
    steps.run(counted, warmup)
    _sync(steps.device)
    counted.reset()
    t0 = time.perf_counter()
    steps.run(counted, n_steps)
    _sync(steps.device)
    return counted.images / (time.perf_counter() - t0)


def speed_settings(steps: TrainingSteps) -> dict[str, Any]:
    """The run's settings that decide its speed, as configured, and the autocast dtype they give on this device."""
    cfg, dtype = steps.cfg, steps.opt.dtype
    return {
        "device": str(steps.device),
        "num_workers": int(cfg.num_workers),
        "batch_size": int(cfg.batch_size),
        "amp_dtype": str(cfg.amp_dtype) if cfg.amp else "off",
        "autocast_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        "channels_last": bool(cfg.channels_last),
        "deterministic": bool(cfg.deterministic),
        "compile": bool(cfg.compile),
    }


def measure_training(
    training: Training, images_of: Callable[[Any], int], n_steps: int = 5, warmup: int = 2, data_only: bool = False
) -> dict[str, Any]:
    """The four throughputs of one run (network and trainer None with `data_only`), its speed settings,
    and the bottleneck ("data" or "network"; "data" alone with `data_only`)."""
    steps = TrainingSteps(training)
    batches = n_steps * steps.cfg.grad_accum
    workers = int(steps.cfg.num_workers)
    result: dict[str, Any] = speed_settings(steps)
    result["data_img_s_per_worker"] = data_throughput(steps, images_of, 1, batches, warmup)
    result["data_img_s"] = result["data_img_s_per_worker"] if workers == 1 else data_throughput(steps, images_of, workers, batches, warmup)
    result["network_img_s"] = None if data_only else network_throughput(steps, images_of, n_steps, warmup)
    result["trainer_img_s"] = None if data_only else trainer_throughput(steps, images_of, n_steps, warmup)
    if data_only:
        result["bottleneck"] = "data (network not measured)"
    else:
        result["bottleneck"] = "data" if result["data_img_s"] < result["network_img_s"] else "network"
    return result
