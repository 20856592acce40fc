"""The intracranial demo: a synthetic competition through every stage on a CPU, then a report.

    ./kit demo --competition intracranial --out demo-ich

It runs what a user runs on the real data (the papermill runner over `notebooks/intracranial/`,
fold x seed) with the `demo` profile (`profiles/demo.json`: 64 px head crops, a tiny ResNet, 3 folds
grouped by patient). Everything lands in `--out`: `competition/` (the generated data),
`runs/<stage>/...` and `report/` (report.md, roc.png, loss_01_train.png, summary.json).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from rsna22_utils.core.demo import demo_overrides, run_demo_stage, synthetic_competition, write_report_markdown
from rsna22_utils.core.qc import plot_loss_curves, plot_roc
from rsna22_utils.core.registry import run_dirs, stage_dir, stages
from rsna22_utils.intracranial.labels import IMAGE_ID, LABELS, rows_from_wide, wide_from_rows
from rsna22_utils.intracranial.metric import per_label_auc, prior_predictions, score, score_wide
from rsna22_utils.intracranial.prepare import Prepared
from rsna22_utils.intracranial.stages import INFERENCE, PREDICT, PREPARE, SMOOTH, TRAIN
from rsna22_utils.intracranial.synth import generate_competition

logger = logging.getLogger(__name__)


def run_demo(
    out: str | Path = "demo-ich",
    n_studies: int = 60,
    image_size: int = 128,
    seed: int = 0,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Generate (or reuse) a synthetic competition, run every stage through the runner (the demo profile,
    seed `seed`), write the report; returns the report's numbers."""
    out = Path(out).resolve()
    started = time.perf_counter()
    data_dir, work_dir = out / "competition", out / "runs"
    params = {"n_studies": n_studies, "image_size": image_size, "seed": seed}
    synthetic_competition(data_dir, params, lambda: generate_competition(data_dir, n_studies=n_studies, seed=seed, image_size=image_size))
    common = {"data_dir": str(data_dir), "work_dir": str(work_dir)}
    timings = {stage: run_demo_stage(stage, demo_overrides(stage, common, overrides), seed, work_dir) for stage in stages()}
    report = write_report(out, data_dir, work_dir)
    report["seconds"] = {**{k: round(v, 1) for k, v in timings.items()}, "total": round(time.perf_counter() - started, 1)}
    (out / "report" / "summary.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print((out / "report" / "report.md").read_text())
    print(f"stage times (s): {report['seconds']}")
    return report


def write_report(out: Path, data_dir: Path, work_dir: Path) -> dict[str, Any]:
    """report/report.md: the out-of-fold metric (before / after smoothing) vs the prior, AUC per label, the
    submission scored on the synthetic test labels, and the figures."""
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    images = Prepared(stage_dir(work_dir, PREPARE)).read_images()
    train = images[images["split"] == "train"]
    oof = pd.read_parquet(stage_dir(work_dir, SMOOTH) / "oof_smoothed.parquet")
    raw = pd.read_parquet(stage_dir(work_dir, PREDICT) / "oof_predictions.parquet")
    labels = train.set_index(IMAGE_ID).loc[oof[IMAGE_ID]].reset_index()
    oof = oof.set_index(IMAGE_ID).loc[labels[IMAGE_ID]].reset_index()
    prior = score_wide(labels, prior_predictions(train, labels[IMAGE_ID]))
    result: dict[str, Any] = {
        "train_images": len(train),
        "studies": int(train["StudyInstanceUID"].nunique()),
        "patients": int(train["PatientID"].nunique()),
        "any_prevalence": float(train["any"].mean()),
        "prior_metric": prior,
        "oof_metric_tta": score_wide(labels, raw),
        "oof_metric": score_wide(labels, oof),
        "auc": per_label_auc(labels, oof),
    }
    result["ratio"] = result["oof_metric"] / prior
    lines = [
        "# rsna22-kit demo report: RSNA 2019 intracranial haemorrhage",
        "",
        f"Data: `{data_dir}`: {result['train_images']} train images in {result['studies']} studies of {result['patients']} patients"
        f" ({100 * result['any_prevalence']:.1f} % `any`). Runs: `{work_dir}`.",
        "",
        "## Out of fold (every image predicted by models that never saw its patient)",
        "",
        f"- prior baseline (train prevalence of each label): {prior:.4f}",
        f"- 02_predict (TTA, mean of the fold's runs): {result['oof_metric_tta']:.4f}",
        f"- 03_smooth (neighbouring slices, fitted on the other folds): **{result['oof_metric']:.4f}** → ratio to the prior"
        f" **{result['ratio']:.2f}**",
        "",
        "| label | AUC | positive images |",
        "| --- | --- | --- |",
        *[f"| {label} | {auc:.3f} | {int(labels[label].sum())} |" for label, auc in result["auc"].items()],
        "",
    ]
    lines += _submission_lines(result, data_dir, work_dir, train)
    figures = {"roc": report_dir / "roc.png"}
    plot_roc(labels, oof, figures["roc"], LABELS, bold="any", unit="images (out of fold, smoothed)")
    histories = {run.name: run / "history.csv" for run in run_dirs(work_dir, TRAIN, require="history.csv")}
    if histories:
        figures["loss_01_train"] = plot_loss_curves(histories, report_dir / "loss_01_train.png")
    write_report_markdown(report_dir, lines, figures, work_dir, result)
    return result


def _submission_lines(result: dict[str, Any], data_dir: Path, work_dir: Path, train: pd.DataFrame) -> list[str]:
    """The submissions of 03 and of the Kaggle notebook (04) scored on the synthetic test images' labels."""
    truth_path = data_dir / "_synthetic" / "test_labels.csv"
    if not truth_path.is_file():
        return []
    truth = pd.read_csv(truth_path, dtype={"ID": str})
    test_images = wide_from_rows(truth, str(truth_path))[IMAGE_ID]
    result["test"] = {"images": len(test_images), "prior_metric": score(truth, rows_from_wide(prior_predictions(train, test_images)))}
    lines = [
        "## Submissions on the synthetic test images",
        "",
        f"- prior baseline: {result['test']['prior_metric']:.4f} ({len(test_images)} images)",
    ]
    for stage in (SMOOTH, INFERENCE):
        path = stage_dir(work_dir, stage) / "submission.csv"
        if path.is_file():
            submission = pd.read_csv(path, dtype={"ID": str})
            result["test"][stage] = score(truth, submission)
            lines.append(
                f"- {stage} `{path}`: {len(submission)} rows (the sample submission's IDs), metric **{result['test'][stage]:.4f}**"
            )
    return [*lines, ""]
