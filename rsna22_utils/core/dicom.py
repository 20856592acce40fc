"""DICOM layer: per-slice header tables, HU volumes ordered head -> feet, and windowing.

Everything else in the kit stands on three promises made here:
- slices are ordered head -> feet by DESCENDING ImagePositionPatient z (ties: InstanceNumber),
  never by file name; row i of the per-slice table describes volume[i];
- volumes are int16 Hounsfield units, and padding / outside-the-scan-circle pixels are -1000 (air);
- dicomsdl (fast, C++) and pydicom (+ pylibjpeg / pyjpegls / gdcm) give identical HU, because both
  only deliver *stored* values and share one conversion (`_stored_to_hu`).

Any problem with a file is raised as `DicomReadError` naming the file and the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

BONE_WINDOW = (400, 1800)
AIR_HU = -1000
MIN_HU = -1024  # anything below this after rescale is padding / outside the scan circle

SLICE_COLUMNS = [
    "StudyInstanceUID",
    "slice_number",
    "z",
    "instance_number",
    "pixel_spacing",
    "pixel_spacing_col",
    "slice_thickness",
    "rows",
    "cols",
    "transfer_syntax",
    "path",
]

TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}

BACKENDS = ("auto", "dicomsdl", "pydicom")

try:  # dicomsdl is the fast path; the kit still works (slower) without it
    import dicomsdl as _dicomsdl
except ImportError:  # pragma: no cover - depends on the environment
    _dicomsdl = None


class DicomReadError(ValueError):
    """A DICOM file (or study folder) that cannot be read; the message names it and the problem."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple:
        # picklable with its two arguments, so it crosses process pools intact (scan, cache workers)
        return type(self), (self.path, self.reason)


class Study(NamedTuple):
    """`read_study` result: unpacks as `volume, slices = read_study(...)`."""

    volume: np.ndarray  # int16 HU (slices, rows, cols), head -> feet
    slices: pd.DataFrame  # one row per slice, row i describes volume[i]


class _Pixels(NamedTuple):
    """What the HU conversion needs from a header (identical for both backends)."""

    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    padding: int | None
    padding_limit: int | None


# ----------------------------------------------------------------------------------------------
# helpers shared by both backends


def _slice_number(path: Path, strict: bool = True) -> int:
    """The `<n>` of `<n>.dcm`; a file read on its own (strict=False) may have any name (-> -1)."""
    try:
        return int(path.stem)
    except ValueError:
        if not strict:
            return -1
        raise DicomReadError(path, "file name is not `<slice number>.dcm`") from None


def _list_dicoms(study_dir: Path) -> list[Path]:
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise DicomReadError(study_dir, "study folder does not exist")
    files = [p for p in study_dir.iterdir() if p.suffix.lower() == ".dcm" and p.is_file()]
    if not files:
        raise DicomReadError(study_dir, "no .dcm files in the study folder")
    return files


