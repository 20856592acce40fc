"""Per-slice box predictions -> one study box and slice range."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rsna22_utils.cervical.study_box import box_iou, evaluate_study_boxes, study_boxes


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
