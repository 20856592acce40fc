"""DICOM layer: per-slice header tables, HU volumes ordered head -> feet, and windowing.

Everything else in the kit stands on three promises made here:
- slices are ordered head -> feet by DESCENDING ImagePositionPatient z (ties: InstanceNumber),
  never by file name; row i of the per-slice table describes volume[i];
- volumes are int16 Hounsfield units, and padding / outside-the-scan-circle pixels are -1000 (air);
- dicomsdl (fast, C++) and pydicom (+ pylibjpeg / pyjpegls / gdcm) give identical HU, because both
  only deliver *stored* values and share one conversion (`_stored_to_hu`).

Any problem with a file is raised as `DicomReadError` naming the file and the reason: a file is
checked before any decoder sees it (empty, not DICOM, pixel data cut short), so no file can crash
the process, and the HU rule's inputs are checked too (RescaleSlope / RescaleIntercept present,
numeric, finite, slope not 0; HU that do not fit int16, the sign of a PixelRepresentation that
disagrees with the data). dicomsdl's own C++ `error:` lines go to the debug log, never the console.

A study folder is one volume keyed by the folder's name (what train.csv, the segmentations and the
cache use); `read_slice_headers` warns once per study when the folder holds more than one series
(it keeps the series with the most slices), when slices repeat a z position (it keeps one), or
when the headers' StudyInstanceUID differs from the folder name.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from rsna22_utils.core.pool import note_item

logger = logging.getLogger(__name__)

BONE_WINDOW = (400, 1800)
AIR_HU = -1000
MIN_HU = -1024  # anything below this after rescale is padding / outside the scan circle

SLICE_COLUMNS = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
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


class Study(tuple):
    """`read_study` result, the pair (volume, slices): unpacks as `volume, slices = read_study(...)`;
    `.dropped` holds the unreadable slices left out (read_study's `max_dropped`)."""

    def __new__(cls, volume: np.ndarray, slices: pd.DataFrame, dropped: Sequence[DicomReadError] = ()) -> Study:
        study = super().__new__(cls, (volume, slices))
        study.dropped = tuple(dropped)
        return study

    @property
    def volume(self) -> np.ndarray:
        """int16 HU (slices, rows, cols), head -> feet."""
        return self[0]

    @property
    def slices(self) -> pd.DataFrame:
        """One row per slice; row i describes volume[i]."""
        return self[1]


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
    """A multi-valued number (DS list, pydicom MultiValue or `a\\b\\c` text); [] when absent or not numeric."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        value = value.split("\\") if value.strip() else []
    try:
        return [float(v) for v in value]
    except TypeError:
        return [float(value)]
    except ValueError:
        return []


def _header_row(path: Path, get: Any, transfer_syntax: str, strict: bool = True) -> dict:
    """Per-slice table row from a `get(keyword)` accessor (pydicom or dicomsdl)."""
    position = _multi(get("ImagePositionPatient"))
    if len(position) != 3:
        raise DicomReadError(path, "missing or malformed ImagePositionPatient (needed to order slices head -> feet)")
    spacing = _multi(get("PixelSpacing"))
    if len(spacing) == 1:
        spacing = spacing * 2
    uid = get("StudyInstanceUID")
    series = get("SeriesInstanceUID")
    instance = get("InstanceNumber")
    return {
        "StudyInstanceUID": str(uid).strip() if uid else path.parent.name,
        "SeriesInstanceUID": str(series).strip() if series else "",
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
        slope=_rescale(path, get, "RescaleSlope"),
        intercept=_rescale(path, get, "RescaleIntercept"),
        padding=int(padding) if padding not in (None, "") and not isinstance(padding, (bytes, list)) else None,
        padding_limit=int(limit) if limit not in (None, "") and not isinstance(limit, (bytes, list)) else None,
    )


def _rescale(path: Path, get: Any, keyword: str) -> float:
    """RescaleSlope / RescaleIntercept as a finite number (slope not 0), or a DicomReadError.

    No default when a tag is absent: both are required (Type 1) in a CT image, and the usual guesses
    (intercept 0 or -1024) are each 1024 HU wrong for some scanners, so a guess would be silent garbage.
    """
    raw = get(keyword)
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if raw is None or (isinstance(raw, str) and not raw.strip(" \x00")):
        raise DicomReadError(path, f"no {keyword}: HU cannot be computed (no default is guessed: it differs by scanner)")
    if not isinstance(raw, (str, int, float)):
        raise DicomReadError(path, f"{keyword} {raw!r} has several values; a CT slice has one")
    text = str(raw).strip(" \x00")
    try:
        value = float(text)
    except ValueError:
        raise DicomReadError(path, f"{keyword} {text!r} is not a number") from None
    if not np.isfinite(value):
        raise DicomReadError(path, f"{keyword} {text!r} is not a finite number")
    if keyword == "RescaleSlope" and value == 0:
        raise DicomReadError(path, "RescaleSlope 0 would make every pixel the same HU")
    return value


@lru_cache(maxsize=64)
def _hu_lut(info: _Pixels, itemsize: int) -> np.ndarray:
    """int16 HU for every possible 8/16-bit stored bit pattern: one table lookup per pixel."""
    patterns = np.arange(1 << (8 * itemsize), dtype=np.int64)
    return _stored_to_hu_arithmetic(patterns, info, container_bits=8 * itemsize)


def _stored_to_hu(stored: np.ndarray, info: _Pixels, out: np.ndarray | None = None) -> np.ndarray:
    """Stored pixel values -> int16 HU with padding set to air; the one conversion for both backends.

    8/16-bit data (all CT in practice) goes through a cached 65536-entry lookup table built by
    `_stored_to_hu_arithmetic`, ~4x faster than the arithmetic on a 512x512 slice. The table is
    indexed by bit pattern, so the array must be in native byte order (`_to_hu` sees to it).
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
    """The HU rule itself (used to build the lookup table, and directly for >16-bit containers)."""
    return np.clip(_hu_unclipped(stored, info, container_bits), -32768, 32767).astype(np.int16)


def _hu_unclipped(stored: np.ndarray, info: _Pixels, container_bits: int) -> np.ndarray:
    """int64 HU before the int16 clip.

    Bits above BitsStored are ignored (unsigned) or sign-extended (signed), as the standard says and
    as several RSNA 2022 studies need; PixelPaddingValue (a stored value, optionally a range up to
    PixelPaddingRangeLimit) and anything below -1024 HU after rescale become -1000 HU.
    """
    values = _stored_values(stored, info, container_bits)
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
    return values


def _stored_values(stored: np.ndarray, info: _Pixels, container_bits: int) -> np.ndarray:
    """The BitsStored low bits as int64, sign-extended when PixelRepresentation says signed."""
    values = np.asarray(stored).astype(np.int64)
    bits = min(info.bits_stored, container_bits)
    if 0 < bits < 64:
        values &= (1 << bits) - 1  # bit pattern of the BitsStored low bits
        if info.signed:
            values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)  # sign-extend
    return values


