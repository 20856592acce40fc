"""The competition metric as Kaggle scored it, in row format and in torch.

Weighted multi-label log loss: every `ID_<image>_<label>` row has the log loss of its probability,
`any` rows weigh 2 and each subtype row 1; the score is sum(w * logloss) / sum(w) over the rows,
i.e. the mean over images of sum_j w_j * logloss_j / 7. Predictions are clipped to
[EPS, 1 - EPS] with EPS = 1e-15 (the clipping of sklearn's historical `log_loss` default, which
Kaggle's log-loss metrics use), so a confident wrong answer costs ~34.5, not inf.

The solution is in the `stage_2_train.csv` format (`ID,Label`, six rows per image); the
submission in the sample submission's (`ID,Label` probabilities). `score` checks both strictly
and raises `MetricError` (counts + examples) on missing, extra or repeated rows, NaN or
out-of-range values, and images without all six rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from rsna22_utils.core.errors import MetricError
from rsna22_utils.core.metric import binary_column, check_same_ids, check_unique, probability_column, read_csv_table, require_columns
from rsna22_utils.intracranial.labels import IMAGE_ID, LABEL_WEIGHTS, LABELS, rows_from_wide, split_row_ids

EPS = 1e-15


def score(solution: pd.DataFrame, submission: pd.DataFrame, eps: float = EPS) -> float:
    """Competition score (lower is better) of `submission` against `solution`, both `ID,Label` row tables."""
    require_columns(solution, ("ID", "Label"), "solution")
    require_columns(submission, ("ID", "Label"), "submission")
    if len(solution) == 0:
        raise MetricError("solution: no rows")
    sol, sub = solution.reset_index(drop=True), submission.reset_index(drop=True)
    sol_ids, sub_ids = sol["ID"].astype(str), sub["ID"].astype(str)
    check_unique(sol_ids, "solution", "ID")
    check_unique(sub_ids, "submission", "ID")
    check_same_ids(sol_ids, sub_ids, "ID")
    image, label = split_row_ids(sol_ids, "solution")
    counts = image.value_counts()
    incomplete = counts[counts != len(LABELS)]
    if len(incomplete):
        raise MetricError(f"solution: {len(incomplete)} image(s) without all {len(LABELS)} label rows: {list(incomplete.index[:5])}")
    y = binary_column(sol, "Label", "solution", "ID")
    p = pd.Series(probability_column(sub, "Label", "submission", "ID"), index=sub_ids).reindex(sol_ids).to_numpy()
    w = label.map(LABEL_WEIGHTS).to_numpy(dtype=np.float64)
    return float((w * log_losses(y, p, eps)).sum() / w.sum())


def log_losses(truth: np.ndarray, probabilities: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Each prediction's binary log loss, the probabilities clipped to [eps, 1 - eps] as Kaggle clipped them."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(truth, dtype=np.float64)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def per_label_log_loss(labels: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, float]:
    """Mean log loss per label (LABELS order) over the labelled images, predictions matched by ID."""
    predictions = predictions.set_index(IMAGE_ID).loc[labels[IMAGE_ID]]
    return {label: float(log_losses(labels[label].to_numpy(), predictions[label].to_numpy()).mean()) for label in LABELS}


def score_files(submission: str | Path, solution: str | Path) -> float:
    """`score` of two CSV files (the `score` command); unreadable files raise MetricError naming them."""
    return score(read_csv_table(solution, "solution"), read_csv_table(submission, "submission"))


def score_wide(labels: pd.DataFrame, predictions: pd.DataFrame, eps: float = EPS) -> float:
    """`score` of wide tables (ID + LABELS) over the labelled images (e.g. one fold's out-of-fold predictions)."""
    missing = labels[IMAGE_ID][~labels[IMAGE_ID].isin(set(predictions[IMAGE_ID]))]
    if len(missing):
        raise MetricError(f"predictions: {len(missing)} labelled image(s) without predictions: {list(missing[:5])}")
    predictions = predictions.set_index(IMAGE_ID).loc[labels[IMAGE_ID]].reset_index()
    return score(rows_from_wide(labels), rows_from_wide(predictions), eps=eps)


def prior_predictions(labels: pd.DataFrame, image_ids: pd.Series | list[str]) -> pd.DataFrame:
    """The baseline: every label's prevalence in `labels` (wide), for every image in `image_ids`."""
    if len(labels) == 0:
        raise MetricError("labels: no rows to compute prevalences from")
    prevalence = labels[list(LABELS)].astype(float).mean()
    out = pd.DataFrame({IMAGE_ID: pd.Series(list(image_ids), dtype=object)})
    for label in LABELS:
        out[label] = float(prevalence[label])
    return out


def per_label_auc(labels: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, float]:
    """ROC AUC per label (LABELS order) over the labelled images; NaN where a label has one class only."""
    from sklearn.metrics import roc_auc_score

    predictions = predictions.set_index(IMAGE_ID).loc[labels[IMAGE_ID]]
    out = {}
    for label in LABELS:
        y = labels[label].to_numpy()
        out[label] = float(roc_auc_score(y, predictions[label].to_numpy())) if len(np.unique(y)) == 2 else float("nan")
    return out


def weighted_log_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The metric as a training loss: (batch, 6) logits vs targets in LABELS order, BCE with logits weighted
    [2, 1, 1, 1, 1, 1], normalised per image, mean over images (equals `score` up to the clipping)."""
    if logits.ndim != 2 or logits.shape[1] != len(LABELS) or targets.shape != logits.shape:
        raise ValueError(
            f"weighted_log_loss: logits and targets must be (batch, {len(LABELS)}), got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    weights = torch.tensor([LABEL_WEIGHTS[label] for label in LABELS], dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return ((bce * weights).sum(dim=1) / weights.sum()).mean()
