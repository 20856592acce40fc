"""Killed and resumed: a training run that is killed (SIGKILL) after an epoch and started again ends with
exactly the weights of a run that was never interrupted, for every training stage (CPU)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_COMMON, TINY_STAGES, tiny_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def _command(stage: str, settings: dict) -> list[str]:
    import json

    return [sys.executable, "-m", "rsna22_utils", "train", stage, *[f"-p{k}={json.dumps(v)}" for k, v in settings.items()]]


def _kill_after_first_epoch(cmd: list[str], checkpoint: Path, timeout: float = 600) -> int:
    """Start `cmd`, SIGKILL it as soon as its checkpoint exists; the epoch the checkpoint holds."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while not checkpoint.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{cmd[4]} ended (code {proc.returncode}) before its first checkpoint")
        if time.monotonic() - started > timeout:
            proc.kill()
            raise AssertionError(f"{cmd[4]}: no checkpoint after {timeout} s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["01_train_box", "03_train_vertebra", "05_train_fracture", "06_train_study"])
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(stage: str, tiny_pipeline: dict, tmp_path: Path) -> None:
    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    base = {**TINY_COMMON, **TINY_STAGES[stage], "work_dir": str(work_dir), "prepared_dir": str(work_dir / "00_prepare")}
    base = tiny_settings(stage, {**base, "fold": 0, "seed": 0, "epochs": 3})
    if stage == "06_train_study":  # the 05 run it freezes
        base["fracture_run"] = str(work_dir / "05_train_fracture" / "fold0-seed0")

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(_command(stage, {**base, "out_dir": str(whole)}), cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    killed_at = _kill_after_first_epoch(_command(stage, {**base, "out_dir": str(resumed)}), resumed / "checkpoint.pt")
    assert killed_at < 3 and not (resumed / "metrics.json").exists()  # it really stopped part way
    subprocess.run(_command(stage, {**base, "out_dir": str(resumed)}), cwd=REPO_ROOT, env=env, check=True, capture_output=True)

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{stage}: {name} differs after resuming from epoch {killed_at}"
    history = [pd.read_csv(run / "history.csv").drop(columns="seconds") for run in (whole, resumed)]
    pd.testing.assert_frame_equal(*history)  # every epoch's losses and validation figures too
    assert len(history[0]) == 3
