"""The DICOM layer: real competition files, every transfer syntax, and bad input.

Real-file tests use the `rsna_real` fixture (skip when ../shared/realdata is absent). Synthetic
slices are written here with pydicom (+ python-gdcm for JPEG Lossless) from a known HU image, so
the expected HU never comes from the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsna22_utils.core.dicom import SLICE_COLUMNS, DicomReadError, read_slice, read_slice_headers, read_study, window

UID_14267 = "1.2.826.0.1.3680043.14267"
UID_13203 = "1.2.826.0.1.3680043.13203"
UID_1476 = "1.2.826.0.1.3680043.1476"


# ------------------------------------------------------------------ real competition files


def real_studies(rsna_real: Path) -> list[Path]:
    return sorted(p for split in ("train_images", "test_images") for p in (rsna_real / split).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def real_read(rsna_real: Path) -> dict[str, dict[str, tuple[np.ndarray, pd.DataFrame]]]:
    """Every real study read once with each backend."""
    return {d.name: {b: read_study(d, backend=b) for b in ("dicomsdl", "pydicom")} for d in real_studies(rsna_real)}


def test_real_backends_identical(real_read):
    assert len(real_read) == 4
    for uid, by_backend in real_read.items():
        (v_sdl, t_sdl), (v_pyd, t_pyd) = by_backend["dicomsdl"], by_backend["pydicom"]
        assert v_sdl.dtype == np.int16 and v_sdl.shape == (len(t_sdl), 512, 512), uid
        np.testing.assert_array_equal(v_sdl, v_pyd, err_msg=uid)
        pd.testing.assert_frame_equal(t_sdl, t_pyd)
        assert list(t_sdl.columns) == SLICE_COLUMNS
        assert (t_sdl["StudyInstanceUID"] == uid).all()
        assert np.all(np.diff(t_sdl["z"].to_numpy()) < 0), f"{uid}: not head -> feet"
        # bone and soft tissue are present, nothing below the -1024 floor survives
        assert v_sdl.min() >= -1024 and v_sdl.max() > 1000, uid


def test_real_air_is_minus_1000(real_read):
    for uid, by_backend in real_read.items():
        volume = by_backend["dicomsdl"][0]
        corners = np.concatenate([volume[:, :24, :24].ravel(), volume[:, :24, -24:].ravel(), volume[:, -24:, :24].ravel()])
        assert abs(float(np.median(corners)) + 1000) <= 50, uid


def test_real_order_matches_meta_segmentation(rsna_real, real_read):
    table = real_read[UID_14267]["dicomsdl"][1]
    meta = pd.read_csv(rsna_real / "csv" / "meta_segmentation.csv")
    meta = meta[(meta["StudyInstanceUID"] == UID_14267) & meta["Slice"].isin(table["slice_number"])]
    assert len(meta) == len(table) == 8
    expected = meta.sort_values("ImagePositionPatient_z", ascending=False)
    assert table["slice_number"].tolist() == expected["Slice"].tolist()
    np.testing.assert_allclose(table["z"], expected["ImagePositionPatient_z"], atol=1e-4)
    assert (table["transfer_syntax"] == "1.2.840.10008.1.2.4.70").all()


def test_real_z_rising_with_file_number_still_head_to_feet(rsna_real, real_read, tmp_path):
    # all four real studies have z falling as the file number grows; copy one under reversed numbers
    src = rsna_real / "train_images" / UID_1476
    files = sorted(src.glob("*.dcm"), key=lambda p: int(p.stem))
    dst = tmp_path / UID_1476
    dst.mkdir()
    for f in files:
        shutil.copy(f, dst / f"{len(files) + 1 - int(f.stem)}.dcm")
    headers = read_slice_headers(dst)
    volume, table = read_study(dst)
    z = table["z"].to_numpy()
    assert np.all(np.diff(z) < 0)
    assert table["slice_number"].tolist() == list(range(len(files), 0, -1))  # numbers now run feet -> head
    pd.testing.assert_frame_equal(headers, table)
    original_volume, original_table = real_read[UID_1476]["dicomsdl"]
    np.testing.assert_array_equal(volume, original_volume)
    np.testing.assert_allclose(z, original_table["z"])


def test_real_padding_minus_2000_becomes_air(rsna_real, real_read):
    import pydicom

    volume, table = real_read[UID_13203]["pydicom"]
    raw = pydicom.dcmread(table.at[0, "path"]).pixel_array
    padded = raw == -2000
    assert padded.mean() > 0.05  # the real study does store -2000 outside the scan circle
    assert (volume[0][padded] == -1000).all()
    assert (volume[0][~padded] == raw[~padded] - 1024).all()  # the rest is the plain rescale


def test_window_values():
    hu = np.array([[-2000, -500, 400], [1300, 2000, -50]], dtype=np.int16)
    out = window(hu)  # default bone window (400, 1800): 0 HU at -500, 255 at 1300
    assert out.shape == (2, 3, 1) and out.dtype == np.uint8
    assert out[..., 0].tolist() == [[0, 0, 127], [255, 255, 63]]  # 127.5 and 63.75 truncate
    two = window(hu, [(40, 400), (400, 1800)])
    assert two.shape == (2, 3, 2)
    assert two[..., 0].tolist() == [[0, 0, 255], [255, 255, 70]]  # (-50 + 160) / 400 * 255 = 70.1
    np.testing.assert_array_equal(two[..., 1], out[..., 0])
    np.testing.assert_array_equal(window(hu, (400, 1800)), out)  # a single (c, w) pair


# ------------------------------------------------------------------ synthetic slices, every syntax

SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR LE",
    "1.2.840.10008.1.2.1": "Explicit VR LE",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless P14",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
}

# (signed, bits_stored, slope, intercept, padding stored value or None)
VARIANTS = {
    "s16": (True, 16, 1.0, -1024.0, -2000),  # like ...13203: -2000 stored outside the circle, no tag
    "u12": (False, 12, 1.0, -1024.0, 0),  # like ...14267, with PixelPaddingValue 0 (= -1024 HU)
    "s12": (True, 12, 1.0, 0.0, -2000),
    "u16_slope": (False, 16, 0.5, -1024.0, None),
    "s16_slope": (True, 16, 2.0, -1000.0, None),
}


def synthetic_hu(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Known HU slice (even values, so slope 2 is exact) and the outside-the-scan-circle mask."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx)
    hu = np.full((size, size), -1000, dtype=np.int16)  # air inside the scan circle
    hu[r < size * 0.38] = 40  # soft tissue
    hu[(r > size * 0.12) & (r < size * 0.2)] = 1200  # cortical bone ring
    rng = np.random.default_rng(0)
    inside = r < size * 0.3
    hu[inside] += (rng.integers(-50, 50, size=inside.sum()) * 2).astype(np.int16)
    hu[0, 1], hu[0, 2] = 2000, -1022  # extremes every variant must keep
    outside = r > size * 0.5  # stored as the padding value; must come back as air (-1000 HU)
    outside[0, 1:3] = False
    return hu, outside


def write_slice(path: Path, hu: np.ndarray, outside: np.ndarray, syntax: str, variant: str, z: float = 0.0, number: int = 1) -> None:
    """Write `hu` as a CT slice in `syntax` with the stored-value layout of `variant`."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    signed, bits, slope, intercept, padding = VARIANTS[variant]
    stored = np.rint((hu.astype(np.float64) - intercept) / slope).astype(np.int64)
    if padding is not None:
        stored[outside] = padding
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    assert stored.min() >= lo and stored.max() <= hi, f"{variant}: test image does not fit {bits} bits"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if syntax == ImplicitVRLittleEndian else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-16.0, -16.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    if padding is not None and variant != "s16":
        ds.add_new(0x00280120, "SS" if signed else "US", padding)  # PixelPaddingValue
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()

    if syntax in ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"):
        plain = path.with_suffix(".plain")
        ds.save_as(plain, enforce_file_format=True)
        gdcm_change_syntax(plain, path, syntax)
        plain.unlink()
        return
    if syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax


