"""Training labels derived from the segmentations, and the cross-validation folds.

The 3rd-place pipeline learns two things from the 87 segmented studies:
- the box model: per slice, the outer box around the seven cervical vertebrae (`slice_boxes`);
- the slice vertebra model: per slice and vertebra, how much of that vertebra the slice shows,
  as a fraction of its largest cross-section in the study (`vertebra_ratios`).
`build_segmentation_labels` computes both for every segmented train study and writes them as
parquet tables keyed by (StudyInstanceUID, slice_number, slice_index) with the study's fold.
`fracture_slice_labels` turns 04's per-slice vertebra predictions into slice fracture labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna22_utils.cervical.anatomy import BOX_COLUMNS, CERVICAL, VERTEBRAE
from rsna22_utils.cervical.segmentation import load_segmentation, study_uid_from_path
from rsna22_utils.core.dicom import read_slice_headers
from rsna22_utils.core.files import atomic_write, write_failures
from rsna22_utils.core.pool import run_tasks

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------- labels of one study


def _slice_keys(seg: np.ndarray, study_uid: str | None, slice_numbers: Iterable[int] | None) -> pd.DataFrame:
    """StudyInstanceUID, slice_index (0-based, head -> feet) and slice_number for each slice of `seg`."""
    if seg.ndim != 3:
        raise ValueError(f"study {study_uid}: expected a (slices, rows, cols) label volume, got shape {seg.shape}")
    n = seg.shape[0]
    if slice_numbers is None:
        numbers = np.arange(1, n + 1, dtype=np.int64)
    else:
        numbers = np.asarray(list(slice_numbers), dtype=np.int64)
        if len(numbers) != n:
            raise ValueError(f"study {study_uid}: {len(numbers)} slice numbers for a volume of {n} slices")
    return pd.DataFrame(
        {
            "StudyInstanceUID": pd.Series([study_uid] * n, dtype=object),
            "slice_number": numbers,
            "slice_index": np.arange(n, dtype=np.int64),
        }
    )


def slice_boxes(
    seg: np.ndarray,
    study_uid: str | None = None,
    slice_numbers: Iterable[int] | None = None,
    labels: Iterable[int] = range(1, 8),
) -> pd.DataFrame:
    """One row per slice: the outer box of all `labels` (C1..C7) in that slice, for the box model.

    Columns: StudyInstanceUID, slice_number, slice_index, x0, y0, x1, y1, has_box. Pixel
    coordinates of `seg` (x = column, y = row), x1/y1 exclusive (width = x1 - x0). Slices with
    none of the labels get NaN coordinates and has_box 0. `slice_numbers` are the study table's
    file numbers in volume order; without them slice_number is the position from 1.
    (The 3rd place stored the last pixel, x1 - 1, and the image centre for empty slices.)
    """
    keys = _slice_keys(seg, study_uid, slice_numbers)
    lut = np.zeros(max(256, int(seg.max(initial=0)) + 1), dtype=bool)
    lut[list(labels)] = True
    mask = lut[seg]
    rows_hit = mask.any(axis=2)  # (slices, rows)
    cols_hit = mask.any(axis=1)  # (slices, cols)
    has_box = rows_hit.any(axis=1)
    n_rows, n_cols = seg.shape[1], seg.shape[2]
    y0 = rows_hit.argmax(axis=1).astype(np.float64)
    y1 = (n_rows - rows_hit[:, ::-1].argmax(axis=1)).astype(np.float64)
    x0 = cols_hit.argmax(axis=1).astype(np.float64)
    x1 = (n_cols - cols_hit[:, ::-1].argmax(axis=1)).astype(np.float64)
    for coord in (x0, y0, x1, y1):
        coord[~has_box] = np.nan
    keys["x0"], keys["y0"], keys["x1"], keys["y1"] = x0, y0, x1, y1
    keys["has_box"] = has_box.astype(np.int64)
    return keys


def vertebra_ratios(
    seg: np.ndarray,
    study_uid: str | None = None,
    slice_numbers: Iterable[int] | None = None,
    labels: Sequence[int] = CERVICAL,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per slice and vertebra: its pixels in the slice / its most pixels in any slice of the study.

    Columns: StudyInstanceUID, slice_number, slice_index, then one column per label (C1..C7 by
    default, or `names`), in [0, 1]; 1 on the slice(s) with the vertebra's largest
    cross-section, 0 for a vertebra absent from the study. This is the 3rd place's target for
    the slice vertebra model.
    """
    labels = list(labels)
    names = list(names) if names is not None else [f"C{k}" for k in labels]
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names for {len(labels)} labels")
    keys = _slice_keys(seg, study_uid, slice_numbers)
    size = max(256, int(seg.max(initial=0)) + 1)
    counts = np.stack([np.bincount(s.ravel(), minlength=size) for s in seg]) if len(seg) else np.zeros((0, size))
    counts = counts[:, labels].astype(np.float64)
    peak = counts.max(axis=0, initial=0)
    ratios = np.divide(counts, peak, out=np.zeros_like(counts), where=peak > 0)
    for name, column in zip(names, ratios.T):
        keys[name] = column
    return keys