def _to_hu(path: Path, stored: np.ndarray, info: _Pixels, out: np.ndarray | None = None) -> np.ndarray:
    """`_stored_to_hu` of one file, refusing data its PixelRepresentation misdescribes (DicomReadError).

    Big-endian arrays (pydicom on Explicit VR Big Endian) become native first: the lookup table and the
    checks read bit patterns, and a big-endian view of them is byte-swapped HU.
    """
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    _check_representation(path, stored, info)
    out = _stored_to_hu(stored, info, out)
    if out.size and int(out.max()) == 32767:  # the int16 ceiling: only then is the exact check worth its cost
        _check_int16(path, stored, info)
    return out


def _check_representation(path: Path, stored: np.ndarray, info: _Pixels) -> None:
    """Unsigned header, signed data: every pixel's bits above BitsStored are the sign extension of its top stored bit.

    Junk above BitsStored is legal (and ignored), but a pattern that is exactly two's complement sign
    extension, with negative values present, means the data are signed and would be read ~2**BitsStored off.
    """
    container = 8 * stored.dtype.itemsize
    bits = info.bits_stored
    if info.signed or stored.dtype.kind not in "iu" or not 0 < bits < container or stored.size == 0:
        return
    raw = stored.view(np.uint8 if container == 8 else np.uint16 if container == 16 else np.uint32).astype(np.int64)
    high = raw >> bits
    if not high.any():  # the common case: one reduction
        return
    negative = ((raw >> (bits - 1)) & 1).astype(bool)
    extension = (1 << (container - bits)) - 1
    if negative.any() and np.array_equal(high, np.where(negative, extension, 0)):
        raise DicomReadError(
            path,
            f"PixelRepresentation 0 (unsigned) disagrees with the data: the bits above BitsStored {bits} are the sign "
            f"extension of {int(negative.sum())} negative values, i.e. signed data (read as unsigned they would be "
            f"{1 << bits} too high)",
        )


