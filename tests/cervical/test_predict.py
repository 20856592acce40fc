"""07_inference on the tiny synthetic pipeline: row order, valid values, the metric, and every fallback."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsna22_utils.cervical.metric import TARGETS, score, solution_from_labels
from rsna22_utils.cervical.study_box import BoxInference
from rsna22_utils.cervical.submission import SetupError, TimeBudget, TooManyFailures, predict_submission, train_prevalence
from rsna22_utils.core.resolve import resolve_config


def _config(data_dir: Path, weights: Path, out: Path, **extra) -> object:
    return resolve_config(
        "07_inference",
        {"data_dir": str(data_dir), "weights_dir": str(weights), "out": str(out), "work_dir": str(out.parent), "device": "cpu", **extra},
    )


def _copy_competition(data_dir: Path, dest: Path) -> Path:
    """A writable copy of the competition files a test needs (csvs + test_images)."""
    dest.mkdir()
    for name in ("train.csv", "test.csv"):
        shutil.copy2(data_dir / name, dest / name)
    shutil.copytree(data_dir / "test_images", dest / "test_images")
    return dest


def _prior_rows(submission: pd.DataFrame, test: pd.DataFrame, uid: str, prior: dict[str, float]) -> bool:
    rows = test["StudyInstanceUID"] == uid
    expected = test.loc[rows, "prediction_type"].map(prior).to_numpy()
    return bool(
        np.allclose(submission.loc[rows.to_numpy(), "fractured"].to_numpy(), expected, atol=1e-5)
    )  # values are clipped to [1e-6, 1 - 1e-6]


def test_submission_rows_values_and_score(tiny_pipeline: dict, tmp_path: Path) -> None:
    data_dir, weights = tiny_pipeline["data_dir"], tiny_pipeline["work_dir"]
    out = tmp_path / "submission.csv"
    submission = predict_submission(_config(data_dir, weights, out, num_workers=2))
    test = pd.read_csv(data_dir / "test.csv")
    written = pd.read_csv(out)
    assert list(written["row_id"]) == list(test["row_id"])
    assert ((written["fractured"] > 0) & (written["fractured"] < 1)).all()
    assert submission.attrs["predicted"] == test["StudyInstanceUID"].nunique() and not submission.attrs["fallbacks"]
    assert submission.attrs["summary"].startswith("3 studies: 3 full, 0 reduced, 0 prior; 0 failed of 0 allowed; self-test")
    # model outputs, not the prior: a study's 8 values differ from the prevalences
    prior = train_prevalence(data_dir)
    assert not _prior_rows(written, test, test["StudyInstanceUID"].iloc[0], prior)
    labels = pd.read_csv(data_dir / "_synthetic" / "test_labels.csv")
    value = score(solution_from_labels(labels), written)
    assert np.isfinite(value) and 0 < value < 5


def test_corrupt_study_gets_prior_and_others_predicted(tiny_pipeline: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    test = pd.read_csv(data_dir / "test.csv")
    bad = test["StudyInstanceUID"].iloc[0]
    dicom = sorted((data_dir / "test_images" / bad).glob("*.dcm"))[3]
    dicom.write_bytes(dicom.read_bytes()[:300])  # truncated file; no file may be left out (max_dropped_slices 0)
    out = tmp_path / "submission.csv"
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.cervical.submission"):
        submission = predict_submission(
            _config(data_dir, tiny_pipeline["work_dir"], out, num_workers=1, max_failed_fraction=0.5, max_dropped_slices=0.0)
        )
    written = pd.read_csv(out)
    assert list(written["row_id"]) == list(test["row_id"])
    assert set(submission.attrs["fallbacks"]) == {bad}
    assert submission.attrs["predicted"] == test["StudyInstanceUID"].nunique() - 1
    assert _prior_rows(written, test, bad, train_prevalence(data_dir))
    warnings = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(warnings) == 1 and dicom.name in warnings[0], warnings
    assert "2 full, 0 reduced, 1 prior (1 unreadable (e.g. " in submission.attrs["summary"]
    assert "1 failed of 1 allowed" in submission.attrs["summary"]


def test_failures_past_max_failed_fraction_fail_the_run(tiny_pipeline: dict, tmp_path: Path) -> None:
    """Two of three studies unreadable with max_failed_fraction 0.5 (one allowed), or all three with 1.0: no submission of priors."""
    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    test = pd.read_csv(data_dir / "test.csv")
    for uid in test["StudyInstanceUID"].unique():
        dicom = sorted((data_dir / "test_images" / uid).glob("*.dcm"))[2]
        dicom.write_bytes(dicom.read_bytes()[:300])
    out = tmp_path / "submission.csv"
    strict = {"num_workers": 0, "max_dropped_slices": 0.0}  # no file may be left out: each study is unreadable
    with pytest.raises(TooManyFailures, match=r"2 of 3 test studies failed \(max_failed_fraction 0.5 allows 1\)"):
        predict_submission(_config(data_dir, tiny_pipeline["work_dir"], out, max_failed_fraction=0.5, **strict))
    with pytest.raises(TooManyFailures, match=r"3 of 3 test studies failed \(max_failed_fraction 1.0 allows 2\)"):
        predict_submission(_config(data_dir, tiny_pipeline["work_dir"], out, max_failed_fraction=1.0, **strict))
    assert not out.exists()


def test_placeholder_test_csv_without_folders_is_all_prior(tiny_pipeline: dict, tmp_path: Path) -> None:
    data_dir = tmp_path / "competition"
    data_dir.mkdir()
    (data_dir / "test_images").mkdir()
    uids = ["1.2.826.0.1.3680043.10197", "1.2.826.0.1.3680043.10454", "1.2.826.0.1.3680043.10690"]
    test = pd.DataFrame({"row_id": [f"{u}_C1" for u in uids], "StudyInstanceUID": uids, "prediction_type": "C1"})
    test.to_csv(data_dir / "test.csv", index=False)
    out = tmp_path / "submission.csv"
    submission = predict_submission(_config(data_dir, tiny_pipeline["work_dir"], out))  # no train.csv: the real prevalences
    written = pd.read_csv(out)
    assert list(written["row_id"]) == list(test["row_id"])
    assert np.allclose(written["fractured"], 146 / 2019)
    assert submission.attrs["summary"].startswith("3 studies: 0 full, 0 reduced, 3 prior (3 placeholder test.csv (e.g. ")
    assert "self-test 0.0 s" not in submission.attrs["summary"]  # the models ran, on a synthetic study
    (data_dir / "test_images" / uids[0]).mkdir()  # one study has a folder: the two without are failures, not a placeholder
    with pytest.raises(TooManyFailures, match="no study folder"):
        predict_submission(_config(data_dir, tiny_pipeline["work_dir"], out))


def _placeholder(tmp_path: Path) -> Path:
    """Kaggle's public competition folder: a 3-study test.csv, no images."""
    data_dir = tmp_path / "competition"
    (data_dir / "test_images").mkdir(parents=True)
    uids = ["1.2.826.0.1.3680043.10197", "1.2.826.0.1.3680043.10454", "1.2.826.0.1.3680043.10690"]
    pd.DataFrame({"row_id": [f"{u}_C1" for u in uids], "StudyInstanceUID": uids, "prediction_type": "C1"}).to_csv(
        data_dir / "test.csv", index=False
    )
    return data_dir


