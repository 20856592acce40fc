"""The trivial baselines of the demo report: centred box, mean vertebra profile, max-pooled stage-05 fractures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rsna22_utils.cervical import baselines
from rsna22_utils.cervical.anatomy import TARGETS, VERTEBRAE
from rsna22_utils.cervical.study_box import box_iou


def test_centred_box_iou_is_one_for_centred_boxes_and_follows_the_shift() -> None:
    uids = ["a", "b", "c"]
    true = np.array([[30.0, 40, 70, 60], [30, 40, 70, 60], [40, 40, 80, 60]])  # 40 x 20 boxes in 100 x 100 images; c shifted by 10
    box_eval = pd.DataFrame({"StudyInstanceUID": uids, **{f"{c}_true": true[:, i] for i, c in enumerate(["x0", "y0", "x1", "y1"])}})
    slices = pd.DataFrame({"StudyInstanceUID": uids * 2, "rows": 100, "cols": 100})
    iou = baselines.centred_box_iou(box_eval, slices)
    assert list(iou.index) == uids
    assert iou["a"] == pytest.approx(1.0) and iou["b"] == pytest.approx(1.0)
    assert iou["c"] == pytest.approx(box_iou(np.array([[30.0, 40, 70, 60]]), true[2:])[0]) == pytest.approx(30 / 50)


def _ratios(profiles: dict[str, tuple[int, np.ndarray]]) -> pd.DataFrame:
    """vertebra_ratios rows: uid -> (fold, (slices, 7) ratios)."""
    frames = []
    for uid, (fold, values) in profiles.items():
        frame = pd.DataFrame(values, columns=list(VERTEBRAE))
        frame.insert(0, "slice_index", np.arange(len(values)))
        frame.insert(0, "fold", fold)
        frame.insert(0, "StudyInstanceUID", uid)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_mean_profile_error_is_zero_for_identical_studies_and_uses_other_folds_only() -> None:
    rng = np.random.default_rng(0)
    profile = np.repeat(rng.random((baselines.PROFILE_BINS, 7)), 2, axis=0)  # 100 slices, constant within each bin
    same = _ratios({f"s{i}": (i % 2, profile) for i in range(4)})
    assert baselines.mean_profile_error(same) == pytest.approx(0.0, abs=1e-12)

    # fold 0 studies are all 0, fold 1 studies all 1: each fold is predicted from the other, so every error is 1
    split = _ratios({"a": (0, np.zeros((50, 7))), "b": (0, np.zeros((60, 7))), "c": (1, np.ones((50, 7))), "d": (1, np.ones((40, 7)))})
    assert baselines.mean_profile_error(split) == pytest.approx(1.0)


def _oof(rows: dict[str, list[list[float]]], fold: dict[str, int]) -> pd.DataFrame:
    frames = []
    for uid, steps in rows.items():
        frame = pd.DataFrame(np.asarray(steps, float), columns=[f"{v}_frac_pred" for v in VERTEBRAE])
        frame.insert(0, "StudyInstanceUID", uid)
        frame["fold"] = fold[uid]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_max_pooled_fracture_takes_each_vertebras_largest_step() -> None:
    steps = {"a": [[0.1] * 7, [0.2, 0.9, 0.1, 0.1, 0.1, 0.1, 0.3]], "b": [[0.05] * 7]}
    pooled = baselines.max_pooled_fracture(_oof(steps, {"a": 0, "b": 1})).set_index("StudyInstanceUID")
    assert list(pooled.columns) == list(TARGETS)
    np.testing.assert_allclose(pooled.loc["a", list(VERTEBRAE)], [0.2, 0.9, 0.1, 0.1, 0.1, 0.1, 0.3])
    assert pooled.loc["a", "patient_overall"] == pytest.approx(0.9) and pooled.loc["b", "patient_overall"] == pytest.approx(0.05)
    with pytest.raises(KeyError, match="C1_frac_pred"):
        baselines.max_pooled_fracture(pd.DataFrame({"StudyInstanceUID": ["a"]}))


def _labels(n: int, rng: np.random.Generator) -> pd.DataFrame:
    labels = pd.DataFrame((rng.random((n, 7)) < 0.1).astype(int), columns=list(VERTEBRAE))  # about half the studies fractured
    labels.insert(0, "patient_overall", labels.max(axis=1))
    labels.insert(0, "StudyInstanceUID", [f"s{i}" for i in range(n)])
    labels["fold"] = np.arange(n) % 3
    return labels


def test_calibration_across_folds_never_uses_a_studys_own_fold() -> None:
    rng = np.random.default_rng(1)
    labels = _labels(60, rng)
    scores = labels[["StudyInstanceUID"]].copy()
    for target in TARGETS:  # informative but inflated probabilities, as a positively weighted model gives
        scores[target] = np.clip(0.75 + 0.2 * labels[target] + rng.normal(0, 0.05, len(labels)), 0.01, 0.99)
    calibrated = baselines.calibrate_across_folds(scores, labels).set_index("StudyInstanceUID")
    flipped = labels.copy()
    in_fold0 = flipped["fold"] == 0
    flipped.loc[in_fold0, list(TARGETS)] = 1 - flipped.loc[in_fold0, list(TARGETS)]
    again = baselines.calibrate_across_folds(scores, flipped).set_index("StudyInstanceUID")
    fold0 = labels.loc[in_fold0, "StudyInstanceUID"]
    np.testing.assert_allclose(again.loc[fold0].to_numpy(), calibrated.loc[fold0].to_numpy())  # fold 0's own labels play no part
    assert not np.allclose(again.drop(index=fold0).to_numpy(), calibrated.drop(index=fold0).to_numpy())  # the others' fits used them

    result = baselines.max_pooled_baseline(
        _oof(
            {u: [list(scores.loc[i, list(VERTEBRAE)])] for i, u in enumerate(scores.StudyInstanceUID)},
            dict(zip(labels.StudyInstanceUID, labels.fold)),
        ),
        labels,
    )
    assert result["studies"] == 60 and result["auc"]["C1"] > 0.9
    assert result["metric_calibrated"] < result["metric_raw"]  # calibration brings inflated probabilities down to the rates
    with pytest.raises(ValueError, match="at least 2 folds"):
        baselines.calibrate_across_folds(scores, labels.assign(fold=0))


def _images(predictions: list[float]) -> pd.DataFrame:
    """05 OOF rows of one study: one window from slice 0, one 3-slice image per step, C1 fracture outputs as given."""
    rows = pd.DataFrame({"StudyInstanceUID": "a", "start": 0, "step": np.arange(len(predictions))})
    for v in range(1, 8):
        rows[f"C{v}_frac_pred"] = predictions if v == 1 else 0.0
    return rows


def test_drawn_break_auc_scores_the_break_itself_not_where_the_vertebra_lies() -> None:
    extents = {f"C{v}_{end}": value for v in range(1, 8) for end, value in (("from", 12 * (v - 1)), ("to", 12 * (v - 1) + 8))}
    studies = pd.DataFrame([{"StudyInstanceUID": "a", **extents}])  # C1: slices 0-8 (images 0-2), C2: 12-20 ...
    breaks = pd.DataFrame({"StudyInstanceUID": "a", "vertebra": "C1", "slice_index": [3, 4]})  # drawn on C1's image 1
    sees_it = baselines.drawn_break_auc(_images([0.1, 0.9, 0.2, 0.0, 0.0, 0.0]), breaks, studies, slices_per_image=3)
    assert sees_it == {"C1": 1.0, "mean": 1.0}  # no other vertebra has both broken and unbroken images
    # outputs that only know where C1 lies (the same on each of its images) are at chance, though the pseudo-labels reward them
    assert baselines.drawn_break_auc(_images([0.7, 0.7, 0.7, 0.0, 0.0, 0.0]), breaks, studies)["C1"] == pytest.approx(0.5)
    # one slice per step: slice 4 alone is the broken step among C1's slices 0-5 here
    per_slice = baselines.drawn_break_auc(_images([0.0, 0.0, 0.0, 0.9, 0.8, 0.1]), breaks, studies, slices_per_image=1)
    assert per_slice["C1"] == pytest.approx(1.0)
