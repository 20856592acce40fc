"""Failure lists: one CSV per build that lists the last build's failures only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rsna22_utils.core.files import write_failures


def test_write_failures_lists_the_rows_and_an_empty_build_removes_the_old_list(tmp_path: Path) -> None:
    path = tmp_path / "failures.csv"
    rows = [{"study": "a/1", "reason": "OSError: disk, full"}, {"study": "b", "reason": None}]
    assert write_failures(path, rows) is True
    table = pd.read_csv(path, keep_default_na=False)
    assert list(table.columns) == ["study", "reason"]
    assert table.to_dict("records") == [{"study": "a/1", "reason": "OSError: disk, full"}, {"study": "b", "reason": ""}]
    assert [p.name for p in tmp_path.iterdir()] == ["failures.csv"]  # no temp file left
    assert write_failures(path, []) is False
    assert not path.exists()
    assert write_failures(path, []) is False  # nothing to remove is fine
