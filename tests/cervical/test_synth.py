"""Synthetic competition: Kaggle layout, geometry, segmentations, fractures, labels."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from rsna22_utils.cervical import synth
from rsna22_utils.cervical.metric import TRAIN_PREVALENCE
from rsna22_utils.core.dicom_writer import EXPLICIT_LE, IMPLICIT_LE, JPEG_LOSSLESS_70

PARAMS = dict(n_studies=6, n_test_studies=3, seed=3, image_size=64, median_slices=40, segmented_fraction=0.5)
TYPES = [f"C{k}" for k in range(1, 8)] + ["patient_overall"]


@pytest.fixture(scope="module")
def comp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate_competition(tmp_path_factory.mktemp("synth") / "comp", workers=2, **PARAMS)


def _headers(folder: Path) -> pd.DataFrame:
    rows = []
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows.append(
            {
                "n": int(path.stem),
                "z": float(ds.ImagePositionPatient[2]),
                "inst": int(ds.InstanceNumber),
                "ts": str(ds.file_meta.TransferSyntaxUID),
                "path": path,
            }
        )
    return pd.DataFrame(rows).sort_values("n").reset_index(drop=True)


def _volume(folder: Path) -> np.ndarray:
    """HU volume (slices, rows, cols) head -> feet (descending z), read with pydicom directly."""
    heads = _headers(folder).sort_values("z", ascending=False)
    slices = []
    for path in heads.path:
        ds = pydicom.dcmread(path)
        slices.append(ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(slices)


def test_layout_and_csv_formats(comp):
    train = pd.read_csv(comp / "train.csv")
    assert list(train.columns) == ["StudyInstanceUID", "patient_overall", *TYPES[:7]]
    assert len(train) == 6 and train.StudyInstanceUID.str.fullmatch(r"1\.2\.826\.0\.1\.3680043\.\d+").all()
    assert (train.patient_overall == train[TYPES[:7]].max(axis=1)).all()
    boxes = pd.read_csv(comp / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    test = pd.read_csv(comp / "test.csv")
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert len(test) == 3 * 8 and set(test.prediction_type) == set(TYPES)
    assert (test.row_id == test.StudyInstanceUID + "_" + test.prediction_type).all()
    sub = pd.read_csv(comp / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", "fractured"] and (sub.row_id == test.row_id).all() and (sub.fractured == 0.5).all()
    labels = pd.read_csv(comp / "_synthetic" / "test_labels.csv")
    assert list(labels.columns) == list(train.columns) and set(labels.StudyInstanceUID) == set(test.StudyInstanceUID)
    assert not set(labels.StudyInstanceUID) & set(train.StudyInstanceUID)
    assert {p.name for p in (comp / "train_images").iterdir()} == set(train.StudyInstanceUID)
    assert {p.name for p in (comp / "test_images").iterdir()} == set(test.StudyInstanceUID)
    studies = pd.read_csv(comp / "_synthetic" / "studies.csv")
    for row in studies.itertuples():
        numbers = sorted(int(p.stem) for p in (comp / f"{row.split}_images" / row.StudyInstanceUID).glob("*.dcm"))
        assert numbers == list(range(1, row.n_slices + 1))
    segs = sorted(p.name for p in (comp / "segmentations").iterdir())
    assert segs == sorted(f"{u}.nii" for u in studies.query("segmented == 1").StudyInstanceUID)
    assert len(segs) == 3 and set(s[:-4] for s in segs) <= set(train.StudyInstanceUID)
    assert set(studies.transfer_syntax) >= {EXPLICIT_LE, IMPLICIT_LE, JPEG_LOSSLESS_70}
    assert (comp / "_synthetic" / "generator.json").read_text().count('"version"') == 1


def test_z_order_matches_truth(comp):
    studies = pd.read_csv(comp / "_synthetic" / "studies.csv")
    assert set(studies.z_direction) == {"falling", "rising"}
    for row in studies.itertuples():
        heads = _headers(comp / f"{row.split}_images" / row.StudyInstanceUID)
        dz = np.diff(heads.z.to_numpy())
        assert (dz < 0).all() if row.z_direction == "falling" else (dz > 0).all(), row.StudyInstanceUID
        assert (heads.inst == heads.n).all() and (heads.ts == row.transfer_syntax).all()


def test_segmentation_labels_lie_on_bone(comp):
    studies = pd.read_csv(comp / "_synthetic" / "studies.csv").query("segmented == 1")
    for row in studies.itertuples():
        nifti = nib.load(str(comp / "segmentations" / f"{row.StudyInstanceUID}.nii"))
        data = np.asarray(nifti.dataobj)
        assert data.dtype == np.uint8 and data.shape == (row.image_size, row.image_size, row.n_slices)
        seg = data[:, ::-1, ::-1].transpose(2, 1, 0)
        if nifti.affine[2, 2] < 0:  # slice axis already head -> feet
            seg = seg[::-1]
        hu = _volume(comp / "train_images" / row.StudyInstanceUID)
        cervical = (seg >= 1) & (seg <= 7)
        assert (hu[cervical] > 150).mean() > 0.8
        assert (hu[~cervical & (seg == 0)] > 150).mean() < 0.05
        mean_slice = [np.nonzero(seg == k)[0].mean() for k in range(1, 8)]
        assert np.all(np.diff(mean_slice) > 0), mean_slice  # C1 above ... above C7
        present = np.flatnonzero(cervical.any(axis=(1, 2)))
        assert (present[0], present[-1]) == (row.slnum_from, row.slnum_to)
        for k in range(1, 8):
            idx = np.flatnonzero((seg == k).any(axis=(1, 2)))
            assert (idx[0], idx[-1]) == (getattr(row, f"C{k}_from"), getattr(row, f"C{k}_to"))
        ys, xs = np.nonzero(cervical.any(axis=0))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (row.x0, row.y0, row.x1, row.y1)
        try:
            from rsna22_utils.cervical.segmentation import load_segmentation
        except ImportError:
            continue
        heads = _headers(comp / "train_images" / row.StudyInstanceUID).sort_values("z", ascending=False)
        table = pd.DataFrame(
            {
                "StudyInstanceUID": row.StudyInstanceUID,
                "slice_number": heads.n.to_numpy(),
                "z": heads.z.to_numpy(),
                "instance_number": heads.inst.to_numpy(),
                "pixel_spacing": row.pixel_spacing,
                "pixel_spacing_col": row.pixel_spacing,
                "slice_thickness": row.slice_thickness,
                "rows": row.image_size,
                "cols": row.image_size,
                "transfer_syntax": row.transfer_syntax,
                "path": heads.path.astype(str).to_numpy(),
            }
        )
        loaded = load_segmentation(comp / "segmentations" / f"{row.StudyInstanceUID}.nii", table, keep_other=True)
        assert np.array_equal(loaded, seg)


def test_fracture_boxes_show_the_break(comp):
    train = pd.read_csv(comp / "train.csv")
    boxes = pd.read_csv(comp / "train_bounding_boxes.csv")
    truth = pd.read_csv(comp / "_synthetic" / "boxes.csv")
    fractured = train.query("patient_overall == 1")
    assert len(fractured) >= 1
    assert set(boxes.StudyInstanceUID) == set(fractured.StudyInstanceUID)
    for row in fractured.itertuples():
        drawn = set(truth.query("StudyInstanceUID == @row.StudyInstanceUID").vertebra)
        assert drawn == {v for v in TYPES[:7] if getattr(row, v) == 1}
    specs = {s.uid: s for s in synth.competition_specs(**PARAMS)}
    for uid, group in truth[truth.StudyInstanceUID.isin(train.StudyInstanceUID)].groupby("StudyInstanceUID"):
        spec = specs[uid]
        clean, _, _ = synth.render_study(spec, fractures=False)
        for b in group.itertuples():
            ds = pydicom.dcmread(comp / "train_images" / uid / f"{b.slice_number}.dcm")
            broken = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert b.slice_index == (b.slice_number - 1 if spec.z_falling else spec.n_slices - b.slice_number)
            window = np.zeros(broken.shape, bool)
            x0, y0 = int(np.floor(b.x)), int(np.floor(b.y))
            window[y0 : int(np.ceil(b.y + b.height)), x0 : int(np.ceil(b.x + b.width))] = True
            unbroken = clean[b.slice_index].astype(np.int32)
            assert broken[window].mean() < unbroken[window].mean() - 10  # the gap darkens the bone
            outside = ~window
            for other in group[group.slice_index == b.slice_index].itertuples():  # another vertebra's box
                ox, oy = int(np.floor(other.x)), int(np.floor(other.y))
                outside[oy : int(np.ceil(other.y + other.height)), ox : int(np.ceil(other.x + other.width))] = False
            assert np.array_equal(broken[outside], unbroken[outside])  # and nothing outside the box changes


def test_label_sampler_follows_real_prevalence():
    labels = synth.sample_labels(200, seed=11)
    assert list(labels.columns) == TYPES[7:] + TYPES[:7]
    assert (labels.patient_overall == labels[TYPES[:7]].max(axis=1)).all()
    for column, p in TRAIN_PREVALENCE.items():
        tolerance = 3.5 * np.sqrt(p * (1 - p) / 200) + 0.015
        assert abs(labels[column].mean() - p) < tolerance, (column, labels[column].mean(), p)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "generator.json"
    }


@pytest.mark.slow
def test_same_seed_same_output(comp, tmp_path):
    again = synth.generate_competition(tmp_path / "again", workers=1, **PARAMS)
    assert _digest(again) == _digest(comp)


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        synth.generate_competition(tmp_path, n_studies=1)


def _fail_to_write(spec: synth.StudySpec, out: Path) -> dict:
    raise OSError(f"disk full while writing {spec.uid}")


def test_a_study_that_cannot_be_written_fails_the_build(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "write_study", _fail_to_write)  # the fork-started workers see the patched module
    with pytest.raises(RuntimeError, match=r"3 synthetic studies could not be written.*OSError: disk full"):
        synth.generate_competition(tmp_path / "comp", n_studies=1, n_test_studies=2, image_size=32, median_slices=8, workers=2)
    assert not (tmp_path / "comp" / "train.csv").exists()
