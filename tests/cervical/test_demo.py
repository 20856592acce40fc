"""The demo's report on the tiny pipeline: metric vs prior, box quality, submission score, QC figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from rsna22_utils.cervical.anatomy import VERTEBRAE
from rsna22_utils.cervical.demo import write_report
from rsna22_utils.cervical.metric import TARGETS
from rsna22_utils.cervical.submission import predict_submission
from rsna22_utils.core.demo import DEMO_PROFILE, demo_overrides, parse_demo_overrides
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.registry import stages
from rsna22_utils.core.resolve import resolve_config


def test_demo_profile_sets_every_stage_and_trains_every_fold() -> None:
    from rsna22_utils.core.profiles import load_profile

    profile = load_profile(DEMO_PROFILE)
    assert list(profile.stages) == [s for s in stages() if s not in ("02_infer_box", "04_infer_vertebra")]
    for stage, entry in stages().items():
        cfg = resolve_config(stage, demo_overrides(stage, COMMON))  # raises on a misspelt or invalid setting
        assert cfg.profile == "demo" and getattr(cfg, "num_workers", 0) == 0
        if entry.per_fold:  # out-of-fold boxes and pseudo-labels need a run of every fold
            (variant,) = profile.variants(stage)
            assert variant.folds == [0, 1, 2] and cfg.n_folds == 3
    assert resolve_config("05_train_fracture", demo_overrides("05_train_fracture", COMMON)).init_encoder_from == "vertebra"


COMMON = {"data_dir": "d", "work_dir": "w"}


def test_the_demo_command_generates_as_many_studies_as_run_demo() -> None:
    import inspect

    from rsna22_utils import cli
    from rsna22_utils.cervical.demo import DEMO_STUDIES, run_demo
    from rsna22_utils.core import registry

    registry.select_competition("cervical")
    demo = cli._parser()._subparsers._group_actions[0].choices["demo"]
    assert demo.get_default("studies") == DEMO_STUDIES == inspect.signature(run_demo).parameters["n_studies"].default


def test_demo_overrides_for_every_stage_or_one() -> None:
    extra = parse_demo_overrides(["n_folds=5", "05_train_fracture:epochs=24"])
    assert extra == {"*": {"n_folds": 5}, "05_train_fracture": {"epochs": 24}}
    fracture = resolve_config("05_train_fracture", demo_overrides("05_train_fracture", COMMON, extra))
    vertebra = resolve_config("03_train_vertebra", demo_overrides("03_train_vertebra", COMMON, extra))
    assert (fracture.epochs, fracture.n_folds, fracture.profile) == (24, 5, "demo")  # the user's values on top of the profile
    assert (vertebra.epochs, vertebra.n_folds) == (resolve_config("03_train_vertebra", {"profile": "demo"}).epochs, 5)
    for bad in ("05_train_fractur:epochs=1", "05_train_fracture:epoch=1", "epoch=1"):
        with pytest.raises(ConfigError, match="epoch"):
            parse_demo_overrides([bad])


def test_report_scores_oof_and_submission_and_writes_figures(tiny_pipeline: dict, tmp_path: Path) -> None:
    data_dir, work_dir = tiny_pipeline["data_dir"], tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    out = work_dir / "07_inference" / "submission.csv"
    predict_submission(
        resolve_config(
            "07_inference",
            {
                "data_dir": str(data_dir),
                "weights_dir": str(work_dir),
                "out": str(out),
                "work_dir": str(out.parent),
                "device": "cpu",
                "num_workers": 0,
            },
        )
    )
    report = write_report(tmp_path, data_dir, work_dir)

    oof = pd.concat(pd.read_parquet(p) for p in work_dir.glob("06_train_study/fold*-seed*/oof.parquet"))
    assert 0 < report["cv_metric"] < 5 and 0 < report["prior_metric"] < 5
    assert report["ratio"] == pytest.approx(report["cv_metric"] / report["prior_metric"])
    assert set(report["auc"]) <= set(TARGETS) and oof["StudyInstanceUID"].nunique() >= 2
    test_labels = pd.read_csv(data_dir / "_synthetic" / "test_labels.csv")
    assert report["test"]["studies"] == len(test_labels) and 0 < report["test"]["metric"] < 5
    for name in ("roc", "loss_01_train_box", "loss_05_train_fracture", "loss_06_train_study", "iou_histogram", "study_animation"):
        path = Path(report["figures"][name])
        assert path.parent == tmp_path / "report" and path.stat().st_size > 1000, name
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"{report['cv_metric']:.4f}" in text and "07_inference" in text

    # each stage beside its trivial baseline, from the runs' own outputs
    baselines = report["baselines"]
    box_eval = pd.read_csv(work_dir / "02_infer_box" / "box_eval.csv")
    assert baselines["box"]["median_iou"] == pytest.approx(box_eval["iou"].median()) and 0 <= baselines["box"]["centred_median_iou"] <= 1
    vertebra = json.loads((work_dir / "04_infer_vertebra" / "metrics.json").read_text())
    assert baselines["vertebra"]["mae"] == vertebra["mae_vs_segmentation"] and 0 < baselines["vertebra"]["mean_profile_mae"] < 1
    fracture_runs = sorted(work_dir.glob("05_train_fracture/fold*-seed*"))
    assert baselines["slice_fracture_auc"] == {
        run.name: json.loads((run / "metrics.json").read_text())["metrics"]["fracture_auc"] for run in fracture_runs
    }
    fracture_oof = pd.concat(pd.read_parquet(run / "oof.parquet") for run in fracture_runs)
    assert baselines["max_pooled"]["studies"] == fracture_oof["StudyInstanceUID"].nunique()
    assert f"{baselines['box']['centred_median_iou']:.3f}" in text and f"{baselines['vertebra']['mean_profile_mae']:.3f}" in text
    assert f"{baselines['max_pooled']['metric_raw']:.4f}" in text
    drawn = baselines["drawn_breaks_auc"]  # the synthetic competition's own breaks (values: test_baselines)
    assert set(drawn) <= {*VERTEBRAE, "mean"} and all(0 <= v <= 1 for v in drawn.values())
    assert not drawn or f"AUC {drawn['mean']:.3f}" in text
    json.dumps(report, default=str)  # summary.json material


def test_fracture_cnn_can_start_from_the_vertebra_cnn(tiny_pipeline: dict) -> None:
    import torch

    from rsna22_utils.cervical.models import create_model, load_run
    from rsna22_utils.cervical.sequence import _init_encoder
    from tests.helpers import TINY_COMMON, TINY_STAGES, tiny_settings

    work_dir = tiny_pipeline["work_dir"]
    cfg = resolve_config(
        "05_train_fracture",
        tiny_settings(
            "05_train_fracture",
            {
                **TINY_COMMON,
                **TINY_STAGES["05_train_fracture"],
                "work_dir": str(work_dir),
                "fold": 0,
                "seed": 0,
                "init_encoder_from": "vertebra",
            },
        ),
    )
    model = create_model(cfg)
    _init_encoder(model, cfg)
    source, _ = load_run(work_dir / "03_train_vertebra" / "fold0-seed0", torch.device("cpu"))
    for (name, value), other in zip(model.encoder.state_dict().items(), source.encoder.state_dict().values()):
        assert torch.equal(value, other), name
    assert model.head.out_features == 14  # only the CNN is copied; the 14-target head is new
    cfg.backbone = "resnet10t"
    with pytest.raises(ValueError, match="init_encoder_from needs the same"):
        _init_encoder(create_model(cfg), cfg)
