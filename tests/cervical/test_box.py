"""The box stage's settings: input slices, loss weights, out-of-fold 02, the original's network size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna22_utils.cervical.box import infer_box
from rsna22_utils.cervical.configs import StudyBoxRule
from rsna22_utils.cervical.data import BoxSliceDataset, CacheSource, stack_slices
from rsna22_utils.cervical.ensemble import load_box_models
from rsna22_utils.cervical.models import box_loss, create_model
from rsna22_utils.cervical.study_box import BoxInference, predict_study_box
from rsna22_utils.core.cache import StudyCache
from rsna22_utils.core.config import save_config, with_derived
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.registry import CONFIG, WEIGHTS, out_of_fold
from rsna22_utils.core.resolve import resolve_config
from rsna22_utils.core.runs import save_weights

SIZE, ROWS_COLS = 32, 64
TINY = {"backbone": "mobilenetv3_small_050", "pretrained": False, "device": "cpu", "num_workers": 0, "n_folds": 3}


def _prepared(root: Path, folds: dict[str, int | None], n_slices: int = 9, seed: int = 0) -> Path:
    """A 00_prepare folder with a tiny study cache (SIZE px, one window) and folds.csv; None = a study of no fold."""
    rng = np.random.default_rng(seed)
    prepared = root / "00_prepare"
    cache = prepared / "cache" / f"{SIZE}px_w400-1800"
    (cache / "volumes").mkdir(parents=True)
    (cache / "slices").mkdir()
    (cache / "spec.json").write_text(json.dumps({"image_size": SIZE, "windows": [[400, 1800]]}))
    for uid in folds:
        np.save(cache / "volumes" / f"{uid}.npy", rng.integers(0, 256, (n_slices, SIZE, SIZE, 1), dtype=np.uint8))
        table = pd.DataFrame({"StudyInstanceUID": uid, "slice_index": np.arange(n_slices), "rows": ROWS_COLS, "cols": ROWS_COLS})
        table.to_parquet(cache / "slices" / f"{uid}.parquet", index=False)
    known = [(uid, fold) for uid, fold in folds.items() if fold is not None]
    pd.DataFrame(known, columns=["StudyInstanceUID", "fold"]).to_csv(prepared / "folds.csv", index=False)
    return prepared


def _box_run(work_dir: Path, fold: int, box_input_slices: int = 1, box_value: float | None = None) -> Path:
    """A finished 01 run of `fold`; with `box_value`, its model says p_box = 0.99 and box (v, v, v + 0.4, v + 0.4) on every slice."""
    cfg = resolve_config("01_train_box", {**TINY, "work_dir": str(work_dir), "fold": fold, "box_input_slices": box_input_slices})
    cfg = with_derived(cfg, image_size=SIZE, windows=[[400.0, 1800.0]])
    model = create_model(cfg)
    if box_value is not None:
        fractions = torch.tensor([box_value, box_value, box_value + 0.4, box_value + 0.4])
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.cat([torch.tensor([4.6]), torch.logit(fractions)]))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True)
    save_weights(model, out / WEIGHTS)
    save_config(cfg, out / CONFIG)
    return out


def _infer(work_dir: Path, **overrides: object) -> pd.DataFrame:
    settings = {"work_dir": str(work_dir), "device": "cpu", "num_workers": 0, "data_dir": str(work_dir / "absent"), **overrides}
    infer_box(resolve_config("02_infer_box", settings))
    return BoxInference.of(work_dir).read("study_boxes").set_index("StudyInstanceUID")


# ----------------------------------------------------------------------------- out of fold


def test_registry_out_of_fold_gives_the_runs_that_validated_on_the_fold(tmp_path: Path) -> None:
    runs = [tmp_path / f"fold{f}-seed{s}" for f in (0, 1, 2, -1) for s in (0, 1)]
    assert [r.name for r in out_of_fold(runs, 1)] == ["fold1-seed0", "fold1-seed1"]
    assert out_of_fold(runs, -1) == []


@pytest.mark.slow
def test_02_out_of_fold_boxes_come_only_from_runs_that_did_not_train_on_the_study(tmp_path: Path) -> None:
    folds = {"a0": 0, "b0": 0, "a1": 1, "a2": 2, "test": None}
    _prepared(tmp_path, folds)
    value = {0: 0.1, 1: 0.2, 2: 0.3, -1: 0.45}  # each run's constant box says which run made it
    for fold, v in value.items():
        _box_run(tmp_path, fold, box_value=v)

    boxes = _infer(tmp_path, out_of_fold=True)
    for uid, fold in folds.items():
        # a training study: the run of its fold (trained on the others) alone; a study of no fold: every run
        expected = value[fold] if fold is not None else np.mean(list(value.values()))
        assert boxes.loc[uid, "x0"] == pytest.approx(expected * ROWS_COLS, abs=1e-3), uid
    metrics = BoxInference.of(tmp_path).read("metrics")
    assert [Path(r).name for r in metrics["out_of_fold"]["fold 1"]] == ["fold1-seed0"]

    everything = _infer(tmp_path, out_of_fold=False)  # every run on every study
    assert everything["x0"].to_numpy() == pytest.approx(np.mean(list(value.values())) * ROWS_COLS, abs=1e-3)


def test_02_outputs_name_only_what_02_writes(tmp_path: Path) -> None:
    outputs = BoxInference.of(tmp_path)
    assert outputs.path("study_boxes") == tmp_path / "02_infer_box" / "study_boxes.csv"
    with pytest.raises(KeyError, match="02_infer_box writes no 'slice_labels'"):
        outputs.path("slice_labels")
    with pytest.raises(FileNotFoundError, match=r"study_boxes\.csv: missing; run 02_infer_box first"):
        outputs.read("study_boxes")


def test_02_out_of_fold_names_the_folds_without_a_run(tmp_path: Path) -> None:
    _prepared(tmp_path, {"a0": 0, "a1": 1, "a2": 2})
    _box_run(tmp_path, 0, box_value=0.1)
    _box_run(tmp_path, -1, box_value=0.1)
    with pytest.raises(ValueError, match=r"fold\(s\) 1 2,.*--folds 1 2.*out_of_fold=false"):
        _infer(tmp_path, out_of_fold=True)


# ----------------------------------------------------------------------------- input slices


@pytest.mark.slow
def test_box_input_of_three_slices_is_the_same_in_training_02_and_the_submission(tmp_path: Path) -> None:
    _prepared(tmp_path, {"s0": 0, "s1": 1}, n_slices=7)
    run = _box_run(tmp_path, 0, box_input_slices=3)
    cache = StudyCache(next((tmp_path / "00_prepare" / "cache").iterdir()))
    volume = np.asarray(cache.volume("s0"))

    # training's dataset: slices i-1, i, i+1 (clamped at the ends) as channels
    dataset = BoxSliceDataset(cache.slices("s0").assign(has_box=0.0, x0=0.0, y0=0.0, x1=0.0, y1=0.0), CacheSource(cache), input_slices=3)
    for i, neighbours in ((0, [0, 0, 1]), (3, [2, 3, 4]), (6, [5, 6, 6])):
        image = dataset[i]["image"]
        assert image.shape == (3, SIZE, SIZE)
        expected = torch.from_numpy(volume[neighbours, :, :, 0].astype(np.float32) / 127.5 - 1.0)
        assert torch.equal(image, expected)
        assert np.array_equal(stack_slices(volume, np.array([i]), 3)[0], volume[neighbours, :, :, 0].transpose(1, 2, 0))

    # 02 and the submission read box_input_slices from the run's config and agree on every study (every run on each)
    boxes = _infer(tmp_path, out_of_fold=False)
    ensemble = load_box_models(tmp_path, torch.device("cpu"))
    assert ensemble.input_slices == 3 and ensemble.models[0].encoder.conv_stem.in_channels == 3
    for uid in ("s0", "s1"):
        ours = predict_study_box(
            ensemble.models,
            np.asarray(cache.volume(uid)),
            cache.slices(uid),
            torch.device("cpu"),
            4,
            StudyBoxRule(),
            amp=False,
            input_slices=3,
        )
        row = boxes.loc[uid]
        assert (ours["slnum_from"], ours["slnum_to"]) == (row["slnum_from"], row["slnum_to"])
        assert [ours[c] for c in ("x0", "y0", "x1", "y1")] == pytest.approx(list(row[["x0", "y0", "x1", "y1"]]), abs=1e-3)
    assert run.exists()


def test_box_input_slices_must_be_odd() -> None:
    with pytest.raises(ConfigError, match="box_input_slices must be odd"):
        resolve_config("01_train_box", {"box_input_slices": 2})


# ----------------------------------------------------------------------------- loss and network


def test_box_loss_weights_the_l1_and_the_bce() -> None:
    torch.manual_seed(0)
    outputs = {"has_box": torch.randn(6), "box": torch.rand(6, 4)}
    batch = {"has_box": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), "box": torch.rand(6, 4)}
    with_box = batch["has_box"] > 0.5
    l1 = (outputs["box"][with_box] - batch["box"][with_box]).abs().mean()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(outputs["has_box"], batch["has_box"])
    assert torch.allclose(box_loss(outputs, batch, box_weight=0.8, has_box_weight=0.2), 0.8 * l1 + 0.2 * bce)
    assert torch.allclose(box_loss(outputs, batch), bce + 5.0 * l1)  # the defaults: today's loss


def test_the_originals_box_network_has_its_parameter_count() -> None:
    """efficientnet_b1, 3 slices x 1 window in, 5 outputs: 6,519,589 trainable parameters in the original."""
    cfg = resolve_config("01_train_box", {"backbone": "efficientnet_b1", "pretrained": False, "box_input_slices": 3})
    model = create_model(cfg)
    assert model.encoder.conv_stem.in_channels == 3 and model.head.out_features == 5
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(count - 6_519_589) <= 0.01 * 6_519_589


def test_box_rule_is_kit_or_original_in_02_and_the_submission() -> None:
    for stage in ("02_infer_box", "07_inference"):
        assert resolve_config(stage, {"box_rule": "original"}).box_rule == "original"
        with pytest.raises(ConfigError, match="box_rule must be one of kit, original, got 'median'"):
            resolve_config(stage, {"box_rule": "median"})