def fracture_slice_labels(
    vertebra_pred: np.ndarray, study_fractured: Sequence[float], peak_floor: float = 0.25, rescale: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice vertebra predictions (slices, 7) + a study's C1..C7 labels -> (vertebra, fracture) slice labels.

    Predictions are clipped to [0, 1]. The ratio labels the vertebra model learns peak at 1 in
    every study by construction, but an under-trained model's outputs peak lower (0.3-0.5 in a
    short CPU run), which would make the fracture targets faint. With `rescale` each column is
    therefore rescaled so its peak is 1, unless its peak is below `peak_floor` (the vertebra is
    probably not in the scan: left as it is); without it (the 3rd place) they stay as predicted.
    Fracture labels are the (rescaled) predictions times the study's label of that vertebra (the
    3rd place's approximate slice-level fracture labels).
    """
    pred = np.nan_to_num(np.asarray(vertebra_pred, dtype=np.float64), nan=0.0).clip(0.0, 1.0)
    vertebra = pred
    if rescale:
        peak = pred.max(axis=0, initial=0.0)
        vertebra = pred * np.where(peak >= peak_floor, 1.0 / np.maximum(peak, 1e-12), 1.0)[None, :]
    fracture = vertebra * np.asarray(study_fractured, dtype=np.float64)[None, :]
    return vertebra.astype(np.float32), fracture.astype(np.float32)


def study_box(boxes: pd.DataFrame) -> dict:
    """Outer box over a study's slice boxes, and the first/last slice that has a box.

    Returns x0, y0, x1, y1 (x1/y1 exclusive), first_slice_index, last_slice_index,
    first_slice_number, last_slice_number and n_slices_with_box; coordinates and slices are None
    when no slice has a box. `boxes` is one study's `slice_boxes` table.
    """
    if "StudyInstanceUID" in boxes and boxes["StudyInstanceUID"].nunique() > 1:
        raise ValueError(f"study_box expects one study, got {boxes['StudyInstanceUID'].nunique()}")
    hit = boxes[boxes["has_box"] == 1]
    if hit.empty:
        return {
            **{c: None for c in BOX_COLUMNS},
            "first_slice_index": None,
            "last_slice_index": None,
            "first_slice_number": None,
            "last_slice_number": None,
            "n_slices_with_box": 0,
        }
    first = hit.loc[hit["slice_index"].idxmin()]
    last = hit.loc[hit["slice_index"].idxmax()]
    return {
        "x0": int(hit["x0"].min()),
        "y0": int(hit["y0"].min()),
        "x1": int(hit["x1"].max()),
        "y1": int(hit["y1"].max()),
        "first_slice_index": int(first["slice_index"]),
        "last_slice_index": int(last["slice_index"]),
        "first_slice_number": int(first["slice_number"]),
        "last_slice_number": int(last["slice_number"]),
        "n_slices_with_box": int(len(hit)),
    }


# ----------------------------------------------------------------------------------------- folds


def _read_fold_file(fold_file: Path) -> pd.DataFrame:
    table = pd.read_parquet(fold_file) if fold_file.suffix == ".parquet" else pd.read_csv(fold_file)
    if "StudyInstanceUID" not in table.columns and "cube_id" in table.columns:
        table = table.rename(columns={"cube_id": "StudyInstanceUID"})
    missing = {"StudyInstanceUID", "fold"} - set(table.columns)
    if missing:
        raise ValueError(f"{fold_file}: fold file lacks column(s) {sorted(missing)} (has {list(table.columns)})")
    duplicated = table["StudyInstanceUID"][table["StudyInstanceUID"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{fold_file}: {len(duplicated)} studies listed twice, e.g. {list(duplicated[:5])}")
    return table[["StudyInstanceUID", "fold"]]


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds (so a message shows nan, not np.float64(nan))."""
    return value.item() if isinstance(value, np.generic) else value


