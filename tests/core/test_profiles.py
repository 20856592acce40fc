"""Profiles: named sets of per-stage settings and sweeps (JSON data), resolved under the user's overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rsna22_utils.core.config import save_config
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.profiles import available_profiles, load_profile
from rsna22_utils.core.registry import stages
from rsna22_utils.core.resolve import load_config, resolve_config, show_configs
from rsna22_utils.core.runner import plan_runs

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shipped_profiles_load_and_name_only_settings_that_apply() -> None:
    assert {"original", "demo"} <= set(available_profiles())
    for name in available_profiles():
        profile = load_profile(name)
        assert profile.name == name and profile.version >= 1 and profile.description
        for stage in stages():
            for variant in profile.variants(stage):
                values = {"profile": name, **({"variant": variant.name} if variant.name else {})}
                resolve_config(stage, values)  # every value valid for its stage


def test_a_profile_with_a_setting_that_does_not_apply_is_an_error(tmp_path: Path) -> None:
    bad = {"profile": "bad", "version": 1, "stages": {"07_inference": {"settings": {"lr": 0.1}}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="07_inference: setting 'lr'"):
        load_profile(str(path))
    bad["stages"] = {"02_infer_box": {"folds": [0]}, "06_train_study": {"settings": {"backbone": "x"}}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="stage runs once.*the stage takes it from its stage-05 run"):
        load_profile(str(path))
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*original"):
        resolve_config("01_train_box", {"profile": "nope"})


def test_overrides_apply_on_top_of_the_profile_and_the_profile_is_saved(tmp_path: Path) -> None:
    cfg = resolve_config("05_train_fracture", {"profile": "original", "variant": "seresnext50", "fold": -1, "seed": 3, "lr": 1e-4})
    assert (cfg.backbone, cfg.lr, cfg.epochs, cfg.batch_size) == ("seresnext50_32x4d", 1e-4, 3, 48)
    assert cfg.full_data and Path(cfg.out_dir).name == "seresnext50-fold-1-seed3"
    again = load_config(save_config(cfg, tmp_path / "config.json"))
    assert (again.profile, again.variant, again.lr, again.backbone) == ("original", "seresnext50", 1e-4, "seresnext50_32x4d")
    with pytest.raises(ConfigError, match="several variants of 03_train_vertebra.*variant=NAME"):
        resolve_config("03_train_vertebra", {"profile": "original"})
    with pytest.raises(ConfigError, match="no variant 'x'"):
        resolve_config("05_train_fracture", {"profile": "original", "variant": "x"})


def test_full_data_runs_keep_the_last_epoch() -> None:
    with pytest.raises(ConfigError, match="full-data run.*save must be 'last'"):
        resolve_config("01_train_box", {"fold": -1, "save": "best"})
    with pytest.raises(ConfigError, match="fold must be in"):
        resolve_config("01_train_box", {"fold": -2})


def test_the_runner_plans_the_profiles_sweep(tmp_path: Path) -> None:
    box = plan_runs("01_train_box", None, None, {"profile": "original"}, tmp_path)
    assert [(s.fold, s.seed) for s in box] == [(f, s) for f in (0, 1, 2, 3, 4, -1) for s in (0, 1, 2)]
    fracture = plan_runs("05_train_fracture", None, None, {"profile": "original"}, tmp_path)
    assert [s.out_dir.name for s in fracture] == [f"resnest50d-fold-1-seed{s}" for s in range(6)] + [
        f"seresnext50-fold-1-seed{s}" for s in range(4)
    ]
    assert all(s.overrides["variant"] == s.variant and s.overrides["profile"] == "original" for s in fracture)
    one = plan_runs("03_train_vertebra", [2], [0], {"profile": "original"}, tmp_path, variants=["seg04F"])
    assert [s.out_dir.name for s in one] == ["seg04F-fold2-seed0"]
    with pytest.raises(ConfigError, match="no variant nope"):
        plan_runs("03_train_vertebra", None, None, {"profile": "original"}, tmp_path, variants=["nope"])
    (prepare,) = plan_runs("00_prepare", None, None, {"profile": "original"}, tmp_path)
    assert prepare.out_dir == tmp_path.absolute() / "00_prepare"


# The original's values per stage (../shared/reference/third-place.md; configs of darraghdog/RSNA22).
ORIGINAL = {
    "01_train_box": {
        "": dict(
            backbone="efficientnet_b1", epochs=15, lr=2e-4, weight_decay=0.0, batch_size=32, folds=[0, 1, 2, 3, 4, -1], seeds=[0, 1, 2]
        )
    },
    "03_train_vertebra": {
        name: dict(backbone=backbone, epochs=epochs, lr=3e-4, weight_decay=5e-4, batch_size=16, seq_len=32, slices_per_image=3)
        for name, backbone, epochs in (("seg02G", "resnest50d", 3), ("seg04A", "resnest50d", 3), ("seg04F", "efficientnetv2_rw_m", 2))
    },
    "05_train_fracture": {
        name: dict(
            backbone=backbone, epochs=3, lr=3e-4, weight_decay=5e-4, batch_size=48, crop_size=512, crop_margin=0.0, folds=[-1], seeds=seeds
        )
        for name, backbone, seeds in (("resnest50d", "resnest50d", list(range(6))), ("seresnext50", "seresnext50_32x4d", list(range(4))))
    },
    "06_train_study": {
        name: dict(backbone=backbone, epochs=3, lr=1e-3, weight_decay=5e-4, batch_size=8, max_len=192, folds=[-1], seeds=seeds)
        for name, backbone, seeds in (("resnest50d", "resnest50d", list(range(6))), ("seresnext50", "seresnext50_32x4d", list(range(4))))
    },
}


@pytest.mark.parametrize("stage", list(ORIGINAL))
def test_config_show_gives_the_originals_values(stage: str) -> None:
    rows = {row["variant"]: row for row in show_configs(stage, "original")}
    assert set(rows) == set(ORIGINAL[stage])
    for name, expected in ORIGINAL[stage].items():
        row = rows[name]
        assert row["image_size"] == 512 and row["windows"] == [[400.0, 1800.0]] and row.get("pretrained", True) is True
        assert (row["warmup_fraction"], row["grad_clip"], row["amp"], row["save"]) == (0.1, 0.0, True, "last")
        assert {k: row[k] for k in expected} == expected, name


def test_config_show_command_prints_json_with_the_sweep() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rsna22_utils", "config", "show", "06_train_study", "--profile", "original", "--json", "-p", "epochs=1"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    ).stdout
    rows = json.loads(out)
    assert [(r["variant"], r["folds"], len(r["seeds"]), r["epochs"]) for r in rows] == [
        ("resnest50d", [-1], 6, 1),
        ("seresnext50", [-1], 4, 1),
    ]
    assert all(r["profile"] == "original" and "fold" not in r for r in rows)


def test_config_show_counts_trainable_parameters() -> None:
    from rsna22_utils.cervical.models import create_network
    from rsna22_utils.cervical.preview import preview_derived

    (row,) = show_configs("01_train_box", "demo", count_params=True)
    model = create_network(preview_derived(resolve_config("01_train_box", {"profile": "demo"})))
    assert row["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    (study,) = show_configs("06_train_study", "demo", count_params=True)  # the frozen stage-05 CNN does not count
    fracture = create_network(preview_derived(resolve_config("05_train_fracture", {"profile": "demo"})))
    assert 0 < study["params_trainable"] < sum(p.numel() for p in fracture.parameters())
