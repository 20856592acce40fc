"""The generic trainer on a tiny toy regression (CPU): learning, resume, outputs, accumulation, freezing, DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from rsna22_utils.core.resolve import load_config
from rsna22_utils.core.runs import load_weights
from rsna22_utils.core.train import param_groups
from tests.core.ddp_toy import ToyDataset, ToyModel, ToyTask, run, toy_config

STATIC = ["train_loss", "valid_loss", "mse", "mae", "lr"]


def _mse(model: torch.nn.Module, n: int = 24) -> float:
    data = ToyDataset(n, 1)
    with torch.no_grad():
        pred = model(data.x)
    return float(((pred - data.y) ** 2).mean())


def _history(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / "history.csv")[["epoch", *STATIC]]


def test_loss_goes_down(tmp_path: Path) -> None:
    before = _mse(ToyModel())
    model, metrics = run(tmp_path, n_train=128, epochs=3, lr=0.03)
    train = [h["train_loss"] for h in metrics["history"]]
    assert train[-1] < 0.5 * train[0], train
    assert metrics["metrics"]["mse"] < 0.2 * before, (before, metrics["metrics"])
    assert metrics["metrics"]["mse"] == pytest.approx(_mse(model), rel=1e-4)  # OOF rows come from the final model


def test_resume_after_interrupt_matches_uninterrupted(tmp_path: Path) -> None:
    full, _ = run(tmp_path / "full")

    class Interrupted(Exception):
        pass

    class InterruptingTask(ToyTask):
        calls = 0

        def loss(self, model, batch):
            if model.training:
                InterruptingTask.calls += 1
                if InterruptingTask.calls > 8:  # first step of epoch 2 (8 steps per epoch)
                    raise Interrupted
            return super().loss(model, batch)

    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", task=InterruptingTask())
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    other = ToyModel()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # a different start: the resumed weights must come from the checkpoint
    resumed, metrics = run(tmp_path / "resumed", model=other)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    pd.testing.assert_frame_equal(_history(tmp_path / "full"), _history(tmp_path / "resumed"))
    assert len(metrics["history"]) == 2


def test_outputs_written_and_loadable(tmp_path: Path) -> None:
    model, metrics = run(tmp_path, fold=2, seed=7, save="best", monitor="mse", epochs=3)
    fresh = ToyModel()
    load_weights(fresh, tmp_path / "model.safetensors")
    oof = pd.read_parquet(tmp_path / "oof.parquet")
    assert len(oof) == 24 and sorted(oof["id"]) == list(range(24))
    assert set(oof["fold"]) == {2} and set(oof["seed"]) == {7}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    mses = [h["mse"] for h in saved["history"]]
    assert saved["epoch"] == 1 + mses.index(min(mses))  # save=best keeps the best epoch
    assert saved["metrics"]["mse"] == pytest.approx(min(mses))
    assert saved["metrics"]["mse"] == pytest.approx(_mse(fresh), rel=1e-4)  # weights of that epoch
    assert saved["n_train"] == 64 and saved["n_valid"] == 24 and saved["world_size"] == 1
    assert load_config(tmp_path / "config.json") == toy_config(tmp_path, fold=2, seed=7, save="best", monitor="mse", epochs=3)
    assert len(pd.read_csv(tmp_path / "history.csv")) == 3
    # the checkpoint is a valid weights file too
    load_weights(ToyModel(), tmp_path / "checkpoint.pt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_full_data_run_trains_on_everything_and_validates_nothing(tmp_path: Path) -> None:
    from rsna22_utils.core.train import fit
    from tests.core.ddp_toy import ToyDataset, toy_config

    cfg = toy_config(tmp_path, fold=-1, epochs=2)
    model = ToyModel()
    metrics = fit(model, ToyTask(), ToyDataset(64, 0), None, cfg)
    assert metrics["epoch"] == 2 and metrics["n_valid"] == 0 and metrics["fold"] == -1
    assert [set(h) for h in metrics["history"]] == [{"epoch", "train_loss", "lr", "seconds"}] * 2  # no validation figures
    assert not (tmp_path / "oof.parquet").exists()
    fresh = ToyModel()
    load_weights(fresh, tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))  # the last epoch
    with pytest.raises(ValueError, match="validation set is needed exactly when"):
        fit(ToyModel(), ToyTask(), ToyDataset(64, 0), ToyDataset(8, 1), toy_config(tmp_path / "b", fold=-1))
    with pytest.raises(ValueError, match="validation set is needed exactly when"):
        fit(ToyModel(), ToyTask(), ToyDataset(64, 0), None, toy_config(tmp_path / "c", fold=0))


def test_gradient_accumulation_matches_full_batch(tmp_path: Path) -> None:
    one, _ = run(tmp_path / "a1", batch_size=8, grad_accum=1)
    two, _ = run(tmp_path / "a2", batch_size=8, grad_accum=2)
    h1, h2 = _history(tmp_path / "a1"), _history(tmp_path / "a2")
    pd.testing.assert_frame_equal(h1, h2, rtol=1e-4)
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_parameters_untouched_and_not_optimised(tmp_path: Path) -> None:
    model = ToyModel(freeze=True)
    stem = {k: v.clone() for k, v in model.stem.state_dict().items()}
    head = model.head.weight.clone()
    groups = param_groups(model, 0.01)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in model.stem.parameters())
    assert [p is model.head.weight for p in groups[0]["params"]] == [True]  # only the matrix is decayed
    assert {id(p) for p in groups[1]["params"]} == {id(model.norm.weight), id(model.norm.bias), id(model.head.bias)}
    run(tmp_path, model=model)
    for k, v in model.stem.state_dict().items():
        assert torch.equal(v, stem[k]), k
    assert not torch.equal(model.head.weight, head)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_toy.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    run(tmp_path / "single")
    pd.testing.assert_frame_equal(_history(tmp_path / "ddp"), _history(tmp_path / "single"), rtol=1e-5)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert log.count("wrote metrics") == 1 and log.count("wrote checkpoint") == 2  # rank 0 only, once per epoch
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    oof = pd.read_parquet(tmp_path / "ddp" / "oof.parquet")
    assert sorted(oof["id"]) == list(range(24))  # both shards gathered, no padded duplicates


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(tmp_path: Path) -> None:
    # the toy's mse falls every epoch, so with monitor_mode="max" the first epoch stays the best
    settings = dict(save="best", monitor="mse", monitor_mode="max", epochs=6, early_stopping_patience=2)
    _, metrics = run(tmp_path, **settings)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["epoch"] == 1
    _, again = run(tmp_path, **settings)  # resuming a stopped run trains nothing more
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]


class _CountingModel(ToyModel):
    """The toy model, counting its forward passes in eval mode (validation)."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.eval_forwards += 0 if self.training else 1
        return super().forward(x)


def test_validation_runs_the_network_once_per_batch_for_predictions_and_loss(tmp_path: Path) -> None:
    without_loss, with_loss = _CountingModel(), _CountingModel()
    run(tmp_path / "predictions", n_valid=24, model=without_loss, epochs=2, valid_loss=False)
    _, metrics = run(tmp_path / "both", n_valid=24, model=with_loss, epochs=2)
    assert without_loss.eval_forwards > 0
    assert with_loss.eval_forwards == without_loss.eval_forwards  # the loss shares predict's forward
    assert metrics["metrics"]["valid_loss"] == pytest.approx(_mse(with_loss), rel=1e-5)  # the loss of that same output
    assert metrics["metrics"]["valid_loss"] == pytest.approx(metrics["metrics"]["mse"], rel=1e-5)