def _check_int16(path: Path, stored: np.ndarray, info: _Pixels) -> None:
    """HU above 32767 are not CT: with an unsigned header they are usually signed data read as unsigned."""
    container = 8 * stored.dtype.itemsize
    hu = _hu_unclipped(stored, info, container)
    over = hu > 32767
    if not over.any():
        return
    reason = f"{int(over.sum())} pixels give HU above 32767 (max {int(hu.max())}; slope {info.slope:g}, intercept {info.intercept:g})"
    if not info.signed:
        as_signed = int(_hu_unclipped(stored, info._replace(signed=True), container).max())
        if as_signed <= 32767:
            reason += f": PixelRepresentation 0 (unsigned) disagrees with the data, which read as signed stay within {as_signed} HU"
    raise DicomReadError(path, reason)


def _as_stored(value: int, info: _Pixels) -> int:
    """Padding value as the same sign-extended / masked integer the pixel array holds."""
    bits = info.bits_stored
    value &= (1 << bits) - 1
    if info.signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


# ----------------------------------------------------------------------------------------------
# backends: each returns (header row, pixel info, stored array); stored arrays are never rescaled


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a library's logger for one call: what it reports comes back as this module's one error."""
    library = logging.getLogger(name)
    level = library.level
    library.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library.setLevel(level)


def _read_pydicom(path: Path, pixels: bool = True, strict: bool = True) -> tuple[dict, _Pixels | None, np.ndarray | None]:
    import pydicom  # lazy: pydicom is the fallback; reads dicomsdl serves never pay its import
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings(record=True) as caught, _quiet("pydicom"):
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError as e:
        raise DicomReadError(path, f"not a DICOM file ({e})") from None
    except Exception as e:  # truncated / corrupt header
        raise DicomReadError(path, f"unreadable DICOM header: {type(e).__name__}: {e}") from None
    # encapsulated (compressed) pixel data cut short: pydicom warns and returns an empty dataset
    cut = [str(w.message) for w in caught if "End of file reached" in str(w.message)]
    if cut:
        raise DicomReadError(path, f"truncated file: the compressed pixel data ends early ({cut[0].split(' found in file')[0]})")
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    get = lambda keyword: ds.get(keyword)
    try:
        row = _header_row(path, get, syntax, strict)
    except DicomReadError as e:  # pydicom reads a cut-short header silently: say so when it looks like it
        data = path.read_bytes()
        if not any(tag in data for tag in _PIXEL_DATA_TAG.values()):
            raise DicomReadError(path, f"{e.reason}; the file has no pixel data either (truncated? {path.stat().st_size} bytes)") from None
        raise
    if not pixels:
        return row, None, None
    if "PixelData" not in ds:
        raise DicomReadError(path, "no pixel data in the file")
    _check_syntax(path, syntax)
    info = _pixel_info(path, get)
    try:
        stored = _native_pixels(path, ds, syntax, info, row)
        if stored is None:
            stored = ds.pixel_array
    except DicomReadError:
        raise
    except Exception as e:
        name = TRANSFER_SYNTAX_NAMES.get(syntax, "unknown transfer syntax")
        raise DicomReadError(
            path,
            f"cannot decode pixel data ({name} {syntax}): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            " (needs pylibjpeg-libjpeg / pylibjpeg-openjpeg / pyjpegls / python-gdcm for compressed data)",
        ) from None
    return row, info, _check_shape(path, stored, row)


_NATIVE_BYTE_ORDER = {  # uncompressed transfer syntaxes -> byte order of the pixel data
    "1.2.840.10008.1.2": "<",
    "1.2.840.10008.1.2.1": "<",
    "1.2.840.10008.1.2.1.99": "<",  # deflated: pydicom has inflated the whole data set
    "1.2.840.10008.1.2.2": ">",
}


def _native_pixels(path: Path, ds: Any, syntax: str, info: _Pixels, row: dict) -> np.ndarray | None:
    """Uncompressed single-frame pixel data exactly as stored (None for anything else: pydicom decodes that).

    pydicom's pixel_array clears the bits above BitsStored, which would hide data whose PixelRepresentation
    is wrong; read as stored, pydicom delivers the same bits as dicomsdl, in the file's byte order.
    """
    order = _NATIVE_BYTE_ORDER.get(syntax)
    if order is None or info.bits_allocated not in (8, 16, 32) or int(_float(ds.get("NumberOfFrames"), 1)) != 1:
        return None
    dtype = np.dtype(f"{order}{'i' if info.signed else 'u'}{info.bits_allocated // 8}")
    count = row["rows"] * row["cols"]
    data = ds.PixelData
    if len(data) < count * dtype.itemsize:
        raise DicomReadError(path, f"truncated file: pixel data needs {count * dtype.itemsize} bytes, only {len(data)} present")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(row["rows"], row["cols"])


def _read_dicomsdl(path: Path, pixels: bool = True, strict: bool = True) -> tuple[dict, _Pixels | None, np.ndarray | None]:
    if _dicomsdl is None:
        raise DicomReadError(path, "dicomsdl is not installed (pip install dicomsdl) - use backend='pydicom'")
    with _dicomsdl_stderr_to_log(path):
        return _read_dicomsdl_quietly(path, pixels, strict)


def _read_dicomsdl_quietly(path: Path, pixels: bool, strict: bool) -> tuple[dict, _Pixels | None, np.ndarray | None]:
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
        # text values (DS, IS, UI...) are read as bytes and parsed here: dicomsdl's own conversion of a
        # malformed number prints an `error:` line and returns 0 instead of failing
        try:
            element = ds.getDataElement(keyword)
            vr = element.vr()
            if vr == _dicomsdl.VR.NONE:
                return None
            if vr in _DICOMSDL_TEXT_VRS:
                return element.toBytes().decode("latin-1").strip(" \x00")
            return element.value()
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


_DICOMSDL_TEXT_VRS = (
    frozenset(getattr(_dicomsdl.VR, name) for name in ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI"))
    if _dicomsdl is not None
    else frozenset()
)
_DICOMSDL_LOG_PREFIXES = ("error:", "warning:", "info:", "debug:")


class _StderrSink:
    """Per-process state of `_dicomsdl_stderr_to_log`: a temp file that stands in for file descriptor 2."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: int | None = None
        self.file: Any = None
        self.pid = -1

    def fd(self) -> int:
        if self.file is None or self.pid != os.getpid():  # a forked child must not share its parent's file
            self.file, self.pid = tempfile.TemporaryFile(prefix="dicomsdl-stderr-"), os.getpid()
        return self.file.fileno()


