"""Typed stage configs: overrides, errors with suggestions, save / load, derived out_dir, every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsna22_utils.config import (
    PER_FOLD_STAGES,
    STAGES,
    BoxConfig,
    ConfigError,
    SequenceConfig,
    config_diff,
    load_config,
    parse_overrides,
    resolve_config,
    save_config,
)


def test_parse_overrides_types() -> None:
    got = parse_overrides(["epochs=3", "lr=1e-4", "amp=false", "pretrained=True", "windows=[[400,1800],[50,350]]",
                           "backbone=resnet34", "data_dir=/a=b"])
    assert got == {"epochs": 3, "lr": 1e-4, "amp": False, "pretrained": True, "windows": [[400, 1800], [50, 350]],
                   "backbone": "resnet34", "data_dir": "/a=b"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_resolve_coerces_by_annotation() -> None:
    cfg = resolve_config("01_train_box", {"epochs": "3", "lr": "0.01", "amp": "false", "fold": 2.0,
                                          "windows": "[[400, 1800]]", "data_dir": Path("/x")})
    assert isinstance(cfg, BoxConfig)
    assert (cfg.epochs, cfg.lr, cfg.amp, cfg.fold, cfg.data_dir) == (3, 0.01, False, 2, "/x")
    assert cfg.windows == [[400.0, 1800.0]] and isinstance(cfg.windows[0][0], float)
    cli = resolve_config("01_train_box", parse_overrides(["epochs=1", "fold=0"]))
    assert (cli.epochs, cli.fold) == (1, 0)
    with pytest.raises(ConfigError, match="'epochs'"):
        resolve_config("01_train_box", {"epochs": "many"})


def test_unknown_key_suggests_close_match() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config("01_train_box", {"epoch": 3})
    assert "Did you mean 'epochs'" in str(err.value) and "Valid keys:" in str(err.value)
    with pytest.raises(ConfigError, match="'01_train_box'"):
        resolve_config("01_train_bx")
    with pytest.raises(ConfigError, match="seq_len"):  # a sequence-stage key is not a box-stage key
        resolve_config("01_train_box", {"seq_len": 16})


def test_validation() -> None:
    with pytest.raises(ConfigError, match="fold"):
        resolve_config("01_train_box", {"fold": 5})
    with pytest.raises(ConfigError, match="grad_accum"):
        resolve_config("01_train_box", {"batch_size": 10, "grad_accum": 3})
    with pytest.raises(ConfigError, match="monitor_mode"):
        resolve_config("06_train_study", {"monitor_mode": "lowest"})
    with pytest.raises(ConfigError, match="fracture_pos_weight"):
        resolve_config("05_train_fracture", {"fracture_pos_weight": 0})


def test_out_dir_derivation() -> None:
    cfg = resolve_config("05_train_fracture", {"fold": 3, "seed": 42, "work_dir": "w"})
    assert Path(cfg.out_dir) == Path("w/05_train_fracture/fold3-seed42")
    assert Path(resolve_config("02_infer_box", {"work_dir": "w"}).out_dir) == Path("w/02_infer_box")
    assert resolve_config("01_train_box", {"out_dir": "/explicit"}).out_dir == "/explicit"
    # every stage finds 00_prepare's outputs under the same work_dir unless told otherwise
    assert Path(resolve_config("03_train_vertebra", {"work_dir": "w"}).prepared_dir) == Path("w/00_prepare")
    assert resolve_config("03_train_vertebra", {"work_dir": "w", "prepared_dir": "/p"}).prepared_dir == "/p"


def test_notebook_pattern() -> None:
    overrides = {"epochs": 1, "fold": 4}
    fold, seed = 1, 3
    cfg = resolve_config("01_train_box", {**overrides, "fold": fold, "seed": seed})
    assert (cfg.fold, cfg.seed, cfg.epochs) == (1, 3, 1)


def test_save_load_round_trip_and_diff(tmp_path: Path) -> None:
    cfg = resolve_config("05_train_fracture", {"epochs": 2, "windows": [[400, 1800], [50, 350]], "fold": 1})
    path = save_config(cfg, tmp_path / "sub" / "config.json")
    payload = json.loads(path.read_text())
    assert payload["_class"] == "SequenceConfig" and payload["stage"] == "05_train_fracture"
    back = load_config(path)
    assert back == cfg and isinstance(back, SequenceConfig)
    assert config_diff(cfg, back) == {}
    other = resolve_config("05_train_fracture", {"epochs": 3, "windows": [[400, 1800], [50, 350]], "fold": 1})
    assert config_diff(cfg, other) == {"epochs": (2, 3)}
    (tmp_path / "bad.json").write_text(json.dumps({**payload, "epoks": 1}))
    with pytest.raises(ConfigError, match="bad.json.*epoks"):
        load_config(tmp_path / "bad.json")


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_resolves(stage: str) -> None:
    cfg = resolve_config(stage)
    assert isinstance(cfg, STAGES[stage]) and cfg.stage == stage
    assert Path(cfg.out_dir).parts[-2 if stage in PER_FOLD_STAGES else -1] == stage
    if stage in ("03_train_vertebra", "04_infer_vertebra", "05_train_fracture"):
        assert cfg.task == ("fracture" if stage == "05_train_fracture" else "vertebra")
