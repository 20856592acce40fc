"""Fault injection: broken DICOMs, folders that are not one series, and worker processes that die.

Every input is generated here into tmp_path (the synthetic writer, pydicom, or raw bytes); nothing
is committed. Expected HU come from the image written, never from the code under test.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from rsna22_utils.core import dicom
from rsna22_utils.core.cache import CacheSpec, StudyCache, build_cache
from rsna22_utils.core.dicom import DicomReadError, read_slice, read_slice_headers, read_study
from rsna22_utils.core.dicom_writer import EXPLICIT_LE, write_dicom_slice
from rsna22_utils.core.pool import WorkerDied, note_item, run_tasks
from rsna22_utils.core.scan import scan_competition

BIG_ENDIAN = "1.2.840.10008.1.2.2"
BACKENDS = ("auto", "dicomsdl", "pydicom")
STUDY = "1.2.3.4"
SERIES = "1.2.3.4.1"
SIZE = 32


def hu_image(offset: int = 0) -> np.ndarray:
    """A small CT-like slice: air, soft tissue, a bone ring and the extremes -1000 / 2000 HU."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(yy, xx)
    hu = np.full((SIZE, SIZE), -1000, dtype=np.int16)
    hu[r < SIZE * 0.4] = 40 + offset
    hu[(r > SIZE * 0.12) & (r < SIZE * 0.22)] = 1200 + offset
    hu[0, 1] = 2000
    return hu


def write(path: Path, hu: np.ndarray, *, z: float = 0.0, number: int = 1, study: str = STUDY, series: str = SERIES, **header) -> Path:
    """One Explicit VR Little Endian CT slice (signed 16-bit, intercept -1024 unless `header` says otherwise)."""
    write_dicom_slice(
        path,
        hu,
        transfer_syntax=EXPLICIT_LE,
        study_uid=study,
        series_uid=series,
        sop_uid=f"{series}.{number}",
        instance_number=number,
        z=z,
        **header,
    )
    return path


def patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Replace a header value in place (same length), for values pydicom refuses to write ('abc', 'NaN')."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new), (old, new)
    path.write_bytes(data.replace(old, new))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == dicom.logger.name]


