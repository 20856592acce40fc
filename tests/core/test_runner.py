"""Stage runner: papermill per fold x seed, skip finished runs, go on after failures, GPUs, torchrun."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from rsna22_utils.core.notebooks import check_pairs
from rsna22_utils.core.runner import (
    COMPLETE_FILE,
    RUNS_FILE,
    _is_this_python,
    add_commands,
    parse_overrides,
    run_stage,
    torchrun_command,
)

# Writes what the kernel saw into out_dir; fold 1 fails after writing it.
STAGE_PY = """# %% tags=["parameters"]
fold = 0
seed = 0
overrides = {}

# %%
import json, os, pathlib, sys
out = pathlib.Path(overrides["out_dir"])
out.mkdir(parents=True, exist_ok=True)
seen = {"fold": fold, "seed": seed, "overrides": overrides, "cwd": os.getcwd(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "python": sys.executable}
(out / "seen.json").write_text(json.dumps(seen))
if fold == 1:
    raise ValueError(f"fold {fold} is broken on purpose")
"""

PREP_PY = """# %% tags=["parameters"]
overrides = {}

# %%
import pathlib
pathlib.Path(overrides["out_dir"], "prepared.txt").write_text(overrides["work_dir"])
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    (folder / "01_stage.py").write_text(STAGE_PY)  # no .ipynb: the runner builds it
    (folder / "00_prepare.py").write_text(PREP_PY)
    return folder


def _seen(out_dir: Path) -> dict:
    return json.loads((out_dir / "seen.json").read_text())


@pytest.mark.slow
def test_runs_per_fold_seed_skip_and_failure(notebooks: Path, tmp_path: Path) -> None:
    work = tmp_path / "runs"
    summary = run_stage("01_stage", folds=[0, 1], seeds=[3], overrides={"lr": 0.5}, work_dir=work, notebooks_dir=notebooks)
    repo = Path(__file__).resolve().parents[2]

    assert (notebooks / "01_stage.ipynb").exists()  # built from the .py
    assert not any("01_stage" in p for p in check_pairs(notebooks))
    assert not summary.ok
    assert [(r.fold, r.seed) for r in summary.completed] == [(0, 3)]
    assert [(r.fold, r.seed) for r in summary.failed] == [(1, 3)]

    done = work / "01_stage" / "fold0-seed3"
    seen = _seen(done)
    assert seen["fold"] == 0 and seen["seed"] == 3 and seen["cwd"] == str(repo)
    assert seen["python"] == sys.executable  # the kernel runs this interpreter
    assert seen["overrides"] == {"lr": 0.5, "out_dir": str(done), "work_dir": str(work)}
    complete = json.loads((done / COMPLETE_FILE).read_text())
    assert complete["parameters"]["fold"] == 0 and complete["seconds"] > 0
    assert complete["notebook"] == str(done / "01_stage.ipynb") and "finished_at" in complete
    executed = json.loads((done / "01_stage.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])

    failed = summary.failed[0]
    bad = work / "01_stage" / "fold1-seed3"
    assert failed.notebook == str(bad / "01_stage.ipynb") and Path(failed.notebook).exists()
    assert failed.error == "ValueError: fold 1 is broken on purpose"
    assert not (bad / COMPLETE_FILE).exists() and _seen(bad)["fold"] == 1

    runs = json.loads((work / "01_stage" / RUNS_FILE).read_text())
    assert runs["counts"] == {"done": 1, "skipped": 0, "failed": 1} and runs["ok"] is False

    # Second call: the finished run is skipped without executing (seen.json untouched), via the CLI.
    (done / "seen.json").unlink()
    args = _parser().parse_args(
        ["run", "01_stage", "--folds", "0", "--seeds", "3", "--work-dir", str(work), "--notebooks-dir", str(notebooks)]
    )
    assert args.func(args) == 0
    assert not (done / "seen.json").exists()
    assert json.loads((work / "01_stage" / RUNS_FILE).read_text())["counts"]["skipped"] == 1
    again = run_stage("01_stage", folds=[0], seeds=[3], work_dir=work, notebooks_dir=notebooks)
    assert again.ok and [r.fold for r in again.skipped] == [0] and not again.completed


def test_fold_less_stage_runs_once_into_stage_folder(notebooks: Path, tmp_path: Path) -> None:
    work = tmp_path / "runs"
    summary = run_stage("00_prepare", overrides={"data_dir": tmp_path}, work_dir=work, notebooks_dir=notebooks)
    assert summary.ok and len(summary.completed) == 1
    out = work / "00_prepare"
    assert (out / "prepared.txt").read_text() == str(work)
    assert (out / "00_prepare.ipynb").exists() and (out / COMPLETE_FILE).exists()
    assert summary.completed[0].fold is None
    params = json.loads((out / COMPLETE_FILE).read_text())["parameters"]
    assert params == {"overrides": {"data_dir": str(tmp_path), "out_dir": str(out), "work_dir": str(work)}}


@pytest.mark.slow
def test_devices_set_cuda_visible_devices(notebooks: Path, tmp_path: Path) -> None:
    work = tmp_path / "runs"
    summary = run_stage("01_stage", folds=[0, 2], seeds=[0], work_dir=work, notebooks_dir=notebooks, devices=["0", "1"])
    assert summary.ok and len(summary.completed) == 2
    # two runs at once, one per GPU
    assert sorted(_seen(Path(r.out_dir))["cuda"] for r in summary.completed) == ["0", "1"]
    for result in summary.completed:
        seen = _seen(Path(result.out_dir))
        assert seen["cuda"] in {"0", "1"} and seen["cuda"] == result.device
        assert (Path(result.out_dir) / COMPLETE_FILE).exists()


def test_unknown_stage_is_a_clear_error(notebooks: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="01_stage"):
        run_stage("99_missing", work_dir=tmp_path / "runs", notebooks_dir=notebooks)
    args = _parser().parse_args(["run", "99_missing", "--notebooks-dir", str(notebooks), "--work-dir", str(tmp_path)])
    assert args.func(args) == 2


def test_torchrun_command() -> None:
    cmd = torchrun_command("01_train_box", 2, 1, {"lr": 0.001, "backbone": "resnet18", "amp": True, "tag": "7", "note": " x"}, nproc=4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    tail = cmd[cmd.index("rsna22_utils") - 1 :]
    assert tail[:4] == ["-m", "rsna22_utils", "train", "01_train_box"]
    params = [tail[i + 1] for i, a in enumerate(tail) if a == "-p"]
    assert params == ["fold=2", "seed=1", "lr=0.001", "backbone=resnet18", "amp=true", 'tag="7"', 'note=" x"']
    # every -p value parses back to the value given
    assert parse_overrides(params) == {"fold": 2, "seed": 1, "lr": 0.001, "backbone": "resnet18", "amp": True, "tag": "7", "note": " x"}


def test_parse_overrides_and_cli_arguments() -> None:
    got = parse_overrides(["epochs=10", "lr=3e-4", "amp=false", "size=[384, 384]", "backbone=resnet18"])
    assert got == {"epochs": 10, "lr": 3e-4, "amp": False, "size": [384, 384], "backbone": "resnet18"}
    args = _parser().parse_args(
        ["run", "01_train_box", "--folds", "0", "1", "-p", "epochs=2", "--devices", "0", "1", "--nproc", "2", "--force"]
    )
    assert args.stage == "01_train_box" and args.folds == [0, 1] and args.seeds is None
    assert args.param == ["epochs=2"] and args.devices == ["0", "1"] and args.nproc == 2 and args.force
    assert args.work_dir == Path("runs") and callable(args.func)


def test_kernel_check_recognises_this_interpreter(tmp_path: Path) -> None:
    assert _is_this_python("python") and _is_this_python(sys.executable)
    assert not _is_this_python(str(tmp_path / "other-env" / "bin" / "python3"))
