"""Quality-control figures people look at after each stage: loss curves, ROC, box IoU, study GIFs, box grids.

Figures are drawn with matplotlib and closed after saving (works under Agg, no display needed; the
kit sets MPLBACKEND=Agg) or with numpy/cv2 +
Pillow for the per-slice study animation (the 3rd place's `study.gif`), which renders the
prediction chart once and only draws the moving cursor per frame, so a 500-slice study takes
seconds. Every function logs the path it wrote and returns it (or the numbers it plotted).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from rsna22_utils.cervical.metric import TARGETS, align_predictions
from rsna22_utils.core.qc import plot_loss_curves, plot_roc, prepare_path, save_figure

logger = logging.getLogger(__name__)

_PRED_COLUMN = re.compile(r"^C([1-7])_pred$")
_FRAC_COLUMN = re.compile(r"^C([1-7])_frac$")
_VERTEBRA_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def plot_roc_curves(
    labels_df: pd.DataFrame,
    pred_df: pd.DataFrame,
    path: str | Path,
    targets: Sequence[str] = TARGETS,
) -> dict[str, float]:
    """Overlaid ROC curves of wide predictions vs labels (StudyInstanceUID + TARGETS); returns AUC per target.

    A target with only one class in the labels gets AUC NaN and no curve (noted in the legend).
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"plot_roc_curves: targets must be a non-empty subset of {list(TARGETS)}, got {list(targets)}")
    path = prepare_path(path, (".png", ".jpg", ".jpeg"))
    labels, preds = align_predictions(labels_df, pred_df)
    colors = {t: "black" if t == "patient_overall" else _VERTEBRA_COLORS[int(t[1]) - 1] for t in targets}
    return plot_roc(labels, preds, path, targets, colors, bold="patient_overall", unit="studies")


def plot_iou_histogram(ious: Sequence[float] | np.ndarray, path: str | Path, threshold: float = 0.7) -> Path:
    """Histogram of box IoUs in [0, 1] with the median and `threshold` marked (NaNs, e.g. empty slices, are dropped)."""
    path = prepare_path(path, (".png", ".jpg", ".jpeg"))
    values = np.asarray(ious, dtype=np.float64).reshape(-1)
    n_nan = int(np.isnan(values).sum())
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError(f"plot_iou_histogram: no IoU values to plot ({n_nan} NaN)")
    if (values < 0).any() or (values > 1).any() or not np.isfinite(values).all():
        raise ValueError(f"plot_iou_histogram: IoUs must lie in [0, 1]; got min {values.min()}, max {values.max()}")
    median = float(np.median(values))
    above = float((values >= threshold).mean())
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.hist(values, bins=np.linspace(0, 1, 41), color="#4c72b0", edgecolor="white")
    ax.axvline(median, color="red", lw=2, label=f"median {median:.3f}")
    ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"IoU >= {threshold:g}: {above:.1%}")
    title = f"box IoU, n={values.size}" + (f" ({n_nan} NaN dropped)" if n_nan else "")
    ax.set(xlim=(0, 1), xlabel="IoU", ylabel="count", title=title)
    ax.legend(loc="upper left")
    return save_figure(fig, path, f"IoU histogram (median {median:.3f})")


def _slice_boxes(box, n_slices: int) -> np.ndarray | None:
    """Box argument -> (S, 4) float array (NaN rows = no box), or None."""
    if box is None:
        return None
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape == (4,):
        return np.tile(arr, (n_slices, 1))
    if arr.shape == (n_slices, 4):
        return arr
    raise ValueError(f"study_animation: box must be (x0, y0, x1, y1) or one box per slice ({n_slices}, 4), got shape {arr.shape}")


def _chart_columns(slice_preds: pd.DataFrame) -> tuple[dict[int, str], dict[int, str]]:
    pred = {int(m.group(1)): c for c in slice_preds.columns if (m := _PRED_COLUMN.match(str(c)))}
    frac = {int(m.group(1)): c for c in slice_preds.columns if (m := _FRAC_COLUMN.match(str(c)))}
    if not pred and not frac:
        raise ValueError(
            f"study_animation: slice_preds has no C1_pred..C7_pred / C1_frac..C7_frac columns; has {list(slice_preds.columns)}"
        )
    return pred, frac


