"""Slice boxes, vertebra ratios, folds and the segmentation-label build."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rsna22_utils.cervical.labels import build_segmentation_labels, make_folds, slice_boxes, study_box, vertebra_ratios

# ------------------------------------------------------------------------------- slice boxes

ROWS, COLS = 20, 30
# slice -> rectangles (label, row0, row1, col0, col1), ends exclusive
RECTS = {
    1: [(1, 2, 6, 3, 9)],
    2: [(2, 10, 13, 20, 26), (3, 4, 7, 1, 3)],
    3: [(9, 5, 8, 5, 8)],  # other anatomy only
    4: [(7, 19, 20, 29, 30)],  # one pixel in the bottom-right corner
}


def hand_made() -> np.ndarray:
    seg = np.zeros((6, ROWS, COLS), dtype=np.uint8)
    for i, rects in RECTS.items():
        for label, r0, r1, c0, c1 in rects:
            seg[i, r0:r1, c0:c1] = label
    return seg


def expected_box(rects, labels=range(1, 8)):
    rects = [r for r in rects if r[0] in labels]
    if not rects:
        return None
    return (min(r[3] for r in rects), min(r[1] for r in rects), max(r[4] for r in rects), max(r[2] for r in rects))


def test_slice_boxes_by_construction():
    seg = hand_made()
    boxes = slice_boxes(seg, "1.2.3")
    assert list(boxes.columns[:3]) == ["StudyInstanceUID", "slice_number", "slice_index"]
    assert len(boxes) == seg.shape[0] and (boxes["StudyInstanceUID"] == "1.2.3").all()
    assert boxes["slice_index"].tolist() == list(range(6))
    for i, row in boxes.iterrows():
        box = expected_box(RECTS.get(i, []))
        if box is None:
            assert row["has_box"] == 0 and row[["x0", "y0", "x1", "y1"]].isna().all(), i
        else:
            assert row["has_box"] == 1 and tuple(row[["x0", "y0", "x1", "y1"]]) == box, i
    # other labels on request: slice 3 holds only label 9
    other = slice_boxes(seg, labels=[9])
    assert other["has_box"].tolist() == [0, 0, 0, 1, 0, 0]
    assert tuple(other.loc[3, ["x0", "y0", "x1", "y1"]]) == expected_box(RECTS[3], labels=[9])


def test_slice_numbers_follow_the_table_and_must_fit():
    seg = hand_made()
    numbers = [60, 50, 40, 30, 20, 10]  # a study whose file numbers rise toward the head
    boxes = slice_boxes(seg, "u", numbers)
    assert boxes["slice_number"].tolist() == numbers
    assert boxes["slice_index"].tolist() == list(range(6))
    assert slice_boxes(seg)["slice_number"].tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="5 slice numbers for a volume of 6"):
        slice_boxes(seg, "u", numbers[:5])


def test_study_box():
    boxes = slice_boxes(hand_made(), "u", [11, 12, 13, 14, 15, 16])
    cervical = [r for i in RECTS for r in RECTS[i] if r[0] <= 7]
    x0, y0, x1, y1 = expected_box(cervical)
    assert study_box(boxes) == {
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "first_slice_index": 1,
        "last_slice_index": 4,
        "first_slice_number": 12,
        "last_slice_number": 15,
        "n_slices_with_box": 3,
    }
    empty = study_box(slice_boxes(np.zeros((3, 4, 4), np.uint8)))
    assert empty["n_slices_with_box"] == 0 and empty["x0"] is None


# ---------------------------------------------------------------------------- vertebra ratios


def test_vertebra_ratios_by_construction():
    areas = {1: [0, 4, 8, 2, 0], 3: [0, 0, 0, 0, 6], 7: [9, 9, 3, 0, 0]}  # C2, C4..C6 absent
    seg = np.zeros((5, 10, 10), dtype=np.uint8)
    seg[:, 9, 9] = 12  # other anatomy everywhere: ignored
    for label, per_slice in areas.items():
        for i, area in enumerate(per_slice):
            flat = seg[i].reshape(-1)
            free = np.flatnonzero(flat == 0)[:area]
            flat[free] = label
    ratios = vertebra_ratios(seg, "u")
    assert list(ratios.columns) == ["StudyInstanceUID", "slice_number", "slice_index"] + [f"C{k}" for k in range(1, 8)]
    for k in range(1, 8):
        if k in areas:
            expected = np.array(areas[k], dtype=float) / max(areas[k])
        else:
            expected = np.zeros(5)
        np.testing.assert_array_equal(ratios[f"C{k}"].to_numpy(), expected, err_msg=f"C{k}")
    named = vertebra_ratios(seg, labels=[12], names=["other"])
    assert named["other"].tolist() == [1.0] * 5


# -------------------------------------------------------------------------------------- folds


def fake_train(n: int = 500, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    fractured = np.zeros((n, 7), dtype=int)
    n_frac = rng.choice([0, 1, 2, 3], size=n, p=[0.5, 0.25, 0.15, 0.10])
    for i, m in enumerate(n_frac):
        fractured[i, rng.choice(7, size=m, replace=False)] = 1
    df = pd.DataFrame(fractured, columns=[f"C{k}" for k in range(1, 8)])
    df.insert(0, "patient_overall", (n_frac > 0).astype(int))
    df.insert(0, "StudyInstanceUID", [f"1.2.{i}" for i in range(n)])
    return df


def test_fold_file_is_used_and_must_cover_the_studies(tmp_path):
    train = fake_train(40)
    given = train.assign(fold=np.arange(40) % 4)
    fold_file = tmp_path / "train_folded.csv"
    given.sample(frac=1.0, random_state=0).to_csv(fold_file, index=False)  # file order differs

    out = make_folds(train, n_folds=4, fold_file=fold_file)
    assert out["StudyInstanceUID"].tolist() == train["StudyInstanceUID"].tolist()
    assert out["fold"].tolist() == given["fold"].tolist()

    given.iloc[3:].to_csv(fold_file, index=False)
    with pytest.raises(ValueError, match=r"train_folded\.csv: 3 of 40 studies have no fold: 1\.2\.0, 1\.2\.1, 1\.2\.2"):
        make_folds(train, n_folds=4, fold_file=fold_file)


def test_labels_that_are_not_0_or_1_are_an_error_naming_the_rows(tmp_path):
    from rsna22_utils.cervical.labels import check_study_labels

    train = fake_train(12).astype({"C3": float, "patient_overall": object})
    check_study_labels(train, "train.csv")
    train.loc[4, "C3"] = np.nan
    train.loc[7, "patient_overall"] = "yes"
    with pytest.raises(ValueError, match=r"train\.csv: 2 rows .*line 6 \(1\.2\.4\): C3=nan; line 9 \(1\.2\.7\): patient_overall='yes'"):
        check_study_labels(train, "train.csv")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['C7'\]"):
        check_study_labels(fake_train(3).drop(columns=["C7"]), "train.csv")


def test_stratified_split_is_balanced_and_reproducible(tmp_path):
    train = fake_train(500)
    with pytest.raises(FileNotFoundError, match=r"fold_file .*absent\.csv: no such file"):  # a typo is not a quiet new split
        make_folds(train, n_folds=5, seed=7, fold_file=tmp_path / "absent.csv")
    folds = make_folds(train, n_folds=5, seed=7)
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    n_frac = folds[[f"C{k}" for k in range(1, 8)]].sum(axis=1)
    per_fold = pd.crosstab(n_frac, folds["fold"])  # every count has >= 5 studies: a stratum of its own
    assert ((per_fold.max(axis=1) - per_fold.min(axis=1)) <= 1).all(), per_fold
    positives = folds.groupby("fold")[["patient_overall", *[f"C{k}" for k in range(1, 8)]]].sum()
    assert ((positives.max() - positives.min()) <= 1).all(), positives  # every vertebra, not only patient_overall
    again = make_folds(train, n_folds=5, seed=7)
    assert again["fold"].tolist() == folds["fold"].tolist()
    assert make_folds(train, n_folds=5, seed=8)["fold"].tolist() != folds["fold"].tolist()


@pytest.mark.realdata
def test_own_split_of_the_real_labels_balances_every_target(rsna_real):
    """StratifiedKFold on patient_overall x count left C2's positives 23 apart between folds."""
    train = pd.read_csv(rsna_real / "csv" / "train.csv")
    folds = make_folds(train, n_folds=5, seed=42)
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    positives = folds.groupby("fold")[["patient_overall", *[f"C{k}" for k in range(1, 8)]]].sum()
    assert ((positives.max() - positives.min()) <= 2).all(), positives


