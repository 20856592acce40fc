"""One trainer for every stage: `fit(model, task, train_dataset, valid_dataset, cfg)`.

A stage supplies a model, datasets and a `Task` (loss / predict / score); `fit` does the rest:
seeding, AdamW (no decay on biases and norm weights; frozen parameters excluded), linear warm-up +
cosine schedule per optimizer step, AMP on CUDA (bf16 when supported, else fp16 + GradScaler),
channels_last, gradient accumulation, clipping, per-epoch validation with out-of-fold predictions,
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
import json
import logging
import math
import os
import random
import tempfile
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
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm  # text bars (not tqdm.auto): they stream through papermill to the runner's console

from rsna22_utils.config import ConfigError, RunConfig, config_diff, resolve_config, save_config

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
OOF = "oof.parquet"
HISTORY = "history.csv"
METRICS = "metrics.json"
CONFIG = "config.json"


class Task(Protocol):
    """What a stage tells the trainer: how to compute the loss, predict OOF rows, and score them."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar loss, mean over the batch (called in train mode, under autocast)."""
        ...

    def predict(self, model: nn.Module, batch: Any) -> pd.DataFrame:
        """OOF rows for one validation batch: ids + predictions (called under eval + no_grad)."""
        ...

    def score(self, predictions: pd.DataFrame) -> dict[str, float]:
        """Validation metrics from all OOF rows of an epoch (cfg.monitor names one of them)."""
        ...


