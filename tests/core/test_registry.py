"""The stage registry is the one stage table: a new stage is one entry, one config, one function, one notebook.

Also: the run-folder layout, and stage functions that leave their config alone (what imports what:
tests/core/test_imports.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from rsna22_utils.core import kaggle
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.notebooks import check_pairs, check_thin, sync_pairs
from rsna22_utils.core.registry import execute, finished_runs, parse_run_name, run_dir, run_dirs, stages, unregister
from rsna22_utils.core.resolve import resolve_config
from rsna22_utils.core.runner import run_stage

ROOT = Path(__file__).resolve().parents[2]

# A toy stage as a user would add one: a config class, a stage function, a registry entry (in one
# module the kernel can import), and a notebook.
TOY_MODULE = '''
from dataclasses import dataclass
from pathlib import Path

from rsna22_utils.core.config import FoldSeed, StageConfig
from rsna22_utils.core.registry import Stage, register


@dataclass
class ToyConfig(StageConfig, FoldSeed):
    """99_toy: writes a greeting per fold x seed."""

    greeting: str = "hello"


def toy_stage(cfg: ToyConfig) -> dict:
    (Path(cfg.out_dir) / "greeting.txt").write_text(f"{cfg.greeting} from fold {cfg.fold} seed {cfg.seed}")
    return {"greeting": cfg.greeting}


register(Stage("99_toy", ToyConfig, "toy_stage_module:toy_stage", per_fold=True))
'''
TOY_NOTEBOOK = """# %% tags=["parameters"]
fold = 0
seed = 0
overrides = {}

# %%
import toy_stage_module  # registers 99_toy
from rsna22_utils.core.notebooks import start_stage

session = start_stage("99_toy", overrides, fold=fold, seed=seed)
session.run()
"""


@pytest.fixture
def toy_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    module_dir = tmp_path / "toy_module"
    module_dir.mkdir()
    (module_dir / "toy_stage_module.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(module_dir), os.environ.get("PYTHONPATH", "")]))
    sys.modules.pop("toy_stage_module", None)
    import toy_stage_module  # noqa: F401 - registers the stage

    yield tmp_path
    unregister("99_toy")
    sys.modules.pop("toy_stage_module", None)


@pytest.mark.slow
def test_a_new_stage_is_one_entry_one_config_one_function_one_notebook(toy_stage: Path) -> None:
    work_dir = toy_stage / "runs"
    assert list(stages())[-1] == "99_toy"
    cfg = resolve_config("99_toy", {"work_dir": str(work_dir), "fold": 1, "greeting": "hi"})
    assert Path(cfg.out_dir) == run_dir(work_dir, "99_toy", 1, 0) == work_dir / "99_toy" / "fold1-seed0"
    with pytest.raises(ConfigError, match="'lr' does not apply to stage '99_toy'; it applies to 01_train_box"):
        resolve_config("99_toy", {"lr": 1e-3})
    assert execute("99_toy", cfg) == {"greeting": "hi"}
    assert (Path(cfg.out_dir) / "greeting.txt").read_text() == "hi from fold 1 seed 0"
    assert "99_toy" in kaggle.stage_names() and kaggle.kernel_metadata("99_toy", kaggle.load_settings())["code_file"] == "99_toy.ipynb"

    notebooks = toy_stage / "notebooks"
    notebooks.mkdir()
    (notebooks / "99_toy.py").write_text(TOY_NOTEBOOK)
    sync_pairs(notebooks)
    assert check_pairs(notebooks) == [] and check_thin(notebooks) == []
    summary = run_stage("99_toy", folds=[0, 1], seeds=[0], overrides={"greeting": "hey"}, work_dir=work_dir, notebooks_dir=notebooks)
    assert summary.ok and len(summary.completed) == 2, summary
    assert [parse_run_name(p.name) for p in run_dirs(work_dir, "99_toy", require="greeting.txt")] == [("", 0, 0), ("", 1, 0)]
    assert (work_dir / "99_toy" / "fold0-seed0" / "greeting.txt").read_text() == "hey from fold 0 seed 0"


def test_run_folder_layout() -> None:
    assert run_dir("w", "05_train_fracture", 2, 7) == Path("w/05_train_fracture/fold2-seed7")
    assert run_dir("w", "04_infer_vertebra") == Path("w/04_infer_vertebra")
    assert parse_run_name("fold3-seed11") == ("", 3, 11) and parse_run_name("fold-1-seed0") == ("", -1, 0) and parse_run_name("x") is None
    assert parse_run_name("04F-fold-1-seed2") == ("04F", -1, 2) and parse_run_name("a-b-fold0-seed0") is None
    with pytest.raises(ValueError, match="per fold"):
        run_dir("w", "01_train_box")


def test_finished_runs_sorted_numerically_and_complete(tmp_path: Path) -> None:
    for fold, seed in [(10, 0), (2, 1), (2, 0)]:
        run = tmp_path / "01_train_box" / f"fold{fold}-seed{seed}"
        run.mkdir(parents=True)
        (run / "model.safetensors").write_bytes(b"x")
        (run / "config.json").write_text("{}")
    (tmp_path / "01_train_box" / "fold3-seed0").mkdir()  # unfinished: no weights
    assert [p.name for p in finished_runs(tmp_path, "01_train_box")] == ["fold2-seed0", "fold2-seed1", "fold10-seed0"]
    (tmp_path / "01_train_box" / "fold2-seed1" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        finished_runs(tmp_path, "01_train_box")
    with pytest.raises(FileNotFoundError, match="train 06_train_study first"):
        finished_runs(tmp_path, "06_train_study")


def test_no_stage_changes_the_config_it_is_given(tiny_pipeline: dict) -> None:
    changes = tiny_pipeline["config_changes"]
    assert set(changes) == set(stages())
    assert {stage: diff for stage, diff in changes.items() if diff} == {}
    # what a run saved holds the values the stage derived (the notebook shows this saved config)
    saved = json.loads((tiny_pipeline["work_dir"] / "06_train_study" / "fold0-seed0" / "config.json").read_text())
    fracture = json.loads((tiny_pipeline["work_dir"] / "05_train_fracture" / "fold0-seed0" / "config.json").read_text())
    assert (saved["backbone"], saved["seq_len"], saved["fracture_lstm_hidden"]) == (
        fracture["backbone"],
        fracture["seq_len"],
        fracture["lstm_hidden"],
    )
    assert saved["image_size"] == fracture["image_size"] == 48


def test_a_training_stage_run_twice_gives_the_same_weights(tiny_pipeline: dict, tmp_path: Path) -> None:
    """Every random number (initial weights, window choice, augmentation) follows the run's seed."""
    import torch
    from safetensors.torch import load_file

    from tests.helpers import TINY_COMMON, TINY_STAGES, tiny_settings

    prepared = tiny_pipeline["work_dir"] / "00_prepare"
    for stage in ("01_train_box", "03_train_vertebra"):
        weights = []
        for attempt in ("a", "b"):
            settings = {**TINY_COMMON, **TINY_STAGES[stage], "work_dir": str(tmp_path / attempt), "prepared_dir": str(prepared)}
            cfg = resolve_config(stage, tiny_settings(stage, settings))
            execute(stage, cfg)
            weights.append(load_file(str(Path(cfg.out_dir) / "model.safetensors")))
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), stage