# ------------------------------------------------------------------ 1. files that crashed the process


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 10, b"\0" * 131, b"\0" * 132, b"\0" * 128 + b"DICM"],
    ids=["zero-byte", "10-bytes", "131-bytes", "no-DICM-marker", "marker-only"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_or_tiny_file_is_a_read_error(tmp_path: Path, content: bytes, backend: str) -> None:
    # before: dicomsdl aborted the process on a zero-byte file ("cannot realloc 0 bytes", double free)
    study = tmp_path / STUDY
    write(study / "1.dcm", hu_image())
    bad = study / "2.dcm"
    bad.write_bytes(content)
    for read in (read_slice, lambda p, backend: read_slice_headers(p.parent, backend), lambda p, backend: read_study(p.parent, backend)):
        with pytest.raises(DicomReadError) as e:
            read(bad, backend=backend)
        assert e.value.path == str(bad) and "2.dcm" in str(e.value)
    if content == b"":
        assert "empty file" in str(e.value)


def test_missing_pixel_data_is_a_read_error(tmp_path: Path) -> None:
    path = write(tmp_path / "1.dcm", hu_image())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    for backend in BACKENDS:
        with pytest.raises(DicomReadError, match="pixel data"):
            read_slice(path, backend=backend)


# ------------------------------------------------------------------ 2. wrong HU without a word


def to_big_endian(src: Path, dst: Path) -> Path:
    """The same slice as Explicit VR Big Endian (pydicom 3 writes it; the pixel bytes are swapped here)."""
    ds = pydicom.dcmread(src)
    stored = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = BIG_ENDIAN
    ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(dst, ds, enforce_file_format=True)
    raw = pydicom.dcmread(dst)
    assert raw.file_meta.TransferSyntaxUID == BIG_ENDIAN
    np.testing.assert_array_equal(np.frombuffer(raw.PixelData, dtype=stored.dtype.newbyteorder(">")).reshape(stored.shape), stored)
    return dst


@pytest.mark.parametrize(
    "header",
    [
        {"signed": True, "bits_stored": 16, "padding_value": -2000},
        {"signed": False, "bits_stored": 12, "rescale_intercept": -1024.0},
        {"signed": False, "bits_stored": 16, "rescale_slope": 0.5, "rescale_intercept": -1024.0},
    ],
    ids=["s16-padding", "u12", "u16-slope"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_big_endian_gives_the_hu_of_little_endian(tmp_path: Path, header: dict, backend: str) -> None:
    # before: both backends byte-swapped Explicit VR Big Endian (mean 5259 HU instead of -325)
    hu = hu_image()
    if "padding_value" in header:
        hu[:2, -2:] = -3024  # stored as the padding value -2000: comes back as air
    little = write(tmp_path / "le" / "1.dcm", hu, **header)
    big = to_big_endian(little, tmp_path / "be" / "1.dcm")
    expected = np.where(hu < -1024, -1000, hu)  # padding and below -1024 HU are air
    np.testing.assert_array_equal(read_slice(little, backend=backend)[0], expected)
    got, row = read_slice(big, backend=backend)
    assert row["transfer_syntax"] == BIG_ENDIAN
    np.testing.assert_array_equal(got, expected)
    volume, _ = read_study(big.parent, backend=backend)
    np.testing.assert_array_equal(volume[0], expected)


RESCALE_FAULTS = {
    # case: (how to break the file, words the error must contain)
    "slope-missing": ("del", "RescaleSlope", "no RescaleSlope"),
    "intercept-missing": ("del", "RescaleIntercept", "no RescaleIntercept"),
    "intercept-NaN": ("intercept", b"NaN  ", "RescaleIntercept 'NaN'"),
    "slope-0": ("slope", b"0   ", "RescaleSlope 0"),
    "slope-abc": ("slope", b"abc ", "RescaleSlope 'abc' is not a number"),
    "intercept-abc": ("intercept", b"abc  ", "RescaleIntercept 'abc' is not a number"),
    "slope-inf": ("slope", b"inf ", "RescaleSlope 'inf'"),
}


@pytest.mark.parametrize("case", list(RESCALE_FAULTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rescale_is_a_read_error_and_dicomsdl_stays_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture, case: str, backend: str
) -> None:
    # before: missing tags gave +1024 HU, NaN an all-air volume, slope 0 a blank one, 'abc' silently 1
    # (and a dicomsdl `error:` line per file)
    what, value, words = RESCALE_FAULTS[case]
    path = write(tmp_path / STUDY / "1.dcm", hu_image(), rescale_slope=7.77, rescale_intercept=-1234.0)
    if what == "del":
        ds = pydicom.dcmread(path)
        delattr(ds, value)
        ds.save_as(path)
    else:
        patch_bytes(path, b"7.77" if what == "slope" else b"-1234", value)
    capfd.readouterr()
    with pytest.raises(DicomReadError) as e:
        read_slice(path, backend=backend)
    assert words in str(e.value) and "1.dcm" in str(e.value)
    with pytest.raises(DicomReadError, match="Rescale"):
        read_study(path.parent, backend=backend)
    assert "error:" not in capfd.readouterr().err


def test_dicomsdl_error_lines_never_reach_the_console(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    import dicomsdl

    path = write(tmp_path / STUDY / "1.dcm", hu_image())
    data = path.read_bytes()
    path.write_bytes(data[: data.index(SERIES.encode()) + 4])  # cut inside a header value: dicomsdl prints `error:` and raises
    try:
        dicomsdl.open(str(path))
    except Exception:  # only what dicomsdl prints matters here
        pass
    assert "error:" in capfd.readouterr().err  # the library does print, straight to fd 2 ...
    for backend in ("auto", "dicomsdl"):
        with pytest.raises(DicomReadError, match="1.dcm"):
            read_slice_headers(path.parent, backend=backend)
        with pytest.raises(DicomReadError, match="1.dcm"):
            read_slice(path, backend=backend)
    captured = capfd.readouterr()
    assert "error:" not in captured.err  # ... but not through the kit
    os.write(2, b"other output\n")  # what else goes to fd 2 is untouched
    assert capfd.readouterr().err == "other output\n"


def signed_as_unsigned(tmp_path: Path, bits: int) -> Path:
    """Signed data (negative stored values outside the scan circle) whose header says unsigned."""
    hu = hu_image()
    intercept = -1024.0 if bits == 16 else 0.0
    hu[:3, -3:] = -2000 + intercept  # stored -2000
    path = write(tmp_path / f"s{bits}" / "1.dcm", hu, signed=True, bits_stored=bits, rescale_intercept=intercept)
    ds = pydicom.dcmread(path)
    assert ds.pixel_array.min() == -2000
    ds.PixelRepresentation = 0
    ds.save_as(path)
    return path


@pytest.mark.parametrize("bits", [16, 12])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_representation_that_disagrees_with_the_data(tmp_path: Path, bits: int, backend: str) -> None:
    # before: 16 bits: the padding read as 63536 -> 32767 HU; 12 bits: read as +4096 -> 1072 HU (a bright ring)
    path = signed_as_unsigned(tmp_path, bits)
    with pytest.raises(DicomReadError, match="PixelRepresentation 0 \\(unsigned\\) disagrees with the data") as e:
        read_slice(path, backend=backend)
    assert "1.dcm" in str(e.value)


def test_unsigned_data_with_junk_high_bits_is_still_read(tmp_path: Path) -> None:
    # the check above must not refuse junk above BitsStored, which the standard allows (and real studies have)
    hu = hu_image()
    path = write(tmp_path / "1.dcm", hu, signed=False, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.PixelData = (np.frombuffer(ds.PixelData, dtype=np.uint16) | 0xF000).tobytes()
    ds.save_as(path)
    for backend in BACKENDS:
        np.testing.assert_array_equal(read_slice(path, backend=backend)[0], hu)


# ------------------------------------------------------------------ 3. studies that are not one series


def test_two_series_in_one_folder_read_the_larger_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # before: the two series were interleaved into one volume
    study = tmp_path / STUDY
    for k in range(6):  # series A: 6 slices, z 5..0
        write(study / f"{k + 1}.dcm", hu_image(10 * k), z=float(k), number=k + 1, series="1.2.3.4.1")
    for k in range(4):  # series B: 4 slices between A's
        write(study / f"{k + 7}.dcm", hu_image(-300), z=k + 0.5, number=k + 1, series="1.2.3.4.2")
    caplog.set_level(logging.WARNING)
    volume, table = read_study(study)
    assert len(table) == 6 and set(table["SeriesInstanceUID"]) == {"1.2.3.4.1"}
    for i, z in enumerate(table["z"]):
        np.testing.assert_array_equal(volume[i], hu_image(10 * int(z)))
    (message,) = warnings_of(caplog)
    assert "2 series" in message and "1.2.3.4.1: 6 slices" in message and "1.2.3.4.2: 4 slices" in message


def test_duplicate_z_positions_keep_one_slice_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # before: ten duplicate z positions passed unnoticed
    study = tmp_path / STUDY
    for k in range(12):
        write(study / f"{k + 1}.dcm", hu_image(10 * k), z=float(k), number=k + 1)
    for k in range(10):  # the same positions again, later instance numbers, other pixels
        write(study / f"{k + 13}.dcm", hu_image(-500), z=float(k), number=k + 13)
    caplog.set_level(logging.WARNING)
    volume, table = read_study(study)
    assert table["z"].tolist() == [float(z) for z in range(11, -1, -1)]
    assert table["instance_number"].tolist() == list(range(12, 0, -1))  # the lower InstanceNumber of each pair
    for i, z in enumerate(table["z"]):
        np.testing.assert_array_equal(volume[i], hu_image(10 * int(z)))
    (message,) = warnings_of(caplog)
    assert "10 slices repeat the z position" in message


def test_folder_name_is_the_study_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # before: slices.parquet used the header's UID and the cache the folder's name
    study = tmp_path / "1.2.3.999"
    for k in range(3):
        write(study / f"{k + 1}.dcm", hu_image(), z=float(k), number=k + 1, study=STUDY)
    caplog.set_level(logging.WARNING)
    table = read_slice_headers(study)
    assert set(table["StudyInstanceUID"]) == {"1.2.3.999"}
    (message,) = warnings_of(caplog)
    assert STUDY in message and "1.2.3.999" in message
    assert read_slice(study / "1.dcm")[1]["StudyInstanceUID"] == STUDY  # a file on its own keeps its header's


@pytest.mark.slow
def test_prepare_keys_each_study_by_its_folder_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # before: slices.parquet said the header's UID, the cache the folder's; a zero-byte file left most studies uncached
    from rsna22_utils.cervical.prepare import Prepared, PrepareFailed, prepare
    from rsna22_utils.cervical.synth import generate_competition
    from rsna22_utils.core.resolve import resolve_config

    data = tmp_path / "data"
    generate_competition(data, n_studies=4, n_test_studies=1, image_size=32, median_slices=30, segmented_fraction=1.0, seed=1, workers=1)
    renamed, broken = sorted((data / "train_images").iterdir())[:2]
    for path in renamed.glob("*.dcm"):  # headers that name another study than the folder does
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = "9.9.9"
        ds.save_as(path)
    empty = sorted(broken.glob("*.dcm"))[2]
    empty.write_bytes(b"")
    # no file may be left out here: the zero-byte file fails its study (see the test below for the default)
    settings = {
        "data_dir": str(data),
        "out_dir": str(tmp_path / "prep"),
        "image_size": 32,
        "workers": 2,
        "n_folds": 2,
        "max_dropped_slices": 0.0,
    }
    caplog.set_level(logging.WARNING)
    with pytest.raises(PrepareFailed, match=rf"1 of 5 studies failed \(e\.g\. {broken.name}: .*max_failed_studies=1"):
        prepare(resolve_config("00_prepare", settings))  # a failed study fails the stage: exit status non-zero
    assert (tmp_path / "prep" / "prepare.json").is_file()  # after every output was written
    caplog.clear()
    outputs = prepare(resolve_config("00_prepare", {**settings, "max_failed_studies": 1}))  # allowed: a warning
    prepared = Prepared(tmp_path / "prep")
    slices, cache = prepared.read("slices"), prepared.cache()
    folders = sorted(p.name for p in data.glob("*_images/*"))
    assert sorted(slices["StudyInstanceUID"].unique()) == cache.uids == sorted(set(folders) - {broken.name})
    assert set(cache.slices(renamed.name)["StudyInstanceUID"]) == {renamed.name}
    assert set(prepared.read("slice_boxes")["StudyInstanceUID"]) <= set(cache.uids)
    assert [m for m in warnings_of(caplog) if "9.9.9" in m] == [m for m in warnings_of(caplog) if renamed.name in m]
    assert len([m for m in warnings_of(caplog) if "9.9.9" in m]) == 1  # the scan's; labels and cache follow its table
    failures = pd.read_csv(tmp_path / "prep" / "slices.failures.csv", dtype=str)
    assert failures[["study", "file"]].values.tolist() == [[broken.name, empty.name]]
    assert outputs["scan_failures"] == 1 and outputs["cache_failures"] == 1


def test_prepare_leaves_out_a_bad_file_not_its_study(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """#23: a zero-byte file and a file that is not DICOM beside readable slices: each named and counted, both studies cached."""
    from rsna22_utils.cervical.prepare import Prepared, prepare
    from rsna22_utils.cervical.synth import generate_competition
    from rsna22_utils.core.resolve import resolve_config

    data = tmp_path / "data"
    generate_competition(data, n_studies=4, n_test_studies=1, image_size=32, median_slices=30, seed=1, workers=1)
    empty_in, text_in = sorted((data / "train_images").iterdir())[:2]
    (empty_in / "999.dcm").write_bytes(b"")
    (text_in / "998.dcm").write_text("not an image\n")
    settings = {"data_dir": str(data), "out_dir": str(tmp_path / "prep"), "image_size": 32, "workers": 2, "n_folds": 2}
    with caplog.at_level(logging.WARNING):
        outputs = prepare(resolve_config("00_prepare", settings))
    prepared = Prepared(tmp_path / "prep")
    assert outputs["scan_failures"] == 0 and outputs["cache_failures"] == 0 and outputs["dropped_files"] == 2
    assert sorted(prepared.cache().uids) == sorted(p.name for p in data.glob("*_images/*"))
    dropped = pd.read_csv(tmp_path / "prep" / "slices.dropped.csv", dtype=str).sort_values("file")
    assert dropped[["study", "file"]].values.tolist() == [[text_in.name, "998.dcm"], [empty_in.name, "999.dcm"]]
    assert "not a DICOM file" in dropped["reason"].iloc[0] and "empty file" in dropped["reason"].iloc[1]
    assert not prepared.read("slices")["path"].str.endswith(("998.dcm", "999.dcm")).any()
    named = [m for m in warnings_of(caplog) if "999.dcm" in m or "998.dcm" in m]
    assert len(named) == 2, named  # one warning per study, naming its file


# ------------------------------------------------------------------ pools that survive a dead worker


def echo_or_die(item: str) -> str:
    """Task for run_tasks: reads `item` (noted), dies without a word on `die-*`."""
    for part in item.split("/"):
        note_item(part)
        if part.startswith("die"):
            os._exit(3)
    return item.upper()


def test_run_tasks_survives_a_dead_worker_and_names_what_it_was_reading() -> None:
    items = [f"study{i}/{i}.dcm" for i in range(7)]
    items[4] = "study4/die-4.dcm"
    results, errors = {}, {}
    for index, result, error in run_tasks(echo_or_die, [(item,) for item in items], workers=2, desc="test"):
        (errors if error else results)[index] = error or result
    assert results == {i: item.upper() for i, item in enumerate(items) if i != 4}
    assert list(errors) == [4] and isinstance(errors[4], WorkerDied)
    assert errors[4].path == "die-4.dcm" and errors[4].exitcode == 3
    assert str(errors[4]) == "worker process died (exit code 3) while reading die-4.dcm"


def competition(root: Path, n_studies: int = 5, n_slices: int = 4) -> list[Path]:
    """`train_images/<uid>/<n>.dcm` for a few tiny studies."""
    studies = []
    for s in range(n_studies):
        uid = f"1.2.3.{s + 10}"
        for k in range(n_slices):
            write(root / "train_images" / uid / f"{k + 1}.dcm", hu_image(k), z=float(k), number=k + 1, study=uid, series=f"{uid}.1")
        studies.append(root / "train_images" / uid)
    return studies


def test_zero_byte_file_fails_only_its_study(tmp_path: Path) -> None:
    # before: scan dropped 32 of 38 studies as BrokenProcessPool and the cache left 32 of 38 uncached
    studies = competition(tmp_path / "data")
    bad = studies[2] / "3.dcm"
    bad.write_bytes(b"")
    failures = scan_competition(tmp_path / "data", tmp_path / "slices.parquet", workers=2)
    assert [(f.study, f.file) for f in failures] == [(studies[2].name, "3.dcm")] and "empty file" in failures[0].reason
    table = pd.read_parquet(tmp_path / "slices.parquet")
    assert sorted(table["StudyInstanceUID"].unique()) == sorted(s.name for s in studies if s != studies[2])
    root, cache_failures = build_cache(studies, tmp_path / "cache", CacheSpec(image_size=16), workers=2)
    assert [f[0] for f in cache_failures] == [str(studies[2])] and "3.dcm: empty file" in cache_failures[0][1]
    assert StudyCache(root).uids == sorted(table["StudyInstanceUID"].unique())
    assert pd.read_csv(root / "failures.csv")["study"].tolist() == [str(studies[2])]


@pytest.mark.slow
@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the crash is injected by a patch that forked workers inherit")
def test_scan_and_cache_name_the_file_that_killed_a_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    studies = competition(tmp_path / "data", n_studies=6)
    killer = studies[3] / "2.dcm"
    check_file = dicom._check_file

    def abort_on_killer(path: Path) -> None:
        if Path(path) == killer:
            faulthandler.disable()  # pytest's faulthandler would print the worker's stack
            os.abort()  # what dicomsdl did on a zero-byte file
        check_file(path)

    monkeypatch.setattr(dicom, "_check_file", abort_on_killer)
    failures = scan_competition(tmp_path / "data", tmp_path / "slices.parquet", workers=2)
    assert [(f.study, f.file) for f in failures] == [(studies[3].name, "2.dcm")]
    assert failures[0].reason == f"WorkerDied: worker process died (signal SIGABRT) while reading {killer}"
    assert pd.read_parquet(tmp_path / "slices.parquet")["StudyInstanceUID"].nunique() == 5
    root, cache_failures = build_cache(studies, tmp_path / "cache", CacheSpec(image_size=16), workers=2)
    assert [f[0] for f in cache_failures] == [str(studies[3])] and str(killer) in cache_failures[0][1]
    assert len(StudyCache(root).uids) == 5


# ------------------------------------------------------------------ clean faults


def test_full_disk_during_the_cache_build_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # before: a full disk left `<uid>.tmp.npy` files in volumes/
    from rsna22_utils.core import cache

    studies = competition(tmp_path / "data", n_studies=1)
    root = tmp_path / "cache" / CacheSpec(image_size=16).name
    (root / "volumes").mkdir(parents=True)
    (root / "slices").mkdir()

    def disk_full(f, array) -> None:
        f.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cache._write_study(studies[0], root, CacheSpec(image_size=16))
    assert sorted(p.name for p in (root / "volumes").iterdir()) == []
    monkeypatch.undo()
    (root / "volumes" / f".{studies[0].name}.npy.abc123.tmp").write_bytes(b"left by a killed build")
    root, failures = build_cache(studies, tmp_path / "cache", CacheSpec(image_size=16), workers=1)
    assert failures == [] and sorted(p.name for p in (root / "volumes").iterdir()) == [f"{studies[0].name}.npy"]


WORKER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
from rsna22_utils.core.pool import run_tasks

def sleeper(pid_dir):
    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    time.sleep(120)

if __name__ == "__main__":
    for _ in run_tasks(sleeper, [({pid_dir!r},)] * 2, workers=2, desc="sleep"):
        pass
"""


def test_workers_end_with_their_parent(tmp_path: Path) -> None:
    # before: a killed 00_prepare left its pool workers running
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT.format(repo=str(Path(__file__).resolve().parents[2]), pid_dir=str(pid_dir))))
    parent = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list(pid_dir.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [int(p.name) for p in pid_dir.iterdir()]
        assert len(workers) == 2, "the workers never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
    finally:
        parent.kill()
        for p in pid_dir.iterdir():
            if alive(int(p.name)):
                os.kill(int(p.name), signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_read_study_leaves_out_unreadable_slices_up_to_max_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from rsna22_utils.cervical.synth import generate_competition

    generate_competition(tmp_path / "c", n_studies=1, n_test_studies=1, image_size=32, median_slices=30, seed=3, workers=1)
    study = sorted((tmp_path / "c" / "test_images").iterdir())[0]
    files = sorted(study.glob("*.dcm"), key=lambda p: int(p.stem))
    whole = read_study(study)
    for bad in files[4:6]:
        bad.write_bytes(bad.read_bytes()[:-100])  # truncated pixel frames
    with pytest.raises(DicomReadError, match="truncated file"):
        read_study(study)  # by default a study is all of its slices or an error
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.core.dicom"):
        partial = read_study(study, max_dropped=0.1)
    assert len(partial.dropped) == 2 and {Path(e.path).name for e in partial.dropped} == {files[4].name, files[5].name}
    assert len(partial.slices) == len(whole.slices) - 2 and partial.volume.shape[0] == whole.volume.shape[0] - 2
    kept = whole.slices["path"].isin(partial.slices["path"]).to_numpy()
    np.testing.assert_array_equal(partial.volume, whole.volume[kept])  # the rest, in the same order, same HU
    assert [r.getMessage() for r in caplog.records if "left out" in r.getMessage()][0].count("2 of") == 1
    one = 1.5 / len(files)  # one unreadable slice allowed, not two
    with pytest.raises(DicomReadError, match=rf"2 of {len(files)} slices unreadable \(at most {one:.0%} may be left out\): truncated"):
        read_study(study, max_dropped=one)


def test_files_that_fail_at_the_header_read_are_left_out_up_to_max_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """#23: zero-byte, not DICOM, truncated before the pixels: left out like a slice that fails to decode, under one allowance."""
    study = competition(tmp_path / "data", n_studies=1, n_slices=8)[0]
    whole = read_study(study)
    (study / "91.dcm").write_bytes(b"")
    (study / "92.dcm").write_text("not DICOM\n" * 20)
    with pytest.raises(DicomReadError, match="empty file|not a DICOM file"):
        read_study(study)  # by default a study is all of its files or an error
    with caplog.at_level(logging.WARNING, logger="rsna22_utils.core.dicom"):
        partial = read_study(study, max_dropped=0.25)
    assert sorted(Path(e.path).name for e in partial.dropped) == ["91.dcm", "92.dcm"]
    assert {Path(e.path).name: e.reason for e in partial.dropped}["91.dcm"] == "empty file (0 bytes)"
    np.testing.assert_array_equal(partial.volume, whole.volume)
    assert len([m for m in warnings_of(caplog) if "left out" in m]) == 1
    bad = study / "3.dcm"
    bad.write_bytes(bad.read_bytes()[:-100])  # and one that fails to decode: 3 of 10 is past 25 %
    with pytest.raises(DicomReadError, match=r"3 of 10 slices unreadable \(at most 25% may be left out\): truncated"):
        read_study(study, max_dropped=0.25)
    assert len(read_study(study, max_dropped=0.3).dropped) == 3


def test_a_slice_of_another_size_is_left_out_up_to_max_dropped(tmp_path: Path) -> None:
    study = competition(tmp_path / "data", n_studies=1, n_slices=6)[0]
    whole = read_study(study)
    write(study / "7.dcm", np.full((SIZE // 2, SIZE // 2), 40, np.int16), z=2.5, number=7, study=study.name, series=f"{study.name}.1")
    with pytest.raises(DicomReadError, match=r"7.dcm: slice shape \(16, 16\) differs from the study's first slice \(32, 32\)"):
        read_study(study)
    partial = read_study(study, max_dropped=0.2)
    assert [(Path(e.path).name, e.reason) for e in partial.dropped] == [("7.dcm", "slice size (16, 16) differs from the study's (32, 32)")]
    np.testing.assert_array_equal(partial.volume, whole.volume)
    failures = scan_competition(tmp_path / "data", tmp_path / "slices.parquet", workers=1, max_dropped=0.2)
    assert failures == [] and len(pd.read_parquet(tmp_path / "slices.parquet")) == 6
    assert pd.read_csv(tmp_path / "slices.dropped.csv")["file"].tolist() == ["7.dcm"]


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5"])
@pytest.mark.parametrize("backend", ["auto", "pydicom"])
def test_truncated_compressed_pixel_data_is_named_as_such(tmp_path: Path, syntax: str, backend: str) -> None:
    """pydicom reads encapsulated pixel data cut short as an empty dataset (and a warning): not a missing position."""
    path = tmp_path / "1.dcm"
    write_dicom_slice(
        path, hu_image(), transfer_syntax=syntax, study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.1", instance_number=1, z=0.0
    )
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DicomReadError, match="truncated file"):
        read_slice(path, backend)


# ------------------------------------------------------------------ honest stages, safe reruns


def test_labelled_slices_the_cache_lacks_are_counted_or_an_error(tiny_pipeline: dict, tmp_path: Path, caplog) -> None:
    import shutil

    from rsna22_utils.cervical.box import box_table
    from rsna22_utils.cervical.prepare import Prepared

    prepared_dir = tmp_path / "00_prepare"
    shutil.copytree(tiny_pipeline["work_dir"] / "00_prepare", prepared_dir)
    prepared = Prepared(prepared_dir)
    cache = prepared.cache()
    labelled = sorted(set(prepared.read("slice_boxes")["StudyInstanceUID"]))
    gone = labelled[0]
    for path in (cache.root / "volumes" / f"{gone}.npy", cache.root / "slices" / f"{gone}.parquet"):
        path.unlink()
    with pytest.raises(ValueError, match=rf"1 labelled studies are not in the cache .*{gone}.*rerun 00_prepare"):
        box_table(prepared, cache)  # a cache that silently lacks a labelled study
    pd.DataFrame({"study": [f"/data/train_images/{gone}"], "reason": ["empty file"]}).to_csv(cache.root / "failures.csv", index=False)
    caplog.set_level(logging.WARNING)
    table = box_table(prepared, cache)  # 00_prepare reported it (and was allowed to): counted, not silent
    assert gone not in set(table["StudyInstanceUID"])
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "labelled slices" in r.getMessage() and gone in r.getMessage()]


def test_a_run_folder_holds_a_lock(tmp_path: Path) -> None:
    from rsna22_utils.core.files import LOCK_FILE, RunLocked, run_lock
    from rsna22_utils.core.registry import execute

    with run_lock(tmp_path / "run"):
        with pytest.raises(RunLocked, match=r"another process is running this run \(pid \d+"):
            with run_lock(tmp_path / "run"):
                pass
        cfg = _toy_box_config(tmp_path / "run")
        with pytest.raises(RunLocked):  # a stage run on a locked folder stops before it trains
            execute("01_train_box", cfg)
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with run_lock(tmp_path / "run"):  # released
        pass


def _toy_box_config(out_dir: Path, **overrides):
    from rsna22_utils.core.resolve import resolve_config

    return resolve_config("01_train_box", {"out_dir": str(out_dir), "device": "cpu", "num_workers": 0, **overrides})


def test_resuming_with_settings_that_change_the_result_is_an_error(tmp_path: Path) -> None:
    from rsna22_utils.core.errors import ConfigError
    from tests.core.ddp_toy import run

    run(tmp_path, epochs=1)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0\.01 in the checkpoint, 0\.02 now\).*--force"):
        run(tmp_path, epochs=1, lr=0.02)
    _, metrics = run(tmp_path, epochs=1, num_workers=1)  # where / how fast it runs: resumes (nothing left to do)
    assert metrics["epoch"] == 1


def test_force_starts_a_run_over_without_its_checkpoint(tmp_path: Path) -> None:
    from rsna22_utils.core.runner import COMPLETE_FILE, _RunSpec, _start_over

    run = tmp_path / "01_train_box" / "fold0-seed0"
    run.mkdir(parents=True)
    for name in ("checkpoint.pt", "model.safetensors", COMPLETE_FILE):
        (run / name).write_text("old")
    _start_over(_RunSpec("01_train_box", 0, 0, run, {}, {}))
    assert list(run.iterdir()) == []
    once = tmp_path / "02_infer_box"
    once.mkdir()
    (once / COMPLETE_FILE).write_text("old")
    (once / "study_boxes.csv").write_text("kept")
    _start_over(_RunSpec("02_infer_box", None, None, once, {}, {}))  # a stage that runs once: only the mark goes
    assert [p.name for p in once.iterdir()] == ["study_boxes.csv"]


def test_a_rerun_that_fails_leaves_no_finished_looking_run_of_other_settings(tmp_path: Path) -> None:
    from tests.core.ddp_toy import ToyTask, run

    class Crash(Exception):
        pass

    class CrashingTask(ToyTask):
        def loss(self, model, batch):
            if model.training:
                raise Crash
            return super().loss(model, batch)

    run(tmp_path, epochs=1)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "metrics.json").is_file()
    with pytest.raises(Crash):  # started over (resume=false) with other settings, dies in its first epoch
        run(tmp_path, epochs=1, lr=0.05, resume=False, task=CrashingTask())
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "metrics.json").exists()  # the old run's record is gone


@pytest.mark.slow
def test_a_full_disk_at_the_checkpoint_keeps_weights_oof_and_checkpoint_of_one_epoch(tmp_path: Path, monkeypatch) -> None:
    import errno

    import torch

    from rsna22_utils.core.runs import load_weights
    from tests.core.ddp_toy import ToyModel, run

    whole, _ = run(tmp_path / "whole", epochs=2)
    real_save = torch.save

    def full_disk_at_epoch_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_epoch_2)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path / "full", epochs=2)
    monkeypatch.undo()
    out = tmp_path / "full"
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    kept = ToyModel()
    load_weights(kept, out / "model.safetensors")
    assert checkpoint["epoch"] == 1 and all(torch.equal(v, checkpoint["model"][k]) for k, v in kept.state_dict().items())
    assert set(pd.read_parquet(out / "oof.parquet")["id"]) == set(range(24))  # epoch 1's rows, beside epoch 1's weights
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no pending or temp files
    resumed, _ = run(out, epochs=2)  # and the run goes on to what it would have been
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
