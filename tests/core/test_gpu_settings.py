"""GPU settings of the configs (amp_dtype, deterministic, channels_last, compile, num_workers) and loader workers
kept across epochs that draw exactly what a new loader per epoch drew."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rsna22_utils.core import device as kit_device
from rsna22_utils.core.config import RESULT_NEUTRAL, default_num_workers
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.resolve import resolve_config
from rsna22_utils.core.train import _EpochPermutation, _Loaders, _Processes, _worker_init_fn
from tests.core.ddp_toy import ToyDataset, run, toy_config

ROOT = Path(__file__).resolve().parents[2]


def test_config_defaults_and_checks() -> None:
    cfg = resolve_config("05_train_fracture", {})
    assert (cfg.amp_dtype, cfg.deterministic, cfg.channels_last, cfg.compile) == ("auto", False, False, False)
    assert cfg.num_workers == default_num_workers() == len(os.sched_getaffinity(0))
    assert resolve_config("07_inference", {}).amp_dtype == "auto"  # the submission has the setting too
    assert resolve_config("01_train_box", {"amp_dtype": "bf16", "deterministic": "true"}).deterministic is True
    with pytest.raises(ConfigError, match="amp_dtype must be one of auto, fp16, bf16"):
        resolve_config("01_train_box", {"amp_dtype": "float16"})
    assert {"deterministic", "compile", "num_workers"} <= RESULT_NEUTRAL and "amp_dtype" not in RESULT_NEUTRAL


def test_default_num_workers_shares_the_cores_among_torchrun_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_num_workers() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers() == 4


def test_config_show_shows_the_gpu_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rsna22_utils", "config", "show", "05_train_fracture", "--profile", "original", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = json.loads(out)
    text = json.dumps(shown)
    for key in ("amp_dtype", "deterministic", "channels_last", "compile", "num_workers"):
        assert f'"{key}"' in text, key


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_switch_sets_cudnn_and_keeps_cpu_results(tmp_path: Path, deterministic: bool) -> None:
    kit_device.set_cudnn(not deterministic)
    model, metrics = run(tmp_path / str(deterministic), deterministic=deterministic)
    assert torch.backends.cudnn.deterministic is deterministic and torch.backends.cudnn.benchmark is (not deterministic)
    reference, _ = run(tmp_path / "reference")  # the default (autotuned kernels on CUDA): the same weights on CPU
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


class NoisyItems(ToyDataset):
    """Toy samples with numpy, python and torch noise drawn per item, as augmentations draw."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import random

        item = super().__getitem__(i)
        noise = np.random.random() + random.random() + float(torch.rand(()))
        return {**item, "x": item["x"] + noise}


def _epoch_batches(loader: DataLoader) -> list[torch.Tensor]:
    return [torch.cat([b["id"].float()[:, None], b["x"]], dim=1) for b in loader]


def test_persistent_workers_draw_what_a_new_loader_per_epoch_drew(tmp_path: Path) -> None:
    dataset, seed, workers = NoisyItems(40, 0), 3, 2
    cfg = toy_config(tmp_path, seed=seed, num_workers=workers)
    sampler = _EpochPermutation(len(dataset), seed)
    before = []  # the trainer's loaders until workers persisted: a new DataLoader per epoch
    for epoch in range(3):
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(seed * 1000 + epoch * 10)
        loader = DataLoader(
            dataset, batch_size=8, sampler=sampler, num_workers=workers, worker_init_fn=_worker_init_fn, generator=generator, drop_last=True
        )
        before.append(_epoch_batches(loader))
    loaders = _Loaders(cfg, _Processes(), None, pin=False)
    kept = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        loader = loaders(dataset, sampler, 8, True, epoch)
        kept.append(_epoch_batches(loader))
    assert loaders(dataset, sampler, 8, True, 2) is loader and loader.persistent_workers  # one loader, workers kept
    resumed = _Loaders(cfg, _Processes(), None, pin=False)  # a run resumed at epoch 2: new workers
    sampler.set_epoch(2)
    after_resume = _epoch_batches(resumed(dataset, sampler, 8, True, 2))
    for epoch in range(3):
        assert all(torch.equal(a, b) for a, b in zip(before[epoch], kept[epoch], strict=True)), epoch
    assert all(torch.equal(a, b) for a, b in zip(before[2], after_resume, strict=True))
    assert not torch.equal(before[0][0], before[1][0])  # epochs draw differently


def test_a_run_with_loader_workers_resumed_after_a_crash_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rsna22_utils.core import train
    from rsna22_utils.core.train import fit
    from tests.core.ddp_toy import ToyModel, ToyTask

    def train_toy(out: Path) -> torch.nn.Module:
        model = ToyModel()
        fit(model, ToyTask(), NoisyItems(64, 0), NoisyItems(24, 1), toy_config(out, num_workers=2, epochs=3))
        return model

    uninterrupted = train_toy(tmp_path / "a")
    real_checkpoint = train._checkpoint

    def crash_after_the_first_epoch(*args, **kwargs):
        real_checkpoint(*args, **kwargs)
        raise RuntimeError("killed")

    monkeypatch.setattr(train, "_checkpoint", crash_after_the_first_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        train_toy(tmp_path / "b")
    monkeypatch.setattr(train, "_checkpoint", real_checkpoint)
    resumed = train_toy(tmp_path / "b")  # new workers from epoch 2 on
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values(), strict=True))


def test_compile_wraps_the_training_model_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []

    def fake_compile(module: torch.nn.Module) -> torch.nn.Module:  # the wiring, without compiling kernels on CPU
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, _ = run(tmp_path / "on", compile=True, epochs=1)
    assert compiled == [model]
    run(tmp_path / "off", epochs=1)
    assert len(compiled) == 1
