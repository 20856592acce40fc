"""Study boxes: box models over slices, and per-slice box predictions -> one box and slice range per study (02 and the submission);
the folder 02_infer_box writes them to (`BoxInference`) and their reader (`study_crops`).

Box stage: per-slice has-box probability + box (mean over folds/seeds) -> one box per study around
all C1-C7 slices and the slice range where the spine starts and ends, in the 3rd place's
study-level table layout `x0 y0 x1 y1 slnum_from slnum_to slnum_max`. Here `slnum_*` are slice
*positions* head -> feet (0-based `slice_index` of read_study / the cache), never file numbers,
and `slnum_max` is the study's slice count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import median_filter
from torch import nn

from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.cervical.configs import StudyBoxRule
from rsna22_utils.cervical.data import WINDOW_INPUT, InputNorm, neighbour_positions
from rsna22_utils.cervical.geometry import box_iou
from rsna22_utils.cervical.stages import INFER_BOX
from rsna22_utils.core.device import autocast
from rsna22_utils.core.outputs import StageOutputs

STUDY_BOX_COLUMNS = ["StudyInstanceUID", *BOX_COLUMNS, "slnum_from", "slnum_to", "slnum_max"]


@dataclass(frozen=True)
class BoxInference(StageOutputs):
    """The folder written by 02_infer_box: per-slice box predictions, one box + slice range per study, and
    (synthetic data) their evaluation; the native crop caches of 05-07 live beside them (`crops.py`)."""

    stage = INFER_BOX
    files = {
        "slice_predictions": "slice_predictions.parquet",
        "study_boxes": "study_boxes.csv",
        "box_eval": "box_eval.csv",  # only when the data holds the synthetic generator's truth
        "metrics": "metrics.json",
    }

    def crop_cache(self, name: str) -> Path:
        """The folder of the native crop cache `name` (`crops.CropSpec.name`)."""
        return Path(self.root) / "crops" / name


def study_crops(work_dir: str | Path) -> tuple[dict[str, tuple], dict[str, tuple[int, int]]]:
    """Each study's box (original pixels) and slice range (first, last) from 02_infer_box."""
    boxes = BoxInference.of(work_dir).read("study_boxes").set_index("StudyInstanceUID")
    crops = {uid: tuple(row[BOX_COLUMNS]) for uid, row in boxes.iterrows()}
    ranges = {uid: (int(row["slnum_from"]), int(row["slnum_to"])) for uid, row in boxes.iterrows()}
    return crops, ranges