def gdcm_change_syntax(src: Path, dst: Path, syntax: str) -> None:
    """JPEG Lossless .57 / .70 re-encoding with python-gdcm (pydicom cannot encode them)."""
    import gdcm

    target = {
        "1.2.840.10008.1.2.4.57": gdcm.TransferSyntax.JPEGLosslessProcess14,
        "1.2.840.10008.1.2.4.70": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), f"gdcm cannot read {src}"
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(target[syntax]))
    change.SetInput(reader.GetImage())
    assert change.Change(), f"gdcm cannot encode {syntax}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), f"gdcm cannot write {dst}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_syntax_same_hu(tmp_path, variant):
    hu, outside = synthetic_hu()
    expected = hu  # air is -1000 everywhere in `hu`, padded or not
    assert (hu[outside] == -1000).all()
    for syntax, name in SYNTAXES.items():
        path = tmp_path / f"{variant}_{syntax}.dcm"
        write_slice(path, hu, outside, syntax, variant)
        for backend in ("dicomsdl", "pydicom", "auto"):
            got, header = read_slice(path, backend=backend)
            assert got.dtype == np.int16 and header["transfer_syntax"] == syntax
            np.testing.assert_array_equal(got, expected, err_msg=f"{variant} {name} ({syntax}) with {backend}")