_sink = _StderrSink()
os.register_at_fork(after_in_child=lambda: _sink.__init__())


@contextmanager
def _dicomsdl_stderr_to_log(path: Path) -> Iterator[None]:
    """File descriptor 2 points at a temp file while dicomsdl runs; its C++ `error:` lines go to the debug log.

    dicomsdl writes them straight to fd 2 (Python's sys.stderr never sees them) and also raises, which
    becomes the DicomReadError; anything else written meanwhile (another thread's output) is passed on.
    """
    with _sink.lock:
        if _sink.depth == 0:
            if sys.stderr is not None:
                sys.stderr.flush()
            try:
                _sink.saved = os.dup(2)
            except OSError:  # no fd 2 at all (a daemon): nothing can reach a console
                _sink.saved = None
            else:
                os.dup2(_sink.fd(), 2)
        _sink.depth += 1
    try:
        yield
    finally:
        text = b""
        with _sink.lock:
            _sink.depth -= 1
            if _sink.depth == 0 and _sink.saved is not None:
                os.dup2(_sink.saved, 2)
                os.close(_sink.saved)
                fd = _sink.fd()
                if os.fstat(fd).st_size:
                    os.lseek(fd, 0, os.SEEK_SET)
                    text = os.read(fd, os.fstat(fd).st_size)
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
        if text:
            _route_dicomsdl_output(path, text.decode("utf-8", "replace"))


def _route_dicomsdl_output(path: Path, text: str) -> None:
    passed_on = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(_DICOMSDL_LOG_PREFIXES):
            logger.debug("dicomsdl on %s: %s", path, line.strip())
        else:
            passed_on.append(line)
    if passed_on:
        os.write(2, "".join(passed_on).encode())


