"""Trivial baselines for each trained stage, so that a report can say what each model learned.

Each function compares a stage's out-of-fold result with what a model that learned nothing from the
images would score: a fixed centred box (01/02), the mean vertebra profile along the study (03/04),
chance (05's slice fracture AUC), the training prevalence and the stage-05 fracture probabilities
max-pooled per study (06). On a synthetic competition, `drawn_break_auc` also scores 05 against the
breaks the generator drew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from rsna22_utils.cervical.anatomy import BOX_COLUMNS, TARGETS, VERTEBRAE
from rsna22_utils.cervical.metric import per_target_auc, score_predictions
from rsna22_utils.cervical.models import logistic_fit
from rsna22_utils.cervical.study_box import box_iou

PROFILE_BINS = 50  # positions along a study (relative slice index) at which the mean vertebra profile is kept


def centred_box_iou(box_eval: pd.DataFrame, slices: pd.DataFrame) -> pd.Series:
    """IoU of each study's true C1-C7 box with a fixed box of the median true size, centred in the image.

    `box_eval`: 02's `box_eval.csv` (true boxes in `x0_true..y1_true`); `slices`: 00's `slices.parquet`
    (image `rows` / `cols` per study). The size comes from the same true boxes it is scored on, which
    can only flatter the baseline.
    """
    true = box_eval[[f"{c}_true" for c in BOX_COLUMNS]].to_numpy(float)
    width, height = np.median(true[:, 2] - true[:, 0]), np.median(true[:, 3] - true[:, 1])
    shape = slices.groupby("StudyInstanceUID")[["rows", "cols"]].first().loc[box_eval["StudyInstanceUID"]]
    cx, cy = shape["cols"].to_numpy(float) / 2, shape["rows"].to_numpy(float) / 2
    fixed = np.stack([cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2], axis=1)
    return pd.Series(box_iou(fixed, true), index=box_eval["StudyInstanceUID"].to_numpy(), name="iou")


def mean_profile_error(ratios: pd.DataFrame) -> float:
    """Mean absolute error of the mean vertebra profile against the segmentations, out of fold.

    `ratios`: 00's `vertebra_ratios.parquet` (StudyInstanceUID, slice_index, fold, C1..C7). Each
    study is predicted by the mean C1..C7 ratio of the other folds' studies at the same relative
    position along the study (slice index / slices): a vertebra model that learned nothing from
    the pixels; 04's `mae_vs_segmentation` is the same error of the vertebra models.
    """
    table = ratios.sort_values(["StudyInstanceUID", "slice_index"]).copy()
    n_slices = table.groupby("StudyInstanceUID")["slice_index"].transform("max") + 1
    table["bin"] = table["slice_index"] * PROFILE_BINS // n_slices
    errors = []
    for fold in sorted(table["fold"].unique()):
        held_out = table["fold"] == fold
        profile = table[~held_out].groupby("bin")[list(VERTEBRAE)].mean().reindex(range(PROFILE_BINS)).interpolate().bfill().ffill()
        predicted = profile.loc[table.loc[held_out, "bin"]].to_numpy()
        errors.append(np.abs(table.loc[held_out, list(VERTEBRAE)].to_numpy() - predicted))
    return float(np.concatenate(errors).mean())


def slice_fracture_auc(runs: list[Path]) -> dict[str, float]:
    """Each 05 run's out-of-fold slice fracture AUC (mean over C1..C7, `metrics.json`), by run name; chance is 0.5."""
    out = {}
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text()).get("metrics", {})
        if "fracture_auc" in metrics:
            out[run.name] = float(metrics["fracture_auc"])
    return out


