"""The sequence stages' windows and out-of-fold vertebra inference (04), on a small hand-made cache and tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna22_utils.cervical.data import SequenceDataset
from rsna22_utils.cervical.labels import fracture_slice_labels
from rsna22_utils.cervical.models import create_model
from rsna22_utils.cervical.sequence import vertebra_predictions
from rsna22_utils.cervical.stages import TRAIN_VERTEBRA
from rsna22_utils.core.config import save_config, with_derived
from rsna22_utils.core.registry import CONFIG, WEIGHTS, out_of_fold, run_dir
from rsna22_utils.core.resolve import resolve_config
from rsna22_utils.core.runs import save_weights
from tests.cervical.test_data import make_cache  # a cache whose voxel value is the slice position

BACKBONE = "mobilenetv3_small_050"


def test_per_slice_items_have_one_target_and_mask_entry_per_slice(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 10})
    labels = {"a": np.arange(10, dtype=np.float32)[:, None]}
    common = dict(seq_len=2, slices_per_image=3, mode="infer", stride=6)
    per_image = SequenceDataset(["a"], cache, labels, **common)[1]  # window 4..9
    per_slice = SequenceDataset(["a"], cache, labels, per_slice=True, **common)[1]
    assert per_image["target"][:, 0].tolist() == [5, 8] and per_image["mask"].tolist() == [1, 1]
    assert per_slice["target"][:, 0].tolist() == [4, 5, 6, 7, 8, 9] and per_slice["mask"].tolist() == [1] * 6
    assert per_slice["slice_position"].tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])  # (index + 1) / n
    first = SequenceDataset(["a"], cache, labels, per_slice=True, seq_len=4, slices_per_image=3, mode="infer")[0]
    assert first["mask"].tolist() == [1] * 10 + [0] * 2  # slices past the study's end are masked


def test_out_of_fold_runs_are_those_that_validated_on_the_fold(tmp_path: Path) -> None:
    runs = [tmp_path / name for name in ("fold0-seed0", "fold1-seed0", "fold1-seed1", "seg04A-fold1-seed0", "fold-1-seed0")]
    assert [r.name for r in out_of_fold(runs, 1)] == ["fold1-seed0", "fold1-seed1", "seg04A-fold1-seed0"]
    assert out_of_fold(runs, 2) == [] and out_of_fold(runs, -1) == []


def _constant_run(work_dir: Path, fold: int, value: float, variant: str = "", **settings) -> None:
    """A finished 03 run whose every output is `value` (MSE outputs read clipped, so no sigmoid in the way)."""
    cfg = resolve_config(
        TRAIN_VERTEBRA, {"backbone": BACKBONE, "lstm_hidden": 4, "seq_len": 2, "infer_stride": 6, "loss": "mse", "fold": fold, **settings}
    )
    cfg = with_derived(cfg, image_size=16, windows=[[400.0, 1800.0]])
    model = create_model(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(value)
    out = run_dir(work_dir, TRAIN_VERTEBRA, fold, 0, variant)
    out.mkdir(parents=True)
    save_config(cfg, out / CONFIG)
    save_weights(model, out / WEIGHTS)


@pytest.mark.slow
def test_vertebra_inference_out_of_fold_uses_only_runs_that_never_saw_the_study(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "cache", {"a": 7, "b": 9, "c": 8})
    fold_of = {"a": 0, "b": 1, "c": 2}
    work = tmp_path / "runs"
    for fold in (0, 1, 2):
        _constant_run(work, fold, 0.1 * (fold + 1))
    _constant_run(work, 1, 0.6, variant="seg04F", outputs_per_slice=True, position_embedding=16, channel_embedding=16)
    cfg = resolve_config("04_infer_vertebra", {"work_dir": str(work), "device": "cpu", "out_of_fold": True, "infer_stride": 2})
    predictions, n_runs = vertebra_predictions(cfg, cache, fold_of)
    assert n_runs == 4
    assert predictions["a"].shape == (7, 7)
    assert np.allclose(predictions["a"], 0.1) and np.allclose(predictions["c"], 0.3)
    assert np.allclose(predictions["b"], (0.2 + 0.6) / 2)  # both variants' fold-1 runs, averaged
    every = vertebra_predictions(
        resolve_config("04_infer_vertebra", {"work_dir": str(work), "device": "cpu", "infer_stride": 2, "out_of_fold": False}),
        cache,
        fold_of,
    )[0]
    assert np.allclose(every["a"], (0.1 + 0.2 + 0.3 + 0.6) / 4)  # every run on every study
    missing = resolve_config("04_infer_vertebra", {"work_dir": str(work), "device": "cpu", "out_of_fold": True})
    with pytest.raises(ValueError, match=r"fold\(s\) 3,.*--folds 3"):
        vertebra_predictions(missing, cache, {**fold_of, "d": 3})


def test_fracture_labels_without_rescaling_are_the_clipped_predictions_times_the_study_label() -> None:
    pred = np.array([[0.2, 1.3], [0.5, 0.4], [-0.1, 0.1]])
    vertebra, fracture = fracture_slice_labels(pred, [1.0, 0.0], rescale=False)
    assert np.allclose(vertebra, [[0.2, 1.0], [0.5, 0.4], [0.0, 0.1]])
    assert fracture[:, 0].tolist() == pytest.approx([0.2, 0.5, 0.0]) and not fracture[:, 1].any()
    rescaled, _ = fracture_slice_labels(pred, [1.0, 0.0])
    assert rescaled[:, 0].tolist() == pytest.approx([0.4, 1.0, 0.0])  # default: peak 1 per vertebra


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "settings", "steps"),
    [
        # the 3rd place's 03: per-slice steps, position + channel embeddings
        (TRAIN_VERTEBRA, {"outputs_per_slice": True, "position_embedding": 16, "channel_embedding": 16}, 6),
        # its 05: per-image steps, position embedding, any-fracture output
        ("05_train_fracture", {"position_embedding": 16, "position_of": "window", "any_fracture_head": True, "crop_by_box": False}, 2),
    ],
)
def test_the_originals_sequence_variants_train_and_score_their_oof(tmp_path: Path, stage: str, settings: dict, steps: int) -> None:
    from rsna22_utils.cervical.anatomy import VERTEBRAE
    from rsna22_utils.cervical.sequence import ANY_FRACTURE, FRACTURE, SequenceTask, _window_inputs
    from rsna22_utils.core.train import fit

    lengths = {"a": 12, "b": 10}
    cache = make_cache(tmp_path / "cache", lengths)
    rng = np.random.default_rng(0)
    names = list(VERTEBRAE) + ([] if stage == TRAIN_VERTEBRA else FRACTURE)
    labels = {uid: (rng.random((n, len(names))) > 0.5).astype(np.float32) for uid, n in lengths.items()}
    names += [ANY_FRACTURE] if settings.get("any_fracture_head") else []
    shape = {"backbone": BACKBONE, "lstm_hidden": 0, "seq_len": 2, "infer_stride": 6, "epochs": 1, "batch_size": 2}
    loss = {"loss": "mse", "positive_weight": 2.0}
    cfg = resolve_config(stage, {**shape, **settings, **loss, "device": "cpu", "out_dir": str(tmp_path / "run"), "num_workers": 0})
    cfg = with_derived(cfg, image_size=16, windows=[[400.0, 1800.0]])
    common = _window_inputs(cfg, None)
    train = SequenceDataset(["a"], cache, labels, mode="train", samples_per_study=2, **common)
    valid = SequenceDataset(["b"], cache, labels, mode="infer", stride=cfg.infer_stride, **common)
    metrics = fit(create_model(cfg), SequenceTask(valid, names, **loss), train, valid, cfg)
    oof = pd.read_parquet(tmp_path / "run" / "oof.parquet")
    assert sorted(set(oof["step"])) == list(range(steps))  # one row per step (slice or image) of each window
    assert len(oof) == 2 * steps  # windows 0..5 and 4..9 of study b
    assert oof[[f"{n}_pred" for n in names]].stack().between(0, 1).all()
    assert "mean_auc" in json.dumps(metrics)
