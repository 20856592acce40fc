"""Segmentation loading: competition NIfTIs aligned by z with read_study's (slices, rows, cols) order."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from rsna22_utils.cervical.segmentation import (
    SegmentationError,
    VertebraOrderWarning,
    load_nifti_labels,
    load_segmentation,
)

COL_SPACING, ROW_SPACING, STEP = 0.6, 0.7, 1.25


def head_to_feet_labels(n_slices: int = 16, rows: int = 12, cols: int = 10) -> np.ndarray:
    """(slices, rows, cols) with C1..C7 stacked top to bottom, an asymmetric blob per slice, T1 below."""
    seg = np.zeros((n_slices, rows, cols), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for k in range(1, 9):  # 8 = T1, other anatomy
        first = 1 + (k - 1) * 2
        for i in range(first, min(first + 2, n_slices)):
            r, c = rng.integers(0, rows - 3), rng.integers(0, cols - 2)
            seg[i, r : r + 3, c : c + 2] = k
            seg[i, r, c] = 0  # break the symmetry of each blob
    return seg


def write_competition_nifti(path, seg: np.ndarray, ascending: bool = True, z_top: float = 100.0) -> None:
    """Write `seg` (slices, rows, cols head -> feet) in the competition convention (COMMON.md)."""
    stored = seg.transpose(2, 1, 0)[:, ::-1, :]  # (cols, rows, slices), rows flipped
    n = seg.shape[0]
    if ascending:
        stored = stored[:, :, ::-1]  # k = 0 is the feet end
        z_column = (STEP, z_top - STEP * (n - 1))
    else:
        z_column = (-STEP, z_top)
    affine = np.array(
        [[-COL_SPACING, 0, 0, 0], [0, -ROW_SPACING, 0, 0], [0, 0, z_column[0], z_column[1]], [0, 0, 0, 1]],
        dtype=np.float64,
    )
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), affine), str(path))


def slice_table(seg: np.ndarray, z_top: float = 100.0, numbers_rise_with_z: bool = False) -> pd.DataFrame:
    """A per-slice table (head -> feet) for a study of seg's shape."""
    n = seg.shape[0]
    z = z_top - STEP * np.arange(n)
    numbers = np.arange(n, 0, -1) if numbers_rise_with_z else np.arange(1, n + 1)
    return pd.DataFrame(
        {
            "StudyInstanceUID": "1.2.3",
            "slice_number": numbers,
            "z": z,
            "rows": seg.shape[1],
            "cols": seg.shape[2],
        }
    )


@pytest.mark.parametrize("ascending", [True, False], ids=["z-up-in-file", "z-down-in-file"])
def test_load_segmentation_returns_the_original_for_both_z_directions(tmp_path, ascending):
    seg = head_to_feet_labels()
    path = tmp_path / "1.2.3.nii"
    write_competition_nifti(path, seg, ascending=ascending)

    out = load_segmentation(path, slice_table(seg))
    expected = np.where(seg > 7, 0, seg)
    assert out.dtype == np.uint8
    assert out.shape == seg.shape
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(load_segmentation(path), expected)  # no table: same alignment
    np.testing.assert_array_equal(load_segmentation(path, keep_other=True), seg)
    assert (load_segmentation(path, keep_other=True) == 8).any()


def test_forced_slice_order_that_contradicts_the_affine_positions_is_refused(tmp_path):
    seg = head_to_feet_labels()
    path = tmp_path / "1.2.3.nii"
    write_competition_nifti(path, seg, ascending=False)
    with pytest.warns(VertebraOrderWarning):
        flipped = load_segmentation(path, slice_order="ascending")  # the 3rd place's fixed rule
    np.testing.assert_array_equal(flipped, np.where(seg > 7, 0, seg)[::-1])
    with pytest.raises(SegmentationError, match="reverse order"):
        load_segmentation(path, slice_table(seg), slice_order="ascending")


def test_slice_count_mismatch_names_the_file(tmp_path):
    seg = head_to_feet_labels(n_slices=16)
    path = tmp_path / "1.2.826.0.1.3680043.999.nii"
    write_competition_nifti(path, seg)
    with pytest.raises(SegmentationError, match=r"1\.2\.826\.0\.1\.3680043\.999\.nii.*16 slices.*table has 15"):
        load_segmentation(path, slice_table(seg).iloc[:15])


def test_image_size_mismatch_and_unsorted_table_are_refused(tmp_path):
    seg = head_to_feet_labels()
    path = tmp_path / "s.nii"
    write_competition_nifti(path, seg)
    wrong_rows = slice_table(seg).assign(rows=seg.shape[1] + 1)
    with pytest.raises(SegmentationError, match=r"s\.nii.*rows"):
        load_segmentation(path, wrong_rows)
    by_number_in_up_study = slice_table(seg).iloc[::-1].reset_index(drop=True)  # z rising
    with pytest.raises(SegmentationError, match=r"s\.nii.*not ordered head -> feet"):
        load_segmentation(path, by_number_in_up_study)


