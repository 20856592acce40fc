"""The decode benchmark times both backends on the same files and tabulates them by transfer syntax."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rsna22_utils.core.bench_decode import BACKENDS, bench_decode, dicom_files
from rsna22_utils.core.dicom_writer import write_dicom_slice
from rsna22_utils.core.timing import LapTimer, one_core

EXPLICIT, RLE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"


def _study(folder: Path, syntax: str, n: int) -> Path:
    folder.mkdir(parents=True)
    hu = np.random.default_rng(0).integers(-1000, 1500, (n, 32, 32)).astype(np.int16)
    for i in range(n):
        uids = {"study_uid": "1.2.3", "series_uid": "1.2.3.1", "sop_uid": f"1.2.3.1.{i}"}
        write_dicom_slice(folder / f"{i + 1}.dcm", hu[i], transfer_syntax=syntax, instance_number=i + 1, z=float(i), **uids)
    return folder


def test_bench_decode_tabulates_each_transfer_syntax(tmp_path: Path) -> None:
    plain, rle = _study(tmp_path / "plain", EXPLICIT, 3), _study(tmp_path / "rle", RLE, 2)
    assert [p.name for p in dicom_files([plain])] == ["1.dcm", "2.dcm", "3.dcm"]
    table = bench_decode([plain, rle / "1.dcm", rle / "2.dcm"], repeat=2).set_index("transfer_syntax")
    assert sorted(table.index) == sorted([EXPLICIT, RLE])
    assert table.loc[EXPLICIT, "files"] == 3 and table.loc[RLE, "files"] == 2
    assert (table[[f"{b}_ms" for b in BACKENDS]] > 0).all().all()
    np.testing.assert_allclose(table["speedup"], table["pydicom_ms"] / table["dicomsdl_ms"])


def test_bench_decode_names_what_it_cannot_find(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such DICOM file or study folder"):
        bench_decode([tmp_path / "absent"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .dcm files"):
        bench_decode([tmp_path / "empty"])
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        bench_decode([tmp_path / "empty"], repeat=0)


def test_one_core_restores_threads_and_the_lap_timer_adds_up() -> None:
    import torch

    threads = torch.get_num_threads()
    with one_core():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    timer = LapTimer()
    timer.lap("a", 3)
    timer.lap("a", 2)
    timer.lap("b")
    assert (timer.items["a"], timer.counts["a"], timer.counts["b"]) == (5, 2, 1) and timer.seconds["a"] >= 0
    timer.reset()
    assert not timer.seconds and not timer.items
