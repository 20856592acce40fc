"""The demo: a synthetic competition through every stage of the pipeline on a CPU, then a report.

    ./kit demo                       # = python -m rsna22_utils demo --out demo

It runs exactly what a user runs on the real data (the papermill runner over the stage
notebooks, fold x seed), with a small profile (`profiles/demo.json`: tiny backbone, 96 px cache, few
epochs, 3 folds) so the whole pipeline finishes in minutes on two cores. Everything lands in
`--out`: `competition/` (the generated data), `runs/<stage>/...` (executed notebooks, configs,
weights, OOF predictions, metrics) and `report/` (report.md + figures).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna22_utils.cervical import baselines, qc
from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.cervical.metric import (
    TARGETS,
    per_target_auc,
    prior_predictions,
    score,
    score_predictions,
    solution_from_labels,
    submission_from_predictions,
)
from rsna22_utils.cervical.prepare import Prepared
from rsna22_utils.cervical.sequence import VertebraInference
from rsna22_utils.cervical.stages import INFER_BOX, INFERENCE, PREPARE, TRAIN_FRACTURE, TRAIN_STUDY
from rsna22_utils.cervical.study_box import BoxInference
from rsna22_utils.cervical.synth import generate_competition
from rsna22_utils.core.demo import demo_overrides, run_demo_stage, synthetic_competition, write_report_markdown
from rsna22_utils.core.registry import run_dirs, stage_dir
from rsna22_utils.core.registry import stages as registered_stages

logger = logging.getLogger(__name__)

# Training studies of the demo's synthetic competition. On 60, a fold's stage-05 model trained on about 24
# broken vertebrae and on some draws never learned to see the breaks; 90 studies at fewer windows per study
# cost the same time (NOTES.md, issue #23).
DEMO_STUDIES = 90
FEW_POSITIVES = 10  # below this many positive studies a target's pooled OOF AUC is noise (the report says so)


def run_demo(
    out: str | Path = "demo",
    n_studies: int = DEMO_STUDIES,
    image_size: int = 96,
    seed: int = 0,
    stages: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict:
    """Generate (or reuse) a synthetic competition, run every stage through the runner (the `demo`
    profile's settings and folds, seed `seed`), write the report.

    `overrides` ({stage or "*": {key: value}}, see `parse_demo_overrides`) change the profile, e.g.
    longer training for a CV figure: `./kit demo --studies 150 -p 05_train_fracture:epochs=24`.
    """
    out = Path(out).resolve()
    started = time.perf_counter()
    data_dir = out / "competition"
    _synthetic_competition(data_dir, n_studies, image_size, seed)
    work_dir = out / "runs"
    common = {"data_dir": str(data_dir), "work_dir": str(work_dir)}
    timings: dict[str, float] = {}
    for stage in stages or list(registered_stages()):
        stage_overrides = demo_overrides(stage, common, overrides)
        if stage == PREPARE:
            stage_overrides["image_size"] = image_size
        if stage == INFERENCE:  # the Kaggle notebook, on the synthetic test studies, with this run's weights
            stage_overrides.update(weights_dir=str(work_dir), out=str(_submission_path(work_dir)))
        timings[stage] = run_demo_stage(stage, stage_overrides, seed, work_dir)
    report = write_report(out, data_dir, work_dir)
    report["seconds"] = {**{k: round(v, 1) for k, v in timings.items()}, "total": round(time.perf_counter() - started, 1)}
    (out / "report" / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    print((out / "report" / "report.md").read_text())
    print(f"stage times (s): {report['seconds']}")
    return report


def _submission_path(work_dir: Path) -> Path:
    """Where the demo has 07_inference write its submission (and the report reads it)."""
    return stage_dir(work_dir, INFERENCE) / "submission.csv"


def _synthetic_competition(data_dir: Path, n_studies: int, image_size: int, seed: int) -> None:
    params = {"n_studies": n_studies, "image_size": image_size, "seed": seed}
    synthetic_competition(data_dir, params, lambda: generate_competition(data_dir, n_studies=n_studies, seed=seed, image_size=image_size))


def _oof(work_dir: Path, stage: str) -> pd.DataFrame:
    frames = [pd.read_parquet(run / "oof.parquet") for run in run_dirs(work_dir, stage, require="oof.parquet")]
    if not frames:
        raise FileNotFoundError(f"{work_dir / stage}: no oof.parquet")
    return pd.concat(frames, ignore_index=True)


def write_report(out: Path, data_dir: Path, work_dir: Path) -> dict:
    """report/report.md with the CV metric vs the prior baseline, per-target AUC, box quality, and QC figures."""
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(data_dir / "train.csv")
    result: dict[str, Any] = {}
    lines = ["# rsna22-kit demo report", "", f"Data: `{data_dir}` ({len(labels)} train studies). Runs: `{work_dir}`.", ""]

    oof = _oof(work_dir, TRAIN_STUDY)
    oof = oof.groupby("StudyInstanceUID", as_index=False)[list(TARGETS)].mean()  # mean over seeds
    study_labels = labels[labels["StudyInstanceUID"].isin(oof["StudyInstanceUID"])]
    result["cv_metric"] = score_predictions(study_labels, oof)
    result["prior_metric"] = score_predictions(study_labels, prior_predictions(labels, list(oof["StudyInstanceUID"])))
    result["ratio"] = result["cv_metric"] / result["prior_metric"]
    result["auc"] = per_target_auc(study_labels, oof)
    lines += [
        "## Study model, out of fold",
        "",
        f"- studies: {len(oof)}",
        f"- competition metric (weighted log loss): **{result['cv_metric']:.4f}**",
        f"- prior baseline (train prevalence): {result['prior_metric']:.4f}  → ratio {result['ratio']:.2f}",
        "",
        "| target | AUC | positive studies |",
        "| --- | --- | --- |",
        *[f"| {k} | {v:.3f} | {int(study_labels[k].sum())} |" for k, v in result["auc"].items()],
        "",
        f"AUCs pool the folds' out-of-fold predictions. A target with fewer than {FEW_POSITIVES} positive studies gives a noisy"
        " AUC, and a misleading one when a fold's model saw fewer positives than the others: that model predicts the target"
        " lower for all its studies, positives included.",
        "",
    ]
    qc.plot_roc_curves(study_labels, oof, report_dir / "roc.png")
    figures = {"roc": report_dir / "roc.png"}
    for stage in [name for name, spec in registered_stages().items() if spec.trains]:  # one figure per stage: one loss scale
        histories = {run.name: run / "history.csv" for run in run_dirs(work_dir, stage, require="history.csv")}
        if histories:
            figures[f"loss_{stage}"] = qc.plot_loss_curves(histories, report_dir / f"loss_{stage}.png")

    box_outputs = BoxInference.of(work_dir)
    box_metrics = box_outputs.read("metrics")
    result["box"] = {k: v for k, v in box_metrics.items() if k.startswith(("median", "eval"))}
    if box_outputs.path("box_eval").exists():
        evaluation = box_outputs.read("box_eval")
        figures["iou_histogram"] = qc.plot_iou_histogram(evaluation["iou"], report_dir / "iou_histogram.png")
        lines += [
            f"## Study boxes ({INFER_BOX}) on studies no box model saw",
            "",
            f"- median IoU with the true C1–C7 box: **{box_metrics['median_iou']:.3f}** ({box_metrics['eval_studies']} studies)",
            f"- median slice-range error: from {box_metrics['median_from_error']:.1f}, to {box_metrics['median_to_error']:.1f} slices",
            "",
        ]

    submission_path = _submission_path(work_dir)
    test_labels_path = data_dir / "_synthetic" / "test_labels.csv"
    if submission_path.exists() and test_labels_path.exists():  # the synthetic test studies have known labels
        test_labels = pd.read_csv(test_labels_path)
        solution = solution_from_labels(test_labels)
        prior_rows = submission_from_predictions(prior_predictions(labels, list(test_labels["StudyInstanceUID"])))
        result["test"] = {
            "studies": len(test_labels),
            "metric": score(solution, pd.read_csv(submission_path)),
            "prior_metric": score(solution, prior_rows),
        }
        lines += [
            f"## Submission ({INFERENCE}) on the synthetic test studies",
            "",
            f"- `{submission_path}`: metric **{result['test']['metric']:.4f}** on {len(test_labels)} test studies "
            f"(prior baseline {result['test']['prior_metric']:.4f}; few studies: a noisy figure)",
            "",
        ]

    result["baselines"] = stage_baselines(work_dir, labels, result, data_dir / "_synthetic")
    lines += baseline_lines(result)
    figures["study_animation"] = _study_figure(work_dir, report_dir, oof, labels)
    write_report_markdown(report_dir, lines, figures, work_dir, result)
    return result


def stage_baselines(work_dir: Path, labels: pd.DataFrame, result: dict[str, Any], synthetic: Path | None = None) -> dict[str, Any]:
    """What each trained stage scores out of fold beside a trivial baseline (`baselines`), from the runs' outputs.

    `labels`: train.csv; `result`: the report's figures so far (the study model's metric and AUCs);
    `synthetic`: the generator's truth (`_synthetic/`), when the competition is synthetic: 05 is then
    also scored against the breaks it drew (`baselines.drawn_break_auc`)."""
    prepared = Prepared.of(work_dir)
    folds = prepared.read("folds")
    out: dict[str, Any] = {}
    box_outputs = BoxInference.of(work_dir)
    if box_outputs.path("box_eval").exists():
        box_eval = box_outputs.read("box_eval")
        centred = baselines.centred_box_iou(box_eval, prepared.read("slices"))
        out["box"] = {
            "studies": len(box_eval),
            "median_iou": float(box_eval["iou"].median()),
            "centred_median_iou": float(centred.median()),
        }
    vertebra_metrics = VertebraInference.of(work_dir).read("metrics")
    if "mae_vs_segmentation" in vertebra_metrics and prepared.vertebra_ratios.exists():
        out["vertebra"] = {
            "mae": float(vertebra_metrics["mae_vs_segmentation"]),
            "mean_profile_mae": baselines.mean_profile_error(prepared.read("vertebra_ratios")),
        }
    fracture_runs = run_dirs(work_dir, TRAIN_FRACTURE, require="oof.parquet")
    out["slice_fracture_auc"] = baselines.slice_fracture_auc(fracture_runs)
    fracture_oof = _oof(work_dir, TRAIN_FRACTURE)
    if synthetic is not None and (synthetic / "boxes.csv").exists():  # _oof raised if there is no 05 run
        run_cfg = json.loads((fracture_runs[0] / "config.json").read_text())
        per_step = 1 if run_cfg.get("outputs_per_slice") else int(run_cfg.get("slices_per_image", 3))
        out["drawn_breaks_auc"] = baselines.drawn_break_auc(
            fracture_oof, pd.read_csv(synthetic / "boxes.csv"), pd.read_csv(synthetic / "studies.csv"), per_step
        )
    out["max_pooled"] = baselines.max_pooled_baseline(fracture_oof, folds)
    out["study"] = {"metric": result["cv_metric"], "prior_metric": result["prior_metric"], "auc": result["auc"]}
    return out


def _figure(value: float | None, digits: int = 3) -> str:
    """A report figure, or "n/a" where it could not be computed (one class, one fold)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def baseline_lines(result: dict[str, Any]) -> list[str]:
    """The report's table of each stage beside its trivial baseline (`stage_baselines`)."""
    b = result["baselines"]
    rows = []
    if "box" in b:
        rows.append(
            f"| 01/02 study boxes ({b['box']['studies']} studies) | median IoU {b['box']['median_iou']:.3f}"
            f" | a fixed centred box of the median size: {b['box']['centred_median_iou']:.3f} |"
        )
    if "vertebra" in b:
        rows.append(
            f"| 03/04 vertebra pseudo-labels | mean abs. error {b['vertebra']['mae']:.3f}"
            f" | the mean vertebra profile along the study: {b['vertebra']['mean_profile_mae']:.3f} |"
        )
    aucs = b["slice_fracture_auc"]
    if aucs:
        per_run = ", ".join(f"{v:.2f}" for v in aucs.values())
        rows.append(f"| 05 slice fractures | AUC {np.mean(list(aucs.values())):.3f} (runs: {per_run}) | chance: 0.500 |")
    drawn = b.get("drawn_breaks_auc")
    if drawn:
        per_vertebra = ", ".join(f"{v} {auc:.2f}" for v, auc in drawn.items() if v != "mean")
        rows.append(f"| 05 vs the drawn breaks, inside each vertebra | AUC {drawn['mean']:.3f} ({per_vertebra}) | chance: 0.500 |")
    pooled, study = b["max_pooled"], b["study"]
    calibrated = _figure(pooled["metric_calibrated"], 4)
    rows.append(
        f"| 05 max-pooled per study ({pooled['studies']} studies) | patient_overall AUC {_figure(pooled['auc'].get('patient_overall'))},"
        f" metric {pooled['metric_raw']:.4f} as is, {calibrated} calibrated across folds | prior: metric {study['prior_metric']:.4f} |"
    )
    rows.append(
        f"| 06 study model | patient_overall AUC {_figure(study['auc'].get('patient_overall'))}, metric {study['metric']:.4f}"
        f" | prior {study['prior_metric']:.4f}; max-pooled 05, calibrated: {calibrated} |"
    )
    return [
        "## What each stage learned, against a trivial baseline (out of fold)",
        "",
        "| stage | model | trivial baseline |",
        "| --- | --- | --- |",
        *rows,
        "",
        "The max-pooled baseline takes each vertebra's largest stage-05 fracture probability over the study (their largest for"
        " patient_overall); calibrated across folds, each fold's studies go through a logistic fit to the other folds' studies."
        " The 05 slice AUC is scored against the pseudo-labels, which knowing where each vertebra lies already earns;"
        " the synthetic competition's drawn breaks, inside each vertebra, show whether 05 sees the break itself."
        " A weak figure comes from the first stage that does not beat its baseline.",
        "",
    ]


def _study_figure(work_dir: Path, report_dir: Path, oof: pd.DataFrame, labels: pd.DataFrame) -> Path:
    """study.gif of the most confidently fractured study: slices, its box, per-slice vertebra/fracture curves."""
    cache = Prepared.of(work_dir).cache()
    uid = oof.sort_values("patient_overall", ascending=False)["StudyInstanceUID"].iloc[0]
    volume = np.asarray(cache.volume(uid)[..., 0])
    boxes = BoxInference.of(work_dir).read("study_boxes").set_index("StudyInstanceUID")
    rows = int(cache.slices(uid)["rows"].iloc[0])
    scale = volume.shape[1] / rows
    box = tuple(float(v) * scale for v in boxes.loc[uid, BOX_COLUMNS])
    slice_labels = VertebraInference.of(work_dir).read("slice_labels")
    preds = slice_labels[slice_labels["StudyInstanceUID"] == uid].sort_values("slice_index")
    preds = preds[[c for c in preds.columns if c.endswith(("_pred", "_frac"))]].reset_index(drop=True)
    return qc.study_animation(volume, report_dir / "study.gif", box=box, slice_preds=preds, every=2)