def test_unused_high_bits_ignored(tmp_path):
    """12-bit data with junk above bit 12 (unsigned) or no sign extension (signed) decodes as 12-bit."""
    import pydicom

    hu, outside = synthetic_hu()
    for variant, junk in (("u12", 0xF000), ("s12", None)):
        path = tmp_path / f"{variant}.dcm"
        write_slice(path, hu, outside, "1.2.840.10008.1.2.1", variant)
        clean = read_slice(path)[0]
        ds = pydicom.dcmread(path)
        raw = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
        raw = raw | junk if junk else raw & 0x0FFF  # signed: 12-bit two's complement, top nibble 0
        ds.PixelData = raw.tobytes()
        ds.save_as(path)
        for backend in ("dicomsdl", "pydicom"):
            np.testing.assert_array_equal(read_slice(path, backend=backend)[0], clean, err_msg=f"{variant} {backend}")


def test_read_study_orders_by_z_not_name(tmp_path):
    hu, outside = synthetic_hu(32)
    study = tmp_path / "1.2.3.4"
    study.mkdir()
    zs = {1: 5.0, 2: 20.0, 3: 10.0, 10: 15.0}  # file names say nothing about the order
    for number, z in zs.items():
        write_slice(study / f"{number}.dcm", hu + int(z) * 2, outside, "1.2.840.10008.1.2.1", "u16_slope", z=z, number=number)
    volume, table = read_study(study)
    assert table["slice_number"].tolist() == [2, 10, 3, 1]
    assert table["z"].tolist() == [20.0, 15.0, 10.0, 5.0]
    for i, z in enumerate(table["z"]):
        np.testing.assert_array_equal(volume[i], hu + int(z) * 2)


# ------------------------------------------------------------------ bad input


@pytest.fixture
def good_slice(tmp_path) -> Path:
    hu, outside = synthetic_hu(32)
    study = tmp_path / "study"
    study.mkdir()
    path = study / "1.dcm"
    write_slice(path, hu, outside, "1.2.840.10008.1.2.1", "s16")
    return path


def assert_names(excinfo, name: str) -> None:
    assert name in str(excinfo.value), str(excinfo.value)


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DicomReadError) as e:
            read_slice_headers(folder)
        assert_names(e, folder.name)
        with pytest.raises(DicomReadError):
            read_study(folder)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70"])
@pytest.mark.parametrize("backend", ["auto", "dicomsdl", "pydicom"])
def test_truncated_file(good_slice, backend, syntax):
    hu, outside = synthetic_hu(32)
    write_slice(good_slice, hu, outside, syntax, "s16")
    data = good_slice.read_bytes()
    good_slice.write_bytes(data[: len(data) - 700])  # pixel data cut short
    with pytest.raises(DicomReadError) as e:
        read_slice(good_slice, backend=backend)
    assert_names(e, good_slice.name)
    with pytest.raises(DicomReadError) as e:
        read_study(good_slice.parent, backend=backend)
    assert_names(e, good_slice.name)
    good_slice.write_bytes(data[:300])  # header cut short
    with pytest.raises(DicomReadError) as e:
        read_slice_headers(good_slice.parent, backend=backend)
    assert_names(e, good_slice.name)


@pytest.mark.parametrize("backend", ["auto", "dicomsdl", "pydicom"])
def test_no_pixel_data(good_slice, backend):
    import pydicom

    ds = pydicom.dcmread(good_slice)
    del ds.PixelData
    ds.save_as(good_slice)
    assert len(read_slice_headers(good_slice.parent, backend=backend)) == 1  # headers alone are fine
    with pytest.raises(DicomReadError) as e:
        read_slice(good_slice, backend=backend)
    assert_names(e, good_slice.name)
    assert "pixel data" in str(e.value)


@pytest.mark.parametrize("backend", ["auto", "dicomsdl", "pydicom"])
def test_unknown_transfer_syntax(good_slice, backend):
    import pydicom

    ds = pydicom.dcmread(good_slice)
    ds.file_meta.TransferSyntaxUID = "1.2.3.999.42"
    ds.save_as(good_slice, implicit_vr=False, little_endian=True)
    with pytest.raises(DicomReadError) as e:
        read_study(good_slice.parent, backend=backend)
    assert_names(e, good_slice.name)
    assert "1.2.3.999.42" in str(e.value) or "transfer syntax" in str(e.value).lower()


def test_missing_position_and_mixed_shapes(good_slice):
    import pydicom

    hu, outside = synthetic_hu(48)
    write_slice(good_slice.parent / "2.dcm", hu, outside, "1.2.840.10008.1.2.1", "s16", z=-1.0)
    with pytest.raises(DicomReadError) as e:
        read_study(good_slice.parent)
    assert_names(e, "2.dcm")
    ds = pydicom.dcmread(good_slice)
    del ds.ImagePositionPatient
    ds.save_as(good_slice)
    with pytest.raises(DicomReadError) as e:
        read_slice_headers(good_slice.parent)
    assert_names(e, good_slice.name)
    assert "ImagePositionPatient" in str(e.value)


def test_read_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(DicomReadError("/x/1.dcm", "not a DICOM file")))
    assert (error.path, error.reason, str(error)) == ("/x/1.dcm", "not a DICOM file", "/x/1.dcm: not a DICOM file")
