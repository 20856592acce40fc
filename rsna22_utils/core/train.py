"""One trainer for every stage: `fit(model, task, train_dataset, valid_dataset, cfg)`.

A stage supplies a model, datasets and a `Task` (loss / predict / score); `fit` does the rest:
seeding, AdamW (no decay on biases and norm weights; frozen parameters excluded), linear warm-up +
cosine schedule per optimizer step, AMP on CUDA (`amp_dtype`: fp16 + GradScaler by default, or bf16),
cuDNN autotuning unless `deterministic`, channels_last, optional torch.compile, loader workers kept
across epochs, gradient accumulation, clipping, per-epoch validation with out-of-fold predictions,
an atomic `checkpoint.pt` after every epoch (resumed automatically), and the final outputs in
`cfg.out_dir`: model.safetensors, oof.parquet, history.csv, metrics.json, config.json.

Distributed: launched with torchrun (WORLD_SIZE > 1) the same `fit` initialises the process group
(nccl on cuda:LOCAL_RANK, gloo on CPU), shards the data with the same permutation a single process
would use (so the global batches are identical), wraps the model in DDP (no_sync on accumulation
micro-steps), gathers the OOF rows on rank 0 and writes files from rank 0 only.

`cfg.batch_size` is the GLOBAL batch: micro-batch = batch_size // (grad_accum * world_size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm  # text bars (not tqdm.auto): they stream through papermill to the runner's console

from rsna22_utils.core.config import RESULT_NEUTRAL, TrainConfig, config_diff, save_config
from rsna22_utils.core.device import amp_dtype, resolve_device, seed_everything
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.files import atomic_write
from rsna22_utils.core.registry import CONFIG, WEIGHTS
from rsna22_utils.core.resolve import resolve_config
from rsna22_utils.core.runs import save_weights, unwrap

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
OOF = "oof.parquet"
HISTORY = "history.csv"
PENDING = ".pending-"  # a kept epoch's weights / OOF before its checkpoint is written
METRICS = "metrics.json"


class Task(Protocol):
    """What a stage tells the trainer: how to compute the loss, predict OOF rows, and score them."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar loss, mean over the batch (called in train mode, under autocast; in validation after
        `predict`, with a `SharedForward` model: call it on what `predict` called it on)."""
        ...

    def predict(self, model: nn.Module, batch: Any) -> pd.DataFrame:
        """OOF rows for one validation batch: ids + predictions (called under eval + no_grad)."""
        ...

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        """Validation metrics from all OOF rows of an epoch (cfg.monitor names one of them)."""
        ...


# ----------------------------------------------------------------------------- small utilities


def _worker_init_fn(worker_id: int) -> None:
    """Each DataLoader worker seeds numpy / random from its torch seed (itself from the seeded loader generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _to_device(batch: Any, device: torch.device, channels_last: bool, on_device: Callable[[Any], Any] | None = None) -> Any:
    """A loader batch on `device`, finished there by `on_device` (e.g. uint8 pixels -> normalised floats), 4D floats channels_last."""
    batch = _map_tensors(batch, lambda t: t.to(device, non_blocking=True))
    if on_device is not None:
        batch = on_device(batch)
    if channels_last:
        batch = _map_tensors(batch, _channels_last)
    return batch


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.ndim == 4 and tensor.is_floating_point() else tensor


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0]) if batch and not isinstance(batch[0], str) else len(batch)
    return 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices / kernels, none for biases and norm weights (ndim <= 1); frozen excluded."""
    decay, no_decay = [], []
    for _, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up over warmup_fraction of the steps, then cosine to 0."""
    warmup = int(round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Processes:
    """This process's place among the torchrun processes (a single process: world_size 1)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _init_distributed(device: torch.device) -> _Processes:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return _Processes()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Before init: torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when
        # first imported (DDP's constructor imports it). Imported after init, those defaults keep the WORLD
        # group alive past destroy_process_group, so gloo's worker threads are never joined and may drop the
        # last collective's tensors during interpreter shutdown: SIGABRT ("terminate called without an
        # active exception") after all outputs were written.
        importlib.import_module("torch.distributed.nn")  # (a plain `import torch...` here would make `torch` local)
        dist.init_process_group(backend=backend)
        owns = True
    return _Processes(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), owns)


class _EpochPermutation(Sampler[int]):
    """Shuffled indices of `dataset`: the same permutation DistributedSampler(seed) draws for this epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _Strided(Sampler[int]):
    """Validation shard: indices rank, rank + world, ... (no padding, so no duplicated OOF rows)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------- checkpoint


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_out(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _numpy_state_out() -> tuple:
    """numpy's RNG state with a tensor instead of an ndarray, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if mode == "min" else value > best


# ----------------------------------------------------------------------------- fit


@dataclass
class _Plan:
    """How one run's data is cut into optimizer steps."""

    micro: int  # samples per forward on one process
    steps_per_epoch: int
    total_steps: int
    n_train: int
    n_valid: int


@dataclass
class _Optimisation:
    """Optimizer, schedule and AMP of one run, plus what a resume restores."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    start_epoch: int = 0
    history: list[dict[str, Any]] | None = None
    best: dict[str, Any] | None = None
    seconds_before: float = 0.0

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type="cuda", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()


def fit(
    model: nn.Module,
    task: Task,
    train_dataset: Dataset,
    valid_dataset: Dataset | None,
    cfg: TrainConfig,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    on_device: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Train `model` on `task` as `cfg` says and write the run's outputs to cfg.out_dir; returns metrics.json's dict.

    A full-data run (fold -1, `valid_dataset` None) trains on everything, validates nothing and keeps
    the last epoch (no oof.parquet). `on_device` finishes each batch once it is on the device (datasets
    that hand uint8 pixels to the loader leave their conversion to network inputs to it).
    """
    if (valid_dataset is None) != cfg.full_data:
        raise ValueError(f"fold {cfg.fold}: a validation set is needed exactly when the run is not a full-data (fold -1) run")
    device = resolve_device(cfg.device)
    procs = _init_distributed(device)
    try:
        to_device = functools.partial(_to_device, device=device, channels_last=cfg.channels_last, on_device=on_device)
        return _train(model, task, train_dataset, valid_dataset, cfg, collate_fn, device, procs, to_device)
    finally:
        if procs.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    model, task, train_dataset, valid_dataset, cfg: TrainConfig, collate_fn, device: torch.device, procs: _Processes, to_device
) -> dict[str, Any]:
    """Set up, then epochs of train -> validate -> checkpoint, then the final outputs."""
    if not cfg.out_dir:
        raise ConfigError("cfg.out_dir is empty; build the config with resolve_config()")
    out = Path(cfg.out_dir)
    plan = _plan(cfg, procs, len(train_dataset), 0 if valid_dataset is None else len(valid_dataset))  # type: ignore[arg-type]
    seed_everything(cfg.seed + procs.rank, cfg.deterministic)  # per-rank augmentation / dropout streams; data order uses cfg.seed
    log = logger.info if procs.main else logger.debug
    train_sampler, valid_sampler = _samplers(cfg, procs, plan)
    loader = _Loaders(cfg, procs, collate_fn, pin=device.type == "cuda")

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _optimisation(model, cfg, device, plan.total_steps)
    _resume(opt, model, cfg, out / CHECKPOINT, procs)
    if procs.main:  # until this run ends, the folder must not look like a finished run of other settings or epochs
        for path in [out / CONFIG, out / METRICS, *out.glob(f"{PENDING}*")]:
            path.unlink(missing_ok=True)
    history, best = opt.history, opt.best
    train_model: nn.Module = model
    if procs.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the training forward only: validation, checkpoints and weights use `model` as it is
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    t0 = time.time()
    log(
        "training %s: %d train / %d valid samples, %d epochs x %d steps, global batch %d = micro %d x accum %d x world %d, device %s",
        cfg.stage,
        plan.n_train,
        plan.n_valid,
        cfg.epochs,
        plan.steps_per_epoch,
        cfg.batch_size,
        plan.micro,
        cfg.grad_accum,
        procs.world_size,
        device,
    )
    for epoch in range(opt.start_epoch, cfg.epochs):
        if _stale_epochs(history, best, cfg):
            break
        train_sampler.set_epoch(epoch)
        batches = iter(loader(train_dataset, train_sampler, plan.micro, True, epoch))
        train_loss = _train_epoch(train_model, task, batches, opt, cfg, plan, device, procs, epoch, to_device)
        frames, vsum, vcount = [], 0.0, 0.0
        if valid_dataset is not None:
            valid_batches = loader(valid_dataset, valid_sampler, _valid_batch(plan.micro), False, epoch)
            frames, vsum, vcount = _validate(model, task, valid_batches, cfg, opt.autocast, procs, to_device)
            frames, vsum, vcount = _gather_validation(frames, vsum, vcount, device, procs)
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "lr": opt.scheduler.get_last_lr()[0]}
        improved, oof = False, None
        if procs.main:
            oof = pd.concat(frames, ignore_index=True) if frames else None
            entry.update(_epoch_metrics(task, oof if oof is not None else pd.DataFrame(), vsum, vcount, cfg))
            entry["seconds"] = opt.seconds_before + time.time() - t0
            improved = _improved(entry, best, cfg)
            if improved:
                best = {"epoch": epoch + 1, "value": entry.get(cfg.monitor)}
            history.append(entry)
            log(
                "epoch %d/%d: %s",
                epoch + 1,
                cfg.epochs,
                ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "epoch"),
            )
        _checkpoint(model, opt, oof, improved, history, best, cfg, out, procs, epoch, opt.seconds_before + time.time() - t0)
    return _final_outputs(model, history, best, cfg, out, device, procs, plan)