def _weights_missing_a_stage(tiny: dict, tmp_path: Path) -> Path:
    shutil.copytree(tiny["work_dir"] / "01_train_box", tmp_path / "weights" / "01_train_box")
    return tmp_path / "weights"


def _weights_truncated(tiny: dict, tmp_path: Path) -> Path:
    weights = tmp_path / "weights"
    for stage in ("01_train_box", "06_train_study"):
        shutil.copytree(tiny["work_dir"] / stage, weights / stage)
    model = weights / "06_train_study" / "fold0-seed0" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    return weights


@pytest.mark.parametrize(
    "weights, error",
    [
        (lambda tiny, tmp: tmp / "no-weights-dataset", r"no-weights-dataset: weights folder not found; on Kaggle add the weights dataset"),
        (_weights_missing_a_stage, r"cannot load the submission's models: FileNotFoundError: .*06_train_study: no finished run"),
        (_weights_truncated, r"cannot load the submission's models: RuntimeError: .*model.safetensors: cannot read weights"),
    ],
    ids=["no weights dataset", "no 06_train_study run", "broken weights file"],
)
def test_setup_errors_fail_the_run_even_on_the_placeholder(tiny_pipeline: dict, tmp_path: Path, weights, error: str) -> None:
    """Kaggle's 3-study placeholder (no images) used to hide these behind priors and exit status 0."""
    out = tmp_path / "submission.csv"
    with pytest.raises(SetupError, match=error):
        predict_submission(_config(_placeholder(tmp_path), weights(tiny_pipeline, tmp_path), out))
    assert not out.exists()