def _float(value: Any, default: float = float("nan")) -> float:
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _multi(value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = str(value).split("\\")
    try:
        return [float(v) for v in value]
    except TypeError:
        return [float(value)]


def _header_row(path: Path, get: Any, transfer_syntax: str, strict: bool = True) -> dict:
    """Per-slice table row from a `get(keyword)` accessor (pydicom or dicomsdl)."""
    position = _multi(get("ImagePositionPatient"))
    if len(position) != 3:
        raise DicomReadError(path, "missing or malformed ImagePositionPatient (needed to order slices head -> feet)")
    spacing = _multi(get("PixelSpacing"))
    if len(spacing) == 1:
        spacing = spacing * 2
    uid = get("StudyInstanceUID")
    instance = get("InstanceNumber")
    return {
        "StudyInstanceUID": str(uid).strip() if uid else path.parent.name,
        "slice_number": _slice_number(path, strict),
        "z": position[2],
        "instance_number": int(_float(instance, 0)) if instance not in (None, "") else 0,
        "pixel_spacing": spacing[0] if spacing else float("nan"),
        "pixel_spacing_col": spacing[1] if spacing else float("nan"),
        "slice_thickness": _float(get("SliceThickness")),
        "rows": int(_float(get("Rows"), 0)),
        "cols": int(_float(get("Columns"), 0)),
        "transfer_syntax": str(transfer_syntax or ""),
        "path": str(path),
    }


def _pixel_info(path: Path, get: Any) -> _Pixels:
    bits_allocated = int(_float(get("BitsAllocated"), 16))
    bits_stored = int(_float(get("BitsStored"), bits_allocated))
    representation = get("PixelRepresentation")
    if representation is None:
        raise DicomReadError(path, "no PixelRepresentation: not an image")
    padding = get("PixelPaddingValue")
    limit = get("PixelPaddingRangeLimit")
    samples = int(_float(get("SamplesPerPixel"), 1))
    if samples != 1:
        raise DicomReadError(path, f"SamplesPerPixel {samples}: only single-channel CT slices are supported")
    return _Pixels(
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=bool(int(representation)),
        slope=_float(get("RescaleSlope"), 1.0),
        intercept=_float(get("RescaleIntercept"), 0.0),
        padding=int(padding) if padding not in (None, "") and not isinstance(padding, (bytes, list)) else None,
        padding_limit=int(limit) if limit not in (None, "") and not isinstance(limit, (bytes, list)) else None,
    )


@lru_cache(maxsize=64)
def _hu_lut(info: _Pixels, itemsize: int) -> np.ndarray:
    """int16 HU for every possible 8/16-bit stored bit pattern: one table lookup per pixel."""
    patterns = np.arange(1 << (8 * itemsize), dtype=np.int64)
    return _stored_to_hu_arithmetic(patterns, info, container_bits=8 * itemsize)


def _stored_to_hu(stored: np.ndarray, info: _Pixels, out: np.ndarray | None = None) -> np.ndarray:
    """Stored pixel values -> int16 HU with padding set to air; the one conversion for both backends.

    8/16-bit data (all CT in practice) goes through a cached 65536-entry lookup table built by
    `_stored_to_hu_arithmetic`, ~4x faster than the arithmetic on a 512x512 slice.
    """
    if out is None:
        out = np.empty(stored.shape, dtype=np.int16)
    if stored.dtype.kind in "iu" and stored.dtype.itemsize in (1, 2):
        lut = _hu_lut(info, stored.dtype.itemsize)
        index = stored.view(np.uint8 if stored.dtype.itemsize == 1 else np.uint16)
        np.take(lut, index, out=out, mode="wrap")  # indices are always in range; "wrap" skips the bounds check
        return out
    out[...] = _stored_to_hu_arithmetic(stored, info, container_bits=8 * stored.dtype.itemsize)
    return out


def _stored_to_hu_arithmetic(stored: np.ndarray, info: _Pixels, container_bits: int) -> np.ndarray:
    """The HU rule itself (used to build the lookup table, and directly for >16-bit containers).

    Bits above BitsStored are ignored (unsigned) or sign-extended (signed), as the standard says and
    as several RSNA 2022 studies need; PixelPaddingValue (a stored value, optionally a range up to
    PixelPaddingRangeLimit) and anything below -1024 HU after rescale become -1000 HU.
    """
    values = stored.astype(np.int64)
    bits = min(info.bits_stored, container_bits)
    if 0 < bits < 64:
        values &= (1 << bits) - 1  # bit pattern of the BitsStored low bits
        if info.signed:
            values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)  # sign-extend
    pad = None
    if info.padding is not None:
        padding = _as_stored(info.padding, info)
        if info.padding_limit is not None:
            limit = _as_stored(info.padding_limit, info)
            lo, hi = min(padding, limit), max(padding, limit)
            pad = (values >= lo) & (values <= hi)
        else:
            pad = values == padding
    if info.slope == 1.0 and float(info.intercept).is_integer():
        values = values + int(info.intercept)
    else:
        values = np.rint(values * np.float64(info.slope) + info.intercept).astype(np.int64)
    if pad is not None:
        values[pad] = AIR_HU
    values[values < MIN_HU] = AIR_HU
    return np.clip(values, -32768, 32767).astype(np.int16)


def _as_stored(value: int, info: _Pixels) -> int:
    """Padding value as the same sign-extended / masked integer the pixel array holds."""
    bits = info.bits_stored
    value &= (1 << bits) - 1
    if info.signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


# ----------------------------------------------------------------------------------------------
# backends: each returns (header row, pixel info, stored array); stored arrays are never rescaled


def _read_pydicom(path: Path, pixels: bool = True, strict: bool = True) -> tuple[dict, _Pixels | None, np.ndarray | None]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError as e:
        raise DicomReadError(path, f"not a DICOM file ({e})") from None
    except Exception as e:  # truncated / corrupt header
        raise DicomReadError(path, f"unreadable DICOM header: {type(e).__name__}: {e}") from None
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    get = lambda keyword: ds.get(keyword)
    try:
        row = _header_row(path, get, syntax, strict)
    except DicomReadError as e:  # pydicom reads a cut-short header silently: say so when it looks like it
        if _PIXEL_DATA_TAG not in path.read_bytes():
            raise DicomReadError(path, f"{e.reason}; the file has no pixel data either (truncated? {path.stat().st_size} bytes)") from None
        raise
    if not pixels:
        return row, None, None
    if "PixelData" not in ds:
        raise DicomReadError(path, "no pixel data in the file")
    _check_syntax(path, syntax)
    info = _pixel_info(path, get)
    try:
        stored = ds.pixel_array
    except Exception as e:
        name = TRANSFER_SYNTAX_NAMES.get(syntax, "unknown transfer syntax")
        raise DicomReadError(
            path,
            f"cannot decode pixel data ({name} {syntax}): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            " (needs pylibjpeg-libjpeg / pylibjpeg-openjpeg / pyjpegls / python-gdcm for compressed data)",
        ) from None
    return row, info, _check_shape(path, stored, row)