def check_study_labels(train_df: pd.DataFrame, source: str | Path) -> None:
    """Every label of train.csv is 0 or 1: a NaN or any other value is an error naming the rows
    (as CSV line numbers) and values, before folds or training silently work around it."""
    columns = [c for c in ("patient_overall", *VERTEBRAE) if c in train_df.columns]
    missing = sorted({"StudyInstanceUID", "patient_overall", *VERTEBRAE} - set(train_df.columns))
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing} (has {list(train_df.columns)})")
    values = train_df[columns].apply(pd.to_numeric, errors="coerce")
    bad = ~values.isin([0, 1])
    rows = np.flatnonzero(bad.any(axis=1).to_numpy())
    if len(rows):
        shown = []
        for row in rows[:10]:
            cells = ", ".join(f"{c}={_plain(train_df[c].iat[row])!r}" for c in columns if bad.iat[row, columns.index(c)])
            shown.append(f"line {row + 2} ({train_df['StudyInstanceUID'].iat[row]}): {cells}")
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        raise ValueError(f"{source}: {len(rows)} rows have labels that are not 0 or 1: " + "; ".join(shown) + more)


def _stratification_targets(train_df: pd.DataFrame, n_folds: int) -> np.ndarray:
    """0/1 columns every fold should hold its share of: each label, and each number of fractured
    vertebrae (counts held by fewer than n_folds studies merged upward)."""
    vertebrae = [c for c in VERTEBRAE if c in train_df.columns]
    columns = ["patient_overall", *vertebrae] if "patient_overall" in train_df.columns else vertebrae
    labels = train_df[columns].to_numpy(dtype=np.float64)
    if not vertebrae:
        return labels
    n_frac = train_df[vertebrae].sum(axis=1).to_numpy(dtype=np.int64)
    cap = max(c for c in range(int(n_frac.max(initial=0)) + 1) if (n_frac >= c).sum() >= n_folds or c == 0)
    counts = np.eye(cap + 1)[np.minimum(n_frac, cap)]
    return np.concatenate([labels, counts], axis=1)


def _balanced_folds(targets: np.ndarray, n_folds: int, seed: int, swaps_per_study: int = 20) -> np.ndarray:
    """Equal-size folds whose per-target positive counts are as even as swaps can make them.

    Starts from a random split of equal sizes, then tries random swaps of two studies in different
    folds and keeps those that lower the squared distance of every fold's target counts to their
    share. Plain StratifiedKFold can stratify on one key only, which left the per-vertebra
    positives of the real train.csv up to 23 apart between folds; this keeps them within 1-2.
    """
    rng = np.random.default_rng(seed)
    n = len(targets)
    fold = rng.permutation(n) % n_folds
    share = targets.sum(axis=0) / n_folds
    excess = np.stack([targets[fold == f].sum(axis=0) for f in range(n_folds)]) - share
    n_swaps = max(20_000, swaps_per_study * n)
    for i, j in zip(rng.integers(0, n, n_swaps), rng.integers(0, n, n_swaps)):
        fi, fj = fold[i], fold[j]
        if fi == fj:
            continue
        moved = targets[j] - targets[i]  # what fold fi gains (and fj loses) by the swap
        if not moved.any():
            continue
        a, b = excess[fi], excess[fj]
        if ((a + moved) ** 2 - a**2 + (b - moved) ** 2 - b**2).sum() < 0:
            excess[fi] += moved
            excess[fj] -= moved
            fold[i], fold[j] = fj, fi
    return fold.astype(np.int64)


