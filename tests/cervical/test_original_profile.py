"""The `original` profile end to end: 00 -> 07 with every variant of the 3rd place, fold -1 included, on a
tiny synthetic competition on CPU. Only sizes change (image size, epochs, batch, sequence length, the
backbones through overrides); every structural setting is the original's, and ImageNet weights come
from an offline weights folder holding a (fake) file per backbone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rsna22_utils.core.profiles import load_profile
from rsna22_utils.core.registry import execute, finished_runs, parse_run_name, stages
from rsna22_utils.core.resolve import load_config, resolve_config
from rsna22_utils.core.runner import plan_runs
from tests.helpers import tiny_settings

SMALL_BACKBONE = "mobilenetv3_small_050"
# sizes only: what makes the original fit a CPU test
TINY = {
    "n_folds": 2,
    "num_workers": 0,
    "workers": 1,
    "device": "cpu",
    "image_size": 48,
    "backbone": SMALL_BACKBONE,
    "epochs": 1,
    "max_steps_per_epoch": 2,
    "batch_size": 2,
    "seq_len": 8,
    "infer_stride": 12,
    "crop_size": 32,
    "max_len": 32,
    "cnn_chunk_size": 8,
    "infer_batch_size": 4,
}
FOLDS = {"01_train_box": [0, 1, -1], "03_train_vertebra": [0, 1]}  # the profile's CV folds exist only up to n_folds=2


def _fake_imagenet_weights(folder: Path) -> Path:
    from safetensors.torch import save_file

    from rsna22_utils.cervical.models import create_backbone

    folder.mkdir(parents=True)
    model = create_backbone(SMALL_BACKBONE, in_chans=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{SMALL_BACKBONE}.safetensors")
    return folder


@pytest.mark.slow
def test_the_original_pipeline_runs_every_variant_on_a_tiny_competition(tmp_path: Path) -> None:
    from rsna22_utils.cervical.submission import predict_submission
    from rsna22_utils.cervical.synth import generate_competition

    data_dir, work_dir = tmp_path / "competition", tmp_path / "runs"
    generate_competition(data_dir, n_studies=8, n_test_studies=3, image_size=48, median_slices=60, seed=5, workers=1)
    weights = _fake_imagenet_weights(tmp_path / "imagenet")
    dropped = sorted(pd.read_csv(data_dir / "train.csv")["StudyInstanceUID"])[0]  # the original's drop list, on this data
    common = {**TINY, "profile": "original", "data_dir": str(data_dir), "pretrained_dir": str(weights)}
    common["drop_studies"] = [dropped, "1.2.826.0.1.3680043.0"]
    profile = load_profile("original")
    for stage, entry in stages().items():
        if stage == "07_inference":
            continue
        overrides = tiny_settings(stage, common) | {"profile": "original"}
        specs = plan_runs(stage, FOLDS.get(stage), [0] if entry.per_fold else None, overrides, work_dir)
        if entry.per_fold:  # every variant of the profile, each with its fold(s)
            assert sorted({s.variant for s in specs}) == sorted(v.name for v in profile.variants(stage))
        for spec in specs:
            values = {**spec.overrides, **({"fold": spec.fold, "seed": spec.seed} if entry.per_fold else {})}
            cfg = resolve_config(stage, values)
            assert cfg.profile == "original"
            execute(stage, cfg)
        if entry.trains:
            for run in finished_runs(work_dir, stage):
                saved = load_config(run / "config.json")
                key = parse_run_name(run.name)
                assert (saved.profile, saved.variant, saved.fold) == ("original", key.variant, key.fold)
                if hasattr(saved, "pretrained"):
                    assert saved.pretrained and saved.pretrained_dir == str(weights)
                if key.fold == -1:  # a full-data run keeps its last epoch and writes no out-of-fold rows
                    assert not (run / "oof.parquet").exists()

    prepared = work_dir / "00_prepare"  # a dropped study is in no label table, nor in the pseudo-labels
    assert dropped not in set(pd.read_csv(prepared / "folds.csv")["StudyInstanceUID"])
    for table in (
        prepared / "slice_boxes.parquet",
        prepared / "vertebra_ratios.parquet",
        work_dir / "04_infer_vertebra" / "slice_labels.parquet",
    ):
        assert dropped not in set(pd.read_parquet(table)["StudyInstanceUID"])
    fracture = load_config(work_dir / "05_train_fracture" / "resnest50d-fold-1-seed0" / "config.json")
    study = load_config(work_dir / "06_train_study" / "resnest50d-fold-1-seed0" / "config.json")
    for name in ("intensity", "norm_mean", "norm_std", "crop_square", "crop_margin", "crop_source", "any_fracture_head", "position_of"):
        assert getattr(study, name) == getattr(fracture, name), name  # 06 sees images as its 05 run did
    assert (fracture.crop_source, fracture.intensity, study.embed_on_the_fly, study.slice_margin) == ("native", "minmax", True, 2)

    study_runs = finished_runs(work_dir, "06_train_study")
    assert sorted(r.name for r in study_runs) == ["resnest50d-fold-1-seed0", "seresnext50-fold-1-seed0"]
    out = work_dir / "07_inference" / "submission.csv"
    submission_cfg = resolve_config(
        "07_inference",
        tiny_settings("07_inference", common)
        | {"profile": "original", "weights_dir": str(work_dir), "out": str(out), "work_dir": str(out.parent)},
    )
    predict_submission(submission_cfg)
    rows = pd.read_csv(out)
    assert len(rows) == 3 * 8 and rows["fractured"].between(0, 1).all()