@pytest.mark.realdata
def test_third_place_fold_file(rsna_real):
    train = pd.read_csv(rsna_real / "csv" / "train.csv")
    fold_file = rsna_real / "csv" / "train_folded_v01.csv"
    folds = make_folds(train, fold_file=fold_file)
    reference = pd.read_csv(fold_file).set_index("StudyInstanceUID")["fold"]
    assert len(folds) == 2019
    assert (folds["fold"].to_numpy() == reference.loc[folds["StudyInstanceUID"]].to_numpy()).all()
    assert sorted(folds["fold"].value_counts().tolist()) == [403, 404, 404, 404, 404]


# --------------------------------------------------------------- real TotalSegmentator volume

# TotalSegmentator (v2 label map) numbers the vertebrae from the bottom: 26 = S1, 27 = L5, ...,
# 32 = T12, 33 = T11. The test checks that order in the file itself (label z rises with the
# number). Here T12..S1 play "C1..C7" (head -> feet) and T11, cut by the scan's top edge, is
# label 8: other anatomy, left out of boxes and ratios.
TOTALSEG_REMAP = {32: 1, 31: 2, 30: 3, 29: 4, 28: 5, 27: 6, 26: 7, 33: 8}


@pytest.fixture(scope="module")
def totalseg(realdata):
    path = realdata / "totalsegmentator" / "example_ct_totalseg.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from rsna22_utils.cervical.segmentation import load_nifti_labels

    return path, load_nifti_labels(path, TOTALSEG_REMAP)


