"""DICOM writing for synthetic data: CT slices in the transfer syntaxes, bit depths and paddings real studies use.

Why in core: any competition's synthetic generator and any test that needs a DICOM in a given
encoding (JPEG Lossless, JPEG-LS, JPEG 2000, RLE, signed/unsigned, PixelPaddingValue) writes it
the same way. `write_dicom_slice` writes one file; `SliceWriter` writes a series with one header.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage

EXPLICIT_LE = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian
IMPLICIT_LE = "1.2.840.10008.1.2"  # Implicit VR Little Endian
JPEG_LOSSLESS_57 = "1.2.840.10008.1.2.4.57"  # JPEG Lossless, Process 14
JPEG_LOSSLESS_70 = "1.2.840.10008.1.2.4.70"  # JPEG Lossless, Process 14, SV1 (most competition files)
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"  # JPEG-LS Lossless
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Lossless
RLE_LOSSLESS = "1.2.840.10008.1.2.5"  # RLE Lossless

TRANSFER_SYNTAXES: tuple[str, ...] = (
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_LOSSLESS_57,
    JPEG_LOSSLESS_70,
    JPEG_LS_LOSSLESS,
    JPEG2000_LOSSLESS,
    RLE_LOSSLESS,
)
_GDCM_SYNTAXES = {JPEG_LOSSLESS_57, JPEG_LOSSLESS_70}
_PYDICOM_SYNTAXES = {JPEG_LS_LOSSLESS, JPEG2000_LOSSLESS, RLE_LOSSLESS}


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest stored pixel value for BitsStored / PixelRepresentation."""
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def hu_to_stored(hu: np.ndarray, *, intercept: float, slope: float, bits_stored: int, signed: bool) -> np.ndarray:
    """stored = round((hu - intercept) / slope), clipped to the stored range, as int16 / uint16."""
    low, high = stored_range(bits_stored, signed)
    stored = np.clip(np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope), low, high)
    return stored.astype(np.int16 if signed else np.uint16)


def padding_hu(padding_value: int, *, rescale_intercept: float = -1024.0, rescale_slope: float = 1.0) -> int:
    """HU to put in `hu` where a slice should hold the raw PixelPaddingValue (e.g. -2000 -> -3024)."""
    return int(round(padding_value * rescale_slope + rescale_intercept))


def _gdcm_change_syntax(path: Path, transfer_syntax: str) -> None:
    """Re-encode an uncompressed DICOM file in place into JPEG Lossless (.57 / .70) with GDCM."""
    try:
        import gdcm  # lazy: only the JPEG Lossless syntaxes need python-gdcm
    except ImportError as error:  # pragma: no cover - gdcm is in requirements
        raise RuntimeError(f"{path}: writing {transfer_syntax} needs python-gdcm (pip install python-gdcm)") from error
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise RuntimeError(f"{path}: GDCM cannot read the uncompressed file it should re-encode")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(transfer_syntax)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"{path}: GDCM could not encode transfer syntax {transfer_syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"{path}: GDCM could not write the {transfer_syntax} file")