def _longest_run(mask: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True, or None."""
    best, start = None, None
    for i, value in enumerate(np.append(mask, False)):
        if value and start is None:
            start = i
        elif not value and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = (start, i - 1)
            start = None
    return best


def study_box_from_slices(
    slice_index: np.ndarray,
    p_box: np.ndarray,
    boxes: np.ndarray,
    threshold: float = 0.5,
    smooth: int = 5,
    quantile: float = 0.05,
) -> dict[str, float]:
    """One study: slice range = longest run of median-filtered p_box >= threshold; box = robust outer box.

    The outer box takes low/high quantiles of the per-slice corners inside the range (not min/max),
    so a single stray slice prediction cannot blow it up.
    """
    order = np.argsort(slice_index)
    slice_index, p_box, boxes = slice_index[order], p_box[order], boxes[order]
    # a median filter removes isolated flips but, unlike a mean, keeps the edges of the run in place
    p_smooth = median_filter(p_box, size=smooth, mode="nearest") if smooth > 1 else p_box
    run = _longest_run(p_smooth >= threshold)
    if run is None:  # no confident slice: fall back to the single most confident one
        peak = int(np.argmax(p_box))
        run = (peak, peak)
    inside = slice(run[0], run[1] + 1)
    weights = p_box[inside]
    chosen = boxes[inside][weights >= min(threshold, weights.max())]
    x0, y0 = np.quantile(chosen[:, 0], quantile), np.quantile(chosen[:, 1], quantile)
    x1, y1 = np.quantile(chosen[:, 2], 1 - quantile), np.quantile(chosen[:, 3], 1 - quantile)
    return {
        "x0": float(x0),
        "y0": float(y0),
        "x1": float(x1),
        "y1": float(y1),
        "slnum_from": int(slice_index[run[0]]),
        "slnum_to": int(slice_index[run[1]]),
        "slnum_max": int(len(slice_index)),
    }


def original_study_box(
    slice_index: np.ndarray,
    p_box: np.ndarray,
    boxes: np.ndarray,
    threshold: float = 0.5,
    range_threshold: float = 0.1,
    window: int = 5,
) -> dict[str, float]:
    """One study by the 3rd place's rule (its scripts/_make_bbox_part2.py).

    Box: min x0, y0 (floored) / max x1, y1 (ceiled) over the slices with p_box > threshold.
    Range: first / last slice where the centred rolling mean of p_box (`window` slices, at least
    window // 2 + 1 of them: 5 and 3 in the original) exceeds `range_threshold`; the whole study
    when none does. A study without a slice above `threshold` had no box in the original; here
    every slice's box counts then, as the whole study does for the range.
    """
    order = np.argsort(slice_index, kind="stable")
    slice_index, p_box, boxes = slice_index[order], np.clip(p_box[order], 0.0, 1.0), np.clip(boxes[order], 0.0, None)
    chosen = p_box > threshold
    if not chosen.any():
        chosen[:] = True
    x0, y0 = np.floor(boxes[chosen, :2].min(0))
    x1, y1 = np.ceil(boxes[chosen, 2:].max(0))
    rolling = pd.Series(p_box).rolling(window, min_periods=window // 2 + 1, center=True).mean().to_numpy()
    inside = np.flatnonzero(rolling > range_threshold)
    first, last = (inside[0], inside[-1]) if len(inside) else (0, len(slice_index) - 1)
    return {
        "x0": float(x0),
        "y0": float(y0),
        "x1": float(x1),
        "y1": float(y1),
        "slnum_from": int(slice_index[first]),
        "slnum_to": int(slice_index[last]),
        "slnum_max": int(len(slice_index)),
    }


def study_box(slice_index: np.ndarray, p_box: np.ndarray, boxes: np.ndarray, rule: StudyBoxRule) -> dict[str, float]:
    """One study's box and slice range by the config's `box_rule` (the one place 02 and the submission decide it)."""
    if rule.box_rule == "original":
        return original_study_box(slice_index, p_box, boxes, rule.has_box_threshold, rule.range_threshold, rule.range_window)
    return study_box_from_slices(slice_index, p_box, boxes, threshold=rule.has_box_threshold, smooth=rule.box_smooth)


def study_boxes(slice_predictions: pd.DataFrame, rule: StudyBoxRule | None = None) -> pd.DataFrame:
    """Per-slice predictions (StudyInstanceUID, slice_index, p_box, x0..y1 in pixels) -> one row per study."""
    rule = rule if rule is not None else StudyBoxRule()
    rows = []
    for uid, group in slice_predictions.groupby("StudyInstanceUID", sort=True):
        result = study_box(group["slice_index"].to_numpy(), group["p_box"].to_numpy(), group[BOX_COLUMNS].to_numpy(float), rule)
        rows.append({"StudyInstanceUID": uid, **result})
    return pd.DataFrame(rows, columns=STUDY_BOX_COLUMNS)


def evaluate_study_boxes(predicted: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Join predicted and true study boxes; adds iou and slice-range errors (|from| and |to|)."""
    merged = predicted.merge(truth, on="StudyInstanceUID", suffixes=("", "_true"), validate="one_to_one")
    merged["iou"] = box_iou(merged[BOX_COLUMNS].to_numpy(), merged[[f"{c}_true" for c in BOX_COLUMNS]].to_numpy())
    merged["from_error"] = (merged["slnum_from"] - merged["slnum_from_true"]).abs()
    merged["to_error"] = (merged["slnum_to"] - merged["slnum_to_true"]).abs()
    return merged


def shared_input_slices(run_configs: dict) -> int:
    """The `box_input_slices` every box run (folder -> its config) was trained with; runs that differ are an error."""
    values = {getattr(run_cfg, "box_input_slices", 1) for run_cfg in run_configs.values()}
    if len(values) > 1:
        listed = ", ".join(f"{run} ({getattr(c, 'box_input_slices', 1)})" for run, c in run_configs.items())
        raise ValueError(f"box runs trained with different box_input_slices, one value is needed to predict them together: {listed}")
    return values.pop() if values else 1


def predict_box_slices(
    models: list[nn.Module],
    batches: Iterable[tuple[np.ndarray, torch.Tensor]],
    n_slices: int,
    device: torch.device,
    amp: bool = True,
    amp_dtype: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Every box model on batches of (slice positions, images in [-1, 1]) -> mean p_box (n,) and box fractions (n, 4)."""
    p_sum, box_sum = np.zeros(n_slices), np.zeros((n_slices, 4))
    with torch.inference_mode(), autocast(device, amp, amp_dtype):
        for index, images in batches:
            images = images.to(device)
            for model in models:
                out = model({"image": images})
                p_sum[index] += torch.sigmoid(out["has_box"].float()).cpu().numpy()
                box_sum[index] += out["box"].float().cpu().numpy()
    return p_sum / len(models), box_sum / len(models)


def box_input_batches(
    volume: np.ndarray, batch_size: int, input_slices: int, norm: InputNorm, device: torch.device
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(slice positions, box-model inputs) of every slice of an encoded study (n, H, W, windows), in batches:
    what `data.images_to_tensor(data.stack_slices(volume, positions, input_slices), device, norm)` gives.

    The stretch is per channel, i.e. per slice and window, so each slice is stretched once (not once per
    image that holds it); the study goes to the device once and each batch's images are gathered there.
    """
    n = volume.shape[0]
    study = torch.from_numpy(np.array(norm.stretch(volume))).to(device)  # np.array: a writable copy
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        block = study[torch.from_numpy(neighbour_positions(index, n, input_slices)).to(device)]  # (b, k, H, W, w)
        b, k, h, w, c = block.shape
        images = block.permute(0, 2, 3, 1, 4).reshape(b, h, w, k * c)  # slice-major channels, as stack_slices
        yield index, norm.normalise(images.permute(0, 3, 1, 2))


def predict_study_box(
    models: list[nn.Module],
    volume: np.ndarray,
    slices: pd.DataFrame,
    device: torch.device,
    batch_size: int,
    rule: StudyBoxRule,
    amp: bool = True,
    input_slices: int = 1,
    norm: InputNorm = WINDOW_INPUT,
    amp_dtype: str = "auto",
) -> dict[str, float]:
    """Box models on every slice of one encoded study (mean) -> its box in original pixels + slice range.

    `input_slices`: the box runs' `box_input_slices` (consecutive slices per input, as in training);
    `norm`: their input intensity (`data.InputNorm`); `amp`, `amp_dtype`: the config's mixed precision.
    """
    n = volume.shape[0]
    p_box, boxes = predict_box_slices(models, box_input_batches(volume, batch_size, input_slices, norm, device), n, device, amp, amp_dtype)
    rows, cols = float(slices["rows"].iloc[0]), float(slices["cols"].iloc[0])
    boxes = boxes * np.array([cols, rows, cols, rows])  # fractions -> original pixels
    return study_box(np.arange(n), p_box, boxes, rule)
