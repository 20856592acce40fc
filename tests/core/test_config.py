"""Typed stage configs: overrides, errors with suggestions, save / load, derived out_dir, every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsna22_utils.cervical.configs import (
    BoxTrainConfig,
    FractureTrainConfig,
    PrepareConfig,
    VertebraInferConfig,
    VertebraTrainConfig,
)
from rsna22_utils.core.config import config_diff, parse_overrides, save_config, with_derived
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.registry import get_stage, stages
from rsna22_utils.core.resolve import load_config, resolve_config


def test_parse_overrides_types() -> None:
    got = parse_overrides(
        ["epochs=3", "lr=1e-4", "amp=false", "pretrained=True", "windows=[[400,1800],[50,350]]", "backbone=resnet34", "data_dir=/a=b"]
    )
    assert got == {
        "epochs": 3,
        "lr": 1e-4,
        "amp": False,
        "pretrained": True,
        "windows": [[400, 1800], [50, 350]],
        "backbone": "resnet34",
        "data_dir": "/a=b",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_resolve_coerces_by_annotation() -> None:
    cfg = resolve_config("01_train_box", {"epochs": "3", "lr": "0.01", "amp": "false", "fold": 2.0})
    assert isinstance(cfg, BoxTrainConfig)
    assert (cfg.epochs, cfg.lr, cfg.amp, cfg.fold) == (3, 0.01, False, 2)
    prepare = resolve_config("00_prepare", {"windows": "[[400, 1800]]", "data_dir": Path("/x")})
    assert isinstance(prepare, PrepareConfig) and prepare.data_dir == "/x"
    assert prepare.windows == [[400.0, 1800.0]] and isinstance(prepare.windows[0][0], float)
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
    cfg = with_derived(resolve_config("05_train_fracture", {"epochs": 2, "fold": 1}), windows=[[400.0, 1800.0], [50.0, 350.0]])
    path = save_config(cfg, tmp_path / "sub" / "config.json")
    payload = json.loads(path.read_text())
    assert payload["_class"] == "FractureTrainConfig" and payload["stage"] == "05_train_fracture"
    back = load_config(path)
    assert back == cfg and isinstance(back, FractureTrainConfig)
    assert config_diff(cfg, back) == {}
    other = with_derived(resolve_config("05_train_fracture", {"epochs": 3, "fold": 1}), windows=[[400.0, 1800.0], [50.0, 350.0]])
    assert config_diff(cfg, other) == {"epochs": (2, 3)}
    (tmp_path / "bad.json").write_text(json.dumps({**payload, "epoks": 1}))
    with pytest.raises(ConfigError, match="bad.json.*epoks"):
        load_config(tmp_path / "bad.json")


@pytest.mark.parametrize("stage", list(stages()))
def test_every_stage_resolves(stage: str) -> None:
    cfg = resolve_config(stage)
    assert isinstance(cfg, get_stage(stage).config) and cfg.stage == stage
    assert Path(cfg.out_dir).parts[-2 if get_stage(stage).per_fold else -1] == stage
    expected = {
        "03_train_vertebra": VertebraTrainConfig,
        "04_infer_vertebra": VertebraInferConfig,
        "05_train_fracture": FractureTrainConfig,
    }
    if stage in expected:
        assert type(cfg) is expected[stage]


def test_a_setting_that_does_not_apply_names_the_stages_where_it_does() -> None:
    with pytest.raises(
        ConfigError,
        match=r"'lr' does not apply to stage '07_inference'; "
        r"it applies to 01_train_box, 03_train_vertebra, 05_train_fracture, 06_train_study",
    ):
        resolve_config("07_inference", {"lr": 1e-3})
    with pytest.raises(ConfigError, match=r"'backbone' does not apply to stage '00_prepare'"):
        resolve_config("00_prepare", {"backbone": "resnet18"})
    with pytest.raises(ConfigError, match=r"'fold' does not apply to stage '04_infer_vertebra'"):
        resolve_config("04_infer_vertebra", {"fold": 1})


def test_derived_settings_come_from_the_stage_inputs_not_the_user(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"'seq_len' of stage '06_train_study' is not a setting: the stage takes it from its stage-05 run"
    ):
        resolve_config("06_train_study", {"seq_len": 16})
    with pytest.raises(
        ConfigError, match=r"'image_size' of stage '01_train_box' is not a setting: the stage takes it from the study cache"
    ):
        resolve_config("01_train_box", {"image_size": 128})
    cfg = resolve_config("06_train_study")
    derived = with_derived(cfg, seq_len=8, backbone="resnet34")
    assert (cfg.seq_len, cfg.backbone) == (32, "resnet18")  # the given config is never changed
    assert load_config(save_config(derived, tmp_path / "config.json")) == derived  # a saved run holds them