class SliceWriter:
    """Writes the slices of one series: the header is built once, each slice only changes its own fields.

    `write_dicom_slice` is the one-off form; the generator keeps one writer per study (faster).
    """

    def __init__(
        self,
        *,
        transfer_syntax: str,
        study_uid: str,
        series_uid: str,
        rows: int,
        cols: int,
        pixel_spacing: tuple[float, float] = (0.5, 0.5),
        slice_thickness: float = 1.0,
        signed: bool = True,
        bits_stored: int = 16,
        rescale_intercept: float = -1024.0,
        rescale_slope: float = 1.0,
        padding_value: int | None = None,
        x: float | None = None,
        y: float | None = None,
    ) -> None:
        if transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}; use one of {TRANSFER_SYNTAXES}")
        if not 8 < bits_stored <= 16:
            raise ValueError(f"bits_stored must be 9..16, got {bits_stored}")
        self.transfer_syntax, self.signed, self.bits_stored = transfer_syntax, signed, bits_stored
        self.intercept, self.slope, self.shape = rescale_intercept, rescale_slope, (rows, cols)
        row_mm, col_mm = float(pixel_spacing[0]), float(pixel_spacing[1])
        self.x = -cols * col_mm / 2 if x is None else x
        self.y = -rows * row_mm / 2 if y is None else y

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.1"
        meta.TransferSyntaxUID = IMPLICIT_LE if transfer_syntax == IMPLICIT_LE else EXPLICIT_LE
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RSNA22KIT_SYNTH"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        patient = study_uid.rsplit(".", 1)[-1]
        ds.PatientName = patient
        ds.PatientID = patient
        # Fixed dates/times: GDCM stamps the current time when they are missing (non-deterministic files).
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20220727"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.ImagePositionPatient = [0, 0, 0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = f"{slice_thickness:.6f}"
        ds.SliceLocation = "0"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{row_mm:.6f}", f"{col_mm:.6f}"]
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if padding_value is not None:
            ds.PixelPaddingValue = int(padding_value)  # VR (US or SS) follows PixelRepresentation
        ds.WindowCenter = "500"
        ds.WindowWidth = "2000"
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleType = "HU"
        self.ds = ds

    def write(self, path: str | Path, hu: np.ndarray, *, sop_uid: str, instance_number: int, z: float) -> None:
        """Write one slice (HU, shape (rows, cols)) at ImagePositionPatient z."""
        path = Path(path)
        hu = np.asarray(hu)
        if hu.shape != self.shape:
            raise ValueError(f"{path}: expected a 2-D HU slice of shape {self.shape}, got {hu.shape}")
        stored = hu_to_stored(hu, intercept=self.intercept, slope=self.slope, bits_stored=self.bits_stored, signed=self.signed)
        ds, ts = self.ds, self.transfer_syntax
        ds.file_meta.TransferSyntaxUID = IMPLICIT_LE if ts == IMPLICIT_LE else EXPLICIT_LE
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = int(instance_number)
        ds.ImagePositionPatient = [f"{self.x:.3f}", f"{self.y:.3f}", f"{z:.3f}"]
        ds.SliceLocation = f"{z:.3f}"
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        ds["PixelData"].is_undefined_length = False
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if ts in _PYDICOM_SYNTAXES:
                if ts == JPEG2000_LOSSLESS:
                    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # one INFO line per tile otherwise
                ds.compress(ts, stored, generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
            if ts in _GDCM_SYNTAXES:
                _gdcm_change_syntax(path, ts)
        except Exception as error:
            raise RuntimeError(f"{path}: cannot write {ts} ({type(error).__name__}: {error})") from error


def write_dicom_slice(
    path: str | Path,
    hu: np.ndarray,
    *,
    transfer_syntax: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    z: float,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    slice_thickness: float = 1.0,
    signed: bool = True,
    bits_stored: int = 16,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    padding_value: int | None = None,
    x: float | None = None,
    y: float | None = None,
) -> None:
    """Write one axial CT slice (HU, shape (rows, cols)) as a DICOM file in `transfer_syntax`.

    Stored values are round((hu - intercept) / slope) clipped to the stored range; every
    syntax is lossless, so pydicom's `pixel_array * slope + intercept` gives back exactly the
    clipped HU. `padding_value` is a RAW stored value (DICOM semantics, e.g. -2000): it is
    written as PixelPaddingValue; put `padding_hu(padding_value)` in `hu` where it applies.
    ImagePositionPatient is [x, y, z] with x, y defaulting to centre the slice on 0.
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D HU slice, got shape {hu.shape}")
    try:
        writer = SliceWriter(
            transfer_syntax=transfer_syntax,
            study_uid=study_uid,
            series_uid=series_uid,
            rows=hu.shape[0],
            cols=hu.shape[1],
            pixel_spacing=pixel_spacing,
            slice_thickness=slice_thickness,
            signed=signed,
            bits_stored=bits_stored,
            rescale_intercept=rescale_intercept,
            rescale_slope=rescale_slope,
            padding_value=padding_value,
            x=x,
            y=y,
        )
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    writer.write(path, hu, sop_uid=sop_uid, instance_number=instance_number, z=z)
