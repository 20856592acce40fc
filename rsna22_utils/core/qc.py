"""Quality-control figures every competition draws: loss curves of training runs and ROC curves per target.

Figures are drawn with matplotlib and closed after saving (works under Agg, no display needed). Every
function logs the path it wrote and returns it (or the numbers it plotted).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

_HISTORY_REQUIRED = ("epoch", "train_loss", "valid_loss")


def prepare_path(path: str | Path, suffixes: Sequence[str]) -> Path:
    """`path` as a Path with an accepted image suffix, its folder created."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: unsupported image type {path.suffix!r}; use one of {list(suffixes)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: plt.Figure, path: Path, what: str) -> Path:
    """Save and close `fig`, log what was written where; returns `path`."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    logger.info("wrote %s to %s", what, path)
    return path


def _read_history(name: str, history: pd.DataFrame | str | Path) -> pd.DataFrame:
    """A history table from a DataFrame or a csv / parquet file, with the required columns checked."""
    if isinstance(history, pd.DataFrame):
        df, source = history, f"run {name!r}"
    else:
        source = f"run {name!r} ({history})"
        p = Path(history)
        if not p.is_file():
            raise FileNotFoundError(f"{source}: history file not found")
        df = pd.read_parquet(p) if p.suffix.lower() in (".parquet", ".pq") else pd.read_csv(p)
    missing = [c for c in _HISTORY_REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: history table lacks column(s) {missing}; has {list(df.columns)}")
    return df.sort_values("epoch")


_STYLES = ("-", ":", "-.", "--", (0, (1, 3)), (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def _headline_metrics(history: pd.DataFrame) -> list[str]:
    """Numeric per-epoch metrics worth a line: not timings, not the per-target AUCs (auc_C1 ...; see the ROC figure)."""
    skip = (*_HISTORY_REQUIRED, "lr", "fold", "step", "time", "seconds")
    return [c for c in history.columns if c not in skip and not c.startswith("auc_") and pd.api.types.is_numeric_dtype(history[c])]


def plot_loss_curves(histories: Mapping[str, pd.DataFrame | str | Path], path: str | Path) -> Path:
    """Train (dashed) and valid (solid) loss per epoch for each run, plus lr and metric panels when present.

    History tables: epoch, train_loss, valid_loss, optionally lr and any numeric metric columns
    (plotted in a third panel, one line per run and metric).
    """
    if not histories:
        raise ValueError("plot_loss_curves: no histories given")
    path = prepare_path(path, (".png", ".jpg", ".jpeg"))
    tables = {name: _read_history(name, h) for name, h in histories.items()}
    has_lr = any("lr" in df.columns for df in tables.values())
    metric_cols = {name: _headline_metrics(df) for name, df in tables.items()}
    has_metrics = any(metric_cols.values())
    n_panels = 1 + has_lr + has_metrics
    fig, axes = plt.subplots(1, n_panels, figsize=(6 * n_panels, 4.2), squeeze=False)
    axes = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles: dict[str, str] = {}  # metric -> line style (colours are runs, as in the loss panel)
    for i, (name, df) in enumerate(tables.items()):
        color = colors[i % len(colors)]
        ax = axes[0]
        ax.plot(df["epoch"], df["train_loss"], "--", color=color, label=f"{name} train")
        valid = df.dropna(subset=["valid_loss"])
        ax.plot(valid["epoch"], valid["valid_loss"], "-o", ms=3, color=color, label=f"{name} valid")
        if len(valid):
            best = valid.loc[valid["valid_loss"].idxmin()]
            ax.scatter([best["epoch"]], [best["valid_loss"]], marker="*", s=120, color=color, zorder=3)
        k = 1
        if has_lr:
            if "lr" in df.columns:
                axes[k].plot(df["epoch"], df["lr"], color=color, label=name)
            k += 1
        if has_metrics:
            for col in metric_cols[name]:
                axes[k].plot(df["epoch"], df[col], linestyle=styles.setdefault(col, _STYLES[len(styles) % len(_STYLES)]), color=color)
    axes[0].set(title="loss (dashed train, solid valid, * best valid)", xlabel="epoch", ylabel="loss")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    k = 1
    if has_lr:
        axes[k].set(title="learning rate", xlabel="epoch", ylabel="lr")
        axes[k].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        axes[k].grid(alpha=0.3)
        axes[k].legend(fontsize=8)
        k += 1
    if has_metrics:
        axes[k].set(title="validation metrics (colour = run)", xlabel="epoch")
        axes[k].grid(alpha=0.3)
        axes[k].legend([plt.Line2D([], [], color="k", linestyle=style) for style in styles.values()], list(styles), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, f"loss curves of {len(tables)} run(s)")


def plot_roc(
    labels: pd.DataFrame,
    preds: pd.DataFrame,
    path: str | Path,
    targets: Sequence[str],
    colors: Mapping[str, str] | None = None,
    bold: str = "",
    unit: str = "rows",
) -> dict[str, float]:
    """Overlaid ROC curves of `preds` vs 0/1 `labels` (aligned tables with one column per target); returns AUC per target.

    A target with only one class in the labels gets AUC NaN and no curve (noted in the legend); `bold` is drawn thicker.
    """
    path = prepare_path(path, (".png", ".jpg", ".jpeg"))
    if len(labels) != len(preds):
        raise ValueError(f"plot_roc: {len(labels)} label rows but {len(preds)} prediction rows")
    fig, ax = plt.subplots(figsize=(6.5, 6))
    aucs: dict[str, float] = {}
    for t in targets:
        y, p = labels[t].to_numpy(), preds[t].to_numpy()
        color = (colors or {}).get(t)
        if len(np.unique(y)) < 2:
            aucs[t] = float("nan")
            ax.plot([], [], color=color, label=f"{t}: n/a (one class)")
            continue
        aucs[t] = float(roc_auc_score(y, p))
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color=color, lw=2.5 if t == bold else 1.3, label=f"{t}: AUC {aucs[t]:.3f} (n+={int(y.sum())})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=f"ROC over {len(labels)} {unit}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path, "ROC curves")
    return aucs
