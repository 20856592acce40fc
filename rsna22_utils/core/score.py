"""`python -m rsna22_utils score --competition NAME --submission S.csv --solution L.csv`: the selected competition's metric.

Each competition package has a `metric` module with `score_files(submission, solution) -> float`
(the solution in that competition's format, e.g. `stage_2_train.csv`'s for intracranial).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from rsna22_utils.core.errors import MetricError
from rsna22_utils.core.registry import competition


def score_files(submission: str | Path, solution: str | Path) -> float:
    """The selected competition's score of a submission CSV against a solution CSV."""
    return float(importlib.import_module(competition() + ".metric").score_files(submission, solution))


def _cmd_score(args: argparse.Namespace) -> int:
    try:
        value = score_files(args.submission, args.solution)
    except MetricError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{value:.6f}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `score` to the CLI."""
    p = subparsers.add_parser("score", help="score a submission CSV against a solution CSV with the competition's metric")
    p.add_argument("--submission", type=Path, required=True, help="the submission CSV (the sample submission's format)")
    p.add_argument("--solution", type=Path, required=True, help="the labels CSV (the competition's train-label format)")
    p.set_defaults(func=_cmd_score)
