"""The ICH metric agrees with an independent implementation (sklearn's log_loss per label, weighted) and rejects bad tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import log_loss

from rsna22_utils.core.errors import MetricError
from rsna22_utils.intracranial.labels import LABELS, rows_from_wide, wide_from_rows
from rsna22_utils.intracranial.metric import EPS, score, score_files, weighted_log_loss


def _tables(n_images: int = 40, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    ids = [f"ID_{i:09x}" for i in rng.choice(16**9, n_images, replace=False)]
    labels = pd.DataFrame({"ID": ids, **{label: rng.integers(0, 2, n_images) for label in LABELS}})
    labels["any"] = labels[list(LABELS[1:])].max(axis=1)
    preds = pd.DataFrame({"ID": ids, **{label: rng.uniform(0.02, 0.98, n_images) for label in LABELS}})
    return labels, preds


def test_score_agrees_with_sklearn_log_loss_per_label_weighted():
    labels, preds = _tables()
    weights = {label: (2.0 if label == "any" else 1.0) for label in LABELS}
    expected = sum(weights[k] * log_loss(labels[k], preds[k], labels=[0, 1]) for k in LABELS) / sum(weights.values())
    solution = rows_from_wide(labels)
    submission = rows_from_wide(preds).sample(frac=1.0, random_state=1)  # row order does not matter
    assert score(solution, submission) == pytest.approx(expected, rel=1e-12)


def test_torch_loss_equals_the_score():
    labels, preds = _tables(seed=3)
    logits = torch.logit(torch.tensor(preds[list(LABELS)].to_numpy(), dtype=torch.float64))
    loss = weighted_log_loss(logits, torch.tensor(labels[list(LABELS)].to_numpy(), dtype=torch.float64))
    assert float(loss) == pytest.approx(score(rows_from_wide(labels), rows_from_wide(preds)), rel=1e-9)


def test_predictions_are_clipped_at_1e_15():
    labels, preds = _tables(n_images=1)
    labels.loc[:, list(LABELS)] = 1
    preds.loc[:, list(LABELS)] = 0.0  # certain and wrong on every label
    assert score(rows_from_wide(labels), rows_from_wide(preds)) == pytest.approx(-math.log(EPS))


def test_score_files_and_round_trip(tmp_path):
    labels, preds = _tables()
    rows_from_wide(labels).astype({"Label": int}).to_csv(tmp_path / "solution.csv", index=False)
    rows_from_wide(preds).to_csv(tmp_path / "submission.csv", index=False)
    assert score_files(tmp_path / "submission.csv", tmp_path / "solution.csv") == pytest.approx(
        score(rows_from_wide(labels), rows_from_wide(preds))
    )
    back = wide_from_rows(pd.read_csv(tmp_path / "submission.csv"), "submission")
    np.testing.assert_allclose(back[list(LABELS)].to_numpy(), preds[list(LABELS)].to_numpy())
    with pytest.raises(MetricError, match="cannot read"):
        score_files(tmp_path / "absent.csv", tmp_path / "solution.csv")


def test_bad_tables_are_errors_naming_the_rows():
    labels, preds = _tables(n_images=5)
    solution, submission = rows_from_wide(labels), rows_from_wide(preds)
    with pytest.raises(MetricError, match=r"1 solution ID\(s\) missing from the submission"):
        score(solution, submission.iloc[1:])
    with pytest.raises(MetricError, match=r"not in the solution"):
        score(solution, pd.concat([submission, pd.DataFrame({"ID": ["ID_ffffff_any"], "Label": [0.5]})]))
    with pytest.raises(MetricError, match=r"duplicated ID"):
        score(pd.concat([solution, solution.iloc[:1]]), submission)
    with pytest.raises(MetricError, match=r"outside \[0, 1\]"):
        score(solution, submission.assign(Label=submission["Label"] + 1.0))
    with pytest.raises(MetricError, match=r"not 0/1"):
        score(solution.assign(Label=0.5), submission)
    with pytest.raises(MetricError, match=r"without all 6 label rows"):
        score(solution.iloc[1:], submission.iloc[1:])
    bad = solution.copy()
    bad.loc[0, "ID"] = "ID_abc_fracture"
    with pytest.raises(MetricError, match=r"not 'ID_<image>_<label>'"):
        score(bad, submission.assign(ID=bad["ID"]))


@pytest.mark.parametrize("where", ["before", "after"])
def test_score_command_selects_the_competition(tmp_path, capsys, monkeypatch, where):
    from rsna22_utils import cli
    from rsna22_utils.core import registry

    labels, preds = _tables(seed=5)
    rows_from_wide(labels).astype({"Label": int}).to_csv(tmp_path / "solution.csv", index=False)
    rows_from_wide(preds).to_csv(tmp_path / "submission.csv", index=False)
    files = ["--submission", str(tmp_path / "submission.csv"), "--solution", str(tmp_path / "solution.csv")]
    selection = ["--competition", "intracranial"]
    previous = registry.competition()
    monkeypatch.setenv(registry.COMPETITION_ENV, previous)  # restored after the test, like the selection below
    try:
        argv = [*selection, "score", *files] if where == "before" else ["score", *selection, *files]
        assert cli.main(argv) == 0
    finally:
        registry.select_competition(previous)
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    weights = {label: (2.0 if label == "any" else 1.0) for label in LABELS}
    expected = sum(weights[k] * log_loss(labels[k], preds[k], labels=[0, 1]) for k in LABELS) / sum(weights.values())
    assert printed == pytest.approx(expected, abs=1e-6)


def test_a_nested_command_takes_competition_after_its_name(capsys, monkeypatch):
    import json

    from rsna22_utils import cli
    from rsna22_utils.core import registry

    previous = registry.competition()
    monkeypatch.setenv(registry.COMPETITION_ENV, previous)
    try:
        assert cli.main(["config", "show", "01_train", "--competition", "intracranial", "--profile", "demo", "--json"]) == 0
    finally:
        registry.select_competition(previous)
    (row,) = json.loads(capsys.readouterr().out)
    assert row["stage"] == "01_train" and row["backbone"] == "resnet10t" and row["folds"] == [0, 1, 2]