def _read_dicomsdl(path: Path, pixels: bool = True, strict: bool = True) -> tuple[dict, _Pixels | None, np.ndarray | None]:
    if _dicomsdl is None:
        raise DicomReadError(path, "dicomsdl is not installed (pip install dicomsdl) - use backend='pydicom'")
    data = None
    try:
        if pixels:
            # dicomsdl 0.109 segfaults on native pixel data cut short, so check the length first
            data = path.read_bytes()
            problem = _pixel_data_problem(data)
            if problem:
                raise DicomReadError(path, problem)
            ds = _dicomsdl.open_memory(data, copy_data=False)
        else:
            ds = _dicomsdl.open(str(path), load_until=_PIXEL_DATA_GROUP)
    except DicomReadError:
        raise
    except Exception as e:  # dicomsdl raises RuntimeError / DicomException with C++ text
        raise DicomReadError(path, f"dicomsdl cannot open the file: {_first_line(e)}") from None

    def get(keyword: str) -> Any:
        try:
            return getattr(ds, keyword)
        except Exception:
            return None

    row = _header_row(path, get, get("TransferSyntaxUID"), strict)
    if not pixels:
        return row, None, None
    _check_syntax(path, row["transfer_syntax"])
    info = _pixel_info(path, get)
    try:
        stored = ds.pixelData(storedvalue=True)
    except Exception as e:
        raise DicomReadError(path, f"dicomsdl cannot decode pixel data ({row['transfer_syntax']}): {_first_line(e)}") from None
    if stored is None:
        raise DicomReadError(path, "no pixel data in the file")
    return row, info, _check_shape(path, stored, row)


_PIXEL_DATA_GROUP = 0x7FE00000  # stop before (7FE0,0010) Pixel Data when reading headers
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_EXPLICIT_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV")


def _pixel_data_problem(data: bytes) -> str | None:
    """Why the file's Pixel Data element cannot be complete (None when it looks complete)."""
    pos = data.rfind(_PIXEL_DATA_TAG)
    if pos < 0:
        return "no pixel data in the file (or the file is truncated before it)"
    if data[pos + 4 : pos + 6] in _EXPLICIT_LONG_VRS and data[pos + 6 : pos + 8] == b"\0\0":
        start, length = pos + 12, int.from_bytes(data[pos + 8 : pos + 12], "little")
    else:  # implicit VR
        start, length = pos + 8, int.from_bytes(data[pos + 4 : pos + 8], "little")
    if length == 0xFFFFFFFF:  # encapsulated (compressed): dicomsdl checks fragment lengths itself
        return None
    if start + length > len(data):
        return f"truncated file: pixel data needs {length} bytes, only {max(len(data) - start, 0)} present"
    return None


