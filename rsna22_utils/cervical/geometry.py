"""Box geometry in pixels, shared by the box stages, the datasets and the crop cache (a leaf: numpy only).

Boxes are (x0, y0, x1, y1); a study box is in the study's original (DICOM) pixels.
"""

from __future__ import annotations

import math

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired boxes (n, 4) x0, y0, x1, y1."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def square_crop(box: tuple[float, float, float, float], rows: int, cols: int, margin: float = 0.0) -> tuple[int, int, int, int]:
    """A study box (native pixels) -> integer square crop (x0, y0, x1, y1): `margin` x its size added on
    each side, the short side padded to the long one around the centre (the 3rd place's "square the
    bbox"), moved inside the image where it sticks out, clipped only where it is larger than the image.
    A degenerate box (under 4 px) keeps the whole slice."""
    bx0, by0, bx1, by1 = (float(v) for v in box)
    w, h = bx1 - bx0, by1 - by0
    if w < 4 or h < 4:
        return 0, 0, int(cols), int(rows)
    side = int(math.ceil(max(w, h) * (1 + 2 * margin)))
    out = []
    for centre, limit in (((bx0 + bx1) / 2, int(cols)), ((by0 + by1) / 2, int(rows))):
        start = int(round(centre - side / 2))
        start = min(max(start, 0), max(limit - side, 0))
        out.append((start, min(start + side, limit)))
    (x0, x1), (y0, y1) = out
    return x0, y0, x1, y1


def crop_box(
    box: tuple[float, float, float, float], scale: tuple[float, float], bounds: tuple[int, int], margin: float
) -> tuple[int, int, int, int]:
    """A study box in original pixels -> integer crop (x0, y0, x1, y1) of an image of `bounds` (width, height) that is
    the original scaled by `scale` (sx, sy): `margin` x the box's size added on each side, clamped to the
    image. A crop under 4 pixels a side (a degenerate box) is the whole image."""
    x0, y0, x1, y1 = box
    sx, sy = scale
    w, h = (x1 - x0) * sx, (y1 - y0) * sy
    cx0, cy0 = x0 * sx - margin * w, y0 * sy - margin * h
    cx1, cy1 = x1 * sx + margin * w, y1 * sy + margin * h
    width, height = bounds
    cx0, cy0 = max(0, int(np.floor(cx0))), max(0, int(np.floor(cy0)))
    cx1, cy1 = min(width, int(np.ceil(cx1))), min(height, int(np.ceil(cy1)))
    if cx1 - cx0 < 4 or cy1 - cy0 < 4:  # degenerate box: keep the whole slice
        return 0, 0, width, height
    return cx0, cy0, cx1, cy1


def crop_box_in_cache(
    box: tuple[float, float, float, float], rows: int, cols: int, size: int, margin: float, square: bool = False
) -> tuple[int, int, int, int]:
    """A study box in original pixels -> integer crop (x0, y0, x1, y1) in cache pixels.

    `square`: the squared box of the native crop cache (`square_crop`: margin, short side padded
    around the centre, moved inside the image), so cache and native crops cover the same anatomy.
    """
    if square:
        box, margin = square_crop(box, rows, cols, margin), 0.0
    return crop_box(box, (size / cols, size / rows), (size, size), margin)
