"""The core DICOM writer: every transfer syntax and bit depth round-trips through pydicom to the clipped HU."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from rsna22_utils.core.dicom_writer import TRANSFER_SYNTAXES, padding_hu, stored_range, write_dicom_slice


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("signed,bits,padding", [(True, 16, -2000), (False, 12, None)])
def test_write_dicom_slice_round_trips(tmp_path, syntax, signed, bits, padding):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1100, 3200, (40, 48)).astype(np.int16)
    if padding is not None:
        hu[:4, :4] = padding_hu(padding)
    path = tmp_path / "1.dcm"
    write_dicom_slice(
        path,
        hu,
        transfer_syntax=syntax,
        study_uid="1.2.826.0.1.3680043.7",
        series_uid="1.2.826.0.1.3680043.7.1",
        sop_uid="1.2.826.0.1.3680043.7.1.4",
        instance_number=4,
        z=-17.25,
        pixel_spacing=(0.7, 0.7),
        signed=signed,
        bits_stored=bits,
        padding_value=padding,
    )
    ds = pydicom.dcmread(path)
    low, high = stored_range(bits, signed)
    expected = np.clip(hu.astype(np.int32), low - 1024, high - 1024)
    got = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert np.array_equal(got, expected)
    assert str(ds.file_meta.TransferSyntaxUID) == syntax
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.SOPInstanceUID == "1.2.826.0.1.3680043.7.1.4" and int(ds.InstanceNumber) == 4
    assert float(ds.ImagePositionPatient[2]) == -17.25 and [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
    assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (bits, bits - 1, int(signed))
    assert ds.get("PixelPaddingValue") == padding