def test_a_model_that_fails_on_a_real_sized_study_fails_the_self_test(
    tiny_pipeline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rsna22_utils.cervical.submission as submission

    seen = []

    def crop_too_small(ensemble, study, cfg, flip):  # what a model that only worked at training size would do
        seen.append((study.volumes[ensemble.box.spec.name].shape, study.slices[["rows", "cols"]].iloc[0].tolist(), flip))
        raise RuntimeError("Input size (1x1) is smaller than the kernel")

    monkeypatch.setattr(submission, "predict_study", crop_too_small)
    with pytest.raises(SetupError, match=r"self-test: .* fails on a \(300, 512, 512\) study: RuntimeError: Input size"):
        predict_submission(_config(_placeholder(tmp_path), tiny_pipeline["work_dir"], tmp_path / "submission.csv"))
    assert seen == [((300, 48, 48, 1), [512, 512], True)]  # every model, flip TTA, the models' own input size


def test_a_missing_decoder_fails_before_the_first_study(tiny_pipeline: dict, tmp_path: Path) -> None:
    """No dicomsdl, no JPEG Lossless plugin for pydicom (a wheel that did not install): one clear error, exit status 2."""
    out = tmp_path / "submission.csv"
    blocked = ["dicomsdl", "pylibjpeg", "libjpeg", "gdcm"]
    code = (
        "import sys, runpy\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # import fails, as for a package that is not installed\n"
        "sys.argv = ['rsna22_utils'] + sys.argv[1:]\n"
        "runpy.run_module('rsna22_utils', run_name='__main__')\n"
    )
    args = ["predict", "--data-dir", str(tiny_pipeline["data_dir"]), "--weights", str(tiny_pipeline["work_dir"]), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code, *args, "-p", "device=cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()
    error = "\n".join(error[next(i for i, line in enumerate(error) if line.startswith("error: ")) :])
    assert "no auto decoder for the test studies' transfer syntaxes" in error, error
    assert "JPEG Lossless SV1 1.2.840.10008.1.2.4.70 (1 studies, e.g. " in error and "dicomsdl does not import" in error
    assert "pydicom lacks a plugin: gdcm - requires gdcm" in error and "self-test" not in proc.stderr  # checked first
    assert not out.exists()


class Clock:
    """A clock the test moves: `budget.decide` / `record` as a run would call them."""

    def __init__(self) -> None:
        self.now = 0.0

    def study(self, budget: TimeBudget, done: int, seconds: float) -> str:
        mode = budget.decide(done)
        if mode != "prior":
            self.now += seconds
            budget.record(mode, seconds)
        return mode


def test_time_budget_ignores_the_start_up_study() -> None:
    """A first study that pays worker start-up (50 of 100 s) would project 10 x 50 s; the steady state fits in full."""
    clock = Clock()
    budget = TimeBudget(budget_s=100.0, n_studies=10, clock=lambda: clock.now)
    assert [clock.study(budget, done, 50.0 if done == 0 else 4.0) for done in range(10)] == ["full"] * 10


def test_time_budget_goes_reduced_back_to_full_and_prior_last() -> None:
    clock = Clock()
    budget = TimeBudget(budget_s=100.0, n_studies=10, clock=lambda: clock.now)
    assert clock.study(budget, 0, 30.0) == "full"  # start-up: not timed
    assert clock.study(budget, 1, 5.0) == "full"  # nothing timed yet
    assert clock.study(budget, 2, 25.0) == "full"  # 8 x 5 s fit in 65 s
    assert clock.study(budget, 3, 2.0) == "reduced"  # 7 x 15 s (median) > 40 s left
    assert [clock.study(budget, done, 2.0) for done in range(4, 8)] == ["reduced"] * 4
    assert clock.study(budget, 8, 15.0) == "full"  # 2 x 15 s fit in the 30 s left: back to full
    assert clock.study(budget, 9, 15.0) == "full"
    assert len(budget.times["reduced"]) == 5 and budget.per_study("full") == 15.0

    clock = Clock()
    budget = TimeBudget(budget_s=100.0, n_studies=10, clock=lambda: clock.now)
    modes = [clock.study(budget, done, 30.0) for done in range(10)]  # reduced is no faster: 10 s left < 30 s
    assert modes == ["full", "full", "reduced"] + ["prior"] * 7
    assert TimeBudget(1.0, 3, clock=lambda: 5.0, start=0.0).decide(0) == "prior"  # no time at all


def test_tiny_budget_still_writes_every_row(tiny_pipeline: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tiny_pipeline["data_dir"]
    out = tmp_path / "submission.csv"
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.cervical.submission"):
        submission = predict_submission(_config(data_dir, tiny_pipeline["work_dir"], out, time_budget_hours=1e-7, num_workers=0))
    test = pd.read_csv(data_dir / "test.csv")
    assert list(pd.read_csv(out)["row_id"]) == list(test["row_id"])
    assert submission.attrs["predicted"] == 0
    assert any("time budget" in r.getMessage() for r in caplog.records)
    assert set(submission.attrs["fallbacks"].values()) == {"time budget"}


def test_notebook_writes_submission_under_papermill(tiny_pipeline: dict, tmp_path: Path) -> None:
    """The issue's acceptance: the inference notebook on a Kaggle-like synthetic competition, one study corrupted."""
    from rsna22_utils.core.runner import run_stage

    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    test = pd.read_csv(data_dir / "test.csv")
    bad = test["StudyInstanceUID"].iloc[-1]
    dicom = sorted((data_dir / "test_images" / bad).glob("*.dcm"))[0]
    dicom.write_bytes(dicom.read_bytes()[:200])
    out = tmp_path / "submission.csv"
    overrides = {
        "data_dir": str(data_dir),
        "weights_dir": str(tiny_pipeline["work_dir"]),
        "out": str(out),
        "device": "cpu",
        "num_workers": 1,
        "max_failed_fraction": 0.5,
        "max_dropped_slices": 0.0,  # the truncated file fails its study (a dropped file is tested on its own)
    }
    summary = run_stage("07_inference", overrides=overrides, work_dir=tmp_path / "runs")
    assert summary.ok, summary.failed
    written = pd.read_csv(out)
    assert list(written["row_id"]) == list(test["row_id"])
    labels = pd.read_csv(tiny_pipeline["data_dir"] / "_synthetic" / "test_labels.csv")
    assert np.isfinite(score(solution_from_labels(labels), written))
    assert _prior_rows(written, test, bad, train_prevalence(data_dir))
    assert (tmp_path / "runs" / "07_inference" / "07_inference.ipynb").is_file()


def test_notebook_on_kaggle_with_every_slug_renamed_and_the_network_cut(tiny_pipeline: dict, tmp_path: Path) -> None:
    """07_inference.ipynb as Kaggle runs it: every slug renamed in the settings the utils dataset carries, the kit only from
    the utils dataset (nothing of the repo on the path), the network cut (unshare -rn where allowed, a socket guard always)."""
    import json

    from rsna22_utils.core.kaggle import KaggleSettings, build_utils_dataset, build_weights_dataset
    from rsna22_utils.core.paths import KAGGLE_INPUT_ENV, NOTEBOOKS_DIR
    from rsna22_utils.core.runner import default_kernel_name
    from tests.helpers import make_wheel, network_namespace, offline_env

    slugs = {"utils_dataset": "renamed-kit-code", "weights_dataset": "renamed-kit-models", "wheels_dataset": "renamed-kit-decoders"}
    settings = KaggleSettings(owner="kit-tester", competition="renamed-competition", **slugs)
    mount = tmp_path / "input"  # what Kaggle mounts at /kaggle/input
    build_utils_dataset(mount / "renamed-kit-code", settings)
    build_weights_dataset(tiny_pipeline["work_dir"], mount / "renamed-kit-models", settings)
    _copy_competition(tiny_pipeline["data_dir"], mount / "renamed-competition")
    make_wheel(mount / "renamed-kit-decoders" / "wheels", "kit-probe-decoder")
    out = tmp_path / "working" / "submission.csv"
    overrides = {"out": str(out), "work_dir": str(out.parent), "device": "cpu", "num_workers": 1}
    env, attempts = offline_env(tmp_path, pythonpath=[])
    env.update({KAGGLE_INPUT_ENV: str(mount), "PIP_TARGET": str(tmp_path / "site")})  # the probe wheel installs there
    executed = tmp_path / "executed.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS_DIR / "07_inference.ipynb"), str(executed)]
    cmd += ["-k", default_kernel_name(), "--cwd", str(tmp_path), "-y", json.dumps({"overrides": overrides})]
    proc = subprocess.run([*network_namespace(), *cmd], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not attempts.exists(), attempts.read_text()  # no process tried to reach the network

    test = pd.read_csv(tiny_pipeline["data_dir"] / "test.csv")
    written = pd.read_csv(out)
    assert list(written["row_id"]) == list(test["row_id"])
    labels = pd.read_csv(tiny_pipeline["data_dir"] / "_synthetic" / "test_labels.csv")
    assert np.isfinite(score(solution_from_labels(labels), written))
    assert not _prior_rows(written, test, test["StudyInstanceUID"].iloc[0], train_prevalence(tiny_pipeline["data_dir"]))
    outputs = "".join(  # streams (logs, prints) and displayed values (the config) of every cell
        "".join(part) if isinstance(part, list) else part
        for cell in json.loads(executed.read_text())["cells"]
        for output in cell.get("outputs", [])
        for part in (output.get("text", ""), output.get("data", {}).get("text/plain", ""))
    )
    assert "3 studies: 3 full, 0 reduced, 0 prior" in outputs  # the run's summary
    assert str(mount / "renamed-kit-models") in outputs and str(mount / "renamed-competition") in outputs
    assert (tmp_path / "site" / "kit_probe_decoder").is_dir()  # the wheels came from the renamed wheels dataset


def test_prevalence_constants_match_targets() -> None:
    from rsna22_utils.cervical.metric import TRAIN_PREVALENCE

    assert list(TRAIN_PREVALENCE) == list(TARGETS)
    assert all(0 < v < 1 for v in TRAIN_PREVALENCE.values())


def test_inference_path_matches_the_training_pipeline(tiny_pipeline: dict) -> None:
    """Box + crops + study model on a cached train study give what 02_infer_box and embed_studies gave in training."""
    import torch

    from rsna22_utils.cervical.configs import StudyBoxRule
    from rsna22_utils.cervical.embed import embed_studies, study_images, study_probabilities
    from rsna22_utils.cervical.ensemble import MemoryCache, load_ensemble
    from rsna22_utils.cervical.models import fit_length, load_run
    from rsna22_utils.cervical.prepare import Prepared
    from rsna22_utils.cervical.study_box import predict_study_box
    from rsna22_utils.core.registry import finished_runs, out_of_fold
    from rsna22_utils.core.resolve import load_config

    work_dir = tiny_pipeline["work_dir"]
    ensemble = load_ensemble(work_dir, torch.device("cpu"))
    prepared = Prepared(work_dir / "00_prepare")
    cache = prepared.cache()
    uid = cache.uids[0]
    slices = cache.slices(uid)
    # 02 predicted this training study with the box run that did not train on it (that of its fold)
    fold = int(prepared.read("folds").set_index("StudyInstanceUID").loc[uid, "fold"])
    (box_run,) = out_of_fold(finished_runs(work_dir, "01_train_box"), fold)
    box_model, _ = load_run(box_run, torch.device("cpu"))
    box = predict_study_box([box_model], np.asarray(cache.volume(uid)), slices, torch.device("cpu"), 64, StudyBoxRule())
    expected = BoxInference.of(work_dir).read("study_boxes").set_index("StudyInstanceUID").loc[uid]
    assert (box["slnum_from"], box["slnum_to"]) == (expected["slnum_from"], expected["slnum_to"])
    assert np.allclose([box[c] for c in ("x0", "y0", "x1", "y1")], expected[["x0", "y0", "x1", "y1"]].to_numpy(float), atol=1e-3)

    run = ensemble.study[0]
    images = study_images(run.cfg, MemoryCache(run.spec, uid, np.asarray(cache.volume(uid)), slices), uid, box)
    with torch.inference_mode():
        ours = study_probabilities(run.model, run.cfg, images, torch.device("cpu"), 4)
    cfg = load_config(work_dir / "06_train_study" / "fold0-seed0" / "config.json")
    crops = {uid: tuple(expected[["x0", "y0", "x1", "y1"]])}
    ranges = {uid: (int(expected["slnum_from"]), int(expected["slnum_to"]))}
    embedding = embed_studies(run.model.encoder, cache, [uid], cfg, crops, ranges, torch.device("cpu"))[uid]
    with torch.inference_mode():
        sequence, mask = fit_length(torch.from_numpy(embedding)[None], torch.ones(1, len(embedding)), cfg.max_len)
        theirs = torch.sigmoid(run.model.head(sequence, mask))[0].numpy()
    assert np.allclose(ours, theirs, atol=1e-4), (ours, theirs)


def test_study_runs_from_before_the_evidence_still_load(tiny_pipeline: dict, tmp_path: Path) -> None:
    """A 06 run whose config.json has no `slice_evidence` (and whose weights have no evidence layers) loads without them."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from rsna22_utils.cervical.ensemble import load_study_models

    source = tiny_pipeline["work_dir"] / "06_train_study" / "fold0-seed0"
    old = tmp_path / "06_train_study" / "fold0-seed0"
    shutil.copytree(source, old)
    config = json.loads((old / "config.json").read_text())
    assert config.pop("slice_evidence") is True
    (old / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(str(old / "model.safetensors")).items() if not k.startswith("head.evidence")}
    save_file(state, str(old / "model.safetensors"))
    (run,) = load_study_models(tmp_path, torch.device("cpu"))
    assert run.model.head.evidence is None
    with pytest.raises(RuntimeError, match="evidence"):  # today's runs keep their evidence layers
        shutil.copy2(source / "config.json", old / "config.json")
        load_study_models(tmp_path, torch.device("cpu"))


def test_weights_dataset_holds_what_the_submission_loads_and_loads(tiny_pipeline: dict, tmp_path: Path) -> None:
    """Built from the tiny runs folder: only 01 and 06 runs, no local path in any file, and the ensemble loads from it."""
    import torch

    from rsna22_utils.cervical.ensemble import load_ensemble
    from rsna22_utils.core.kaggle import KaggleSettings, build_weights_dataset
    from rsna22_utils.core.registry import finished_runs
    from rsna22_utils.core.resolve import load_config

    work_dir = tiny_pipeline["work_dir"]
    out = build_weights_dataset(work_dir, tmp_path / "weights", KaggleSettings(owner="kit-tester"))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["01_train_box", "06_train_study"]
    for path in out.rglob("*.json"):
        assert str(work_dir.parent) not in path.read_text(), path
    for stage in ("01_train_box", "06_train_study"):
        shipped = finished_runs(out, stage)
        assert [run.name for run in shipped] == [run.name for run in finished_runs(work_dir, stage)]  # no full-data run: every run
        for run in shipped:
            assert load_config(run / "config.json").backbone == load_config(work_dir / stage / run.name / "config.json").backbone
    ensemble = load_ensemble(out, torch.device("cpu"))
    assert len(ensemble.box.models) == 2 and len(ensemble.study) == 1


def test_full_data_runs_alone_serve_the_test_set(tiny_pipeline: dict, tmp_path: Path) -> None:
    """As in the original's submission: with fold -1 runs present, the cross-validation runs are not shipped or loaded."""
    import torch

    from rsna22_utils.cervical.ensemble import load_ensemble
    from rsna22_utils.core.kaggle import KaggleSettings, build_weights_dataset
    from rsna22_utils.core.registry import finished_runs

    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    for stage in ("01_train_box", "06_train_study"):  # stand-ins for full-data runs
        shutil.copytree(work_dir / stage / "fold0-seed0", work_dir / stage / "fold-1-seed4")
    out = build_weights_dataset(work_dir, tmp_path / "weights", KaggleSettings(owner="kit-tester"))
    for stage in ("01_train_box", "06_train_study"):
        assert [run.name for run in finished_runs(out, stage)] == ["fold-1-seed4"]
    ensemble = load_ensemble(work_dir, torch.device("cpu"))
    assert len(ensemble.box.models) == 1 and [run.name for run in ensemble.study] == ["06_train_study/fold-1-seed4"]


def test_a_study_with_a_truncated_slice_is_predicted_from_the_rest(
    tiny_pipeline: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    test = pd.read_csv(data_dir / "test.csv")
    partial = test["StudyInstanceUID"].iloc[0]
    dicom = sorted((data_dir / "test_images" / partial).glob("*.dcm"))[3]
    dicom.write_bytes(dicom.read_bytes()[:-200])  # a truncated pixel frame; the header is intact
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.core.dicom"):
        submission = predict_submission(_config(data_dir, tiny_pipeline["work_dir"], tmp_path / "a.csv", num_workers=0))
    assert submission.attrs["predicted"] == test["StudyInstanceUID"].nunique() and not submission.attrs["fallbacks"]
    assert not _prior_rows(pd.read_csv(tmp_path / "a.csv"), test, partial, train_prevalence(data_dir))
    assert f"3 full, 0 reduced, 1 of them from part of their slices (e.g. {partial}: 1 of " in submission.attrs["summary"]
    assert f"{dicom.name}: truncated file" in submission.attrs["summary"]
    warnings = [r.getMessage() for r in caplog.records if partial in r.getMessage()]
    assert len(warnings) == 1 and "1 of" in warnings[0] and dicom.name in warnings[0], warnings
    # allowed no unreadable slice, the study gets the prior, with the real reason
    strict = predict_submission(
        _config(data_dir, tiny_pipeline["work_dir"], tmp_path / "b.csv", num_workers=0, max_dropped_slices=0.0, max_failed_fraction=0.5)
    )
    assert set(strict.attrs["fallbacks"]) == {partial} and "truncated file" in strict.attrs["fallbacks"][partial]


def test_native_study_run_sees_in_the_submission_what_06_trained_on(
    tiny_pipeline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 06 run on native crops beside one on the cache (a mixed ensemble): a train study submitted as a test study
    gets, given 02's box, exactly the images 06 embedded (crop cache on disk, slice_margin, crop_size, normalisation)."""
    import json

    import torch

    import rsna22_utils.cervical.ensemble as ensemble
    from rsna22_utils.cervical.anatomy import BOX_COLUMNS
    from rsna22_utils.cervical.embed import study_windows
    from rsna22_utils.cervical.prepare import Prepared
    from rsna22_utils.cervical.study import study_inputs, train_study
    from rsna22_utils.cervical.study_box import study_crops
    from rsna22_utils.core.resolve import load_config
    from tests.helpers import TINY_COMMON, TINY_STAGES, tiny_settings

    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    fracture = work_dir / "05_train_fracture" / "fold0-seed0" / "config.json"
    fracture.write_text(json.dumps({**json.loads(fracture.read_text()), "crop_source": "native"}))  # as a native 05 run records it
    studies = work_dir / "06_train_study"
    shutil.move(studies / "fold0-seed0", studies / "fold0-seed1")  # the cache run stays in the ensemble
    common = {**TINY_COMMON, "work_dir": str(work_dir), "prepared_dir": str(work_dir / "00_prepare"), "fold": 0, "seed": 0}
    values = {
        **common,
        **TINY_STAGES["06_train_study"],
        "max_steps_per_epoch": 1,
        "slice_margin": 2,
        "out_dir": str(studies / "fold0-seed0"),
    }
    train_study(resolve_config("06_train_study", tiny_settings("06_train_study", values)))
    native = load_config(studies / "fold0-seed0" / "config.json")
    assert native.crop_source == "native" and native.slice_margin == 2
    names = [spec.name for spec in ensemble.load_ensemble(work_dir, torch.device("cpu")).specs]
    assert len(names) == 2 and names[1].startswith("native_")  # the native volume is shipped only when a run needs it
    assert not any(s.name.startswith("native_") for s in ensemble.load_ensemble(tiny_pipeline["work_dir"], torch.device("cpu")).specs)

    cache = Prepared(work_dir / "00_prepare").cache()
    boxes, ranges = study_crops(work_dir)
    uid = sorted(set(boxes) & set(cache.uids))[0]
    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    shutil.copytree(tiny_pipeline["data_dir"] / "train_images" / uid, data_dir / "test_images" / uid)
    test = pd.read_csv(data_dir / "test.csv")
    extra = pd.DataFrame({"row_id": [f"{uid}_{t}" for t in TARGETS], "StudyInstanceUID": uid, "prediction_type": list(TARGETS)})
    test = pd.concat([test, extra], ignore_index=True)
    test.to_csv(data_dir / "test.csv", index=False)

    # the submission's box is the mean of both folds' box models; 02 gave this study its out-of-fold box
    row = {**dict(zip(BOX_COLUMNS, boxes[uid])), "slnum_from": ranges[uid][0], "slnum_to": ranges[uid][1]}
    real_box, real_images, seen = ensemble.predict_study_box, ensemble.study_images, []

    def box_of_02(models, volume, slices, *args):
        box = real_box(models, volume, slices, *args)
        return {**box, **row} if slices["StudyInstanceUID"].iloc[0] == uid else box

    def spy(cfg, cache, study_uid, study_box, device=None):
        images = real_images(cfg, cache, study_uid, study_box, device)
        seen.append((study_uid, cfg.crop_source, images))
        return images

    monkeypatch.setattr(ensemble, "predict_study_box", box_of_02)
    monkeypatch.setattr(ensemble, "study_images", spy)
    out = tmp_path / "submission.csv"
    result = predict_submission(_config(data_dir, work_dir, out, num_workers=1))
    assert list(pd.read_csv(out)["row_id"]) == list(test["row_id"])
    assert result.attrs["predicted"] == test["StudyInstanceUID"].nunique() and not result.attrs["fallbacks"]
    assert {(u, source) for u, source, _ in seen} >= {("self-test", "native"), ("self-test", "cache"), (uid, "native"), (uid, "cache")}

    crop_cache, crops, wide = study_inputs(native, cache, boxes, ranges)  # how 06 read its images (the crop cache on disk)
    trained = [item for item in study_windows([uid], crop_cache, wide, crops, native)]
    (submitted,) = [images for u, source, images in seen if u == uid and source == "native"]
    assert (submitted.first, submitted.last) == wide[uid]
    assert submitted.starts == [int(item["start"]) for item in trained]
    assert submitted.images.shape[-1] == native.crop_size
    torch.testing.assert_close(submitted.images, torch.stack([item["image"] for item in trained]), rtol=0, atol=0)
    torch.testing.assert_close(submitted.masks, torch.stack([item["mask"] for item in trained]), rtol=0, atol=0)


# --------------------------------------------------------------------------- what is known before the first study


def _no_models(*args, **kwargs):
    raise AssertionError("the models were loaded: the check should have come first")


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_output_that_cannot_be_written_fails_before_any_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import rsna22_utils.cervical.submission as submission

    monkeypatch.setattr(submission, "load_models", _no_models)
    if where == "a folder":
        out = tmp_path / "out.csv"
        out.mkdir()
        error = r"out.csv: cannot write the submission there, it is a folder"
    else:
        (tmp_path / "base.csv").write_text("x\n")
        out = tmp_path / "base.csv" / "submission.csv"
        error = r"cannot write the submission there, .*base.csv is a file, not a folder"
    with pytest.raises(SetupError, match=error):
        predict_submission(_config(_placeholder(tmp_path), tmp_path / "weights", out))
    assert not list(tmp_path.glob("**/.*probe"))


def _test_csv(tmp_path: Path, text: str) -> Path:
    data_dir = tmp_path / "competition"
    (data_dir / "test_images").mkdir(parents=True)
    (data_dir / "test.csv").write_text(text)
    return data_dir


@pytest.mark.parametrize(
    "text, error",
    [
        (None, r"competition/test.csv: no test.csv \(is data_dir the competition folder\?\)"),
        (
            "row_id, StudyInstanceUID ,prediction_type\n1.2_C1,1.2,C1\n",
            r"test.csv: no column 'StudyInstanceUID'; expected row_id, StudyInstanceUID, prediction_type, "
            r"found a column ' StudyInstanceUID '",
        ),
        (
            "row_id,StudyInstanceUID,prediction_type\n1.2_C1,1.2,C1\n1.2_C3,1.2,c3\n",
            r"test.csv: line 3: prediction_type 'c3' is not one of",
        ),
        (
            "row_id,StudyInstanceUID,prediction_type\n1.2_C8,1.2,C8\n",
            r"test.csv: line 2: prediction_type 'C8' is not one of .*\(1 such rows\)",
        ),
        ("row_id,StudyInstanceUID,prediction_type\n1.2_C1,,C1\n", r"test.csv: line 2: empty StudyInstanceUID"),
        (
            "row_id,StudyInstanceUID,prediction_type\n1.2_C1,1.2,C1\n1.2_C1,1.3,C1\n",
            r"row_id 1.2_C1 on line 2 \(1.2, C1\) and line 3 \(1.3, C1\): one row_id, two rows",
        ),
    ],
    ids=["no test.csv", "spaced column", "lower-case type", "C8", "empty study", "one row_id two studies"],
)
def test_a_bad_test_csv_is_one_setup_error_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, error: str
) -> None:
    import rsna22_utils.cervical.submission as submission

    monkeypatch.setattr(submission, "load_models", _no_models)
    data_dir = _test_csv(tmp_path, text or "")
    if text is None:
        (data_dir / "test.csv").unlink()
    with pytest.raises(SetupError, match=error):
        predict_submission(_config(data_dir, tmp_path / "weights", tmp_path / "submission.csv"))
    assert not (tmp_path / "submission.csv").exists()


def test_a_setup_error_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    data_dir = _test_csv(tmp_path, "row_id,StudyInstanceUID,prediction_type\n1.2_C8,1.2,C8\n")
    args = ["predict", "--data-dir", str(data_dir), "--weights", str(tmp_path / "weights"), "--out", str(tmp_path / "s.csv")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "rsna22_utils", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "test.csv: line 2: prediction_type 'C8'" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_repeated_test_csv_rows_are_written_once_and_named(tiny_pipeline: dict, tmp_path: Path) -> None:
    data_dir = _placeholder(tmp_path)
    test = pd.read_csv(data_dir / "test.csv")
    pd.concat([test, test.iloc[[1]]], ignore_index=True).to_csv(data_dir / "test.csv", index=False)
    submission = predict_submission(_config(data_dir, tiny_pipeline["work_dir"], tmp_path / "submission.csv"))
    written = pd.read_csv(tmp_path / "submission.csv")
    assert list(written["row_id"]) == list(test["row_id"])
    assert f"test.csv: 1 repeated rows dropped (e.g. line 5: {test['row_id'].iloc[1]})" in submission.attrs["summary"]


def _without_a_study(tiny: dict, tmp_path: Path, how: str) -> tuple[Path, str]:
    data_dir = _copy_competition(tiny["data_dir"], tmp_path / "competition")
    uid = pd.read_csv(data_dir / "test.csv")["StudyInstanceUID"].iloc[1]
    folder = data_dir / "test_images" / uid
    shutil.rmtree(folder)
    if how == "no readable file":
        folder.mkdir()
        (folder / "1.dcm").write_bytes(b"")
        (folder / "2.dcm").write_text("not a DICOM file")
    return data_dir, uid


@pytest.mark.parametrize("how", ["no study folder", "no readable file"])
def test_studies_known_to_fail_are_counted_before_the_first_study(
    tiny_pipeline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    import rsna22_utils.cervical.submission as submission

    data_dir, uid = _without_a_study(tiny_pipeline, tmp_path, how)
    with monkeypatch.context() as patch:
        patch.setattr(submission, "load_models", _no_models)
        with pytest.raises(TooManyFailures, match=rf"1 of 3 test studies failed .*allows 0\), known before the first study.*1 {how}"):
            predict_submission(_config(data_dir, tiny_pipeline["work_dir"], tmp_path / "submission.csv"))
    assert not (tmp_path / "submission.csv").exists()
    allowed = predict_submission(_config(data_dir, tiny_pipeline["work_dir"], tmp_path / "submission.csv", max_failed_fraction=0.5))
    assert set(allowed.attrs["fallbacks"]) == {uid} and allowed.attrs["predicted"] == 2
    assert f"2 full, 0 reduced, 1 prior (1 {how} (e.g. {uid}: " in allowed.attrs["summary"]
    assert len(pd.read_csv(tmp_path / "submission.csv")) == len(pd.read_csv(data_dir / "test.csv"))


def _weights_dataset(tiny: dict, tmp_path: Path) -> Path:
    from rsna22_utils.core.kaggle import KaggleSettings, build_weights_dataset

    return build_weights_dataset(tiny["work_dir"], tmp_path / "weights", KaggleSettings(owner="kit-tester"))


def _runner_record(tiny: dict, tmp_path: Path) -> Path:
    """A runs folder whose 01_train_box sweep the runner recorded (both folds done)."""
    from rsna22_utils.core.registry import RUNS_FILE
    from rsna22_utils.core.runner import RunResult, RunSummary, _write_runs

    weights = tmp_path / "runs"
    for stage in ("01_train_box", "06_train_study"):
        shutil.copytree(tiny["work_dir"] / stage, weights / stage)
    summary = RunSummary("01_train_box")
    for fold in (0, 1):
        summary.add(RunResult("01_train_box", fold, 0, "done", str(weights / "01_train_box" / f"fold{fold}-seed0"), "nb.ipynb"))
    _write_runs(summary, weights / "01_train_box" / RUNS_FILE)
    return weights


@pytest.mark.parametrize("weights", [_weights_dataset, _runner_record], ids=["weights dataset manifest", "runner record"])
def test_a_missing_model_is_refused_unless_allowed(tiny_pipeline: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, weights) -> None:
    folder = weights(tiny_pipeline, tmp_path)
    source = "manifest.json" if (folder / "manifest.json").exists() else "_runs.json"
    shutil.rmtree(folder / "01_train_box" / "fold1-seed0")
    out = tmp_path / "submission.csv"
    data_dir = _placeholder(tmp_path)
    with pytest.raises(
        SetupError, match=rf"1 of the 2 01_train_box runs listed in .*{source} are missing: fold1-seed0; .*allow_missing_models"
    ):
        predict_submission(_config(data_dir, folder, out))
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.cervical.submission"):
        allowed = predict_submission(_config(data_dir, folder, out, allow_missing_models=True))
    assert "01_train_box without fold1-seed0 (allow_missing_models)" in allowed.attrs["summary"]
    assert [r.getMessage() for r in caplog.records if "fold1-seed0" in r.getMessage()]  # named in a warning too


def test_degenerate_studies_get_the_prior_with_the_reason(tiny_pipeline: dict, tmp_path: Path) -> None:
    """One slice left, or every slice at one z (a sagittal series): named, the prior, counted; the others predicted."""
    import pydicom

    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    one_slice, flat, fine = pd.read_csv(data_dir / "test.csv")["StudyInstanceUID"].unique()
    for dicom in sorted((data_dir / "test_images" / one_slice).glob("*.dcm"))[1:]:
        dicom.unlink()
    for dicom in (data_dir / "test_images" / flat).glob("*.dcm"):
        ds = pydicom.dcmread(dicom)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], 12.5]
        ds.save_as(dicom)
    out = tmp_path / "submission.csv"
    with pytest.raises(TooManyFailures, match=r"too few slices"):  # counted: 2 of 3 where max_failed_fraction 0.5 allows 1
        predict_submission(_config(data_dir, tiny_pipeline["work_dir"], out, max_failed_fraction=0.5))
    submission = predict_submission(_config(data_dir, tiny_pipeline["work_dir"], out, max_failed_fraction=0.7))
    assert set(submission.attrs["fallbacks"]) == {one_slice, flat} and submission.attrs["predicted"] == 1
    assert "too few slices: no complete 3-slice image" in submission.attrs["fallbacks"][one_slice]
    assert "files share one z position: not an axial series?" in submission.attrs["fallbacks"][flat]
    assert "1 full, 0 reduced, 2 prior (2 too few slices (e.g. " in submission.attrs["summary"]
    assert len(pd.read_csv(out)) == len(pd.read_csv(data_dir / "test.csv"))


def test_an_extra_zero_byte_file_leaves_every_row_written_and_is_named(tiny_pipeline: dict, tmp_path: Path) -> None:
    """#23: the file is left out under max_dropped_slices, the study predicted from the rest, exit status 0."""
    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    test = pd.read_csv(data_dir / "test.csv")
    uid = test["StudyInstanceUID"].iloc[0]
    (data_dir / "test_images" / uid / "999.dcm").write_bytes(b"")
    out = tmp_path / "submission.csv"
    args = ["predict", "--data-dir", str(data_dir), "--weights", str(tiny_pipeline["work_dir"]), "--out", str(out), "-p", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "rsna22_utils", *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(pd.read_csv(out)["row_id"]) == list(test["row_id"])
    summary = [line for line in proc.stderr.splitlines() if "submission of" in line and "written to" in line]
    assert len(summary) == 1 and "3 full, 0 reduced, 1 of them from part of their slices" in summary[0], proc.stderr[-3000:]
    assert f"{uid}: 1 of " in summary[0] and "999.dcm: empty file (0 bytes)" in summary[0]


def _slice_of_another_size(study: Path, rows: int) -> Path:
    """A slice of this study's series, between two of its slices, of `rows` x `rows` pixels."""
    import pydicom

    from rsna22_utils.core.dicom_writer import EXPLICIT_LE, write_dicom_slice

    first, second = (pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(study.glob("*.dcm"))[:2])
    z = (float(first.ImagePositionPatient[2]) + float(second.ImagePositionPatient[2])) / 2
    path = study / "997.dcm"
    hu = np.full((rows, rows), 40, np.int16)
    write_dicom_slice(
        path, hu, transfer_syntax=EXPLICIT_LE, study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
        sop_uid=f"{first.SeriesInstanceUID}.997", instance_number=997, z=z,
    )  # fmt: skip
    return path


def test_one_odd_file_is_left_out_with_a_warning_naming_it(tiny_pipeline: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """#24: a slice of another size, or a file that is not DICOM, beside readable slices: dropped, named, the study predicted."""
    data_dir = _copy_competition(tiny_pipeline["data_dir"], tmp_path / "competition")
    test = pd.read_csv(data_dir / "test.csv")
    odd_size, not_dicom, _ = test["StudyInstanceUID"].unique()
    odd = _slice_of_another_size(data_dir / "test_images" / odd_size, rows=24)
    (data_dir / "test_images" / not_dicom / "998.dcm").write_text("a note saved with the wrong name\n" * 10)
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.core.dicom"):
        submission = predict_submission(_config(data_dir, tiny_pipeline["work_dir"], tmp_path / "submission.csv", num_workers=0))
    assert submission.attrs["predicted"] == 3 and not submission.attrs["fallbacks"]
    assert "3 full, 0 reduced, 2 of them from part of their slices" in submission.attrs["summary"]
    warned = {uid: [r.getMessage() for r in caplog.records if uid in r.getMessage()] for uid in (odd_size, not_dicom)}
    assert len(warned[odd_size]) == 1 and f"{odd.name}: slice size (24, 24) differs from the study's (48, 48)" in warned[odd_size][0]
    assert len(warned[not_dicom]) == 1 and "998.dcm: not a DICOM file" in warned[not_dicom][0]
    # allowed none, the study gets the prior with the reason
    strict = predict_submission(
        _config(data_dir, tiny_pipeline["work_dir"], tmp_path / "b.csv", num_workers=0, max_dropped_slices=0.0, max_failed_fraction=0.7)
    )
    assert set(strict.attrs["fallbacks"]) == {odd_size, not_dicom} and "not a DICOM file" in strict.attrs["fallbacks"][not_dicom]