def drawn_break_auc(oof: pd.DataFrame, breaks: pd.DataFrame, studies: pd.DataFrame, slices_per_image: int = 3) -> dict[str, float]:
    """Stage 05's out-of-fold fracture outputs against the breaks a synthetic competition drew, per vertebra,
    among the images of that vertebra only; chance is 0.5.

    The slice fracture AUC of the runs (`slice_fracture_auc`) is scored against the pseudo-labels, which
    mark every slice of a fractured vertebra: outputs that only learned where the vertebrae lie and how
    often each is broken score well there. Inside one vertebra's images that knowledge is the same for
    every image, so only seeing the break ranks the broken images first.

    `oof`: 05's oof.parquet rows (one per image: `start`, `step`, `C1_frac_pred`..); `breaks`: the
    generator's `_synthetic/boxes.csv` (StudyInstanceUID, vertebra, slice_index of each drawn break);
    `studies`: its `_synthetic/studies.csv` (each vertebra's first/last slice, `C1_from`/`C1_to`..);
    `slices_per_image`: the runs' slices per step (1 for `outputs_per_slice`). Returns the AUC of each
    vertebra with broken and unbroken images, and their mean (`mean`).
    """
    k = int(slices_per_image)
    first = oof["start"].to_numpy() + k * oof["step"].to_numpy()
    span = first[:, None] + np.arange(k)[None, :]  # the slices of each image
    centre = first + k // 2
    drawn = set(zip(breaks["StudyInstanceUID"], breaks["vertebra"], breaks["slice_index"]))
    extents = studies.set_index("StudyInstanceUID")
    uids = oof["StudyInstanceUID"].to_numpy()
    out: dict[str, float] = {}
    for vertebra in VERTEBRAE:
        low = extents[f"{vertebra}_from"].reindex(uids).to_numpy()
        high = extents[f"{vertebra}_to"].reindex(uids).to_numpy()
        inside = (centre >= low) & (centre <= high)
        images = zip(uids[inside], span[inside])
        broken = np.array([any((uid, vertebra, int(s)) in drawn for s in slices) for uid, slices in images], dtype=bool)
        if 0 < broken.sum() < len(broken):
            out[vertebra] = float(roc_auc_score(broken, oof.loc[inside, f"{vertebra}_frac_pred"].to_numpy()))
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out


def max_pooled_fracture(oof: pd.DataFrame) -> pd.DataFrame:
    """Study predictions from 05's out-of-fold slice predictions: each vertebra's largest fracture
    probability over the study's validation windows, their largest for patient_overall (TARGETS columns)."""
    columns = [f"{v}_frac_pred" for v in VERTEBRAE]
    missing = [c for c in columns if c not in oof.columns]
    if missing:
        raise KeyError(f"stage-05 out-of-fold predictions lack {missing}")
    pooled = oof.groupby("StudyInstanceUID")[columns].max()
    pooled.columns = list(VERTEBRAE)
    pooled.insert(0, "patient_overall", pooled.max(axis=1))
    return pooled.reset_index()


def calibrate_across_folds(predictions: pd.DataFrame, labels: pd.DataFrame, l2: float = 1e-2) -> pd.DataFrame:
    """Each fold's studies' probabilities through a logistic fit (per target, on the logit) to the other folds' studies.

    `labels`: StudyInstanceUID, TARGETS and fold. Max-pooled probabilities of a model trained with
    positive weights are far above the true rates; this rescales them without using a study's own
    label, as a study model fitted on out-of-fold evidence would.
    """
    table = predictions.merge(labels[["StudyInstanceUID", "fold", *TARGETS]], on="StudyInstanceUID", suffixes=("", "_true"))
    scores = torch.logit(torch.tensor(table[list(TARGETS)].to_numpy(), dtype=torch.float32).clamp(1e-4, 1 - 1e-4))
    truth = torch.tensor(table[[f"{t}_true" for t in TARGETS]].to_numpy(), dtype=torch.float32)
    if table["fold"].nunique() < 2:
        raise ValueError(f"calibration across folds needs studies of at least 2 folds, got folds {sorted(table['fold'].unique())}")
    out = table[["StudyInstanceUID"]].copy()
    calibrated = np.zeros(scores.shape, dtype=np.float32)
    for fold in sorted(table["fold"].unique()):
        held_out = torch.tensor((table["fold"] == fold).to_numpy())
        weight, bias = logistic_fit(scores[~held_out], truth[~held_out], l2)
        calibrated[held_out.numpy()] = torch.sigmoid(weight * scores[held_out] + bias).numpy()
    out[list(TARGETS)] = calibrated
    return out


def max_pooled_baseline(oof: pd.DataFrame, labels: pd.DataFrame) -> dict[str, Any]:
    """The max-pooled stage-05 baseline of the study model: its AUC per target, its metric as it is and
    calibrated across folds (`calibrate_across_folds`). `labels`: StudyInstanceUID, TARGETS, fold."""
    pooled = max_pooled_fracture(oof)
    study_labels = labels[labels["StudyInstanceUID"].isin(pooled["StudyInstanceUID"])]
    several_folds = study_labels["fold"].nunique() >= 2  # else nothing to calibrate on without the studies' own labels
    return {
        "studies": len(pooled),
        "auc": per_target_auc(study_labels, pooled),
        "metric_raw": score_predictions(study_labels, pooled),
        "metric_calibrated": score_predictions(study_labels, calibrate_across_folds(pooled, labels)) if several_folds else float("nan"),
    }
