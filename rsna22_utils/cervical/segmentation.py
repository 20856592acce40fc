"""Vertebra segmentations as label volumes aligned voxel for voxel with `read_study`.

Every function here returns a uint8 label volume shaped (slices, rows, cols) with slices ordered
head -> feet (descending ImagePositionPatient z), the order of `rsna22_utils.core.dicom.read_study`,
so `seg[i]` labels `volume[i]` and row i of the study's per-slice table.

Competition NIfTIs (`segmentations/<uid>.nii`, labels 1..7 = C1..C7, 8..19 = T1..T12) go through
`load_segmentation`; any other NIfTI (TotalSegmentator output, your own annotations) goes through
`load_nifti_labels`, which trusts the file's affine.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

N_CERVICAL = 7
SliceOrder = Literal["affine", "ascending", "descending"]


class SegmentationError(ValueError):
    """A segmentation file that cannot be aligned with its study (the message names the file)."""


class VertebraOrderWarning(UserWarning):
    """An aligned segmentation puts C7 above C1: the slice order is probably flipped."""


def study_uid_from_path(path: str | Path) -> str:
    """`.../segmentations/<uid>.nii[.gz]` -> `<uid>`."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The NIfTI's data as uint8 labels and its affine; errors name the file."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except FileNotFoundError:
        raise
    except Exception as error:  # nibabel raises several types for broken files
        raise SegmentationError(f"{path}: cannot read NIfTI ({type(error).__name__}: {error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SegmentationError(f"{path}: expected a 3-D label volume, got shape {data.shape}")
    if data.dtype != np.uint8:
        if np.issubdtype(data.dtype, np.floating):
            data = np.rint(data)
        low, high = (data.min(), data.max()) if data.size else (0, 0)
        if low < 0 or high > 255:
            raise SegmentationError(f"{path}: label values {low}..{high} do not fit uint8 labels")
        data = data.astype(np.uint8)
    return data, np.asarray(image.affine, dtype=np.float64)


def nifti_slice_z(affine: np.ndarray, n_slices: int) -> np.ndarray:
    """z of each NIfTI slice k (voxel (0, 0, k)) as written in the affine: affine[2, 3] + k * affine[2, 2]."""
    return affine[2, 3] + affine[2, 2] * np.arange(n_slices, dtype=np.float64)


def _check_order(seg: np.ndarray, path: Path | str) -> None:
    """Warn when label 7 (C7) sits above label 1 (C1): mean slice index of C7 < that of C1."""
    per_slice = np.stack([(seg == 1).any(axis=(1, 2)), (seg == N_CERVICAL).any(axis=(1, 2))])
    if not (per_slice[0].any() and per_slice[1].any()):
        return
    c1 = np.flatnonzero(per_slice[0]).mean()
    c7 = np.flatnonzero(per_slice[1]).mean()
    if c7 < c1:
        message = (
            f"{path}: after alignment C7 lies above C1 (mean slice index C7 {c7:.1f} < C1 {c1:.1f}); "
            "the slice order is probably flipped (check the affine's z sign and the study's z order)"
        )
        logger.warning("%s", message)
        warnings.warn(message, VertebraOrderWarning, stacklevel=3)


def load_segmentation(
    nifti_path: str | Path,
    slices: pd.DataFrame | None = None,
    *,
    keep_other: bool = False,
    slice_order: SliceOrder = "affine",
) -> np.ndarray:
    """Competition segmentation -> uint8 labels (slices, rows, cols), head -> feet, like `read_study`.

    Labels 1..7 are C1..C7; labels above 7 (T1..T12, other anatomy) become 0 unless
    `keep_other=True`.

    The transform, and why:
    - The competition NIfTIs store the array as (cols, rows, slices) (nibabel's axis order) with
      the rows flipped and the slice axis running in ascending z (k = 0 is the feet end). The
      widely used fix `nifti[:, ::-1, ::-1].transpose(2, 1, 0)` therefore gives
      (slices, rows, cols) in descending z, i.e. head -> feet, the order of `read_study`.
    - The file numbers (`<n>.dcm`) run either way relative to z: in
      ../shared/realdata/rsna2022/csv/meta_segmentation.csv z falls as slice_number grows in 81
      of the 87 segmented studies and rises in 6. So NIfTI slice k is NOT "file k+1": aligning by
      slice number puts C1 at the feet end of those 6 studies (that csv's own C1..C7 flags do
      exactly this: their C1 lies at the low-z end in precisely the 6 studies where z rises).
      The 3rd place aligned by z (darraghdog/RSNA22, scripts/_make_bbox_part1.py): with slices
      listed by file number, it flipped the NIfTI slice axis only where z falls as the number
      grows, which amounts to "NIfTI slice axis = ascending z"; this function aligns the same way.
    - Which way the NIfTI slice axis runs is read from the sign of the affine's z column
      (`slice_order="affine"`): affine[2, 2] > 0 means ascending z (flip to get head -> feet),
      affine[2, 2] < 0 means the axis already runs head -> feet (no flip). A zero z step falls
      back to ascending, the competition convention. `slice_order="ascending"` ignores the affine
      (exactly the 3rd place's rule); `"descending"` forces no flip.
    - When `slices` (the study's per-slice table, head -> feet, from `read_study` /
      `read_slice_headers`) is given, the slice count (and rows/cols, when the table has them)
      must match, otherwise a `SegmentationError` naming the file is raised, as it is for a table
      whose z rises (one sorted by slice_number instead of head -> feet). If the affine's slice
      positions (affine[2, 3] + k * affine[2, 2]) equal the table's z, the alignment is confirmed
      slice by slice; if they equal it only in reverse (possible with a forced `slice_order`),
      a `SegmentationError` is raised.

    A `VertebraOrderWarning` (and a logged warning) is raised when the aligned segmentation
    puts C7 above C1, the symptom of a flipped slice order.
    """
    path = Path(nifti_path)
    data, affine = _read_labels(path)

    if slice_order == "affine":
        step = affine[2, 2]
        if step == 0:
            logger.warning("%s: affine has no z step (affine[2, 2] == 0); assuming ascending z", path)
        ascending = step >= 0
    elif slice_order in ("ascending", "descending"):
        ascending = slice_order == "ascending"
    else:
        raise ValueError(f"slice_order must be 'affine', 'ascending' or 'descending', got {slice_order!r}")

    # (cols, rows, slices) -> (slices, rows, cols); rows are stored flipped.
    seg = data[:, ::-1, ::-1] if ascending else data[:, ::-1, :]
    seg = np.ascontiguousarray(seg.transpose(2, 1, 0))
    if not keep_other:
        seg[seg > N_CERVICAL] = 0

    if slices is not None:
        _check_against_table(seg, affine, ascending, slices, path)
    _check_order(seg, path)
    return seg


def _check_against_table(seg: np.ndarray, affine: np.ndarray, ascending: bool, slices: pd.DataFrame, path: Path) -> None:
    """Slice count (and rows/cols) must match the table; the affine's z, when it matches, confirms the order."""
    if len(slices) != seg.shape[0]:
        raise SegmentationError(
            f"{path}: segmentation has {seg.shape[0]} slices but the study's slice table has {len(slices)}; "
            "is the study complete and is this the right study?"
        )
    for axis, column in ((1, "rows"), (2, "cols")):
        if column in slices.columns:
            sizes = pd.unique(slices[column])
            if len(sizes) == 1 and int(sizes[0]) != seg.shape[axis]:
                raise SegmentationError(f"{path}: segmentation has {seg.shape[axis]} {column} but the study's images have {int(sizes[0])}")
    if "z" not in slices.columns or len(slices) < 2:
        return
    table_z = slices["z"].to_numpy(dtype=np.float64)
    if np.any(np.diff(table_z) > 0):
        raise SegmentationError(
            f"{path}: the slice table is not ordered head -> feet (its z rises somewhere); "
            "pass the table from read_study / read_slice_headers, not one sorted by slice_number"
        )
    raw_z = nifti_slice_z(affine, seg.shape[0])
    aligned_z = raw_z[::-1] if ascending else raw_z
    spacing = np.median(np.abs(np.diff(table_z)))
    tolerance = max(0.25 * spacing, 1e-3)
    if np.all(np.abs(aligned_z - table_z) <= tolerance):
        logger.debug("%s: affine z positions match the slice table's z slice by slice", path)
    elif np.all(np.abs(aligned_z[::-1] - table_z) <= tolerance):
        raise SegmentationError(
            f"{path}: the affine's slice positions match the study's z only in reverse order; "
            f"the requested slice_order contradicts the affine (use slice_order='affine')"
        )
    else:
        logger.debug("%s: affine z positions do not match the slice table's z; aligned by the affine's z sign", path)


def load_nifti_labels(
    nifti_path: str | Path,
    remap: Mapping[int, int] | None = None,
    *,
    keep_unmapped: bool = False,
) -> np.ndarray:
    """Any NIfTI label file -> uint8 (slices, rows, cols), head -> feet, using the file's affine.

    For files whose affine is right (TotalSegmentator output, most tools): the array is
    reoriented with nibabel (`as_closest_canonical`, RAS+) and then laid out like an axial DICOM
    series: slices superior -> inferior (head -> feet), rows anterior -> posterior, columns
    patient right -> left. Do not use it for the competition's `segmentations/*.nii`: their rows
    are stored flipped whatever the affine says; use `load_segmentation` there.

    `remap` maps source labels to output labels (e.g. {33: 1, 32: 2}); labels it does not name
    become 0 unless `keep_unmapped=True` (then they keep their value).
    """
    path = Path(nifti_path)
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
    except FileNotFoundError:
        raise
    except Exception as error:
        raise SegmentationError(f"{path}: cannot read NIfTI ({type(error).__name__}: {error})") from error
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SegmentationError(f"{path}: expected a 3-D label volume, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data).astype(np.int32)
    if data.size and data.min() < 0:
        raise SegmentationError(f"{path}: negative label values ({data.min()})")

    if remap is not None:
        top = int(max([data.max(initial=0), *remap.keys()])) + 1
        lut = np.arange(top, dtype=np.int64) if keep_unmapped else np.zeros(top, dtype=np.int64)
        for source, target in remap.items():
            lut[int(source)] = int(target)
        data = lut[data]
    if data.size and data.max() > 255:
        raise SegmentationError(f"{path}: label values up to {data.max()} do not fit uint8 (remap them)")

    # Canonical RAS+ array: index grows toward patient Right (x), Anterior (y), Superior (z).
    # An axial DICOM image has columns growing toward patient Left and rows toward Posterior,
    # and head -> feet means decreasing z: reverse all three, then (x, y, z) -> (z, y, x).
    seg = data.astype(np.uint8)[::-1, ::-1, ::-1].transpose(2, 1, 0)
    return np.ascontiguousarray(seg)