_PIXEL_DATA_GROUP = 0x7FE00000  # stop before (7FE0,0010) Pixel Data when reading headers
_PIXEL_DATA_TAG = {False: b"\xe0\x7f\x10\x00", True: b"\x7f\xe0\x00\x10"}  # (7FE0,0010) little / big endian
_EXPLICIT_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV", b"SQ", b"UC", b"UR", b"UT", b"SV", b"UV")
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_PREAMBLE_BYTES = 132  # 128-byte preamble + "DICM"


def _check_file(path: Path) -> None:
    """Refuse what no decoder should see: a missing, empty or non-DICOM file (dicomsdl aborts the process on an empty one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise DicomReadError(path, f"cannot open the file ({e.strerror})") from None
    if size == 0:
        raise DicomReadError(path, "empty file (0 bytes)")
    if size < _PREAMBLE_BYTES or head[128:132] != b"DICM":
        raise DicomReadError(path, f"not a DICOM file ({size} bytes, no 'DICM' marker at byte 128)")


def _meta_transfer_syntax(data: bytes) -> str:
    """TransferSyntaxUID from the file meta group (always explicit VR little endian), '' when absent."""
    pos = _PREAMBLE_BYTES
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        element, vr = int.from_bytes(data[pos + 2 : pos + 4], "little"), data[pos + 4 : pos + 6]
        if vr in _EXPLICIT_LONG_VRS:
            start, length = pos + 12, int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            start, length = pos + 8, int.from_bytes(data[pos + 6 : pos + 8], "little")
        if element == 0x0010:
            return data[start : start + length].decode("ascii", "replace").strip(" \x00")
        pos = start + length
    return ""


def _pixel_data_problem(data: bytes) -> str | None:
    """Why the file's Pixel Data element cannot be complete (None when it looks complete)."""
    big = _meta_transfer_syntax(data) == _BIG_ENDIAN
    order = "big" if big else "little"
    pos = data.rfind(_PIXEL_DATA_TAG[big])
    if pos < 0:
        return "no pixel data in the file (or the file is truncated before it)"
    if data[pos + 4 : pos + 6] in _EXPLICIT_LONG_VRS and data[pos + 6 : pos + 8] == b"\0\0":
        start, length = pos + 12, int.from_bytes(data[pos + 8 : pos + 12], order)
    else:  # implicit VR
        start, length = pos + 8, int.from_bytes(data[pos + 4 : pos + 8], order)
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
    note_item(path)  # names this file if the process dies in a decoder (core.pool)
    _check_file(path)
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


_Z_DECIMALS = 3  # z positions equal to 1 micrometre are the same slice position


def _sort_head_to_feet(table: pd.DataFrame) -> pd.DataFrame:
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