def test_c7_above_c1_warns(tmp_path, caplog):
    seg = head_to_feet_labels()[::-1].copy()  # a study annotated upside down: C7 on top
    path = tmp_path / "upside_down.nii"
    write_competition_nifti(path, seg)
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.cervical.segmentation"):
        with pytest.warns(VertebraOrderWarning, match="upside_down.nii.*C7 lies above C1"):
            load_segmentation(path)
    assert any("C7 lies above C1" in record.getMessage() for record in caplog.records)


def test_correct_order_does_not_warn(tmp_path, recwarn):
    seg = head_to_feet_labels()
    path = tmp_path / "ok.nii"
    write_competition_nifti(path, seg)
    load_segmentation(path)
    assert not [w for w in recwarn if issubclass(w.category, VertebraOrderWarning)]


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.nii"
    path.write_bytes(b"not a nifti at all")
    with pytest.raises(SegmentationError, match="broken.nii"):
        load_segmentation(path)


# --------------------------------------------------------------------- generic NIfTI (affine)


def _canonical_from_head_to_feet(out: np.ndarray) -> np.ndarray:
    """Inverse of the documented layout: (slices S->I, rows A->P, cols R->L) -> RAS+ (x, y, z)."""
    return out.transpose(2, 1, 0)[::-1, ::-1, ::-1]


@pytest.mark.parametrize("layout", ["RAS", "LPS", "permuted-zxy"])
def test_load_nifti_labels_uses_the_affine(tmp_path, layout):
    out = head_to_feet_labels(n_slices=9, rows=7, cols=5) + 20  # labels 20..28 like another tool's map
    out[out == 20] = 0
    ras = _canonical_from_head_to_feet(out)
    spacing = 3.0
    if layout == "RAS":
        data, affine = ras, np.diag([spacing, spacing, spacing, 1.0])
    elif layout == "LPS":
        data, affine = ras[::-1, ::-1, :], np.diag([-spacing, -spacing, spacing, 1.0])
    else:  # voxel axes (z, x, y)
        data = ras.transpose(2, 0, 1)
        affine = np.array([[0, spacing, 0, 0], [0, 0, spacing, 0], [spacing, 0, 0, 0], [0, 0, 0, 1.0]])
    path = tmp_path / f"{layout}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))

    np.testing.assert_array_equal(load_nifti_labels(path, keep_unmapped=True), out)
    remap = {21: 1, 22: 2, 23: 3}
    remapped = load_nifti_labels(path, remap=remap)
    expected = np.zeros_like(out)
    for source, target in remap.items():
        expected[out == source] = target
    assert remapped.dtype == np.uint8
    np.testing.assert_array_equal(remapped, expected)
    kept = load_nifti_labels(path, remap=remap, keep_unmapped=True)
    np.testing.assert_array_equal(kept, np.where(np.isin(out, list(remap)), expected, out))


# ----------------------------------------------------------------- facts the docstring relies on


@pytest.mark.realdata
def test_meta_segmentation_z_directions(rsna_real):
    """z falls with slice_number in 81 of the 87 segmented studies and rises in 6; the csv's
    C1..C7 flags follow slice numbers, so by z its C1 sits below C7 exactly in those 6."""
    meta = pd.read_csv(rsna_real / "csv" / "meta_segmentation.csv")
    direction, c1_first_by_number, c1_above_by_z = {}, {}, {}
    for uid, study in meta.groupby("StudyInstanceUID"):
        by_number = study.sort_values("Slice")
        dz = np.diff(by_number["ImagePositionPatient_z"].to_numpy())
        assert (dz < 0).all() or (dz > 0).all(), f"{uid}: z is not monotonic in slice number"
        direction[uid] = "down" if (dz < 0).all() else "up"
        c1_first_by_number[uid] = np.flatnonzero(by_number["C1"]).mean() < np.flatnonzero(by_number["C7"]).mean()
        by_z = study.sort_values("ImagePositionPatient_z", ascending=False)
        c1_above_by_z[uid] = np.flatnonzero(by_z["C1"]).mean() < np.flatnonzero(by_z["C7"]).mean()

    counts = pd.Series(direction).value_counts()
    assert len(direction) == 87
    assert counts["down"] == 81 and counts["up"] == 6
    assert all(c1_first_by_number.values())
    assert {uid for uid, ok in c1_above_by_z.items() if not ok} == {u for u, d in direction.items() if d == "up"}