def _plan(cfg: TrainConfig, procs: _Processes, n_train: int, n_valid: int) -> _Plan:
    """Micro-batch and optimizer steps per epoch; errors when the global batch cannot be split or the data is too small."""
    per_step = cfg.grad_accum * procs.world_size
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"batch_size={cfg.batch_size} (global) must be divisible by grad_accum * world_size = {cfg.grad_accum} * {procs.world_size}"
        )
    micro = cfg.batch_size // per_step
    shard = math.ceil(n_train / procs.world_size) if procs.enabled else n_train  # DistributedSampler pads to equal shards
    steps_per_epoch = (shard // micro) // cfg.grad_accum
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch < 1 and cfg.epochs > 0:
        raise ConfigError(
            f"train set too small: {n_train} samples give no full optimizer step of batch_size={cfg.batch_size} "
            f"(micro-batch {micro} x grad_accum {cfg.grad_accum} x world_size {procs.world_size})"
        )
    return _Plan(micro, steps_per_epoch, max(1, steps_per_epoch * cfg.epochs), n_train, n_valid)


def _samplers(cfg: TrainConfig, procs: _Processes, plan: _Plan) -> tuple[Any, Sampler]:
    """The training order (the same global permutation with or without DDP) and this process's validation shard."""
    if procs.enabled:
        train: Any = DistributedSampler(range(plan.n_train), procs.world_size, procs.rank, shuffle=True, seed=cfg.seed)
    else:
        train = _EpochPermutation(plan.n_train, cfg.seed)
    return train, _Strided(plan.n_valid, procs.rank, procs.world_size)


def _loader_base_seed(seed: int, rank: int, epoch: int) -> int:
    """The base seed of an epoch's loader workers (worker k: base + k): a function of (seed, epoch, rank) only."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + rank)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class _Epoched(Sampler[tuple[int, int]]):
    """`sampler`'s indices as (epoch, index): how persistent workers learn that a new epoch began."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.epoch = sampler, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class _EpochSeeded(Dataset):
    """`dataset` read by persistent workers: at an epoch's first item a worker reseeds python, numpy and torch
    as a worker started for that epoch would be (torch's worker start, then `_worker_init_fn`), so each epoch
    draws the same augmentation whether its workers are kept from the last epoch or new (a resumed run)."""

    def __init__(self, dataset: Dataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self.epoch:
            info = torch.utils.data.get_worker_info()
            worker_seed = _loader_base_seed(self.seed, self.rank, epoch) + (info.id if info is not None else 0)
            torch.manual_seed(worker_seed)
            np.random.seed(worker_seed % 2**32)
            random.seed(worker_seed % 2**32)
            self.epoch = epoch
        return self.dataset[index]


class _Loaders:
    """The run's DataLoaders, whose worker seeds depend on (seed, epoch, rank) only, so a resumed epoch draws the same.

    Without workers, a new loader per epoch. With workers, one loader per dataset for the whole run: its
    workers persist across epochs (no start-up per epoch) and reseed at each epoch (`_EpochSeeded`) exactly
    as the epoch's own loader's workers would have been seeded.
    """

    def __init__(self, cfg: TrainConfig, procs: _Processes, collate_fn: Callable | None, pin: bool) -> None:
        self.cfg, self.rank, self.collate_fn, self.pin = cfg, procs.rank, collate_fn, pin
        self.kept: dict[int, tuple[DataLoader, _Epoched]] = {}

    def __call__(self, dataset: Dataset, sampler: Sampler, batch: int, drop_last: bool, epoch: int) -> DataLoader:
        cfg = self.cfg
        common: dict[str, Any] = dict(batch_size=batch, drop_last=drop_last, num_workers=cfg.num_workers, collate_fn=self.collate_fn)
        common.update(pin_memory=self.pin, worker_init_fn=_worker_init_fn)
        if cfg.num_workers == 0:
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + self.rank)
            return DataLoader(dataset, sampler=sampler, generator=generator, **common)
        if id(dataset) not in self.kept:
            epoched = _Epoched(sampler)
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)  # not the global RNG (dropout's)
            seeded = _EpochSeeded(dataset, cfg.seed, self.rank)
            loader = DataLoader(seeded, sampler=epoched, generator=generator, persistent_workers=True, **common)
            self.kept[id(dataset)] = (loader, epoched)
        loader, epoched = self.kept[id(dataset)]
        epoched.epoch = epoch
        return loader