def drop_studies(train_df: pd.DataFrame, uids: Iterable[str]) -> pd.DataFrame:
    """`train_df` without the studies `uids` (the 3rd place left out two whose labels it did not trust).

    One log line names the studies dropped; a listed study that `train_df` lacks is a warning.
    """
    uids = list(dict.fromkeys(uids))
    if not uids:
        return train_df
    known = set(train_df["StudyInstanceUID"])
    unknown = [uid for uid in uids if uid not in known]
    if unknown:
        logger.warning("drop_studies: %d listed studies are not in train.csv: %s", len(unknown), ", ".join(unknown))
    dropped = [uid for uid in uids if uid in known]
    if dropped:
        logger.info("drop_studies: %d studies left out of the folds and labels: %s", len(dropped), ", ".join(dropped))
    return train_df[~train_df["StudyInstanceUID"].isin(dropped)].reset_index(drop=True)


def make_folds(
    train_df: pd.DataFrame,
    n_folds: int = 5,
    seed: int = 42,
    fold_file: str | Path | None = None,
) -> pd.DataFrame:
    """`train_df` with a `fold` column (0..n_folds-1), in `train_df`'s row order.

    With a `fold_file` (the 3rd place's split is `train_folded_v01.csv`: train.csv's columns
    + fold; a `cube_id` column is accepted for the study id) its folds are used, and every study
    of `train_df` must be in it (the error lists the missing ones); a fold file that does not exist
    is an error, not a quiet fall-back to another split. Without one a stratified split
    is made (equal sizes; every target's positives and every number of fractured vertebrae
    spread evenly over the folds, see `_balanced_folds`) and it is the caller's job to save it,
    so later stages reuse the same split.
    """
    if "StudyInstanceUID" not in train_df.columns:
        raise ValueError(f"make_folds needs a StudyInstanceUID column, got {list(train_df.columns)}")
    if train_df["StudyInstanceUID"].duplicated().any():
        raise ValueError("make_folds: train_df lists some StudyInstanceUIDs twice")
    out = train_df.drop(columns=["fold"], errors="ignore").reset_index(drop=True)

    if fold_file is not None and Path(fold_file).is_file():
        fold_file = Path(fold_file)
        folds = _read_fold_file(fold_file).set_index("StudyInstanceUID")["fold"]
        missing = sorted(set(out["StudyInstanceUID"]) - set(folds.index))
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"{fold_file}: {len(missing)} of {len(out)} studies have no fold: {shown}")
        out["fold"] = folds.loc[out["StudyInstanceUID"]].to_numpy().astype(np.int64)
        found = out["fold"].nunique()
        if found != n_folds:
            logger.warning("%s: the fold file has %d folds (n_folds=%d ignored)", fold_file, found, n_folds)
        logger.info("folds for %d studies read from %s", len(out), fold_file)
        return out
    if fold_file is not None:
        raise FileNotFoundError(f"fold_file {fold_file}: no such file (leave fold_file empty for a stratified split)")

    if len(out) < n_folds:
        raise ValueError(f"make_folds: {len(out)} studies cannot fill {n_folds} folds")
    fold = _balanced_folds(_stratification_targets(out, n_folds), n_folds, seed)
    out["fold"] = fold
    logger.info("made a stratified %d-fold split of %d studies (seed %d)", n_folds, len(out), seed)
    return out


# ------------------------------------------------------------------------ segmentation labels


@dataclass(frozen=True)
class LabelFailure:
    """A segmented study whose labels could not be built."""

    study: str
    file: str
    reason: str


