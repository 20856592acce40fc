"""The loader's fast paths give exactly the inputs of the slow ones: the lookup-table min-max stretch, and
uint8 images through the loader finished on the device (`DeviceInputs`) instead of floats made per item."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import default_collate

from rsna22_utils.cervical.data import BoxSliceDataset, CacheSource, DeviceInputs, InputNorm, SequenceDataset
from rsna22_utils.cervical.study import StudyImages, images_collate
from tests.cervical.test_inputs import ORIGINAL_MEAN, ORIGINAL_STD, textured_cache

MINMAX = InputNorm("minmax", tuple(ORIGINAL_MEAN), tuple(ORIGINAL_STD))


def float_stretch(images: np.ndarray) -> np.ndarray:
    """The min-max stretch written as plain float32 arithmetic (what the 3rd place computed per image and channel)."""
    x = images.astype(np.float32)
    low, high = x.min(axis=(-3, -2), keepdims=True), x.max(axis=(-3, -2), keepdims=True)
    span = high - low
    return np.where(span > 0, (x - low) * (255.0 / np.maximum(span, 1.0)), 0.0).astype(np.uint8)


def test_minmax_stretch_equals_the_float_arithmetic_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for shape in [(64, 48, 3), (4, 32, 32, 3), (2, 3, 16, 16, 9), (10, 10, 1), (5, 7, 11, 2)]:
        for trial in range(12):
            low, high = sorted(int(v) for v in rng.integers(0, 256, 2))
            images = rng.integers(low, high + 1, shape).astype(np.uint8)
            if trial % 4 == 0:
                images[..., 0] = low  # a flat channel stretches to 0
            stretched = MINMAX.stretch(images)
            assert stretched.dtype == np.uint8 and stretched.shape == images.shape
            assert np.array_equal(stretched, float_stretch(images)), (shape, trial)


def on_device(batch: dict[str, torch.Tensor], norm: InputNorm, key: str = "image") -> dict[str, torch.Tensor]:
    out = DeviceInputs(norm, key)(batch)
    assert out[key].dtype == torch.float32 and out[key].is_contiguous()
    return out


def test_box_items_finished_on_the_device_equal_the_per_item_inputs(tmp_path: Path) -> None:
    cache = textured_cache(tmp_path)
    table = pd.DataFrame({"StudyInstanceUID": "a", "slice_index": [0, 5, 17, 39], "has_box": [0.0, 1.0, 1.0, 0.0], "rows": 64, "cols": 64})
    table[["x0", "y0", "x1", "y1"]] = [0.0, 0.0, 0.0, 0.0]
    table.loc[[1, 2], ["x0", "y0", "x1", "y1"]] = [10.0, 12.0, 40.0, 50.0]
    for norm in [InputNorm(), MINMAX]:
        kwargs = dict(augment="original", input_slices=3, norm=norm)
        floats, uint8 = (
            BoxSliceDataset(table, CacheSource(cache), **kwargs),
            BoxSliceDataset(table, CacheSource(cache), uint8_images=True, **kwargs),
        )
        np.random.seed(3)
        want = default_collate([floats[i] for i in range(len(table))])
        np.random.seed(3)
        items = [uint8[i] for i in range(len(table))]
        assert items[0]["image"].dtype == torch.uint8 and items[0]["image"].shape == (32, 32, 3)
        got = on_device(default_collate(items), norm)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_sequence_and_study_items_finished_on_the_device_equal_the_per_item_inputs(tmp_path: Path) -> None:
    cache = textured_cache(tmp_path, n=60)
    labels = {"a": np.random.default_rng(2).random((60, 7)).astype(np.float32)}
    for norm in [InputNorm(), MINMAX]:
        kwargs = dict(seq_len=4, slices_per_image=3, mode="train", window_sampling="every", window_step=5, augment="original", norm=norm)
        floats = SequenceDataset(["a"], cache, labels, **kwargs)
        uint8 = SequenceDataset(["a"], cache, labels, uint8_images=True, **kwargs)
        np.random.seed(5)
        want = default_collate([floats[i] for i in range(len(floats))])
        np.random.seed(5)
        got = on_device(default_collate([uint8[i] for i in range(len(uint8))]), norm)
        assert want["image"].shape == got["image"].shape == (len(floats), 4, 3, 32, 32)
        assert all(torch.equal(got[k], want[k]) for k in want)

        windows = SequenceDataset(["a"], cache, None, mode="infer", stride=12, seq_len=4, slices_per_image=3, norm=norm)
        np.random.seed(7)
        want = images_collate([StudyImages(["a"], windows, None, augment="original")[0]])
        np.random.seed(7)
        got = on_device(images_collate([StudyImages(["a"], windows, None, augment="original", uint8_images=True)[0]]), norm, "images")
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_one_channel_inputs_finished_on_the_device_keep_the_float_items_strides(tmp_path: Path) -> None:
    """One-channel images: the device path must hand the network the strides the float items had (CPU kernels
    are chosen by stride, so other strides change the trained weights)."""
    cache = textured_cache(tmp_path)
    table = pd.DataFrame({"StudyInstanceUID": "a", "slice_index": [0, 5, 17], "has_box": 0.0, "rows": 64, "cols": 64})
    table[["x0", "y0", "x1", "y1"]] = 0.0
    floats = BoxSliceDataset(table, CacheSource(cache), input_slices=1)
    uint8 = BoxSliceDataset(table, CacheSource(cache), input_slices=1, uint8_images=True)
    want = default_collate([floats[i] for i in range(len(table))])["image"]
    got = on_device(default_collate([uint8[i] for i in range(len(table))]), InputNorm())["image"]
    assert got.shape[1] == 1
    assert torch.equal(got, want)
    assert got.stride() == want.stride()
