"""Checks every competition's scorer makes on Kaggle row tables (a solution and a submission).

A scorer reads two tables keyed by one id column; these helpers raise `MetricError` naming the
table, the problem, counts and a few example ids, so a bad file never gives a silent score.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rsna22_utils.core.errors import MetricError

_N_EXAMPLES = 5


def examples(values: Iterable) -> str:
    """At most a few items of `values`, for error messages."""
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_N_EXAMPLES])
    return shown + (f", ... ({len(values) - _N_EXAMPLES} more)" if len(values) > _N_EXAMPLES else "")


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise MetricError when `df` lacks any of `columns`."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MetricError(f"{what}: missing column(s) {missing}; has {list(df.columns)}")


def check_unique(row_ids: pd.Series, what: str, id_name: str = "row_id") -> None:
    """Raise MetricError when an id repeats."""
    dup = row_ids[row_ids.duplicated()]
    if len(dup):
        raise MetricError(f"{what}: {len(dup)} duplicated {id_name}(s): {examples(dup.unique())}")


def check_same_ids(solution_ids: pd.Series, submission_ids: pd.Series, id_name: str = "row_id") -> None:
    """Raise MetricError listing the solution ids the submission lacks and the submission ids the solution lacks."""
    missing = solution_ids[~solution_ids.isin(set(submission_ids))]
    extra = submission_ids[~submission_ids.isin(set(solution_ids))]
    parts = []
    if len(missing):
        parts.append(f"{len(missing)} solution {id_name}(s) missing from the submission: {examples(missing)}")
    if len(extra):
        parts.append(f"{len(extra)} submission {id_name}(s) not in the solution: {examples(extra)}")
    if parts:
        raise MetricError("; ".join(parts))


def probability_column(df: pd.DataFrame, column: str, what: str, id_column: str = "row_id") -> np.ndarray:
    """`df[column]` as float64; raises MetricError on non-numeric, NaN/inf or out-of-[0, 1] values."""
    try:
        values = pd.to_numeric(df[column], errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise MetricError(f"{what}: column {column!r} is not numeric ({exc})") from None
    bad = ~np.isfinite(values)
    if bad.any():
        raise MetricError(f"{what}: {int(bad.sum())} NaN/inf {column!r} value(s), rows {examples(df[id_column][bad])}")
    bad = (values < 0) | (values > 1)
    if bad.any():
        rows = [f"{r}={v}" for r, v in zip(df[id_column][bad], values[bad])]
        raise MetricError(f"{what}: {int(bad.sum())} {column!r} value(s) outside [0, 1]: {examples(rows)}")
    return values


def binary_column(df: pd.DataFrame, column: str, what: str, id_column: str = "row_id") -> np.ndarray:
    """`df[column]` as float64 0/1 labels; raises MetricError on anything else."""
    values = probability_column(df, column, what, id_column)
    bad = (values != 0) & (values != 1)
    if bad.any():
        raise MetricError(f"{what}: {int(bad.sum())} {column!r} value(s) not 0/1: {examples(df[id_column][bad])}")
    return values


def read_csv_table(path: str | Path, what: str) -> pd.DataFrame:
    """A solution or submission CSV (id columns kept as text); an unreadable file is a MetricError naming it."""
    try:
        return pd.read_csv(path, dtype={"ID": str, "row_id": str, "StudyInstanceUID": str})
    except (OSError, ValueError) as exc:
        raise MetricError(f"{path}: cannot read the {what} CSV ({exc})") from None