def _optimisation(model: nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int) -> _Optimisation:
    """AdamW, warm-up + cosine per optimizer step, and the AMP dtype / GradScaler (fp16 only) of `device`."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_fraction))
    dtype = amp_dtype(device, cfg.amp_dtype) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return _Optimisation(optimizer, scheduler, scaler, dtype, history=[])


def _resume(opt: _Optimisation, model: nn.Module, cfg: TrainConfig, ckpt_path: Path, procs: _Processes) -> None:
    """Restore model, optimizer, schedule, scaler, history and RNG states from the run's checkpoint, when there is one."""
    if not (cfg.resume and ckpt_path.is_file()):
        return
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # re-raised with the file name and the way out
        raise RuntimeError(f"{ckpt_path}: cannot read checkpoint ({exc}); delete it or set resume=false") from None
    try:
        diff = config_diff(resolve_config(cfg.stage, ckpt["config"], saved=True), cfg) if ckpt.get("config") else {}
    except ConfigError as exc:
        diff = {"config": (f"unreadable: {exc}", None)}
    changed = {k: v for k, v in diff.items() if k not in RESULT_NEUTRAL}
    if changed:  # resuming would give a model that neither config describes
        shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
        raise ConfigError(
            f"{ckpt_path}: this run was started with other settings ({shown}); rerun with the checkpoint's settings, "
            "or start it over (runner --force, or resume=false)"
        )
    if diff and procs.main:
        logger.info("%s: resuming with other %s (these do not change the result)", ckpt_path, ", ".join(diff))
    unwrap(model).load_state_dict(ckpt["model"])
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    opt.scaler.load_state_dict(ckpt["scaler"])
    opt.start_epoch, opt.history, opt.best = ckpt["epoch"], ckpt["history"], ckpt["best"]
    opt.seconds_before = ckpt.get("seconds", 0.0)
    rng = ckpt.get("rng") or []
    if len(rng) == procs.world_size:
        _set_rng_state(rng[procs.rank])
    else:
        logger.warning("checkpoint has RNG states of %d processes, running %d: reseeding", len(rng), procs.world_size)
        seed_everything(cfg.seed + procs.rank + 1000 * opt.start_epoch, cfg.deterministic)
    (logger.info if procs.main else logger.debug)("resuming from epoch %d (%s)", opt.start_epoch, ckpt_path)