@pytest.mark.realdata
def test_totalsegmentator_label_order_in_the_file(totalseg):
    import nibabel as nib

    path, _ = totalseg
    image = nib.as_closest_canonical(nib.load(str(path)))
    labels = np.asarray(image.dataobj)
    mean_z = [np.nonzero(labels == k)[2].mean() for k in range(26, 34)]  # RAS: z index grows upward
    assert np.all(np.diff(mean_z) > 0), mean_z  # S1 lowest ... T11 highest


@pytest.mark.realdata
def test_totalsegmentator_boxes_and_ratios_are_sane(totalseg):
    _, seg = totalseg
    n, rows, cols = seg.shape
    cervical = np.isin(seg, range(1, 8))
    labelled = cervical.any(axis=(1, 2))

    boxes = slice_boxes(seg, "totalseg")
    assert len(boxes) == n and boxes["slice_index"].is_unique
    assert (boxes["has_box"].to_numpy() == labelled).all()
    assert labelled.sum() > 30  # a real spine spans many 3 mm slices
    for row in boxes[boxes["has_box"] == 1].itertuples():
        x0, y0, x1, y1 = int(row.x0), int(row.y0), int(row.x1), int(row.y1)
        assert 0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows
        mask = cervical[row.slice_index]
        assert mask[y0:y1, x0:x1].sum() == mask.sum()  # nothing outside the box
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()  # tight
    # rows run anterior -> posterior: the spine lies in the back half of the image
    assert ((boxes["y0"] + boxes["y1"]) / 2).mean() > rows / 2

    ratios = vertebra_ratios(seg, "totalseg")
    peaks = []
    for k in range(1, 8):
        r = ratios[f"C{k}"].to_numpy()
        assert r.min() >= 0 and r.max() == 1.0, k
        assert ((r > 0) == (seg == k).any(axis=(1, 2))).all(), k
        at_peak = np.flatnonzero(r == 1.0)
        assert (np.diff(at_peak) == 1).all(), f"C{k}: peak slices {at_peak} are not one run"
        peaks.append(at_peak.mean())
    # vertebrae follow each other head -> feet along the slice axis
    assert np.all(np.diff(peaks) > 0), peaks
    centres = [np.nonzero(seg == k)[0].mean() for k in range(1, 9)]
    assert np.all(np.diff(centres[:7]) > 0) and centres[7] < centres[0]  # T11 (8) above T12 (1)


# ------------------------------------------------------------------ build from competition files


