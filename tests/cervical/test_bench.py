"""The epoch benchmark compares like with like: both slice sources give the same images, and it reports every figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsna22_utils.cervical.bench.cost import TrainingData, bench_cost, example_batch, forward_flops, stage_configs
from rsna22_utils.cervical.bench.epoch import bench_epoch
from rsna22_utils.cervical.bench.inference import bench_submission
from rsna22_utils.cervical.data import CacheSource, DicomSource
from rsna22_utils.cervical.ensemble import runs_in_variant_turns
from rsna22_utils.cervical.models import create_network
from rsna22_utils.cervical.synth import generate_competition
from rsna22_utils.core.cache import CacheSpec, StudyCache, build_cache
from rsna22_utils.core.scan import find_studies


def test_cache_and_dicom_sources_give_identical_slices(tmp_path: Path) -> None:
    data_dir = tmp_path / "competition"
    generate_competition(data_dir, n_studies=1, n_test_studies=1, image_size=64, median_slices=20, seed=3)
    studies = [d for split, d in find_studies(data_dir) if split == "train_images"]
    spec = CacheSpec(image_size=32)
    root, failures = build_cache(studies, tmp_path / "cache", spec)
    assert not failures
    cache = StudyCache(root)
    table = cache.all_slices()
    cached, dicom = CacheSource(cache), DicomSource(table, spec)
    for uid, index in table[["StudyInstanceUID", "slice_index"]].itertuples(index=False):
        np.testing.assert_array_equal(cached.slice(uid, index), dicom.slice(uid, index))


@pytest.mark.slow
def test_bench_epoch_reports_both_sources(tmp_path: Path, capsys) -> None:
    result = bench_epoch(work_dir=tmp_path, n_studies=1, image_size=64, cache_size=32, batch_size=8, max_slices=16, device="cpu", repeat=2)
    assert list(result.index) == ["study cache", "DICOM on the fly"]
    assert (result["slices"] == result["slices"].iloc[0]).all() and result["slices"].iloc[0] >= 8
    assert (result[["data_s", "epoch_s", "data_ms_per_slice"]] > 0).all().all()
    assert (result["epoch_s"] >= result["data_s"]).all()
    printed = capsys.readouterr().out
    assert all(source in printed for source in result.index)  # the table is printed


@pytest.mark.slow
def test_bench_backbones_reports_throughput_and_parameters(capsys) -> None:
    from rsna22_utils.cervical.bench.backbones import bench_backbones
    from rsna22_utils.cervical.models import BoxModel, SequenceModel, feature_size

    networks = (("box", "mobilenetv3_small_050"), ("sequence", "mobilenetv3_small_050"))
    table = bench_backbones(networks, image_size=32, batch_images=4, seq_len=2, device="cpu", warmup=1, steps=1)
    assert list(table["network"]) == ["box mobilenetv3_small_050", "sequence mobilenetv3_small_050"]
    assert list(table["dtype"]) == ["float32", "float32"]  # the CPU runs fp32
    assert (table[["train_img_s", "infer_img_s"]] > 0).all().all()
    box = BoxModel("mobilenetv3_small_050", in_chans=3)
    sequence = SequenceModel("mobilenetv3_small_050", 3, 14, lstm_hidden=feature_size(box.encoder) + 32)  # the 3rd place's width
    assert list(table["params_trainable"]) == [sum(p.numel() for p in m.parameters()) for m in (box, sequence)]
    printed = capsys.readouterr().out
    assert all(network in printed for network in table["network"])


# --------------------------------------------------------------------------- cost of a profile

TINY_PROFILE = {
    "profile": "tiny",
    "version": 1,
    "description": "bench tests: small networks and images, the original's shape of sweeps",
    "stages": {
        "00_prepare": {"settings": {"image_size": 64}},
        "01_train_box": {"settings": {"backbone": "mobilenetv3_small_050", "epochs": 5}, "folds": [0, 1, -1], "seeds": [0, 1, 2]},
        "03_train_vertebra": {
            "settings": {
                "backbone": "mobilenetv3_small_050",
                "epochs": 3,
                "seq_len": 4,
                "lstm_hidden": 8,
                "samples_per_study": 2,
                "infer_stride": 12,
            },
            "folds": [0, 1],
            "seeds": [0],
        },
        "05_train_fracture": {
            "settings": {
                "epochs": 2,
                "seq_len": 4,
                "slices_per_image": 3,
                "lstm_hidden": 8,
                "crop_size": 32,
                "samples_per_study": 3,
                "infer_stride": 12,
            },
            "folds": [-1],
            "variants": {
                "a": {"settings": {"backbone": "mobilenetv3_small_050"}, "seeds": [0, 1]},
                "b": {"settings": {"backbone": "mobilenetv3_small_075"}, "seeds": [0]},
            },
        },
        "06_train_study": {
            "settings": {"epochs": 4, "lstm_hidden": 8, "slice_evidence": False, "slice_margin": 3},
            "folds": [-1],
            "variants": {"a": {"seeds": [0, 1]}, "b": {"seeds": [0]}},
        },
    },
}


@pytest.fixture
def tiny_profile(tmp_path: Path) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_PROFILE))
    return str(path)


def tiny_data() -> TrainingData:
    """Five train studies in folds 0, 1, 0, 1, 2; three of them segmented (10, 20, 30 slices)."""
    return TrainingData(
        segmented={"s0": 10, "s1": 20, "s2": 30},
        folds={"s0": 0, "s1": 1, "s2": 0, "s3": 1, "s4": 2},
        sample_slices=(40, 100),
        sample_spine=(20, 30),
        source="tiny",
    )


def test_flop_counter_counts_convolutions_and_lstms() -> None:
    import torch

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert forward_flops(conv, torch.zeros(2, 3, 16, 16)) == 2 * 2 * 8 * 3 * 9 * 16 * 16
    lstm = torch.nn.LSTM(5, 7, batch_first=True, bidirectional=True)
    assert forward_flops(lstm, torch.zeros(2, 3, 5)) == 2 * (2 * 3) * 2 * 4 * 7 * (5 + 7)  # 4 gates, 2 directions


@pytest.mark.slow
def test_bench_cost_table_is_runs_x_epochs_x_images_x_flops(tiny_profile: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cost.json"
    table = bench_cost(tiny_profile, data=tiny_data(), device="cpu", measure_images=2, measure_size=32, out=out).set_index(
        ["stage", "variant"]
    )
    box = table.loc[("01_train_box", "")]
    assert (box["runs"], box["epochs"], box["px"]) == (9, 5, 64)
    assert box["images_per_epoch"] == np.mean([20, 10 + 30, 60])  # folds 0, 1, -1: every slice of the other folds' segmented studies
    vertebra = table.loc[("03_train_vertebra", "")]
    assert vertebra["images_per_epoch"] == np.mean([1, 2]) * 2 * 4  # training studies x samples_per_study x seq_len
    fracture = table.loc["05_train_fracture"]
    assert list(fracture["runs"]) == [2, 1] and list(fracture["px"]) == [32, 32]
    assert (fracture["images_per_epoch"] == 5 * 3 * 4).all()  # fold -1: all five train studies
    study = table.loc["06_train_study"]
    assert (study["images_per_epoch"] == 5 * 3 * 4).all()  # 12-slice windows of 4 images: 3 cover 20 or 30 slices + 3 a side
    for stage in ("01_train_box", "03_train_vertebra", "05_train_fracture"):
        rows = table.loc[[stage]]
        np.testing.assert_allclose(rows["train_gflops_per_image"], 3 * rows["fwd_gflops_per_image"])
    for (_, cfg), (variant, row) in zip(stage_configs("06_train_study", tiny_profile, {}), study.iterrows(), strict=True):
        network = create_network(cfg)
        batch = example_batch(network, cfg, 2, device="meta")
        cnn, forward = forward_flops(network.encoder, batch["image"].flatten(0, 1)) / 2, forward_flops(network, batch) / 2
        assert cfg.variant == variant and row["fwd_gflops_per_image"] == pytest.approx(forward / 1e9)
        # frozen CNN embedded once per run (embed_on_the_fly false): 1 / epochs of its forward per image and epoch; head 3x
        assert row["train_gflops_per_image"] == pytest.approx((cnn / 4 + 3 * (forward - cnn)) / 1e9)
    expected = table["runs"] * table["epochs"] * table["images_per_epoch"] * table["train_gflops_per_image"] / 1e6
    np.testing.assert_allclose(table["total_pflops"], expected)
    np.testing.assert_allclose(table["gpu_h_A100"], table["total_pflops"] * 1e15 / (312e12 * 0.20) / 3600)
    np.testing.assert_allclose(table["gpu_h_per_run_T4"] * table["runs"], table["gpu_h_T4"])
    assert (table["measured_img_s_cpu"] > 0).all()
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(table) and saved["data"] == "tiny"
    printed = capsys.readouterr().out
    assert all(stage in printed for stage in table.index.get_level_values(0).unique())


@pytest.mark.slow
def test_bench_submission_scales_measured_parts_to_the_ensemble(tiny_profile: str, tmp_path: Path, capsys) -> None:
    result = bench_submission(
        tiny_profile,
        n_slices=8,
        image_size=64,
        work_dir=tmp_path,
        device="cpu",
        measure_seq_len=2,
        overrides={"tta_flip": True, "slice_margin": 3},  # a 07 and a 06 setting
        test_studies=100,
        data=tiny_data(),
    )
    measured, families, projection = result["measured"], result["families"], result["projection"]
    assert (measured["measured_s"] > 0).all() and len(measured) == 5
    assert list(families["models"]) == [3, 2, 1]  # fold -1 x seeds of each family
    assert families.loc[0, "images_per_model"] == 300  # the box models see every slice of a 300-slice study
    assert list(families.loc[1:, "images_per_model"]) == [2 * 3 * 4, 2 * 3 * 4]  # range 25 + 2 x 3 slices / 12 per window, x2 flip TTA
    np.testing.assert_allclose(
        families["tflops_per_study"], families["models"] * families["images_per_model"] * families["fwd_gflops_per_image"] / 1e3
    )
    np.testing.assert_allclose(families["T4_s_per_study"], families["tflops_per_study"] * 1e12 / (65e12 * 0.15))
    walls = projection[["stack_s", "box_s", "study_s"]].sum(axis=1).combine(projection["decode_encode_s"], max)
    np.testing.assert_allclose(projection["study_wall_s"], walls)
    np.testing.assert_allclose(projection["hours_100"], 100 * projection["study_wall_s"] / 3600)
    np.testing.assert_allclose(projection["hours_models_only"], 100 * (projection["box_s"] + projection["study_s"]) / 3600)
    assert list(projection["device"]) == ["cpu", "T4", "P100"]
    assert ((projection["study_models_that_fit"] == 3) == projection["fits_9h"]).all()
    printed = capsys.readouterr().out
    assert all(device in printed for device in projection["device"])


def test_first_runs_takes_variants_in_turn() -> None:
    runs = [Path(n) for n in ("a-fold-1-seed0", "a-fold-1-seed1", "a-fold-1-seed2", "b-fold-1-seed0", "b-fold-1-seed1")]
    names = lambda chosen: [p.name for p in chosen]
    assert names(runs_in_variant_turns(runs, 0)) == names(runs)  # 0: all, in their order
    assert names(runs_in_variant_turns(runs, 3)) == ["a-fold-1-seed0", "b-fold-1-seed0", "a-fold-1-seed1"]
    assert names(runs_in_variant_turns(runs, 9)) == names(runs)


@pytest.mark.slow
def test_load_ensemble_honours_the_model_limits(tmp_path: Path) -> None:
    import torch

    from rsna22_utils.cervical.models import create_network
    from rsna22_utils.cervical.submission import load_models
    from rsna22_utils.core.config import save_config
    from rsna22_utils.core.errors import ConfigError
    from rsna22_utils.core.registry import run_dir
    from rsna22_utils.core.resolve import resolve_config
    from rsna22_utils.core.runs import save_weights

    for stage, variant, seed in [("01_train_box", "", s) for s in range(3)] + [
        ("06_train_study", v, s) for v, s in (("a", 0), ("a", 1), ("b", 0))
    ]:
        cfg = resolve_config(
            stage,
            {"fold": -1, "seed": seed, "variant": variant, "backbone": "mobilenetv3_small_050"}
            if stage == "01_train_box"
            else {"fold": -1, "seed": seed, "variant": variant, "lstm_hidden": 8, "slice_evidence": False},
        )
        folder = run_dir(tmp_path, stage, -1, seed, variant)
        folder.mkdir(parents=True)
        save_weights(create_network(cfg), folder / "model.safetensors")
        save_config(cfg, folder / "config.json")
    cfg = resolve_config(
        "07_inference", {"weights_dir": str(tmp_path), "out": "x.csv", "device": "cpu", "max_box_models": 2, "max_study_models": 2}
    )
    ensemble = load_models(cfg)
    assert len(ensemble.box.models) == 2
    assert [run.name for run in ensemble.study] == ["06_train_study/a-fold-1-seed0", "06_train_study/b-fold-1-seed0"]
    assert len(load_models(resolve_config("07_inference", {"weights_dir": str(tmp_path), "out": "x.csv", "device": "cpu"})).study) == 3
    with pytest.raises(ConfigError, match="max_box_models and max_study_models must be >= 0"):
        resolve_config("07_inference", {"max_study_models": -1})
    assert torch.device("cpu") == ensemble.device


# --------------------------------------------------------------------------- bench-train


def _tiny_train_profile(folder: Path) -> str:
    """The tiny pipeline's settings as a profile, with two variants of 05 and 06 (06 re-embedding on the fly)."""
    from tests.helpers import TINY_COMMON, TINY_STAGES, tiny_settings

    stages = {stage: {"settings": tiny_settings(stage, {**TINY_COMMON, **values})} for stage, values in TINY_STAGES.items()}
    stages["06_train_study"]["settings"].update({"embed_on_the_fly": True, "cnn_chunk_size": 8, "slice_evidence": False})
    for stage in ("05_train_fracture", "06_train_study"):
        stages[stage]["variants"] = {"a": {}, "b": {}}
    stages["03_train_vertebra"]["settings"]["num_workers"] = 2
    path = folder / "tiny-train.json"
    path.write_text(json.dumps({"profile": "tiny-train", "version": 1, "description": "bench-train tests", "stages": stages}))
    return str(path)