# ----------------------------------------------------------------------------- small utilities


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); make cuDNN deterministic so reruns match."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def _worker_init_fn(worker_id: int) -> None:
    """Each DataLoader worker seeds numpy / random from its torch seed (itself from the seeded loader generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def resolve_device(cfg: RunConfig) -> torch.device:
    """cfg.device -> torch.device; "auto" = CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device!r} but CUDA is not available here (use device=cpu or auto)")
        return torch.device(f"cuda:{local_rank}") if want == "cuda" else torch.device(want)
    if want == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but MPS is not available here")
    return torch.device(want)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Model state_dict -> safetensors (CPU, contiguous copies so tied weights do not fail), atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().clone().contiguous() for k, v in _unwrap(model).state_dict().items()}
    path = Path(path)
    _atomic(path, lambda tmp: save_file(state, str(tmp)))
    return path


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> Any:
    """Load a .safetensors file, a .pt/.pth state_dict, or a trainer checkpoint.pt into model (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = _unwrap(model).load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise RuntimeError(f"{path}: weights do not match the model: {exc}") from None
    logger.info("loaded weights %s", path)
    return result


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(_to_device(v, device, channels_last) for v in batch)
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
    for _, p in _unwrap(model).named_parameters():
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
class _Dist:
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


def _init_distributed(device: torch.device) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return _Dist()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owns = True
    return _Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), owns)


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


def fit(
    model: nn.Module,
    task: Task,
    train_dataset: Dataset,
    valid_dataset: Dataset,
    cfg: RunConfig,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict[str, Any]:
    """Train `model` on `task` as `cfg` says and write the run's outputs to cfg.out_dir; returns metrics.json's dict."""
    device = resolve_device(cfg)
    dd = _init_distributed(device)
    try:
        return _fit(model, task, train_dataset, valid_dataset, cfg, collate_fn, device, dd)
    finally:
        if dd.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _fit(model, task, train_dataset, valid_dataset, cfg, collate_fn, device, dd: _Dist) -> dict[str, Any]:  # noqa: C901
    if not cfg.out_dir:
        raise ConfigError("cfg.out_dir is empty; build the config with resolve_config()")
    out = Path(cfg.out_dir)
    per_step = cfg.grad_accum * dd.world_size
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"batch_size={cfg.batch_size} (global) must be divisible by grad_accum * world_size = "
            f"{cfg.grad_accum} * {dd.world_size}"
        )
    micro = cfg.batch_size // per_step
    seed_everything(cfg.seed + dd.rank)  # per-rank augmentation / dropout streams; data order uses cfg.seed
    log = logger.info if dd.main else logger.debug

    # data
    n_train, n_valid = len(train_dataset), len(valid_dataset)  # type: ignore[arg-type]
    if dd.enabled:
        from torch.utils.data.distributed import DistributedSampler

        train_sampler: Any = DistributedSampler(train_dataset, dd.world_size, dd.rank, shuffle=True, seed=cfg.seed)
    else:
        train_sampler = _EpochPermutation(n_train, cfg.seed)
    valid_sampler = _Strided(n_valid, dd.rank, dd.world_size)
    pin = device.type == "cuda"

    def loader(dataset: Dataset, sampler: Sampler, batch: int, drop_last: bool, epoch: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch, sampler=sampler, drop_last=drop_last, num_workers=cfg.num_workers,
            collate_fn=collate_fn, pin_memory=pin, worker_init_fn=_worker_init_fn,
            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + dd.rank),
            persistent_workers=False,
        )

    micro_per_epoch = len(train_sampler) // micro
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch < 1 and cfg.epochs > 0:
        raise ConfigError(
            f"train set too small: {n_train} samples give no full optimizer step of batch_size={cfg.batch_size} "
            f"(micro-batch {micro} x grad_accum {cfg.grad_accum} x world_size {dd.world_size})"
        )
    total_steps = max(1, steps_per_epoch * cfg.epochs)

    # model, optimizer, schedule, AMP
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_fraction))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    # resume
    start_epoch, history, best, seconds_before = 0, [], None, 0.0
    ckpt_path = out / CHECKPOINT
    if cfg.resume and ckpt_path.is_file():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"{ckpt_path}: cannot read checkpoint ({exc}); delete it or set resume=false") from None
        try:
            diff = config_diff(resolve_config(cfg.stage, ckpt["config"]), cfg) if ckpt.get("config") else {}
        except ConfigError as exc:
            diff = {"config": (f"unreadable: {exc}", None)}
        if diff and dd.main:
            logger.warning("%s was written with a different config: %s", ckpt_path, diff)
        _unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        seconds_before = ckpt.get("seconds", 0.0)
        rng = ckpt.get("rng") or []
        if len(rng) == dd.world_size:
            _set_rng_state(rng[dd.rank])
        else:
            logger.warning("checkpoint has RNG states of %d processes, running %d: reseeding", len(rng), dd.world_size)
            seed_everything(cfg.seed + dd.rank + 1000 * start_epoch)
        log("resuming from epoch %d (%s)", start_epoch, ckpt_path)
    train_model: nn.Module = model
    if dd.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type="cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    t0 = time.time()
    log("training %s: %d train / %d valid samples, %d epochs x %d steps, global batch %d = micro %d x accum %d x world %d, device %s",
        cfg.stage, n_train, n_valid, cfg.epochs, steps_per_epoch, cfg.batch_size, micro, cfg.grad_accum, dd.world_size, device)
    for epoch in range(start_epoch, cfg.epochs):
        # ---- train
        train_model.train()
        train_sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        n_micro = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not dd.main, leave=False)
        batches = iter(loader(train_dataset, train_sampler, micro, True, epoch))
        for _step in range(steps_per_epoch):
            for k in range(cfg.grad_accum):
                batch = _to_device(next(batches), device, cfg.channels_last)
                sync = k == cfg.grad_accum - 1 or not dd.enabled
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with autocast():
                        loss = task.loss(train_model, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{cfg.stage} epoch {epoch + 1}: loss is {loss.item()} (lower lr or check the data)")
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().double()
                n_micro += 1
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss_sum.item() / n_micro:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        if dd.enabled:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / max(1, n_micro * dd.world_size)

        # ---- validate
        frames, vsum, vcount = _validate(model, task, loader(valid_dataset, valid_sampler, _valid_batch(micro), False, epoch),
                                         cfg, device, autocast, dd)
        if dd.enabled:
            gathered: list[Any] = [None] * dd.world_size
            dist.gather_object(frames, gathered if dd.main else None, dst=0)
            frames = [f for part in gathered for f in part] if dd.main else []
            totals = torch.tensor([vsum, vcount], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            vsum, vcount = totals.tolist()
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}
        improved, oof = False, None
        if dd.main:
            oof = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            if cfg.valid_loss and vcount:
                entry["valid_loss"] = vsum / vcount
            entry.update({k: float(v) for k, v in task.score(oof).items()} if len(oof) else {})
            entry["seconds"] = seconds_before + time.time() - t0
            if cfg.save == "best":
                if cfg.monitor not in entry:
                    raise ConfigError(f"monitor={cfg.monitor!r} is not among the epoch metrics {sorted(entry)}")
                improved = _better(entry[cfg.monitor], best["value"] if best else None, cfg.monitor_mode)
            else:
                improved = True
            if improved:
                best = {"epoch": epoch + 1, "value": entry.get(cfg.monitor)}
            history.append(entry)
            log("epoch %d/%d: %s", epoch + 1, cfg.epochs,
                ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "epoch"))
        # ---- checkpoint (rank 0 writes; RNG states of every rank kept for an exact resume)
        rng_states: list[Any] = [_rng_state()]
        if dd.enabled:
            rng_states = [None] * dd.world_size
            dist.all_gather_object(rng_states, _rng_state())
        if dd.main:
            if improved:
                _write_selected(model, oof, cfg, out)
            state = {
                "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "history": history, "best": best, "rng": rng_states,
                "seconds": seconds_before + time.time() - t0, "config": cfg.to_dict(),
            }
            _atomic(ckpt_path, lambda tmp: torch.save(state, tmp))
            logger.info("wrote checkpoint %s (epoch %d)", ckpt_path, epoch + 1)
        dd.barrier()

    # ---- final outputs
    result: dict[str, Any] = {}
    if dd.main:
        if not (out / WEIGHTS).is_file():  # epochs == 0: keep the given weights
            _write_selected(model, None, cfg, out)
        selected = next((h for h in history if best and h["epoch"] == best["epoch"]), history[-1] if history else {})
        total_seconds = history[-1]["seconds"] if history else 0.0
        result = {
            "stage": cfg.stage, "fold": cfg.fold, "seed": cfg.seed, "save": cfg.save,
            "monitor": cfg.monitor, "monitor_mode": cfg.monitor_mode, "epoch": selected.get("epoch", 0),
            "metrics": {k: v for k, v in selected.items() if k not in ("epoch", "lr", "seconds")},
            "history": history, "n_train": n_train, "n_valid": n_valid, "seconds": total_seconds,
            "device": str(device), "world_size": dd.world_size,
        }
        hist_path = out / HISTORY
        _atomic(hist_path, lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False))
        logger.info("wrote history %s", hist_path)
        met_path = out / METRICS
        _atomic(met_path, lambda tmp: tmp.write_text(json.dumps(result, indent=2, default=float) + "\n"))
        logger.info("wrote metrics %s", met_path)
        save_config(cfg, out / CONFIG)
    if dd.enabled:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
        dd.barrier()
    return result


def _valid_batch(micro: int) -> int:
    """Validation batch per process: twice the training micro-batch (no gradients to hold)."""
    return max(1, 2 * micro)


def _validate(model, task, loader, cfg, device, autocast, dd) -> tuple[list[pd.DataFrame], float, float]:
    """Predict OOF rows on this process's validation shard (+ the summed loss when cfg.valid_loss)."""
    net = _unwrap(model)
    net.eval()
    frames: list[pd.DataFrame] = []
    loss_sum, count = 0.0, 0.0
    with torch.no_grad():
        for batch in tqdm(loader, desc="valid", disable=not dd.main, leave=False):
            batch = _to_device(batch, device, cfg.channels_last)
            with autocast():
                frames.append(task.predict(net, batch))
                if cfg.valid_loss:
                    n = _batch_len(batch)
                    loss_sum += float(task.loss(net, batch)) * n
                    count += n
    net.train()
    return frames, loss_sum, count


def _write_selected(model: nn.Module, oof: pd.DataFrame | None, cfg: RunConfig, out: Path) -> None:
    """Weights (+ OOF rows with fold / seed columns) of the epoch kept by cfg.save."""
    path = save_weights(model, out / WEIGHTS)
    logger.info("wrote weights %s", path)
    if oof is not None:
        oof = oof.copy()
        oof["fold"] = cfg.fold
        oof["seed"] = cfg.seed
        oof_path = out / OOF
        _atomic(oof_path, lambda tmp: oof.to_parquet(tmp, index=False))
        logger.info("wrote out-of-fold predictions %s (%d rows)", oof_path, len(oof))


__all__ = [
    "Task", "fit", "load_weights", "save_weights", "resolve_device", "seed_everything",
    "param_groups", "warmup_cosine",
]