def _check_syntax(path: Path, syntax: str) -> None:
    if syntax and syntax not in TRANSFER_SYNTAX_NAMES:
        raise DicomReadError(path, f"unknown or unsupported transfer syntax {syntax} (see dicom.TRANSFER_SYNTAX_NAMES)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _check_shape(path: Path, stored: np.ndarray, row: dict) -> np.ndarray:
    if stored.ndim != 2 or stored.shape != (row["rows"], row["cols"]):
        raise DicomReadError(path, f"decoded pixel array has shape {stored.shape}, header says ({row['rows']}, {row['cols']})")
    return stored


def _read(path: Path, backend: str, pixels: bool = True, strict: bool = True) -> tuple[dict, _Pixels | None, np.ndarray | None]:
    """One file with the chosen backend; `auto` = dicomsdl, falling back to pydicom on failure."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pydicom" or (backend == "auto" and _dicomsdl is None):
        return _read_pydicom(path, pixels, strict)
    if backend == "dicomsdl":
        return _read_dicomsdl(path, pixels, strict)
    try:
        return _read_dicomsdl(path, pixels, strict)
    except DicomReadError as e:
        logger.debug("dicomsdl failed on %s (%s); trying pydicom", path, e.reason)
        try:
            return _read_pydicom(path, pixels, strict)
        except DicomReadError as e2:
            reason = e2.reason if e2.reason.startswith(e.reason[:20]) else f"{e2.reason} [dicomsdl: {e.reason}]"
            raise DicomReadError(path, reason) from None


def _sort_head_to_feet(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=SLICE_COLUMNS)
    table = table.sort_values(["z", "instance_number", "slice_number"], ascending=[False, True, True], kind="mergesort")
    table = table.reset_index(drop=True)
    return table.astype(
        {
            "slice_number": "int64",
            "z": "float64",
            "instance_number": "int64",
            "pixel_spacing": "float64",
            "pixel_spacing_col": "float64",
            "slice_thickness": "float64",
            "rows": "int64",
            "cols": "int64",
        }
    )


# ----------------------------------------------------------------------------------------------
# public API


def read_slice_headers(study_dir: str | Path, backend: str = "auto") -> pd.DataFrame:
    """Per-slice table of one study folder (headers only, no decoding), sorted head -> feet.

    Columns: SLICE_COLUMNS. Order: descending z, ties by instance_number; never by file name.
    dicomsdl reads headers ~4x faster than pydicom(stop_before_pixels) on the real files, so it is
    used when installed; any file it cannot open is retried with pydicom.
    """
    files = _list_dicoms(Path(study_dir))
    rows = [_read(path, backend, pixels=False)[0] for path in files]
    return _sort_head_to_feet(rows)


def read_study(study_dir: str | Path, backend: str = "auto") -> Study:
    """Decode one study folder -> (int16 HU volume (slices, rows, cols) head -> feet, per-slice table).

    Headers are read first to order the slices and preallocate the volume; each slice is then
    decoded straight into its place. `backend`: "auto" (dicomsdl, pydicom fallback per file),
    "dicomsdl" or "pydicom". Slices of different shapes raise DicomReadError naming the file.
    """
    study_dir = Path(study_dir)
    table = read_slice_headers(study_dir, backend=backend)
    shapes = table[["rows", "cols"]].drop_duplicates()
    if len(shapes) > 1:
        first = (int(table.at[0, "rows"]), int(table.at[0, "cols"]))
        odd = table[(table["rows"] != first[0]) | (table["cols"] != first[1])].iloc[0]
        raise DicomReadError(
            odd["path"], f"slice shape ({odd['rows']}, {odd['cols']}) differs from the study's first slice {first} in {study_dir}"
        )
    volume = np.empty((len(table), int(table.at[0, "rows"]), int(table.at[0, "cols"])), dtype=np.int16)
    for i, path in enumerate(table["path"]):
        _, info, stored = _read(Path(path), backend)
        _stored_to_hu(stored, info, out=volume[i])
    logger.debug("read %s: %d slices %s", study_dir, len(table), volume.shape[1:])
    return Study(volume, table)


def read_slice(path: str | Path, backend: str = "auto") -> tuple[np.ndarray, dict]:
    """One DICOM file -> (int16 HU 2-D array, header dict with the per-slice table's keys).

    For on-the-fly datasets; slice_number is -1 when the file name is not `<n>.dcm`.
    """
    path = Path(path)
    if not path.is_file():
        raise DicomReadError(path, "file does not exist")
    row, info, stored = _read(path, backend, strict=False)
    return _stored_to_hu(stored, info), row


def window(hu: np.ndarray, windows: Sequence[tuple[float, float]] | tuple[float, float] = (BONE_WINDOW,)) -> np.ndarray:
    """HU -> uint8 with one channel per (center, width) window on a trailing axis: (..., n_windows).

    Each channel is clip((hu - (c - w/2)) / w, 0, 1) * 255; a single (c, w) pair is accepted too.
    """
    windows = _normalise_windows(windows)
    hu = np.asarray(hu, dtype=np.float32)
    out = np.empty(hu.shape + (len(windows),), dtype=np.uint8)
    for k, (center, width) in enumerate(windows):
        if width <= 0:
            raise ValueError(f"window width must be positive, got {(center, width)}")
        scaled = (hu - np.float32(center - width / 2)) / np.float32(width)
        np.clip(scaled, 0.0, 1.0, out=scaled)
        scaled *= 255.0
        out[..., k] = scaled  # truncation toward zero, like the uint8 cast of the 3rd place
    return out


def _normalise_windows(windows: Iterable) -> list[tuple[float, float]]:
    windows = list(windows)
    if len(windows) == 2 and all(np.isscalar(v) for v in windows):
        return [(float(windows[0]), float(windows[1]))]
    return [(float(c), float(w)) for c, w in windows]