def _train_epoch(
    train_model: nn.Module,
    task: Task,
    batches: Iterator[Any],
    opt: _Optimisation,
    cfg: TrainConfig,
    plan: _Plan,
    device: torch.device,
    procs: _Processes,
    epoch: int,
    to_device: Callable[[Any], Any],
) -> float:
    """One epoch of optimizer steps (accumulation micro-steps, DDP no_sync, clipping); returns the mean training loss."""
    train_model.train()
    trainable = [p for g in opt.optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n_micro = 0
    bar = tqdm(total=plan.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not procs.main, leave=False)
    for _step in range(plan.steps_per_epoch):
        for k in range(cfg.grad_accum):
            batch = to_device(next(batches))
            sync = k == cfg.grad_accum - 1 or not procs.enabled
            with contextlib.nullcontext() if sync else train_model.no_sync():
                with opt.autocast():
                    loss = task.loss(train_model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{cfg.stage} epoch {epoch + 1}: loss is {loss.item()} (lower lr or check the data)")
                opt.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().double()
            n_micro += 1
        if cfg.grad_clip > 0:
            opt.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scheduler.step()
        bar.update()
        bar.set_postfix(loss=f"{loss_sum.item() / n_micro:.4f}", lr=f"{opt.scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    if procs.enabled:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / max(1, n_micro * procs.world_size)


def _valid_batch(micro: int) -> int:
    """Validation batch per process: twice the training micro-batch (no gradients to hold)."""
    return max(1, 2 * micro)


class SharedForward:
    """A network whose output for one input is computed once: validation calls `Task.predict` and then
    `Task.loss` on the same batch, and both call the network on it (eval mode, no gradients: the same
    output), so the loss costs no second forward. Other attributes are the network's."""

    def __init__(self, network: nn.Module) -> None:
        self._network, self._input, self._output = network, None, None

    def __call__(self, inputs: Any) -> Any:
        if inputs is not self._input:
            self._input, self._output = inputs, self._network(inputs)
        return self._output

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)


def _validate(model, task, loader, cfg, autocast, procs, to_device) -> tuple[list[pd.DataFrame], float, float]:
    """Predict OOF rows on this process's validation shard (+ the summed loss when cfg.valid_loss)."""
    net = unwrap(model)
    net.eval()
    frames: list[pd.DataFrame] = []
    loss_sum, count = 0.0, 0.0
    with torch.no_grad():
        for batch in tqdm(loader, desc="valid", disable=not procs.main, leave=False):
            batch = to_device(batch)
            shared = SharedForward(net)
            with autocast():
                frames.append(task.predict(shared, batch))
                if cfg.valid_loss:
                    n = _batch_len(batch)
                    loss_sum += float(task.loss(shared, batch)) * n
                    count += n
    net.train()
    return frames, loss_sum, count


def _gather_validation(frames: list[pd.DataFrame], vsum: float, vcount: float, device: torch.device, procs: _Processes):
    """Every process's OOF rows on rank 0 and the validation loss summed over processes."""
    if not procs.enabled:
        return frames, vsum, vcount
    gathered: list[Any] = [None] * procs.world_size
    dist.gather_object(frames, gathered if procs.main else None, dst=0)
    frames = [f for part in gathered for f in part] if procs.main else []
    totals = torch.tensor([vsum, vcount], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    vsum, vcount = totals.tolist()
    return frames, vsum, vcount


def _epoch_metrics(task: Task, oof: pd.DataFrame, vsum: float, vcount: float, cfg: TrainConfig) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if cfg.valid_loss and vcount:
        metrics["valid_loss"] = vsum / vcount
    if len(oof):
        metrics.update({k: float(v) for k, v in task.score(oof).items()})
    return metrics


def _improved(entry: dict[str, Any], best: dict[str, Any] | None, cfg: TrainConfig) -> bool:
    """Whether this epoch is the one to keep: always with save=last, when cfg.monitor improved with save=best."""
    if cfg.save != "best":
        return True
    if cfg.monitor not in entry:
        raise ConfigError(f"monitor={cfg.monitor!r} is not among the epoch metrics {sorted(entry)}")
    return _better(entry[cfg.monitor], best["value"] if best else None, cfg.monitor_mode)


def _stale_epochs(history: list[dict[str, Any]], best: dict[str, Any] | None, cfg: TrainConfig) -> bool:
    """Whether early stopping ends the run: cfg.monitor has not improved for `early_stopping_patience` epochs."""
    if not cfg.early_stopping_patience or not history or best is None:
        return False
    stale = history[-1]["epoch"] - best["epoch"]
    if stale >= cfg.early_stopping_patience:
        logger.info(
            "early stopping after epoch %d: %s has not improved for %d epochs (best: epoch %d)",
            history[-1]["epoch"],
            cfg.monitor,
            stale,
            best["epoch"],
        )
        return True
    return False


def _checkpoint(
    model,
    opt: _Optimisation,
    oof,
    improved: bool,
    history,
    best,
    cfg: TrainConfig,
    out: Path,
    procs: _Processes,
    epoch: int,
    seconds: float,
) -> None:
    """Rank 0 writes the kept epoch's weights / OOF and an atomic checkpoint.pt holding every rank's RNG state."""
    rng_states: list[Any] = [_rng_state()]
    if procs.enabled:
        rng_states = [None] * procs.world_size
        dist.all_gather_object(rng_states, _rng_state())
    if procs.main:
        # the kept epoch's weights / OOF go to pending files first and replace the kept ones only once the
        # checkpoint is written: a full disk anywhere leaves weights, OOF and checkpoint of one epoch
        pending = _write_selected(model, oof, cfg, out, pending=True) if improved else []
        state = {
            "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "best": best,
            "rng": rng_states,
            "seconds": seconds,
            "config": cfg.to_dict(),
        }
        try:
            ckpt_path = atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        except BaseException:
            for path in pending:
                path.unlink(missing_ok=True)
            raise
        for path in pending:  # renames: they need no space
            os.replace(path, out / path.name[len(PENDING) :])
        logger.info("wrote checkpoint %s (epoch %d)%s", ckpt_path, epoch + 1, " and its weights" if pending else "")
    procs.barrier()


def _final_outputs(
    model, history, best, cfg: TrainConfig, out: Path, device: torch.device, procs: _Processes, plan: _Plan
) -> dict[str, Any]:
    """history.csv, metrics.json and config.json of the run (rank 0); every rank returns metrics.json's dict."""
    result: dict[str, Any] = {}
    if procs.main:
        if not (out / WEIGHTS).is_file():  # epochs == 0: keep the given weights
            _write_selected(model, None, cfg, out)
        selected = next((h for h in history if best and h["epoch"] == best["epoch"]), history[-1] if history else {})
        result = {
            "stage": cfg.stage,
            "fold": cfg.fold,
            "seed": cfg.seed,
            "save": cfg.save,
            "monitor": cfg.monitor,
            "monitor_mode": cfg.monitor_mode,
            "epoch": selected.get("epoch", 0),
            "metrics": {k: v for k, v in selected.items() if k not in ("epoch", "lr", "seconds")},
            "history": history,
            "n_train": plan.n_train,
            "n_valid": plan.n_valid,
            "seconds": history[-1]["seconds"] if history else 0.0,
            "device": str(device),
            "world_size": procs.world_size,
        }
        hist_path = atomic_write(out / HISTORY, lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False))
        logger.info("wrote history %s", hist_path)
        met_path = atomic_write(out / METRICS, lambda tmp: tmp.write_text(json.dumps(result, indent=2, default=float) + "\n"))
        logger.info("wrote metrics %s", met_path)
        save_config(cfg, out / CONFIG)
    if procs.enabled:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
        procs.barrier()
    return result


def _write_selected(model: nn.Module, oof: pd.DataFrame | None, cfg: TrainConfig, out: Path, pending: bool = False) -> list[Path]:
    """Weights (+ OOF rows with fold / seed columns) of the epoch kept by cfg.save; with `pending`, under
    names that `_checkpoint` moves into place after the checkpoint. Returns the paths written."""
    prefix = PENDING if pending else ""
    written = []
    try:
        written.append(save_weights(model, out / f"{prefix}{WEIGHTS}"))
        logger.info("wrote weights %s", written[-1])
        if oof is not None:
            oof = oof.copy()
            oof["fold"] = cfg.fold
            oof["seed"] = cfg.seed
            written.append(atomic_write(out / f"{prefix}{OOF}", lambda tmp: oof.to_parquet(tmp, index=False)))
            logger.info("wrote out-of-fold predictions %s (%d rows)", written[-1], len(oof))
    except BaseException:
        for path in written if pending else []:
            path.unlink(missing_ok=True)
        raise
    return written


__all__ = ["Task", "fit", "seed_everything", "param_groups", "warmup_cosine"]


# ----------------------------------------------------------------------------- a run's parts, outside fit


@dataclass
class Training:
    """What a stage hands the trainer for one run: `training.fit()` trains it; `TrainingSteps` times its parts."""

    model: nn.Module
    task: Task
    train_dataset: Dataset
    valid_dataset: Dataset | None
    cfg: TrainConfig
    collate_fn: Callable[[list[Any]], Any] | None = None
    on_device: Callable[[Any], Any] | None = None

    def fit(self) -> dict[str, Any]:
        """Train as `fit` does and write the run's outputs."""
        return fit(self.model, self.task, self.train_dataset, self.valid_dataset, self.cfg, self.collate_fn, self.on_device)


class TrainingSteps:
    """A run's training loader and optimizer steps outside `fit`, in one process, writing nothing (for benchmarks).

    The steps are `fit`'s own (`_train_epoch`: device placement and the run's `on_device` step,
    channels_last, the AMP dtype and gradient scaler, accumulation, clipping, `compile`), on the model
    moved and seeded as `fit` moves and seeds it; the loaders are the trainer's (`_Loaders`).
    """

    def __init__(self, training: Training) -> None:
        self.training, self.cfg = training, training.cfg
        self.device = resolve_device(self.cfg.device)
        self.procs = _Processes()
        seed_everything(self.cfg.seed, self.cfg.deterministic)
        training.model.to(self.device)
        if self.cfg.channels_last:
            training.model.to(memory_format=torch.channels_last)
        self.plan = _Plan(self.cfg.batch_size // self.cfg.grad_accum, 1, 1, len(training.train_dataset), 0)  # type: ignore[arg-type]
        if self.plan.micro < 1:
            raise ConfigError(f"batch_size={self.cfg.batch_size} gives no micro-batch with grad_accum={self.cfg.grad_accum}")
        self.opt = _optimisation(training.model, self.cfg, self.device, self.plan.total_steps)
        self.train_model = torch.compile(training.model) if self.cfg.compile else training.model
        self.finish = functools.partial(_to_device, device=self.device, channels_last=self.cfg.channels_last, on_device=training.on_device)

    def loader(self, num_workers: int, n_batches: int) -> DataLoader:
        """`n_batches` training micro-batches drawn at random with replacement (a small dataset lasts), through
        the trainer's DataLoader with `num_workers` workers."""
        dataset = self.training.train_dataset
        sampler = RandomSampler(
            dataset,  # type: ignore[arg-type]
            replacement=True,
            num_samples=n_batches * self.plan.micro,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        cfg = dataclasses.replace(self.cfg, num_workers=num_workers)
        loaders = _Loaders(cfg, self.procs, self.training.collate_fn, pin=self.device.type == "cuda")
        return loaders(dataset, sampler, self.plan.micro, True, 0)

    def to_device(self, batch: Any) -> Any:
        """A loader batch moved to the device as it is (each step still finishes it there, as `fit`'s steps do)."""
        return _to_device(batch, self.device, self.cfg.channels_last)

    def run(self, batches: Iterator[Any], steps: int) -> None:
        """`steps` optimizer steps, each of `grad_accum` micro-batches from `batches`, as `fit` takes them."""
        plan = dataclasses.replace(self.plan, steps_per_epoch=steps)
        _train_epoch(self.train_model, self.training.task, batches, self.opt, self.cfg, plan, self.device, self.procs, 0, self.finish)
