"""QC figures: each writes a readable image of the expected kind and size, and validates its inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rsna22_utils.cervical.metric import TARGETS
from rsna22_utils.cervical.qc import (
    draw_boxes_grid,
    plot_iou_histogram,
    plot_loss_curves,
    plot_roc_curves,
    study_animation,
)


def _open(path, fmt: str) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    img = Image.open(path)
    assert img.format == fmt
    img.load()
    assert img.width > 50 and img.height > 50
    return img


def _history(n: int, with_extras: bool) -> pd.DataFrame:
    epoch = np.arange(n)
    df = pd.DataFrame({"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "valid_loss": 1.2 / (epoch + 1) + 0.05})
    if with_extras:
        df["lr"] = 1e-3 * np.cos(epoch / n * np.pi / 2)
        df["valid_score"] = 0.6 - 0.02 * epoch
    return df


def test_plot_loss_curves(tmp_path) -> None:
    csv = tmp_path / "run_b.csv"
    _history(5, with_extras=False).to_csv(csv, index=False)
    out = plot_loss_curves({"run_a": _history(8, with_extras=True), "run_b": csv}, tmp_path / "qc" / "loss.png")
    img = _open(out, "PNG")
    assert img.width > img.height  # three panels side by side (loss, lr, metrics)

    with pytest.raises(ValueError, match=r"run 'bad'.*valid_loss"):
        plot_loss_curves({"bad": _history(3, False).drop(columns="valid_loss")}, tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        plot_loss_curves({"gone": tmp_path / "missing.csv"}, tmp_path / "bad.png")


def test_plot_roc_curves_matches_sklearn(tmp_path) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 60
    y = (rng.random((n, 8)) < 0.3).astype(int)
    y[:, TARGETS.index("C1")] = 0  # one class: no curve, AUC NaN
    p = np.clip(0.4 * y + 0.6 * rng.random((n, 8)), 0, 1)
    uids = [f"s{i}" for i in range(n)]
    labels = pd.DataFrame(y, columns=list(TARGETS)).assign(StudyInstanceUID=uids)
    preds = pd.DataFrame(p, columns=list(TARGETS)).assign(StudyInstanceUID=uids)
    aucs = plot_roc_curves(labels, preds, tmp_path / "roc.png")
    _open(tmp_path / "roc.png", "PNG")
    assert list(aucs) == list(TARGETS)
    assert math.isnan(aucs["C1"])
    for j, t in enumerate(TARGETS):
        if t != "C1":
            assert aucs[t] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
    sub = plot_roc_curves(labels, preds, tmp_path / "roc_overall.png", targets=["patient_overall"])
    assert list(sub) == ["patient_overall"]
    with pytest.raises(ValueError, match="subset"):
        plot_roc_curves(labels, preds, tmp_path / "x.png", targets=["C8"])


def test_plot_iou_histogram(tmp_path) -> None:
    rng = np.random.default_rng(0)
    ious = np.concatenate([rng.beta(8, 2, 200), [np.nan, np.nan]])
    _open(plot_iou_histogram(ious, tmp_path / "iou.png", threshold=0.7), "PNG")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_iou_histogram([0.5, 1.2], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no IoU values"):
        plot_iou_histogram([np.nan], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="unsupported image type"):
        plot_iou_histogram([0.5], tmp_path / "bad.bmp")


def _study(n: int = 20, h: int = 48, w: int = 64) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(0)
    volume = (rng.random((n, h, w)) * 80).astype(np.uint8)
    t = np.arange(n)
    preds = pd.DataFrame({f"C{k}_pred": np.exp(-(((t - 2.5 * k) / 2.0) ** 2)) for k in range(1, 8)})
    for k in (2, 5):
        preds[f"C{k}_frac"] = 0.5 * preds[f"C{k}_pred"]
    return volume, preds


def test_study_animation_gif(tmp_path) -> None:
    volume, preds = _study()
    size = 96
    out = study_animation(volume, tmp_path / "study.gif", box=(8, 6, 40, 30), slice_preds=preds, every=3, fps=5, size=size)
    img = _open(out, "GIF")
    assert img.n_frames == len(range(0, len(volume), 3)) == 7
    assert img.height == size
    assert img.width > size * volume.shape[2] / volume.shape[1]  # the slice plus the chart beside it
    assert img.info.get("duration") == 200

    # Without a chart the frame is just the resized slice, and the box is drawn in red on it.
    out = study_animation(np.zeros((4, 48, 64), np.uint8), tmp_path / "plain.gif", box=(8, 6, 40, 30), size=96)
    img = _open(out, "GIF")
    assert img.n_frames == 4 and img.size == (128, 96)
    frame = np.asarray(img.convert("RGB")).astype(int)
    scale = 96 / 48
    edge = frame[int(20 * scale), int(8 * scale) - 1 : int(8 * scale) + 2]  # left edge of the box, mid height
    assert (edge[:, 0] - edge[:, 1] > 100).any()
    assert frame[int(20 * scale), int(24 * scale)].max() < 30  # inside the box: still the black slice


def test_study_animation_png_strip_and_per_slice_boxes(tmp_path) -> None:
    volume, preds = _study()
    boxes = np.tile([8.0, 6.0, 40.0, 30.0], (len(volume), 1))
    boxes[::2] = np.nan  # no box on even slices
    out = study_animation(volume, tmp_path / "study.png", box=boxes, slice_preds=preds, size=96, n_strip=8)
    img = _open(out, "PNG")
    gif = study_animation(volume, tmp_path / "one.gif", slice_preds=preds, size=96, every=len(volume))
    frame_w, frame_h = Image.open(gif).size
    assert img.size == (2 * frame_w, 4 * frame_h)  # 8 frames, two per row


def test_study_animation_validation(tmp_path) -> None:
    volume, preds = _study()
    with pytest.raises(ValueError, match=r"slice_preds has 19 rows for a volume of 20 slices"):
        study_animation(volume, tmp_path / "x.gif", slice_preds=preds.iloc[:19])
    with pytest.raises(ValueError, match="no C1_pred"):
        study_animation(volume, tmp_path / "x.gif", slice_preds=pd.DataFrame({"foo": np.zeros(len(volume))}))
    with pytest.raises(ValueError, match="uint8"):
        study_animation(volume.astype(np.int16), tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"\(slices, rows, cols\)"):
        study_animation(volume[0], tmp_path / "x.gif")
    with pytest.raises(ValueError, match="box must be"):
        study_animation(volume, tmp_path / "x.gif", box=(1, 2, 3))
    with pytest.raises(ValueError, match="unsupported image type"):
        study_animation(volume, tmp_path / "x.mp4")


def test_draw_boxes_grid(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((5, 64, 64)) * 255).astype(np.uint8)
    pred = [[5, 5, 40, 40], [10, 10, 50, 50], [np.nan] * 4, [0, 0, 63, 63], [20, 20, 30, 30]]
    true = [[6, 6, 41, 39], [np.nan] * 4, [1, 1, 5, 5], [0, 0, 60, 60], [21, 19, 30, 31]]
    out = draw_boxes_grid(images, pred, true, tmp_path / "grid.png", titles=[f"slice {i}" for i in range(5)], ncols=3)
    img = _open(out, "PNG")
    assert img.width > img.height  # 3 columns x 2 rows
    _open(draw_boxes_grid(images[:2], pred[:2], None, tmp_path / "pred_only.png"), "PNG")
    with pytest.raises(ValueError, match="4 predicted boxes for 5 images"):
        draw_boxes_grid(images, pred[:4], None, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="2 titles for 5 images"):
        draw_boxes_grid(images, pred, true, tmp_path / "bad.png", titles=["a", "b"])
