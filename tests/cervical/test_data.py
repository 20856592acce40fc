"""Study cache readers and the 2.5D sequence dataset, on a small hand-made cache (no DICOM needed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna22_utils.cervical.data import SequenceDataset, positive_slices, sequence_starts, spread_window_predictions
from rsna22_utils.cervical.geometry import crop_box_in_cache
from rsna22_utils.core.cache import CacheSpec, StudyCache


def make_cache(root: Path, lengths: dict[str, int], size: int = 16) -> StudyCache:
    """A cache whose voxel value is the slice position (mod 256): easy to check what a window holds."""
    spec = CacheSpec(image_size=size)
    base = root / spec.name
    (base / "volumes").mkdir(parents=True)
    (base / "slices").mkdir()
    (base / "spec.json").write_text(json.dumps(asdict(spec)))
    for uid, n in lengths.items():
        volume = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, size, size, 1))
        np.save(base / "volumes" / f"{uid}.npy", np.ascontiguousarray(volume))
        pd.DataFrame({"StudyInstanceUID": uid, "slice_index": range(n), "rows": 64, "cols": 64}).to_parquet(
            base / "slices" / f"{uid}.parquet"
        )
    return StudyCache(base)


def test_sequence_starts_cover_every_slice() -> None:
    for first, last, span, stride in [(0, 9, 96, 48), (0, 199, 96, 48), (10, 150, 30, 7), (5, 5, 3, 1)]:
        starts = sequence_starts(first, last, span, stride)
        covered = np.zeros(last + 1, bool)
        for s in starts:
            covered[max(s, 0) : s + span] = True
        assert covered[first : last + 1].all()
        assert starts == sorted(starts)


def test_sequence_window_stacks_adjacent_slices_and_masks_padding(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 20})
    dataset = SequenceDataset(["a"], cache, None, seq_len=4, slices_per_image=3, mode="infer", stride=6)
    images, mask = dataset.window("a", 14)  # slices 14..25; 20..25 are outside the study
    assert images.shape == (4, 16, 16, 3)
    assert images[0, 0, 0].tolist() == [14, 15, 16]
    assert images[1, 0, 0].tolist() == [17, 18, 19]
    assert images[2, 0, 0].tolist() == [0, 0, 0]  # padding is black
    assert mask.tolist() == [True, True, False, False]


def test_sequence_item_targets_follow_the_middle_slice(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 30, "b": 12})
    labels = {uid: np.arange(n, dtype=np.float32)[:, None] / 100 for uid, n in {"a": 30, "b": 12}.items()}
    dataset = SequenceDataset(["a", "b"], cache, labels, seq_len=4, slices_per_image=3, mode="infer", stride=6)
    item = dataset[0]
    assert item["image"].shape == (4, 3, 16, 16)
    assert torch.allclose(item["target"][:, 0], torch.tensor([1, 4, 7, 10], dtype=torch.float32) / 100)
    assert float(item["image"].min()) >= -1.0 and float(item["image"].max()) <= 1.0


def test_training_windows_are_biased_to_positive_slices(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 300})
    labels = np.zeros((300, 1), np.float32)
    labels[250:255] = 1.0
    dataset = SequenceDataset(
        ["a"], cache, {"a": labels}, seq_len=4, slices_per_image=3, mode="train", samples_per_study=200, positive_bias=1.0
    )
    np.random.seed(0)
    hits = [dataset[i]["target"].max().item() > 0.5 or (dataset[i]["start"] <= 254 and dataset[i]["start"] + 12 > 250) for i in range(50)]
    assert np.mean(hits) > 0.9  # uniform windows would hit the 5 positive slices ~6% of the time


def test_faint_soft_labels_still_mark_positive_windows(tmp_path: Path) -> None:
    # fracture labels = vertebra prediction x study label: they may never reach 0.5
    labels = np.zeros((300, 2), np.float32)
    labels[100:110, 0] = 0.3
    labels[105, 0] = 0.35
    labels[200, 1] = 0.05  # a column whose peak is tiny still marks its own peak
    mask = positive_slices(labels)
    assert mask[100:110].all() and mask[200] and mask.sum() == 11
    assert positive_slices(np.zeros((5, 3))).sum() == 0  # an unfractured study has no positive slice
    cache = make_cache(tmp_path, {"a": 300})
    dataset = SequenceDataset(
        ["a"], cache, {"a": labels[:, :1]}, seq_len=4, slices_per_image=3, mode="train", samples_per_study=50, positive_bias=1.0
    )
    np.random.seed(0)
    hits = [dataset[i]["target"].max().item() > 0 for i in range(50)]
    assert np.mean(hits) > 0.9


def test_crop_is_applied_and_resized(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 9})
    crop = crop_box_in_cache((16, 16, 48, 48), rows=64, cols=64, size=16, margin=0.0)
    assert crop == (4, 4, 12, 12)
    dataset = SequenceDataset(["a"], cache, None, seq_len=3, mode="infer", crops={"a": (16, 16, 48, 48)}, crop_margin=0.0, output_size=8)
    assert dataset.crops["a"] == (4, 4, 12, 12)
    assert dataset[0]["image"].shape == (3, 3, 8, 8)


def test_spread_window_predictions_averages_overlaps() -> None:
    windows = {"a": [(0, np.array([[1.0], [3.0]])), (3, np.array([[5.0], [7.0]]))]}
    per_slice = spread_window_predictions(windows, {"a": 10}, slices_per_image=3)["a"][:, 0]
    assert per_slice[:3].tolist() == [1.0, 1.0, 1.0]
    assert per_slice[3:6].tolist() == [4.0, 4.0, 4.0]  # (3 + 5) / 2
    assert per_slice[6:9].tolist() == [7.0, 7.0, 7.0]
    assert np.isnan(per_slice[9])


def test_cache_rejects_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a study cache"):
        StudyCache(tmp_path)


def test_augmentation_follows_the_seeded_numpy_rng(tmp_path: Path) -> None:
    """albumentations' own generator is reseeded from numpy's, so a run's seed fixes every augmentation."""
    cache = make_cache(tmp_path, {"a": 40}, size=32)
    volume = np.array(cache.volume("a"))
    volume[:] = np.random.default_rng(1).integers(0, 255, volume.shape)  # texture, so a flip or shift shows
    np.save(cache.root / "volumes" / "a.npy", volume)
    cache = StudyCache(cache.root)
    dataset = SequenceDataset(["a"], cache, {"a": np.zeros((40, 7), np.float32)}, seq_len=4, mode="train", augment=True)

    def draw(seed: int) -> torch.Tensor:
        np.random.seed(seed)
        return torch.stack([dataset[0]["image"] for _ in range(6)])

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
