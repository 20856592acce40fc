"""The intracranial stages on a tiny synthetic competition: prepare, train, predict with TTA, smooth, submission."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna22_utils.core import registry
from rsna22_utils.core.registry import execute, select_competition
from rsna22_utils.core.resolve import resolve_config


@pytest.fixture
def intracranial(monkeypatch):
    """The intracranial competition selected for one test (the previous selection restored after it)."""
    previous = registry.competition()
    monkeypatch.setenv(registry.COMPETITION_ENV, "intracranial")
    select_competition("intracranial")
    yield
    select_competition(previous)


@pytest.fixture(scope="module")
def competition(tmp_path_factory) -> Path:
    from rsna22_utils.intracranial.synth import generate_competition

    return generate_competition(tmp_path_factory.mktemp("ich") / "data", n_studies=8, n_test_studies=2, seed=2, image_size=64, workers=1)


def test_stage_table_and_profiles(intracranial):
    from rsna22_utils.core.profiles import available_profiles, load_profile

    assert list(registry.stages()) == ["00_prepare", "01_train", "02_predict", "03_smooth", "04_inference"]
    assert not registry.get_stage("04_inference").kaggle_internet
    assert registry.prepare_stage().name == "00_prepare"
    assert all(stage.notebook.is_file() for stage in registry.stages().values())
    assert {"original", "demo"} <= set(available_profiles())
    variants = load_profile("original").variants("01_train")
    assert {v.settings["backbone"] for v in variants} == {
        "efficientnet_b0",
        "efficientnet_b5",
        "efficientnet_b3",
        "densenet169",
        "seresnext101_32x4d",
    }
    sizes = {v.settings["backbone"]: (v.settings["image_size"], v.settings["input"]) for v in variants}
    assert sizes["efficientnet_b0"] == (224, "triplet") and sizes["efficientnet_b5"] == (456, "triplet")
    assert sizes["efficientnet_b3"] == (300, "windows")
    assert all(v.folds == [0, 1, 2, 3, 4] for v in variants)


def test_kernel_metadata_is_what_the_generator_writes(intracranial):
    from rsna22_utils.core import kaggle
    from rsna22_utils.core.paths import REPO_ROOT

    assert kaggle.settings_file() == REPO_ROOT / "kaggle-settings.intracranial.json"
    settings = kaggle.load_settings(owner=kaggle.PLACEHOLDER_OWNER)
    assert settings.competition == "rsna-intracranial-hemorrhage-detection"
    folder = kaggle.kernel_metadata_dir()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(registry.stages())
    for stage in registry.stages():
        assert json.loads((folder / stage / "kernel-metadata.json").read_text()) == kaggle.kernel_metadata(stage, settings)
    assert json.loads((folder / "04_inference" / "kernel-metadata.json").read_text())["enable_internet"] is False


def test_notebook_pairs_are_in_sync():
    from rsna22_utils.core.notebooks import check_pairs, check_thin
    from rsna22_utils.core.paths import NOTEBOOKS_DIR

    assert check_pairs(NOTEBOOKS_DIR / "intracranial") == []
    assert check_thin(NOTEBOOKS_DIR / "intracranial") == []


def test_head_box_leaves_out_the_head_rest():
    from rsna22_utils.intracranial.prepare import head_box
    from rsna22_utils.intracranial.synth import make_specs, render_slice

    spec = make_specs(2, 0, seed=0, image_size=256)[0]
    volume = np.stack([render_slice(spec, i) for i in range(spec.n_slices)])
    x0, y0, x1, y1 = head_box(volume, threshold=-500, border=10)
    rest_rows = np.nonzero(((volume[spec.n_slices // 2] > 100) & (volume[spec.n_slices // 2] < 200)).any(axis=1))[0]
    assert y1 <= rest_rows.max() - 5  # the table / head-rest at the bottom stay out
    assert 0 < x0 < x1 < 256 and 0 < y0 < y1
    assert (volume[:, y0:y1, x0:x1] > 1000).any()  # the skull is in


def test_triplets_repeat_the_edge_and_tta_views():
    from types import SimpleNamespace

    from rsna22_utils.intracranial.data import load_image, tta_views

    class Prepared:
        def volume(self, size, study):
            return np.arange(3, dtype=np.uint8)[:, None, None, None] * 50 + np.zeros((3, 8, 8, 4), np.uint8)

    cfg = SimpleNamespace(input="triplet", triplet_window=[127.5, 255.0])
    first = load_image(Prepared(), 8, SimpleNamespace(StudyInstanceUID="s", slice_index=0, n_slices=3), cfg)
    np.testing.assert_allclose(first[0, 0], [0, 0, 50 / 255])  # previous = the slice itself at the edge
    last = load_image(Prepared(), 8, SimpleNamespace(StudyInstanceUID="s", slice_index=2, n_slices=3), cfg)
    np.testing.assert_allclose(last[0, 0], [50 / 255, 100 / 255, 100 / 255])
    batch = torch.rand(2, 3, 16, 16)
    identity, flipped, left, right = tta_views(batch, ["identity", "hflip", "rot-10", "rot10"])
    assert torch.equal(identity, batch) and torch.equal(flipped, batch.flip(-1))
    assert left.shape == right.shape == batch.shape and not torch.allclose(left, right)


def test_smoothing_uses_the_neighbours():
    from rsna22_utils.intracranial.labels import LABELS
    from rsna22_utils.intracranial.metric import score_wide
    from rsna22_utils.intracranial.smooth import Smoother, neighbour_features

    rng = np.random.default_rng(0)
    rows = []
    for study in range(60):
        n = 30
        bleed = np.zeros(n, int)
        if study % 2:
            start = rng.integers(0, n - 10)
            bleed[start : start + 10] = 1
        for i in range(n):
            rows.append({"ID": f"ID_{study:03d}{i:03d}", "StudyInstanceUID": f"s{study}", "slice_index": i, "n_slices": n, "y": bleed[i]})
    images = pd.DataFrame(rows)
    labels = images.assign(**{label: images["y"] for label in LABELS})
    noisy = 1 / (1 + np.exp(-(3 * (images["y"].to_numpy() - 0.5) + rng.normal(0, 2.0, len(images)))))  # noisy per slice
    predictions = pd.DataFrame({"ID": images["ID"], **{label: noisy for label in LABELS}})
    features = neighbour_features(predictions, images, neighbours=2)
    assert features.shape == (len(images), 5, 6)
    train = images["StudyInstanceUID"].str[1:].astype(int) < 40
    smoother = Smoother(2, 1.0).fit(features[train], labels[train])
    held = labels[~train].reset_index(drop=True)
    smoothed = smoother.predict(features[~train], predictions["ID"].to_numpy()[~train])
    assert score_wide(held, smoothed) < 0.8 * score_wide(held, predictions[~train].reset_index(drop=True))


@pytest.mark.slow
def test_every_stage_on_a_tiny_competition(intracranial, competition, tmp_path):
    work = tmp_path / "runs"
    common = {"work_dir": str(work), "profile": "demo"}
    summary = execute("00_prepare", resolve_config("00_prepare", {**common, "data_dir": str(competition), "cache_size": 32, "n_folds": 2}))
    images = pd.read_parquet(work / "00_prepare" / "images.parquet")
    assert summary["failed_images"] == 0 and len(images) == summary["images"]
    assert images.groupby("PatientID")["fold"].nunique().max() == 1  # folds group patients
    for _, study in images.groupby("StudyInstanceUID"):  # head -> feet: z falls with slice_index
        assert (np.diff(study.sort_values("slice_index")["z"]) < 0).all()
    volume = np.load(next((work / "00_prepare" / "cache" / "32px").glob("*.npy")))
    assert volume.dtype == np.uint8 and volume.shape[1:] == (32, 32, 4)

    train = {"image_size": 32, "epochs": 1, "batch_size": 16, "n_folds": 2, "device": "cpu"}
    for fold in (0, 1):
        metrics = execute("01_train", resolve_config("01_train", {**common, **train, "fold": fold}))
        assert np.isfinite(metrics["metrics"]["valid_loss"])
    run = work / "01_train" / "fold0-seed0"
    assert {"oof.parquet", "model.safetensors", "roc.png", "loss.png"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "config.json").read_text())["cache_size"] == 32  # derived from the cache

    predicted = execute("02_predict", resolve_config("02_predict", {**common, "device": "cpu"}))
    assert predicted["oof_images"] == int((images["split"] == "train").sum()) and predicted["tta"] == [
        "identity",
        "hflip",
        "rot-10",
        "rot10",
    ]
    smoothed = execute("03_smooth", resolve_config("03_smooth", common))
    submission = pd.read_csv(work / "03_smooth" / "submission.csv")
    sample = pd.read_csv(competition / "stage_2_sample_submission.csv")
    assert list(submission["ID"]) == list(sample["ID"]) and submission["Label"].between(0, 1).all()
    assert smoothed["images_without_prediction"] == 0 and np.isfinite(smoothed["oof_metric"])
    # a label keeps its smoothing only where that lowers its out-of-fold log loss; the others pass through
    assert smoothed["oof_metric"] <= smoothed["oof_metric_before"] + 1e-12
    fitted = json.loads((work / "03_smooth" / "smoothing.json").read_text())
    for label in set(fitted["labels"]) - set(smoothed["smoothed_labels"]):
        assert fitted["coef"][label] == [0.0, 0.0, 1.0, 0.0, 0.0] and fitted["intercept"][label] == 0.0

    # the Kaggle notebook's path, from the test DICOMs and the weights dataset alone, gives the same submission
    from rsna22_utils.core import kaggle as kaggle_delivery

    weights = kaggle_delivery.build_weights_dataset(work, tmp_path / "weights", kaggle_delivery.load_settings(owner="someone"))
    assert (weights / "03_smooth" / "smoothing.json").is_file() and len(list((weights / "01_train").iterdir())) == 2
    overrides = {**common, "data_dir": str(competition), "weights_dir": str(weights), "device": "cpu"}
    inferred = execute("04_inference", resolve_config("04_inference", overrides))
    kaggle = pd.read_csv(inferred["submission"])
    assert list(kaggle["ID"]) == list(sample["ID"])
    np.testing.assert_allclose(kaggle["Label"], submission["Label"], atol=1e-5)

    from rsna22_utils.intracranial.demo import write_report
    from rsna22_utils.intracranial.metric import score

    report = write_report(tmp_path, competition, work)
    assert report["oof_metric"] == pytest.approx(smoothed["oof_metric"]) and report["oof_metric_tta"] == pytest.approx(
        predicted["oof_metric"]
    )
    assert report["ratio"] == pytest.approx(report["oof_metric"] / report["prior_metric"])
    truth = pd.read_csv(competition / "_synthetic" / "test_labels.csv")
    assert report["test"]["04_inference"] == pytest.approx(score(truth, kaggle))
    assert {"roc", "loss_01_train"} == set(report["figures"]) and all(Path(f).is_file() for f in report["figures"].values())
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.slow
def test_original_profile_builds_the_seeds_five_networks(intracranial):
    from rsna22_utils.core.resolve import show_configs

    rows = show_configs("01_train", "original", count_params=True)
    params = {row["backbone"]: row["params_trainable"] for row in rows}
    assert set(params) == {"efficientnet_b0", "efficientnet_b5", "efficientnet_b3", "densenet169", "seresnext101_32x4d"}
    # timm's ImageNet networks with a 6-way head: e.g. EfficientNet-B0 4.0M backbone + 1280 x 6 + 6
    assert params["efficientnet_b0"] == 4_007_548 + 1280 * 6 + 6
    assert (
        params["seresnext101_32x4d"]
        > params["efficientnet_b5"]
        > params["densenet169"]
        > params["efficientnet_b3"]
        > params["efficientnet_b0"]
    )


def test_folds_group_patients_from_a_fold_file_or_our_own(tmp_path):
    from rsna22_utils.intracranial.prepare import make_folds

    rng = np.random.default_rng(0)
    images = pd.DataFrame(
        {
            "split": "train",
            "PatientID": [f"ID_p{k // 30}" for k in range(600)],
            "StudyInstanceUID": [f"s{k // 10}" for k in range(600)],
            "any": rng.integers(0, 2, 600),
        }
    )
    own = make_folds(images, n_folds=5, seed=0)
    assert sorted(own["PatientID"]) == sorted(images["PatientID"].unique()) and set(own["fold"]) == set(range(5))
    given = pd.DataFrame({"StudyInstanceUID": [f"s{k}" for k in range(60)], "fold": [(k // 3) % 4 for k in range(60)]})
    given.to_csv(tmp_path / "folds.csv", index=False)
    from_file = make_folds(images, n_folds=5, seed=0, fold_file=str(tmp_path / "folds.csv"))
    assert dict(zip(from_file["PatientID"], from_file["fold"]))["ID_p5"] == (15 // 3) % 4
    given.loc[0, "fold"] = 3  # patient ID_p0's studies now in two folds
    given.to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(ValueError, match="patients in several folds"):
        make_folds(images, n_folds=5, seed=0, fold_file=str(tmp_path / "split.csv"))


def test_a_label_left_out_of_the_smoothing_passes_its_prediction_through() -> None:
    """A smoother fitted on confident models learns steep slopes; a label left out of it (03 does that where the
    smoothing raised the label's out-of-fold log loss) gives back the centre slice's own probability."""
    from rsna22_utils.intracranial.labels import LABELS
    from rsna22_utils.intracranial.smooth import Smoother

    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.3).astype(float)
    confident = np.where(y > 0, 8.0, -6.0) + rng.normal(0, 0.5, n)
    features = np.repeat(confident[:, None, None], 5, axis=1).repeat(len(LABELS), axis=2)
    labels = pd.DataFrame({label: y for label in LABELS})
    smoother = Smoother(neighbours=2, regularisation=1.0).fit(features, labels)
    assert smoother.coef["any"][2] != 1.0  # a real fit
    smoother.keep_model_prediction("any")
    unsure = np.full((4, 5, len(LABELS)), -0.5)
    out = smoother.predict(unsure, np.array(["a", "b", "c", "d"]))
    assert np.allclose(out["any"], 1 / (1 + np.exp(0.5)))  # the centre slice's own probability