def _study_labels(uid: str, nifti_path: Path, study_dir: Path, table: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    if table is None:
        table = read_slice_headers(study_dir)
    elif table.empty:
        raise ValueError(f"{study_dir}: not in the scan's slice table (the scan could not read it)")
    table = table.reset_index(drop=True)
    seg = load_segmentation(nifti_path, table)
    numbers = table["slice_number"].to_numpy()
    return slice_boxes(seg, uid, numbers), vertebra_ratios(seg, uid, numbers)


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


def build_segmentation_labels(
    data_dir: str | Path,
    out_dir: str | Path,
    folds_df: pd.DataFrame | None = None,
    workers: int | None = None,
    slices: pd.DataFrame | None = None,
    drop: Iterable[str] = (),
) -> dict[str, Path]:
    """Slice boxes and vertebra ratios for every segmented train study -> parquet files in `out_dir`.

    Reads `segmentations/<uid>.nii` for every uid with a `train_images/<uid>` folder, aligns it
    to the study by z (`load_segmentation` with the study's `read_slice_headers` table) and
    writes `slice_boxes.parquet` and `vertebra_ratios.parquet`, both keyed by StudyInstanceUID,
    slice_number, slice_index (0-based head -> feet) with the study's `fold` from `folds_df`
    (-1 when `folds_df` is None or lacks the study). A study that fails is logged with its file
    and reason, listed in `segmentation_labels.failures.csv`, and skipped. `slices` (the scan's
    table, keyed by folder name) aligns each study to the scan's slices instead of reading its headers again.
    Studies in `drop` (`drop_studies` of 00_prepare) get no labels.
    Returns {"slice_boxes": path, "vertebra_ratios": path} (+ "failures" when any failed).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    jobs = _segmented_studies(data_dir, set(drop))
    folds: dict[str, int] = {}
    if folds_df is not None:
        folds = dict(zip(folds_df["StudyInstanceUID"], folds_df["fold"].astype(int)))
        unfolded = [uid for uid, _, _ in jobs if uid not in folds]
        if unfolded:
            logger.warning("%d segmented studies have no fold (fold -1), e.g. %s", len(unfolded), unfolded[:3])
    if slices is not None:
        by_study = dict(iter(slices.groupby("StudyInstanceUID", sort=False)))
        jobs = [(*job, by_study.get(job[0], slices.iloc[:0])) for job in jobs]

    results: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    failures: list[LabelFailure] = []
    # workers that die with the parent; a dead one fails only its study
    tasks = run_tasks(
        _study_labels, jobs, workers or min(4, os.cpu_count() or 1), "segmentation labels", "study", lambda job: f"study {job[0]}"
    )
    for index, result, error in tasks:
        uid, path = jobs[index][:2]
        if error is None:
            results[uid] = result
        else:  # reported, the others go on
            failures.append(LabelFailure(uid, str(path), f"{type(error).__name__}: {error}"))
            logger.warning("skipped segmented study %s (%s): %s: %s", uid, path, type(error).__name__, error)
    return _write_label_tables(out_dir, results, failures, folds, len(jobs))


def _segmented_studies(data_dir: Path, dropped: set[str]) -> list[tuple[str, Path, Path]]:
    """(uid, its segmentation file, its train_images folder) of every segmented study not in `dropped` that has a folder."""
    seg_dir = data_dir / "segmentations"
    if not seg_dir.is_dir():
        raise FileNotFoundError(f"{seg_dir}: no segmentations folder")
    nifti = sorted(p for p in seg_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    jobs = [(study_uid_from_path(p), p, data_dir / "train_images" / study_uid_from_path(p)) for p in nifti]
    jobs = [job for job in jobs if job[0] not in dropped]
    orphans = [uid for uid, _, study_dir in jobs if not study_dir.is_dir()]
    if orphans:
        logger.info("%d segmentations have no train_images folder and are skipped, e.g. %s", len(orphans), orphans[:3])
    jobs = [job for job in jobs if job[2].is_dir()]
    if not jobs:
        raise FileNotFoundError(f"{seg_dir}: no segmentation has a study folder under {data_dir / 'train_images'}")
    return jobs


def _write_label_tables(
    out_dir: Path,
    results: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
    failures: list[LabelFailure],
    folds: dict[str, int],
    n_studies: int,
) -> dict[str, Path]:
    """The failure list (or none: an old one is removed) and the two label tables of the labelled studies, with their folds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    failures_path = out_dir / "segmentation_labels.failures.csv"
    if write_failures(failures_path, [asdict(f) for f in failures]):
        logger.warning("%d of %d segmented studies failed; listed in %s", len(failures), n_studies, failures_path)
        written["failures"] = failures_path
    if not results:
        raise RuntimeError(f"no segmented study could be labelled; reasons in {failures_path}")

    for index, name in enumerate(("slice_boxes", "vertebra_ratios")):
        table = pd.concat([results[uid][index] for uid in sorted(results)], ignore_index=True)
        table.insert(3, "fold", table["StudyInstanceUID"].map(folds).fillna(-1).astype(np.int64))
        path = out_dir / f"{name}.parquet"
        _write_parquet(table, path)
        logger.info("wrote %s: %d slices of %d studies to %s", name, len(table), len(results), path)
        written[name] = path
    return written