def write_ct_slice(path, uid: str, number: int, z: float, pixels: np.ndarray) -> None:
    """A minimal valid CT slice (explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = uid + ".1"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-50.0, -50.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_build_segmentation_labels(tmp_path):
    dicom = pytest.importorskip("rsna22_utils.core.dicom")
    if not hasattr(dicom, "read_slice_headers"):
        pytest.skip("rsna22_utils.core.dicom.read_slice_headers not available yet")
    from tests.cervical.test_segmentation import head_to_feet_labels, write_competition_nifti

    data = tmp_path / "data"
    (data / "segmentations").mkdir(parents=True)
    truth = {}
    # "down": z falls as the file number grows (81 of 87 real studies); "up": z rises (6 of 87)
    for uid, numbers_rise_with_z in (("1.2.10", False), ("1.2.20", True)):
        seg = head_to_feet_labels(n_slices=16, rows=12, cols=10)
        n = seg.shape[0]
        study = data / "train_images" / uid
        study.mkdir(parents=True)
        z = 100.0 - 1.25 * np.arange(n)  # head -> feet
        numbers = np.arange(n, 0, -1) if numbers_rise_with_z else np.arange(1, n + 1)
        for i in range(n):
            write_ct_slice(study / f"{numbers[i]}.dcm", uid, int(numbers[i]), z[i], np.zeros((12, 10)))
        write_competition_nifti(data / "segmentations" / f"{uid}.nii", seg)
        truth[uid] = (np.where(seg > 7, 0, seg), numbers)
    # a segmentation whose study has fewer slices: reported and skipped
    broken = data / "train_images" / "1.2.30"
    broken.mkdir(parents=True)
    for i in range(3):
        write_ct_slice(broken / f"{i + 1}.dcm", "1.2.30", i + 1, 10.0 - i, np.zeros((12, 10)))
    write_competition_nifti(data / "segmentations" / "1.2.30.nii", head_to_feet_labels(n_slices=5))
    # a segmentation without images: ignored
    write_competition_nifti(data / "segmentations" / "1.2.40.nii", head_to_feet_labels(n_slices=5))

    folds = pd.DataFrame({"StudyInstanceUID": ["1.2.10", "1.2.20", "1.2.30"], "fold": [3, 1, 0]})
    written = build_segmentation_labels(data, tmp_path / "out", folds_df=folds, workers=1)

    failures = pd.read_csv(written["failures"])
    assert failures["study"].tolist() == ["1.2.30"] and "1.2.30.nii" in failures["file"][0]
    assert "5 slices" in failures["reason"][0]
    boxes = pd.read_parquet(written["slice_boxes"])
    ratios = pd.read_parquet(written["vertebra_ratios"])
    assert sorted(boxes["StudyInstanceUID"].unique()) == ["1.2.10", "1.2.20"]
    for uid, (seg, numbers) in truth.items():
        b = boxes[boxes["StudyInstanceUID"] == uid].sort_values("slice_index")
        r = ratios[ratios["StudyInstanceUID"] == uid].sort_values("slice_index")
        assert (b["fold"] == folds.set_index("StudyInstanceUID").loc[uid, "fold"]).all()
        assert b["slice_number"].tolist() == numbers.tolist()
        expected = slice_boxes(seg, uid, numbers)
        pd.testing.assert_frame_equal(b[expected.columns].reset_index(drop=True), expected, check_dtype=False)
        # C1 sits at the head end, i.e. at the highest file numbers in the "up" study
        c1_numbers = r.loc[r["C1"] > 0, "slice_number"]
        half = len(seg) // 2
        assert (c1_numbers.min() > half) if uid == "1.2.20" else (c1_numbers.max() <= half)
        np.testing.assert_array_equal(r["C7"].to_numpy(), vertebra_ratios(seg, uid, numbers)["C7"].to_numpy())


def test_fracture_slice_labels_rescale_each_vertebra_to_peak_one() -> None:
    from rsna22_utils.cervical.labels import fracture_slice_labels

    pred = np.zeros((20, 7))
    pred[2:6, 0] = [0.1, 0.4, 0.2, 0.1]  # C1 peaks at 0.4: rescaled to 1
    pred[8:12, 1] = [0.2, 0.5, 0.5, 0.1]
    pred[15, 6] = 0.1  # below the floor: C7 probably not in the scan, left as predicted
    pred[0, 2] = np.nan  # windows that covered nothing
    vertebra, fracture = fracture_slice_labels(pred, [1, 0, 0, 0, 0, 0, 1])
    assert vertebra.shape == fracture.shape == (20, 7) and vertebra.dtype == np.float32
    assert vertebra[3, 0] == pytest.approx(1.0) and vertebra[2, 0] == pytest.approx(0.25)
    assert vertebra[:, 1].max() == pytest.approx(1.0)
    assert vertebra[15, 6] == pytest.approx(0.1) and vertebra[0, 2] == 0.0
    np.testing.assert_allclose(fracture[:, 0], vertebra[:, 0])  # C1 fractured
    assert fracture[:, 1].max() == 0.0  # C2 not fractured
    assert fracture[15, 6] == pytest.approx(0.1)
