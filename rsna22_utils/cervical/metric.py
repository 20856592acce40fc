"""The RSNA 2022 competition metric: weighted multi-label log loss, in Kaggle row format and in torch.

`TARGETS = ("patient_overall", "C1", ..., "C7")` is THE column order used everywhere in this kit
for (batch, 8) tensors and wide prediction tables (StudyInstanceUID + TARGETS).

The metric follows the host's clarification code (competition discussion 341854) with the
row-wise (per-study) weight normalisation that the 3rd place also used as its training loss:
each row is weighted 1 (negative) / 2 (positive) for a vertebra C1..C7 and 7 / 14 for
patient_overall; a study's loss is sum_j w_j * logloss_j / sum_j w_j over its 8 rows, and the
score is the mean over studies. Predictions are clipped to [eps, 1 - eps] with eps = 1e-15
(sklearn's historical `log_loss` default), so a confident wrong answer costs ~34.5, not inf.

Row format (Kaggle): `row_id = <StudyInstanceUID>_<C1..C7|patient_overall>`, value column
`fractured`. `score(solution, submission)` checks both tables strictly and raises `MetricError`
(counts + a few examples) on missing / extra / duplicated rows, NaN or out-of-range values, or
a study without all 8 rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from rsna22_utils.cervical.anatomy import TARGETS, VERTEBRAE
from rsna22_utils.core.errors import MetricError
from rsna22_utils.core.metric import (
    binary_column,
    check_same_ids,
    check_unique,
    examples,
    probability_column,
    read_csv_table,
    require_columns,
)

logger = logging.getLogger(__name__)

#: Row order of one study in a submission (like the competition's test.csv): C1..C7, then patient_overall.
SUBMISSION_ORDER: tuple[str, ...] = VERTEBRAE + ("patient_overall",)
#: Competition weights per target, aligned with TARGETS.
NEGATIVE_WEIGHTS: dict[str, float] = {t: (7.0 if t == "patient_overall" else 1.0) for t in TARGETS}
POSITIVE_WEIGHTS: dict[str, float] = {t: 2.0 * NEGATIVE_WEIGHTS[t] for t in TARGETS}
EPS = 1e-15
#: Prevalence of each target in the competition's train.csv (2,019 studies: patient_overall 961,
#: C1 146, C2 285, C3 73, C4 108, C5 162, C6 277, C7 393 positives): the submission's prior when no
#: train.csv is at hand, and the synthetic generator's label rates. Source: rsna-2022-cervical-spine-fracture-detection/train.csv.
TRAIN_PREVALENCE: dict[str, float] = {
    "patient_overall": 961 / 2019,
    "C1": 146 / 2019,
    "C2": 285 / 2019,
    "C3": 73 / 2019,
    "C4": 108 / 2019,
    "C5": 162 / 2019,
    "C6": 277 / 2019,
    "C7": 393 / 2019,
}


def _split_row_ids(row_ids: pd.Series, what: str) -> tuple[pd.Series, pd.Series]:
    """(StudyInstanceUID, target) parsed from `<uid>_<target>` row ids; unknown targets raise."""
    parts = row_ids.astype(str).str.extract(r"^(.+)_(C[1-7]|patient_overall)$")
    bad = parts[1].isna()
    if bad.any():
        raise MetricError(
            f"{what}: {int(bad.sum())} row_id(s) are not '<StudyInstanceUID>_<target>' with a target in "
            f"{list(TARGETS)}: {examples(row_ids[bad])}"
        )
    study, target = parts[0], parts[1]
    return study, target


def score(solution: pd.DataFrame, submission: pd.DataFrame, eps: float = EPS) -> float:
    """Competition score (lower is better) of `submission` against `solution`, both in Kaggle row format.

    solution: row_id, fractured (0/1), optionally sample_weight (used instead of the competition
    weights when present, as Kaggle's solution file carries them) and StudyInstanceUID /
    prediction_type (ignored: the row_id says both). submission: row_id, fractured (probability).
    """
    require_columns(solution, ("row_id", "fractured"), "solution")
    require_columns(submission, ("row_id", "fractured"), "submission")
    if len(solution) == 0:
        raise MetricError("solution: no rows")
    sol = solution.reset_index(drop=True)
    sub = submission.reset_index(drop=True)
    sol_ids = sol["row_id"].astype(str)
    sub_ids = sub["row_id"].astype(str)
    check_unique(sol_ids, "solution")
    check_unique(sub_ids, "submission")

    check_same_ids(sol_ids, sub_ids)

    study, target = _split_row_ids(sol_ids, "solution")
    counts = study.value_counts()
    incomplete = counts[counts != len(TARGETS)]
    if len(incomplete):
        raise MetricError(
            f"solution: {len(incomplete)} stud(y/ies) without all {len(TARGETS)} rows "
            f"({', '.join(TARGETS)}): {examples(f'{u} ({n} rows)' for u, n in incomplete.items())}"
        )

    y = binary_column(sol, "fractured", "solution")
    p = pd.Series(probability_column(sub, "fractured", "submission"), index=sub_ids).reindex(sol_ids).to_numpy()

    if "sample_weight" in sol.columns:
        w = pd.to_numeric(sol["sample_weight"], errors="coerce").to_numpy(dtype=np.float64)
        if not (np.isfinite(w) & (w > 0)).all():
            raise MetricError("solution: 'sample_weight' must be finite and > 0 on every row")
    else:
        neg = target.map(NEGATIVE_WEIGHTS).to_numpy(dtype=np.float64)
        w = np.where(y == 1, 2.0 * neg, neg)

    p = np.clip(p, eps, 1.0 - eps)
    loss = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    sums = pd.DataFrame({"study": study.to_numpy(), "wl": w * loss, "w": w}).groupby("study", sort=False)[["wl", "w"]].sum()
    return float((sums["wl"] / sums["w"]).mean())


def score_files(submission: str | Path, solution: str | Path) -> float:
    """`score` of two CSV files (the `score` command): the solution in Kaggle row format (row_id, fractured) or
    train.csv's (StudyInstanceUID + TARGETS, 0/1)."""
    labels = read_csv_table(solution, "solution")
    if "row_id" not in labels.columns and "StudyInstanceUID" in labels.columns:
        labels = solution_from_labels(labels)
    return score(labels, read_csv_table(submission, "submission"))


def _wide_table(df: pd.DataFrame, what: str, binary: bool) -> pd.DataFrame:
    """Validated copy of a wide table (StudyInstanceUID + TARGETS), values as float."""
    require_columns(df, ("StudyInstanceUID",) + TARGETS, what)
    out = df[["StudyInstanceUID", *TARGETS]].copy()
    out["StudyInstanceUID"] = out["StudyInstanceUID"].astype(str)
    dup = out["StudyInstanceUID"][out["StudyInstanceUID"].duplicated()]
    if len(dup):
        raise MetricError(f"{what}: {len(dup)} duplicated StudyInstanceUID(s): {examples(dup.unique())}")
    for t in TARGETS:
        try:
            values = pd.to_numeric(out[t], errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise MetricError(f"{what}: column {t!r} is not numeric ({exc})") from None
        bad = ~np.isfinite(values) | (values < 0) | (values > 1)
        if binary:
            bad |= (values != 0) & (values != 1)
        if bad.any():
            kind = "0/1" if binary else "a probability in [0, 1]"
            raise MetricError(f"{what}: {int(bad.sum())} {t!r} value(s) not {kind}, studies {examples(out['StudyInstanceUID'][bad])}")
        out[t] = values
    return out


def _to_rows(wide: pd.DataFrame) -> pd.DataFrame:
    """Long table (StudyInstanceUID, prediction_type, value, row_id) in SUBMISSION_ORDER per study."""
    n = len(wide)
    uids = np.repeat(wide["StudyInstanceUID"].to_numpy(dtype=object), len(SUBMISSION_ORDER))
    types = np.tile(np.array(SUBMISSION_ORDER, dtype=object), n)
    values = wide[list(SUBMISSION_ORDER)].to_numpy(dtype=np.float64).reshape(-1)
    row_id = [f"{u}_{t}" for u, t in zip(uids, types)]
    return pd.DataFrame({"row_id": row_id, "StudyInstanceUID": uids, "prediction_type": types, "value": values})


def solution_from_labels(labels_df: pd.DataFrame) -> pd.DataFrame:
    """Kaggle solution rows (row_id, StudyInstanceUID, prediction_type, fractured, sample_weight) from train.csv-style labels."""
    rows = _to_rows(_wide_table(labels_df, "labels", binary=True))
    rows["fractured"] = rows.pop("value").astype(np.int64)
    neg = rows["prediction_type"].map(NEGATIVE_WEIGHTS).to_numpy(dtype=np.float64)
    rows["sample_weight"] = np.where(rows["fractured"] == 1, 2.0 * neg, neg)
    return rows


def submission_from_predictions(pred_df: pd.DataFrame) -> pd.DataFrame:
    """Kaggle submission rows (row_id, fractured) from a wide table StudyInstanceUID + TARGETS probabilities.

    Row order: for each study (in `pred_df` order) C1..C7, then patient_overall.
    """
    rows = _to_rows(_wide_table(pred_df, "predictions", binary=False))
    return pd.DataFrame({"row_id": rows["row_id"], "fractured": rows["value"]})


def prior_predictions(train_labels: pd.DataFrame, study_uids: Iterable[str]) -> pd.DataFrame:
    """Baseline predictions: each target's prevalence in `train_labels`, for every study in `study_uids`."""
    labels = _wide_table(train_labels, "train labels", binary=True)
    if len(labels) == 0:
        raise MetricError("train labels: no rows to compute prevalences from")
    prevalence = labels[list(TARGETS)].mean()
    uids = [str(u) for u in study_uids]
    out = pd.DataFrame({"StudyInstanceUID": pd.Series(uids, dtype=object)})
    for t in TARGETS:
        out[t] = float(prevalence[t])
    return out


def align_predictions(labels_df: pd.DataFrame, pred_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labels, predictions) as wide tables with the same studies in the same order; missing studies raise."""
    labels = _wide_table(labels_df, "labels", binary=True)
    preds = _wide_table(pred_df, "predictions", binary=False)
    missing = labels["StudyInstanceUID"][~labels["StudyInstanceUID"].isin(set(preds["StudyInstanceUID"]))]
    if len(missing):
        raise MetricError(f"predictions: {len(missing)} labelled stud(y/ies) without predictions: {examples(missing)}")
    preds = preds.set_index("StudyInstanceUID").loc[labels["StudyInstanceUID"]].reset_index()
    return labels.reset_index(drop=True), preds


def score_predictions(labels_df: pd.DataFrame, pred_df: pd.DataFrame, eps: float = EPS) -> float:
    """Competition score of wide predictions against wide labels (the labelled studies only; e.g. one fold's OOF)."""
    labels, preds = align_predictions(labels_df, pred_df)
    return score(solution_from_labels(labels), submission_from_predictions(preds), eps=eps)


def per_target_auc(labels_df: pd.DataFrame, pred_df: pd.DataFrame) -> dict[str, float]:
    """ROC AUC per target (TARGETS order) over the labelled studies; NaN where a target has only one class."""
    from sklearn.metrics import roc_auc_score

    labels, preds = align_predictions(labels_df, pred_df)
    aucs: dict[str, float] = {}
    for t in TARGETS:
        y = labels[t].to_numpy()
        aucs[t] = float(roc_auc_score(y, preds[t].to_numpy())) if len(np.unique(y)) == 2 else float("nan")
    return aucs


def competition_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per-element competition weights for (batch, 8) targets in TARGETS order (soft targets interpolate)."""
    neg = torch.tensor([NEGATIVE_WEIGHTS[t] for t in TARGETS], dtype=targets.dtype, device=targets.device)
    return neg * (1.0 + targets)


def competition_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Scalar competition loss of (batch, 8) logits vs targets (TARGETS order): per-study weighted BCE, mean over studies.

    Equals `score` on the same data (up to the eps clipping, which logits never reach);
    numerically stable through BCE-with-logits.
    """
    if logits.ndim != 2 or logits.shape[1] != len(TARGETS):
        raise ValueError(f"competition_loss: logits must be (batch, {len(TARGETS)}) in order {TARGETS}, got {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"competition_loss: targets shape {tuple(targets.shape)} != logits shape {tuple(logits.shape)}")
    targets = targets.to(logits.dtype)
    weights = competition_weights(targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return ((bce * weights).sum(dim=1) / weights.sum(dim=1)).mean()


class CompetitionLoss(nn.Module):
    """`competition_loss` as a module, for configs that name a loss class."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return competition_loss(logits, targets)