def _render_chart(slice_preds: pd.DataFrame, n_slices: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-slice prediction chart as an RGB array, and the pixel column of each slice index (for the cursor)."""
    pred, frac = _chart_columns(slice_preds)
    dpi = 100 * height / 384  # the same layout at every size: fonts scale with the frame height
    fig, ax = plt.subplots(figsize=(width / dpi, height / dpi), dpi=dpi)
    x = np.arange(n_slices)
    for k in range(1, 8):
        color = _VERTEBRA_COLORS[k - 1]
        if k in pred:
            ax.plot(x, slice_preds[pred[k]].to_numpy(dtype=np.float64), color=color, lw=1.4, label=f"C{k}")
        if k in frac:
            ax.plot(
                x, slice_preds[frac[k]].to_numpy(dtype=np.float64), "--", color=color, lw=1.4, label=f"C{k} frac" if k not in pred else None
            )
    ax.set_xlim(-1, n_slices)
    ax.set_ylim(-0.02, 1.02)
    kinds = ", ".join(s for s, d in (("solid = vertebra", pred), ("dashed = fracture", frac)) if d)
    ax.set_xlabel(f"slice, head -> feet ({kinds})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=7, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    chart = np.ascontiguousarray(rgba[..., :3])
    # display coordinates have y up from the bottom; the array has rows down from the top.
    xs_px = ax.transData.transform(np.stack([x, np.zeros(n_slices)], axis=1))[:, 0]
    y0_px, y1_px = ax.transData.transform([[0, -0.02], [0, 1.02]])[:, 1]
    plt.close(fig)
    h = chart.shape[0]
    cursor = np.clip(np.round(xs_px).astype(int), 0, chart.shape[1] - 1)
    rows = (int(np.clip(h - y1_px, 0, h - 1)), int(np.clip(h - y0_px, 0, h - 1)))
    return chart, np.concatenate([cursor[:, None], np.tile(np.array(rows)[None], (n_slices, 1))], axis=1)


def _frames(volume, boxes, chart, cursor, indices, size) -> list[np.ndarray]:
    import cv2

    n, h, w = volume.shape
    scale = size / h
    out_w = max(1, int(round(w * scale)))
    frames = []
    for i in indices:
        img = cv2.resize(volume[i], (out_w, size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        if boxes is not None and np.isfinite(boxes[i]).all():
            x0, y0, x1, y1 = (boxes[i] * scale).round().astype(int)
            cv2.rectangle(img, (x0, y0), (x1, y1), (255, 40, 40), 2)
        cv2.putText(img, f"{i + 1}/{n}", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 0), 1, cv2.LINE_AA)
        if chart is not None:
            panel = chart.copy()
            cx, r0, r1 = cursor[i]
            panel[r0 : r1 + 1, max(cx - 1, 0) : cx + 1] = (0, 0, 0)
            img = np.concatenate([img, panel], axis=1)
        frames.append(img)
    return frames


def study_animation(
    volume: np.ndarray,
    path: str | Path,
    box: Sequence[float] | np.ndarray | None = None,
    slice_preds: pd.DataFrame | None = None,
    every: int = 1,
    fps: int = 8,
    size: int = 384,
    n_strip: int = 8,
) -> Path:
    """The 3rd place's `study.gif`: each slice with its box, beside a per-slice prediction chart with a cursor.

    volume: (S, H, W) uint8, head -> feet. box: (x0, y0, x1, y1) in volume pixels, or one per slice
    as an (S, 4) array with NaN rows for slices without a box. slice_preds: one row per slice
    (aligned with `volume`) with columns C1_pred..C7_pred (solid lines) and/or C1_frac..C7_frac
    (dashed). `.gif` -> animated GIF of every `every`-th slice at `fps`; `.png` -> a grid of
    `n_strip` evenly spaced frames (two per row). Frames are `size` pixels high.
    """
    from PIL import Image

    path = prepare_path(path, (".gif", ".png"))
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.shape[0] == 0:
        raise ValueError(f"study_animation: volume must be (slices, rows, cols), got shape {volume.shape}")
    if volume.dtype != np.uint8:
        raise ValueError(f"study_animation: volume must be uint8 (a windowed volume), got {volume.dtype}")
    if every < 1 or fps < 1 or size < 16 or n_strip < 1:
        raise ValueError(f"study_animation: every, fps, n_strip must be >= 1 and size >= 16 (got {every}, {fps}, {n_strip}, {size})")
    n = volume.shape[0]
    boxes = _slice_boxes(box, n)
    chart = cursor = None
    if slice_preds is not None:
        if len(slice_preds) != n:
            raise ValueError(f"study_animation: slice_preds has {len(slice_preds)} rows for a volume of {n} slices")
        out_w = int(round(volume.shape[2] * size / volume.shape[1]))
        chart, cursor = _render_chart(slice_preds.reset_index(drop=True), n, size, max(int(1.5 * out_w), 320))

    if path.suffix.lower() == ".gif":
        indices = list(range(0, n, every))
        frames = _frames(volume, boxes, chart, cursor, indices, size)
        # One shared palette (from a few frames stacked) is much faster than quantizing every frame.
        sample = np.concatenate([frames[k] for k in sorted({0, len(frames) // 2, len(frames) - 1})], axis=0)
        palette = Image.fromarray(sample).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0, optimize=False, disposal=1)
        logger.info("wrote study animation (%d frames) to %s", len(images), path)
    else:
        indices = sorted(set(np.linspace(0, n - 1, min(n_strip, n)).round().astype(int).tolist()))
        frames = _frames(volume, boxes, chart, cursor, indices, size)
        ncols = min(2, len(frames))
        nrows = -(-len(frames) // ncols)
        fh, fw = frames[0].shape[:2]
        grid = np.full((nrows * fh, ncols * fw, 3), 255, dtype=np.uint8)
        for k, f in enumerate(frames):
            r, c = divmod(k, ncols)
            grid[r * fh : (r + 1) * fh, c * fw : (c + 1) * fw] = f
        Image.fromarray(grid).save(path)
        logger.info("wrote study strip (%d frames) to %s", len(frames), path)
    return path


def draw_boxes_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    boxes_pred: Sequence | np.ndarray,
    boxes_true: Sequence | np.ndarray | None,
    path: str | Path,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
) -> Path:
    """A grid of slices with predicted (red) and, when given, true (green) boxes (x0, y0, x1, y1); NaN box = none."""
    from matplotlib.patches import Rectangle

    path = prepare_path(path, (".png", ".jpg", ".jpeg"))
    n = len(images)
    if n == 0:
        raise ValueError("draw_boxes_grid: no images")
    pred = np.asarray(boxes_pred, dtype=np.float64).reshape(-1, 4) if len(boxes_pred) else np.empty((0, 4))
    if len(pred) != n:
        raise ValueError(f"draw_boxes_grid: {len(pred)} predicted boxes for {n} images")
    true = None
    if boxes_true is not None:
        true = np.asarray(boxes_true, dtype=np.float64).reshape(-1, 4)
        if len(true) != n:
            raise ValueError(f"draw_boxes_grid: {len(true)} true boxes for {n} images")
    if titles is not None and len(titles) != n:
        raise ValueError(f"draw_boxes_grid: {len(titles)} titles for {n} images")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        img = np.asarray(images[k])
        if img.ndim == 3 and img.shape[-1] not in (3, 4):
            img = img[..., 0] if img.shape[-1] < img.shape[0] else img[0]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        for boxes, color in ((true, "lime"), (pred, "red")):
            if boxes is not None and np.isfinite(boxes[k]).all():
                x0, y0, x1, y1 = boxes[k]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=1.5))
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=8)
    legend = "red = predicted" + (", green = true" if true is not None else "")
    fig.suptitle(legend, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, f"box grid of {n} image(s)")


def show_training_run(session: Any) -> None:
    """What a training stage's notebook shows after its run: the config the run saved and its loss curves."""
    from IPython.display import Image, display

    display(session.saved_config)
    out = session.out_dir
    display(Image(plot_loss_curves({out.name: out / "history.csv"}, out / "loss.png")))