def _one_series(table: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    """The series with the most slices (ties: the smallest SeriesInstanceUID); one warning when others are dropped.

    The labels (train.csv, segmentations) describe one volume; the series with the most slices is the
    full-length axial scan, where localizers, reformats and partial re-scans have fewer.
    """
    counts = table["SeriesInstanceUID"].value_counts()
    if len(counts) < 2:
        return table
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = ranked[0][0]
    listing = ", ".join(f"{uid or '(no SeriesInstanceUID)'}: {n} slices" for uid, n in ranked)
    logger.warning(
        "study %s: the folder holds %d series (%s); reading %s, the one with the most slices, and ignoring %d files",
        study_dir,
        len(counts),
        listing,
        kept or "(no SeriesInstanceUID)",
        len(table) - ranked[0][1],
    )
    return table[table["SeriesInstanceUID"] == kept]


def _one_key(table: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    """StudyInstanceUID = the folder name everywhere (train.csv, segmentations and the cache use it); warn once if headers differ."""
    key = study_dir.name
    in_headers = sorted(set(table["StudyInstanceUID"]) - {key})
    if in_headers:
        logger.warning(
            "study %s: the headers' StudyInstanceUID is %s, not the folder name; the folder name %s is the study's key everywhere",
            study_dir,
            " / ".join(in_headers),
            key,
        )
    return table.assign(StudyInstanceUID=key)


def _unique_z(table: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    """One slice per z position (the lowest InstanceNumber, then file number); one warning when any repeat."""
    repeated = table["z"].round(_Z_DECIMALS).duplicated(keep="first")
    if not repeated.any():
        return table
    first = table.loc[repeated.idxmax()]
    twin = table.loc[(table["z"].round(_Z_DECIMALS) == round(first["z"], _Z_DECIMALS)) & ~repeated].iloc[0]
    logger.warning(
        "study %s: %d slices repeat the z position of another slice (e.g. %d.dcm at z=%.3f, like %d.dcm); "
        "keeping one per position (the lowest InstanceNumber) and ignoring those %d files",
        study_dir,
        int(repeated.sum()),
        first["slice_number"],
        first["z"],
        twin["slice_number"],
        int(repeated.sum()),
    )
    return table[~repeated].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# public API


def read_slice_headers(study_dir: str | Path, backend: str = "auto") -> pd.DataFrame:
    """Per-slice table of one study folder (headers only, no decoding), sorted head -> feet: one volume.

    Columns: SLICE_COLUMNS. Order: descending z, ties by instance_number; never by file name.
    StudyInstanceUID is the folder name. A folder with several series keeps the series with the
    most slices; slices at a repeated z keep the lowest InstanceNumber; each is one warning.
    dicomsdl reads headers ~4x faster than pydicom(stop_before_pixels) on the real files, so it is
    used when installed; any file it cannot open is retried with pydicom.
    """
    return read_headers(study_dir, backend)[0]


def read_headers(study_dir: str | Path, backend: str = "auto", max_dropped: float = 0.0) -> tuple[pd.DataFrame, list[DicomReadError]]:
    """`read_slice_headers`, leaving out up to `max_dropped` (a fraction of the folder's files) files whose
    header cannot be read (empty, not DICOM, truncated) or, when `max_dropped` > 0, whose slice size differs
    from the study's (the most common): the table and those left out, with one warning naming the first
    and why. Past the allowance, a DicomReadError says how many and why.
    """
    study_dir = Path(study_dir)
    files = _list_dicoms(study_dir)
    allowance = _Allowance(max_dropped, len(files), "files")
    rows = []
    for path in files:
        try:
            rows.append(_read(path, backend, pixels=False)[0])
        except DicomReadError as error:
            allowance.drop(error)
    table = _one_series(pd.DataFrame(rows, columns=SLICE_COLUMNS), study_dir)
    table = _unique_z(_sort_head_to_feet(_one_key(table, study_dir)), study_dir)
    if max_dropped > 0:
        table = _one_shape(table, allowance)
    allowance.warn(study_dir)
    return table, allowance.dropped


class _Allowance:
    """The files a study may leave out (`max_dropped` of its `total`): DicomReadError past it, naming how many."""

    def __init__(self, max_dropped: float, total: int, what: str) -> None:
        self.max_dropped, self.total, self.what = max_dropped, total, what
        self.dropped: list[DicomReadError] = []
        self.warned = 0

    def drop(self, error: DicomReadError) -> None:
        """Leave `error`'s file out, or raise when that passes the allowance (the first error alone as itself)."""
        if len(self.dropped) + 1 > self.max_dropped * self.total:
            if self.dropped:
                raise DicomReadError(
                    error.path,
                    f"{len(self.dropped) + 1} of {self.total} {self.what} unreadable "
                    f"(at most {self.max_dropped:.0%} may be left out): {error.reason}",
                ) from error
            raise error
        self.dropped.append(error)

    def warn(self, study_dir: Path) -> None:
        """One warning for the files left out since the last call (the first named, with its reason)."""
        new = self.dropped[self.warned :]
        if new:
            logger.warning(
                "%s: %d of %d %s unreadable, left out (e.g. %s: %s)",
                study_dir,
                len(new),
                self.total,
                self.what,
                Path(new[0].path).name,
                new[0].reason,
            )
        self.warned = len(self.dropped)


def _one_shape(table: pd.DataFrame, allowance: _Allowance) -> pd.DataFrame:
    """The slices of the study's size (the most common; ties: the first slice's); the others are left out
    within the allowance, else a DicomReadError names the first of them."""
    sizes = list(zip(table["rows"].astype(int), table["cols"].astype(int)))
    if len(set(sizes)) < 2:
        return table
    counts = pd.Series(sizes).value_counts(sort=False)
    study_size = max(counts.index, key=lambda size: (counts[size], size == sizes[0]))
    odd = [i for i, size in enumerate(sizes) if size != study_size]
    for i in odd:
        row = table.iloc[i]
        allowance.drop(DicomReadError(row["path"], f"slice size ({row['rows']}, {row['cols']}) differs from the study's {study_size}"))
    return table.drop(index=table.index[odd]).reset_index(drop=True)


def study_folder_problem(study_dir: str | Path) -> str | None:
    """Why no file of a study folder can be read (no folder, no .dcm file, none passes the file check), or
    None; it stops at the first file that passes, so it costs one small read for a usual study."""
    try:
        files = sorted(_list_dicoms(Path(study_dir)))
    except DicomReadError as error:
        return error.reason
    first = None
    for path in files:
        try:
            _check_file(path)
            return None
        except DicomReadError as error:
            first = first or error
    return f"none of its {len(files)} .dcm files can be read (e.g. {Path(first.path).name}: {first.reason})"


def read_study(study_dir: str | Path, backend: str = "auto", slices: pd.DataFrame | None = None, max_dropped: float = 0.0) -> Study:
    """Decode one study folder -> (int16 HU volume (slices, rows, cols) head -> feet, per-slice table).

    Headers are read first to order the slices and preallocate the volume (or `slices`, the study's
    rows of a `scan` table, is used as read: its files, in its order, so the scan and the cache
    agree and warn once); each slice is then decoded straight into its place. `backend`: "auto"
    (dicomsdl, pydicom fallback per file), "dicomsdl" or "pydicom". Slices of different shapes
    raise DicomReadError naming the file. A slice whose pixels cannot be decoded raises too, unless
    `max_dropped` (a fraction of the study's slices) allows leaving it out: the study is then the
    rest, with one warning that names the first bad file and its reason.
    """
    study_dir = Path(study_dir)
    table, before = read_headers(study_dir, backend, max_dropped) if slices is None else (_given_slices(slices, study_dir), [])
    shapes = table[["rows", "cols"]].drop_duplicates()
    if len(shapes) > 1:
        first = (int(table.at[0, "rows"]), int(table.at[0, "cols"]))
        odd = table[(table["rows"] != first[0]) | (table["cols"] != first[1])].iloc[0]
        raise DicomReadError(
            odd["path"], f"slice shape ({odd['rows']}, {odd['cols']}) differs from the study's first slice {first} in {study_dir}"
        )
    # one allowance for the study: files left out at the header read count against it too
    allowance = _Allowance(max_dropped, len(table) + len(before), "slices")
    allowance.dropped, allowance.warned = list(before), len(before)
    volume = np.empty((len(table), int(table.at[0, "rows"]), int(table.at[0, "cols"])), dtype=np.int16)
    keep = np.ones(len(table), bool)
    for i, path in enumerate(table["path"]):
        path = Path(path)
        try:
            _, info, stored = _read(path, backend)
            _to_hu(path, stored, info, out=volume[i])
        except DicomReadError as error:
            allowance.drop(error)
            keep[i] = False
    if not keep.all():
        volume, table = volume[keep], table[keep].reset_index(drop=True)
    allowance.warn(study_dir)
    logger.debug("read %s: %d slices %s", study_dir, len(table), volume.shape[1:])
    return Study(volume, table, tuple(allowance.dropped))


def _given_slices(slices: pd.DataFrame, study_dir: Path) -> pd.DataFrame:
    missing = [c for c in SLICE_COLUMNS if c not in slices.columns]
    if missing:
        raise ValueError(f"{study_dir}: the slice table lacks {missing}; rescan the study (rsna22 scan / 00_prepare)")
    if slices.empty:
        raise DicomReadError(study_dir, "the slice table has no rows for this study")
    return slices[SLICE_COLUMNS].reset_index(drop=True)


def read_slice(path: str | Path, backend: str = "auto") -> tuple[np.ndarray, dict]:
    """One DICOM file -> (int16 HU 2-D array, header dict with the per-slice table's keys).

    For on-the-fly datasets; slice_number is -1 when the file name is not `<n>.dcm`, and
    StudyInstanceUID is the header's (a file on its own has no study folder to name it).
    """
    path = Path(path)
    if not path.is_file():
        raise DicomReadError(path, "file does not exist")
    row, info, stored = _read(path, backend, strict=False)
    return _to_hu(path, stored, info), row


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
