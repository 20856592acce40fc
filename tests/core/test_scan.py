"""`scan`: every study's headers into one table, in parallel; a broken study is reported, not fatal."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rsna22_utils.cli import main
from rsna22_utils.core.scan import scan_competition


@pytest.fixture(scope="module")
def competition(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsna22_utils.cervical.synth import generate_competition

    out = tmp_path_factory.mktemp("scan") / "competition"
    generate_competition(out, n_studies=3, n_test_studies=1, image_size=32, median_slices=40, seed=5, workers=1)
    return out


def _dicoms(study_dir: Path) -> list[Path]:
    return sorted(study_dir.glob("*.dcm"), key=lambda p: int(p.stem))


def test_one_row_per_slice_head_to_feet(competition: Path, tmp_path: Path) -> None:
    out = tmp_path / "slices.parquet"
    assert scan_competition(competition, out, workers=2) == []
    table = pd.read_parquet(out)
    studies = sorted(p for split in ("train_images", "test_images") for p in (competition / split).iterdir())
    assert len(table) == sum(len(_dicoms(s)) for s in studies)
    assert set(table["split"]) == {"train", "test"}
    for _, group in table.groupby("StudyInstanceUID"):
        assert group["z"].is_monotonic_decreasing and list(group["slice_index"]) == list(range(len(group)))
    assert not (tmp_path / "slices.failures.csv").exists()


def test_broken_study_is_reported_and_the_scan_goes_on(competition: Path, tmp_path: Path) -> None:
    data = tmp_path / "competition"
    for split in ("train_images", "test_images"):
        for study in (competition / split).iterdir():
            (data / split / study.name).mkdir(parents=True)
            for f in _dicoms(study):
                (data / split / study.name / f.name).symlink_to(f)
    broken = sorted((data / "train_images").iterdir())[0]
    bad_file = _dicoms(broken)[3]
    bad_file.unlink()
    bad_file.write_bytes(b"not a dicom file at all")
    out = tmp_path / "slices.csv"

    assert main(["scan", str(data), "--out", str(out), "--workers", "2"]) == 0  # the others were written
    table = pd.read_csv(out)
    assert broken.name not in set(table["StudyInstanceUID"]) and table["StudyInstanceUID"].nunique() == 3
    failures = pd.read_csv(tmp_path / "slices.failures.csv", dtype=str)
    assert list(failures[["split", "study", "file"]].itertuples(index=False, name=None)) == [("train_images", broken.name, bad_file.name)]
    assert "DicomReadError" in failures.at[0, "reason"] and bad_file.name in failures.at[0, "reason"]


def test_nothing_readable_keeps_an_earlier_output(tmp_path: Path) -> None:
    study = tmp_path / "competition" / "test_images" / "1.2.3"
    study.mkdir(parents=True)
    (study / "1.dcm").write_bytes(b"garbage")
    out = tmp_path / "slices.parquet"
    out.write_bytes(b"earlier scan")
    assert main(["scan", str(tmp_path / "competition"), "--out", str(out), "--workers", "1"]) == 0
    assert out.read_bytes() == b"earlier scan"


def test_no_study_folders_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no study folders"):
        scan_competition(tmp_path, tmp_path / "slices.parquet")


@pytest.mark.realdata
def test_scan_real_competition_files(rsna_real: Path, tmp_path: Path) -> None:
    out = tmp_path / "slices.parquet"
    assert scan_competition(rsna_real, out, workers=2) == []
    table = pd.read_parquet(out)
    expected = {p.parent.name: 0 for p in rsna_real.glob("*_images/*/*.dcm")}
    for p in rsna_real.glob("*_images/*/*.dcm"):
        expected[p.parent.name] += 1
    assert table.groupby("StudyInstanceUID").size().to_dict() == expected
    assert set(table.loc[table["StudyInstanceUID"].str.endswith(".22327"), "split"]) == {"test"}
    assert (table.groupby("StudyInstanceUID")["z"].diff().dropna() < 0).all()
