"""The competition metric: hand-computed values, strict validation, torch loss == score, real prior baseline."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rsna22_utils.cervical.metric import (
    SUBMISSION_ORDER,
    TARGETS,
    CompetitionLoss,
    MetricError,
    competition_loss,
    per_target_auc,
    prior_predictions,
    score,
    score_predictions,
    solution_from_labels,
    submission_from_predictions,
)


def _wide(rows: dict[str, dict[str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"StudyInstanceUID": uid, **values} for uid, values in rows.items()])[["StudyInstanceUID", *TARGETS]]


def _two_studies() -> tuple[pd.DataFrame, pd.DataFrame]:
    labels = _wide(
        {
            "1.2.3": {"patient_overall": 1, "C1": 1, **{f"C{k}": 0 for k in range(2, 8)}},
            "4.5.6": {t: 0 for t in TARGETS},
        }
    )
    preds = _wide(
        {
            "1.2.3": {"patient_overall": 0.8, "C1": 0.5, **{f"C{k}": 0.1 for k in range(2, 8)}},
            "4.5.6": {t: 0.2 for t in TARGETS},
        }
    )
    return labels, preds


def test_hand_computed_two_studies() -> None:
    labels, preds = _two_studies()
    # Study 1.2.3 (fractured at C1): weights patient_overall 14 (positive), C1 2 (positive),
    # C2..C7 1 each (negative) -> sum 14 + 2 + 6 = 22.
    #   losses: -ln 0.8 = 0.22314, -ln 0.5 = 0.69315, C2..C7 -ln(1 - 0.1) = 0.10536 each
    #   study loss = (14 * 0.22314 + 2 * 0.69315 + 6 * 0.10536) / 22 = 5.14247 / 22 = 0.23375
    study1 = (14 * -math.log(0.8) + 2 * -math.log(0.5) + 6 * -math.log(0.9)) / 22
    # Study 4.5.6 (healthy), every prediction 0.2: every row costs -ln 0.8, so the weighted mean is
    # -ln 0.8 = 0.22314 whatever the weights (7 + 7 * 1 = 14).
    study2 = (7 * -math.log(0.8) + 7 * 1 * -math.log(0.8)) / 14
    expected = (study1 + study2) / 2  # = 0.22845, mean over studies
    assert expected == pytest.approx(0.228446, abs=1e-6)
    got = score(solution_from_labels(labels), submission_from_predictions(preds))
    assert got == pytest.approx(expected, rel=1e-12)
    assert score_predictions(labels, preds) == pytest.approx(expected, rel=1e-12)


def test_row_format_and_order() -> None:
    labels, preds = _two_studies()
    sub = submission_from_predictions(preds)
    assert list(sub.columns) == ["row_id", "fractured"]
    assert list(sub["row_id"][:8]) == [f"1.2.3_{t}" for t in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall")]
    assert SUBMISSION_ORDER[-1] == "patient_overall"
    assert sub.set_index("row_id").loc["1.2.3_patient_overall", "fractured"] == 0.8
    sol = solution_from_labels(labels)
    assert set(sol.columns) >= {"row_id", "fractured", "StudyInstanceUID", "prediction_type", "sample_weight"}
    assert sol.set_index("row_id").loc["1.2.3_patient_overall", "sample_weight"] == 14
    assert sol.set_index("row_id").loc["4.5.6_patient_overall", "sample_weight"] == 7
    assert sol.set_index("row_id").loc["1.2.3_C1", "fractured"] == 1
    # Row order does not matter to the score; the optional columns neither.
    shuffled = sub.sample(frac=1.0, random_state=0)
    bare = sol[["row_id", "fractured"]].iloc[::-1]
    assert score(bare, shuffled) == pytest.approx(score(sol, sub), rel=1e-12)


def test_perfect_predictions_score_zero() -> None:
    labels, _ = _two_studies()
    perfect = labels.copy()
    assert score(solution_from_labels(labels), submission_from_predictions(perfect)) < 1e-12


def test_clipping_keeps_confident_mistakes_finite() -> None:
    labels, _ = _two_studies()
    preds = labels.copy()
    preds.loc[0, "C1"] = 0.0  # a fractured C1 predicted 0: clipped to 1e-15
    # Only that row costs: weight 2 of 22 in study 1, -ln(1e-15) = 34.5388; study 2 costs 0.
    expected = (2 * -math.log(1e-15) / 22 + 0.0) / 2
    got = score(solution_from_labels(labels), submission_from_predictions(preds))
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-9)
    # A looser eps caps the cost lower.
    assert score(solution_from_labels(labels), submission_from_predictions(preds), eps=1e-7) == pytest.approx(
        2 * -math.log(1e-7) / 22 / 2, rel=1e-6
    )


def test_validation_errors() -> None:
    labels, preds = _two_studies()
    sol = solution_from_labels(labels)
    sub = submission_from_predictions(preds)

    with pytest.raises(MetricError, match=r"1 solution row_id\(s\) missing.*1\.2\.3_C3"):
        score(sol, sub[sub["row_id"] != "1.2.3_C3"])
    extra = pd.concat([sub, pd.DataFrame({"row_id": ["9.9_C1", "9.9_C2"], "fractured": [0.5, 0.5]})])
    with pytest.raises(MetricError, match=r"2 submission row_id\(s\) not in the solution.*9\.9_C1"):
        score(sol, extra)
    nan = sub.copy()
    nan.loc[3, "fractured"] = np.nan
    with pytest.raises(MetricError, match=r"1 NaN"):
        score(sol, nan)
    out_of_range = sub.copy()
    out_of_range.loc[[1, 2], "fractured"] = [1.5, -0.1]
    with pytest.raises(MetricError, match=r"2 'fractured' value\(s\) outside \[0, 1\]"):
        score(sol, out_of_range)
    with pytest.raises(MetricError, match=r"duplicated row_id"):
        score(sol, pd.concat([sub, sub.iloc[:1]]))
    # A study with only 7 of its 8 rows in the solution (and the submission) cannot be scored.
    short_sol, short_sub = sol[sol["row_id"] != "4.5.6_C7"], sub[sub["row_id"] != "4.5.6_C7"]
    with pytest.raises(MetricError, match=r"1 stud\(y/ies\) without all 8 rows.*4\.5\.6 \(7 rows\)"):
        score(short_sol, short_sub)
    bad_sol, bad_sub = sol.copy(), sub.copy()
    bad_sol.loc[0, "row_id"] = bad_sub.loc[0, "row_id"] = "1.2.3_C8"
    with pytest.raises(MetricError, match=r"1 row_id\(s\) are not '<StudyInstanceUID>_<target>'.*1\.2\.3_C8"):
        score(bad_sol, bad_sub)
    with pytest.raises(MetricError, match=r"missing column"):
        score(sol, sub.rename(columns={"fractured": "prob"}))
    with pytest.raises(MetricError, match=r"not 0/1"):
        solution_from_labels(labels.assign(C2=0.5))


def test_torch_loss_equals_score() -> None:
    rng = np.random.default_rng(0)
    n = 40
    y = (rng.random((n, 8)) < 0.3).astype(np.float64)
    logits = rng.normal(0.0, 2.0, size=(n, 8))
    uids = [f"1.2.{i}" for i in range(n)]
    labels = pd.DataFrame(y, columns=list(TARGETS)).assign(StudyInstanceUID=uids)
    preds = pd.DataFrame(1.0 / (1.0 + np.exp(-logits)), columns=list(TARGETS)).assign(StudyInstanceUID=uids)
    expected = score(solution_from_labels(labels), submission_from_predictions(preds))

    loss64 = competition_loss(torch.tensor(logits), torch.tensor(y))
    assert loss64.ndim == 0
    assert loss64.item() == pytest.approx(expected, rel=1e-10)
    loss32 = CompetitionLoss()(torch.tensor(logits, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert loss32.item() == pytest.approx(expected, rel=1e-5)


def test_torch_loss_is_stable_and_checks_shapes() -> None:
    logits = torch.tensor([[100.0, -100.0] * 4], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0] * 4])
    loss = competition_loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 50  # every row is confidently wrong: ~100 nats each
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match=r"\(batch, 8\)"):
        competition_loss(torch.zeros(2, 7), torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"targets shape"):
        competition_loss(torch.zeros(2, 8), torch.zeros(3, 8))


def test_per_target_auc() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    n = 30
    y = (rng.random((n, 8)) < 0.4).astype(int)
    y[:, TARGETS.index("C3")] = 0  # one class only
    p = np.clip(0.5 * y + 0.5 * rng.random((n, 8)), 0, 1)
    uids = [f"s{i}" for i in range(n)]
    labels = pd.DataFrame(y, columns=list(TARGETS)).assign(StudyInstanceUID=uids)
    preds = pd.DataFrame(p, columns=list(TARGETS)).assign(StudyInstanceUID=uids).iloc[::-1]  # order differs
    aucs = per_target_auc(labels, preds)
    assert list(aucs) == list(TARGETS)
    assert math.isnan(aucs["C3"])
    for j, t in enumerate(TARGETS):
        if t != "C3":
            assert aucs[t] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))


def _straightforward_score(labels: pd.DataFrame, prevalence: dict[str, float]) -> float:
    """Independent plain-python metric: per study, sum w * logloss / sum w over 8 targets; mean of studies."""
    total = 0.0
    for _, row in labels.iterrows():
        num = den = 0.0
        for t in ("patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7"):
            y, p = int(row[t]), prevalence[t]
            w = (14 if y else 7) if t == "patient_overall" else (2 if y else 1)
            num += w * -(math.log(p) if y else math.log(1 - p))
            den += w
        total += num / den
    return total / len(labels)


@pytest.mark.realdata
def test_prior_baseline_on_real_train_csv(rsna_real) -> None:
    labels = pd.read_csv(rsna_real / "csv" / "train.csv")
    assert len(labels) > 1000
    prior = prior_predictions(labels, labels["StudyInstanceUID"])
    prevalence = {t: labels[t].sum() / len(labels) for t in TARGETS}
    assert prior.iloc[0][list(TARGETS)].to_dict() == pytest.approx(prevalence)

    solution = solution_from_labels(labels)
    assert len(solution) == 8 * len(labels)
    baseline = score(solution, submission_from_predictions(prior))
    print(f"prior (train prevalence) baseline on the real train.csv: {baseline:.6f}")
    assert baseline == pytest.approx(_straightforward_score(labels, prevalence), rel=1e-10)

    half = prior.copy()
    half[list(TARGETS)] = 0.5
    constant = score(solution, submission_from_predictions(half))
    assert constant == pytest.approx(math.log(2), rel=1e-12)  # every row costs ln 2
    assert baseline < constant


def test_score_files_reads_the_solution_in_row_or_train_csv_format(tmp_path) -> None:
    from rsna22_utils.cervical.metric import score_files

    labels, preds = _two_studies()
    expected = score_predictions(labels, preds)
    submission_from_predictions(preds).to_csv(tmp_path / "submission.csv", index=False)
    labels.to_csv(tmp_path / "train.csv", index=False)
    solution_from_labels(labels).to_csv(tmp_path / "solution.csv", index=False)
    assert score_files(tmp_path / "submission.csv", tmp_path / "train.csv") == pytest.approx(expected)
    assert score_files(tmp_path / "submission.csv", tmp_path / "solution.csv") == pytest.approx(expected)
    with pytest.raises(MetricError, match="cannot read the solution"):
        score_files(tmp_path / "submission.csv", tmp_path / "absent.csv")