def test_bench_train_names_the_training_stages_it_takes(capsys) -> None:
    from rsna22_utils.cervical.bench.train import stage_named
    from rsna22_utils.cli import main

    assert stage_named("05") == stage_named("05_train_fracture") == "05_train_fracture"
    assert main(["bench-train", "02"]) == 2  # 02 trains nothing: an error before anything is generated
    printed = capsys.readouterr()
    assert printed.err and not printed.out


def test_network_images_counts_what_the_network_sees() -> None:
    import torch

    from rsna22_utils.cervical.bench.train import network_images

    assert network_images({"image": torch.zeros(4, 3, 8, 8)}) == 4  # box: a 3-slice image counts one
    assert network_images({"image": torch.zeros(2, 5, 3, 8, 8)}) == 10  # sequence: a window of 5 counts 5
    assert network_images({"images": torch.zeros(7, 3, 8, 8), "lengths": torch.tensor([3, 4])}) == 7  # 06 re-embedding
    assert network_images({"embeddings": torch.zeros(2, 4, 6), "mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}) == 5


def test_bench_train_measures_each_training_stage_of_the_tiny_pipeline(tiny_pipeline: dict, tmp_path: Path, capsys) -> None:
    import shutil

    from rsna22_utils.cervical.bench.train import JSON_FIELDS
    from rsna22_utils.cli import main

    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    profile = _tiny_train_profile(tmp_path)
    expected = {"01": [""], "03": [""], "05": ["a", "b"], "06": ["a", "b"]}
    for stage, variants in expected.items():
        args = ["bench-train", stage, "--profile", profile, "--work-dir", str(work_dir), "--data-dir", str(tiny_pipeline["data_dir"])]
        assert main([*args, "--steps", "1", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(row["stage"].split("_")[0], row["variant"]) for row in rows] == [(stage, v) for v in variants]
        for row in rows:
            assert set(JSON_FIELDS) <= set(row)
            assert row["device"] == "cpu" and row["autocast_dtype"] == "float32"  # the CPU runs fp32 whatever amp_dtype says
            assert (row["amp_dtype"], row["channels_last"], row["deterministic"]) == ("auto", False, False)  # as configured
            assert row["num_workers"] == (2 if stage == "03" else 0)
            rates = [row[k] for k in ("data_img_s_per_worker", "data_img_s", "network_img_s", "trainer_img_s")]
            assert all(rate > 0 for rate in rates)
            assert row["bottleneck"] == ("data" if row["data_img_s"] < row["network_img_s"] else "network")
    fracture_runs = sorted(p.name for p in (work_dir / "05_train_fracture").iterdir())
    assert fracture_runs == ["a-fold-1-seed0", "b-fold-1-seed0", "fold0-seed0"]  # 06 froze a 05 run of its own variant
    assert (tiny_pipeline["work_dir"] / "05_train_fracture" / "fold0-seed0").is_dir()


@pytest.mark.slow
def test_bench_train_makes_its_inputs_once_and_can_measure_the_data_alone(tmp_path: Path, capsys) -> None:
    import pandas as pd

    from rsna22_utils.cervical.bench.train import bench_train, print_rows

    settings = {"batch_size": 2, "seq_len": 4, "lstm_hidden": 8, "crop_size": 32, "infer_stride": 12, "num_workers": 0}
    common = {"device": "cpu", "steps": 1, "work_dir": tmp_path, "overrides": settings, "n_studies": 2, "image_size": 64}
    rows = bench_train("05", "demo", data_only=True, **common)
    assert [row["variant"] for row in rows] == [""] and rows[0]["network_img_s"] is None and rows[0]["trainer_img_s"] is None
    assert rows[0]["data_img_s_per_worker"] > 0 and rows[0]["bottleneck"].startswith("data")
    boxes = pd.read_csv(tmp_path / "02_infer_box" / "study_boxes.csv")
    labels = pd.read_parquet(tmp_path / "04_infer_vertebra" / "slice_labels.parquet")
    assert len(boxes) == 2 and (boxes["x1"] > boxes["x0"]).all() and (boxes["slnum_to"] > boxes["slnum_from"]).all()
    assert set(labels["StudyInstanceUID"]) == set(boxes["StudyInstanceUID"]) and labels.filter(like="_pred").to_numpy().max() == 1.0
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "02_infer_box" / "study_boxes.csv", tmp_path / "00_prepare" / "folds.csv")}
    again = bench_train("01", "demo", **common)
    assert {p: p.stat().st_mtime_ns for p in made} == made  # prepared once, reused
    print_rows(again)
    assert "01_train_box" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench-inference on trained runs


def test_predict_study_laps_count_what_each_part_did(tiny_pipeline: dict) -> None:
    import torch

    from rsna22_utils.cervical.ensemble import decode_study, load_ensemble, predict_study, study_input_key
    from rsna22_utils.core.resolve import resolve_config
    from rsna22_utils.core.timing import LapTimer

    ensemble = load_ensemble(tiny_pipeline["work_dir"], torch.device("cpu"))
    folder = sorted((tiny_pipeline["data_dir"] / "test_images").iterdir())[0]
    study = decode_study(folder.name, folder, ensemble.specs)
    cfg = resolve_config("07_inference", {"weights_dir": str(tiny_pipeline["work_dir"]), "out": "x.csv", "device": "cpu"})
    timer = LapTimer()
    timed = predict_study(ensemble, study, cfg, flip=True, timer=timer)
    np.testing.assert_array_equal(timed, predict_study(ensemble, study, cfg, flip=True))  # the hook changes nothing
    assert timer.items["box"] == len(study.slices) * len(ensemble.box.models)
    inputs = {study_input_key(run.cfg) for run in ensemble.study}
    assert len(inputs) == 1  # one input here; sharing among several runs: test_shared_crops
    assert timer.counts["crops"] == len(inputs) and timer.counts["study models"] == len(ensemble.study)  # cut once, fed to each
    assert timer.items["study models"] == 2 * len(ensemble.study) * timer.items["crops"] > 0  # flip TTA: every image twice
    assert all(timer.seconds[part] > 0 for part in ("box", "crops", "study models"))


def test_bench_inference_times_the_submissions_own_path(tiny_pipeline: dict) -> None:
    from rsna22_utils.cervical.bench.inference import KAGGLE_TEST_STUDIES, bench_inference

    table = bench_inference(tiny_pipeline["data_dir"], tiny_pipeline["work_dir"], n_studies=3)
    cpu = table[table["device"] == "cpu"]
    assert len(cpu) == 2  # 3 test studies, the first one a warm-up
    assert (cpu[["slices", "decode_s", "encode_s", "stack_s", "model_s"]] > 0).all().all()
    np.testing.assert_allclose(table["total_s"], table[["decode_s", "encode_s", "stack_s", "model_s"]].sum(axis=1))
    projection = table.attrs["projection"].set_index("device").loc["cpu"]
    per_slice = 1e3 * cpu[["stack_s", "model_s"]].sum() / cpu["slices"].sum()
    assert projection["stack_ms_slice"] == pytest.approx(per_slice["stack_s"])
    assert projection["model_ms_slice"] == pytest.approx(per_slice["model_s"])
    workers = 300 * (projection["decode_ms_slice"] + projection["encode_ms_slice_512px"]) / 1e3 / 2
    assert projection["study_s"] == pytest.approx(max(workers, 300 * (per_slice.sum()) / 1e3))
    assert projection[f"hours_{KAGGLE_TEST_STUDIES}"] == pytest.approx(KAGGLE_TEST_STUDIES * projection["study_s"] / 3600)
