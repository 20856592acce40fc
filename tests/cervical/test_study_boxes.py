"""Per-slice box predictions -> one study box and slice range."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rsna22_utils.cervical.configs import StudyBoxRule
from rsna22_utils.cervical.geometry import box_iou
from rsna22_utils.cervical.study_box import evaluate_study_boxes, study_boxes


def _slices(n: int, spine: tuple[int, int], box: tuple[float, float, float, float], rng: np.random.Generator) -> pd.DataFrame:
    index = np.arange(n)
    inside = (index >= spine[0]) & (index <= spine[1])
    p_box = np.where(inside, 0.9, 0.05) + rng.normal(0, 0.03, n)
    boxes = np.array(box) + rng.normal(0, 1.0, (n, 4))
    frame = pd.DataFrame(boxes, columns=["x0", "y0", "x1", "y1"])
    frame.insert(0, "p_box", p_box)
    frame.insert(0, "slice_index", index)
    frame.insert(0, "StudyInstanceUID", "s")
    return frame


def test_study_box_recovers_range_and_box_despite_noise_and_a_stray_slice() -> None:
    rng = np.random.default_rng(0)
    frame = _slices(100, (20, 70), (30, 40, 90, 110), rng)
    frame.loc[90, "p_box"] = 0.99  # an isolated false positive far from the spine
    frame.loc[45, ["x0", "y0", "x1", "y1"]] = [0, 0, 128, 128]  # one wild box inside the range
    result = study_boxes(frame.sample(frac=1.0, random_state=1)).iloc[0]
    assert (result["slnum_from"], result["slnum_to"], result["slnum_max"]) == (20, 70, 100)
    iou = box_iou(result[["x0", "y0", "x1", "y1"]].to_numpy(float)[None], np.array([[30, 40, 90, 110]]))[0]
    assert iou > 0.9


def test_box_iou_and_evaluation() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10]])
    np.testing.assert_allclose(box_iou(a, b), [1.0, 50 / 150])
    pred = pd.DataFrame(
        {"StudyInstanceUID": ["a"], "x0": [0], "y0": [0], "x1": [10], "y1": [10], "slnum_from": [3], "slnum_to": [40], "slnum_max": [50]}
    )
    truth = pred.assign(x1=20, slnum_from=5, slnum_to=40)
    evaluated = evaluate_study_boxes(pred, truth)
    assert evaluated.loc[0, "iou"] == 0.5
    assert (evaluated.loc[0, "from_error"], evaluated.loc[0, "to_error"]) == (2, 0)


def _original_part2(preddf: pd.DataFrame) -> pd.DataFrame:
    """The 3rd place's scripts/_make_bbox_part2.py on per-slice predictions (fractions, each study's slices in order), as written there."""
    bbpreddf = pd.concat(
        [
            preddf.query("has_bbox > 0.5").groupby("uid")[["x0", "y0"]].min(),
            preddf.query("has_bbox > 0.5").groupby("uid")[["x1", "y1"]].max(),
        ],
        axis=1,
    )

    def window_range(g: pd.DataFrame, thresh: float = 0.1, window: int = 5, min_periods: int = 3, center: bool = True) -> list:
        bbseqprobas = g.has_bbox.rolling(window, min_periods=min_periods, center=center).mean()
        if bbseqprobas.max() <= thresh:
            return list(g.slice_numbers.iloc[[0, -1]])
        bb_range = np.where(bbseqprobas > thresh)[0]
        return [g.slice_numbers.iloc[bb_range[0]], g.slice_numbers.iloc[bb_range[-1]]]

    ranges = {uid: window_range(g) for uid, g in preddf.groupby("uid")}
    bbpreddf[["slnum_from", "slnum_to"]] = [ranges[uid] for uid in bbpreddf.index]
    bbpreddf[["x0", "y0"]] = np.floor(bbpreddf[["x0", "y0"]] * 512).astype(int).clip(0, 512)
    bbpreddf[["x1", "y1"]] = np.ceil(bbpreddf[["x1", "y1"]] * 512).astype(int).clip(0, 512)
    return bbpreddf


def test_original_box_rule_matches_the_3rd_places_code() -> None:
    rng = np.random.default_rng(7)
    studies = []
    for s in range(12):
        n = int(rng.integers(20, 120))
        first, last = sorted(rng.integers(0, n, 2))
        position = np.arange(n)
        p = np.where((position >= first) & (position <= last), rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.3, n))
        p[rng.integers(0, n)] = 0.9  # a stray confident slice somewhere
        corners = rng.uniform(0.0, 0.5, (n, 2))
        frame = pd.DataFrame({"uid": f"s{s:02d}", "slice_numbers": position, "has_bbox": p})
        frame[["x0", "y0"]] = corners
        frame[["x1", "y1"]] = corners + rng.uniform(0.1, 0.5, (n, 2))
        studies.append(frame)
    preddf = pd.concat(studies, ignore_index=True)
    expected = _original_part2(preddf)

    ours = preddf.rename(columns={"uid": "StudyInstanceUID", "slice_numbers": "slice_index", "has_bbox": "p_box"})
    ours[["x0", "y0", "x1", "y1"]] *= 512  # our predictions are in original pixels (512 on the real data)
    boxes = study_boxes(ours.sample(frac=1.0, random_state=0), StudyBoxRule(box_rule="original")).set_index("StudyInstanceUID")
    columns = ["x0", "y0", "x1", "y1", "slnum_from", "slnum_to"]
    assert np.array_equal(boxes.loc[expected.index, columns].to_numpy(), expected[columns].to_numpy())


def test_original_box_rule_without_confident_slices_keeps_the_whole_study() -> None:
    frame = pd.DataFrame({"StudyInstanceUID": "s", "slice_index": np.arange(10), "p_box": 0.05})
    frame[["x0", "y0", "x1", "y1"]] = [[10 + i, 20, 30 + i, 40] for i in range(10)]
    row = study_boxes(frame, StudyBoxRule(box_rule="original")).iloc[0]
    assert (row["slnum_from"], row["slnum_to"], row["slnum_max"]) == (0, 9, 10)
    assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (10, 20, 39, 40)
