"""The epoch benchmark compares like with like: both slice sources give the same images, and it reports every figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsna22_utils.cervical.bench import bench_epoch
from rsna22_utils.cervical.data import CacheSource, DicomSource
from rsna22_utils.cervical.synth import generate_competition
from rsna22_utils.core.cache import CacheSpec, StudyCache, build_cache
from rsna22_utils.core.scan import find_studies


def test_cache_and_dicom_sources_give_identical_slices(tmp_path: Path) -> None:
    data_dir = tmp_path / "competition"
    generate_competition(data_dir, n_studies=1, n_test_studies=1, image_size=64, median_slices=20, seed=3)
    studies = [d for split, d in find_studies(data_dir) if split == "train_images"]
    spec = CacheSpec(image_size=32)
    root, failures = build_cache(studies, tmp_path / "cache", spec)
    assert not failures
    cache = StudyCache(root)
    table = cache.all_slices()
    cached, dicom = CacheSource(cache), DicomSource(table, spec)
    for uid, index in table[["StudyInstanceUID", "slice_index"]].itertuples(index=False):
        np.testing.assert_array_equal(cached.slice(uid, index), dicom.slice(uid, index))


def test_bench_epoch_reports_both_sources(tmp_path: Path, capsys) -> None:
    result = bench_epoch(work_dir=tmp_path, n_studies=1, image_size=64, cache_size=32, batch_size=8, max_slices=16, device="cpu", repeat=2)
    assert list(result.index) == ["study cache", "DICOM on the fly"]
    assert (result["slices"] == result["slices"].iloc[0]).all() and result["slices"].iloc[0] >= 8
    assert (result[["data_s", "epoch_s", "data_ms_per_slice"]] > 0).all().all()
    assert (result["epoch_s"] >= result["data_s"]).all()
    printed = capsys.readouterr().out
    assert "median of 2 passes" in printed and "break-even" in printed


def test_bench_backbones_reports_throughput_and_parameters(capsys) -> None:
    from rsna22_utils.cervical.bench import bench_backbones
    from rsna22_utils.cervical.models import BoxModel, SequenceModel, feature_size

    networks = (("box", "mobilenetv3_small_050"), ("sequence", "mobilenetv3_small_050"))
    table = bench_backbones(networks, image_size=32, batch_images=4, seq_len=2, device="cpu", warmup=1, steps=1)
    assert list(table["network"]) == ["box mobilenetv3_small_050", "sequence mobilenetv3_small_050"]
    assert list(table["dtype"]) == ["float32", "float32"]  # the CPU runs fp32
    assert (table[["train_img_s", "infer_img_s"]] > 0).all().all()
    box = BoxModel("mobilenetv3_small_050", in_chans=3)
    sequence = SequenceModel("mobilenetv3_small_050", 3, 14, lstm_hidden=feature_size(box.encoder) + 32)  # the 3rd place's width
    assert list(table["params_trainable"]) == [sum(p.numel() for p in m.parameters()) for m in (box, sequence)]
    assert "networks at 32 px on CPU" in capsys.readouterr().out
