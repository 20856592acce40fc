"""What the networks see: augmentation sets, input intensity, training-window sampling, square crops, the drop list."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna22_utils.cervical.data import (
    WINDOW_INPUT,
    BoxSliceDataset,
    CacheSource,
    InputNorm,
    SequenceDataset,
    augment_sequence,
    box_augmentation,
    common_input_norm,
    images_to_tensor,
    sequence_augmentation,
    sequence_inputs,
    to_tensor,
    training_starts,
)
from rsna22_utils.cervical.geometry import crop_box, crop_box_in_cache, square_crop
from rsna22_utils.cervical.labels import drop_studies
from rsna22_utils.core.cache import StudyCache
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.resolve import resolve_config
from tests.cervical.test_data import make_cache

ORIGINAL_MEAN = [0.22363983, 0.18190407, 0.2523437]
ORIGINAL_STD = [0.32451536, 0.2956294, 0.31335256]


def textured_cache(root: Path, n: int = 40, size: int = 32) -> StudyCache:
    cache = make_cache(root, {"a": n}, size=size)
    volume = np.random.default_rng(1).integers(0, 255, (n, size, size, 1)).astype(np.uint8)
    np.save(cache.root / "volumes" / "a.npy", volume)
    return StudyCache(cache.root)


# ----------------------------------------------------------------------------- augmentation


def test_original_sequence_augmentation_is_one_transform_for_every_image_and_follows_the_seed() -> None:
    images = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3)).astype(np.uint8), 4, axis=0)
    pipeline = sequence_augmentation(4, "original")
    changed = []
    for seed in range(40):
        np.random.seed(seed)
        out = augment_sequence(images, pipeline)
        assert out.shape == images.shape
        assert all(np.array_equal(out[i], out[0]) for i in range(4))  # the same draw for each image of the window
        changed.append(float((out != images).mean()))
        np.random.seed(seed)
        assert np.array_equal(augment_sequence(images, pipeline), out)  # numpy's seed fixes it
    # 8 black holes of 10 % a side on every window (their Cutout had always_apply): at least 8 x 3 x 3 of 32 x 32 pixels
    assert min(changed) >= 8 * 9 / 1024 * 0.5
    # each transform draws on its own: with p 0.5 / 0.75 / 0.75 / 0.5 almost every window gets a geometric or contrast change
    assert np.mean(np.array(changed) > 0.2) > 0.85


def test_original_box_augmentation_flips_the_box_with_the_image() -> None:
    pipeline = box_augmentation(32, "original")
    image = np.zeros((32, 32, 1), np.uint8)
    image[8:16, 2:10] = 255
    flips = 0
    for seed in range(30):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, bboxes=[[2.0, 8.0, 10.0, 16.0]], labels=[1])
        if len(out["bboxes"]):
            x0, y0, x1, y1 = out["bboxes"][0]
            flips += (x0 + x1) / 2 > 16  # the bright patch and its box moved to the right half together
            bright = np.argwhere(out["image"][..., 0] > 128)
            if len(bright):
                assert x0 - 4 <= bright[:, 1].mean() <= x1 + 4
    assert 5 <= flips <= 25


def test_light_augmentation_is_unchanged_and_names_are_checked() -> None:
    assert [type(t).__name__ for t in sequence_augmentation(2).transforms] == ["Affine", "RandomBrightnessContrast"]
    assert [type(t).__name__ for t in sequence_augmentation(2, "original").transforms] == [
        "HorizontalFlip",
        "RandomBrightnessContrast",
        "Affine",
        "OneOf",
        "CoarseDropout",
    ]
    with pytest.raises(ValueError, match="augment must be"):
        sequence_augmentation(2, "strong")
    with pytest.raises(ConfigError, match="augment must be one of light, original"):
        resolve_config("05_train_fracture", {"augment": "heavy"})


# ----------------------------------------------------------------------------- intensity


def test_default_input_is_today_scaling_exactly() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    assert torch.equal(images_to_tensor(images), expected)
    assert torch.equal(to_tensor(images[0]), expected[0])
    assert InputNorm.of(object()) == WINDOW_INPUT  # a config from before the settings: today's inputs


def test_minmax_stretches_each_image_and_channel_then_normalises_per_channel() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = np.arange(16).reshape(4, 4) + 100  # 100..115 -> 0..255
    image[..., 1] = 7  # flat -> 0
    image[0, 0, 2], image[1, 1, 2] = 10, 20
    norm = InputNorm("minmax", tuple(ORIGINAL_MEAN), tuple(ORIGINAL_STD))
    stretched = norm.stretch(image)
    assert stretched[..., 0].min() == 0 and stretched[..., 0].max() == 255
    assert (stretched[..., 1] == 0).all()
    assert stretched[1, 1, 2] == 255 and stretched[0, 0, 2] == 127  # (10 / 20) * 255, truncated as the original's astype
    tensor = to_tensor(image, norm)
    want = (torch.from_numpy(stretched).permute(2, 0, 1).float() / 255 - torch.tensor(ORIGINAL_MEAN)[:, None, None]) / torch.tensor(
        ORIGINAL_STD
    )[:, None, None]
    assert torch.allclose(tensor, want, atol=1e-5)
    assert np.array_equal(norm.to_uint8(tensor), stretched)
    with pytest.raises(ValueError, match="3 values, the images have 9 channels"):
        norm.normalise(torch.zeros(9, 4, 4, dtype=torch.uint8))


def test_sequence_and_box_datasets_apply_the_run_intensity(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 30})  # voxel value = slice position: each image's 3 channels are flat
    cfg = resolve_config("05_train_fracture", {"intensity": "minmax", "norm_mean": ORIGINAL_MEAN, "norm_std": ORIGINAL_STD})
    inputs = sequence_inputs(cfg, crops=None)
    assert inputs["norm"] == InputNorm("minmax", tuple(ORIGINAL_MEAN), tuple(ORIGINAL_STD))
    dataset = SequenceDataset(["a"], cache, None, mode="infer", stride=12, **{**inputs, "seq_len": 4})
    image = dataset[0]["image"]  # flat channels stretch to 0 -> (0 - mean) / std
    assert torch.allclose(image, (-torch.tensor(ORIGINAL_MEAN) / torch.tensor(ORIGINAL_STD))[None, :, None, None].expand_as(image))
    table = pd.DataFrame({"StudyInstanceUID": "a", "slice_index": [3], "has_box": [0.0], "rows": 64, "cols": 64})
    table[["x0", "y0", "x1", "y1"]] = 0.0
    box = BoxSliceDataset(table, CacheSource(cache), norm=InputNorm(mean=(0.0,), std=(1.0,)))
    assert torch.allclose(box[0]["image"], torch.full((1, 16, 16), 3 / 255))


def test_runs_of_one_ensemble_must_share_their_intensity(tmp_path: Path) -> None:
    a = resolve_config("01_train_box", {})
    b = resolve_config("01_train_box", {"intensity": "minmax"})
    assert common_input_norm([a, a], [tmp_path / "r0", tmp_path / "r1"]) == WINDOW_INPUT
    with pytest.raises(ValueError, match="different input intensities"):
        common_input_norm([a, b], [tmp_path / "r0", tmp_path / "r1"])
    with pytest.raises(ConfigError, match="norm_mean and norm_std need the same number"):
        resolve_config("01_train_box", {"norm_mean": [0.1, 0.2], "norm_std": [0.3]})
    with pytest.raises(ConfigError, match="intensity must be one of window, minmax"):
        resolve_config("03_train_vertebra", {"intensity": "zscore"})


# ----------------------------------------------------------------------------- training windows


def test_every_window_sampling_visits_each_aligned_window_once() -> None:
    assert training_starts(0, 299, 96, 12) == [0, 12, 24, 36, 48, 60, 72, 84, 96, 108, 120, 132, 144, 156, 168, 180, 192, 204]
    assert training_starts(5, 130, 96, 12) == [5, 12, 24, 35]  # first (5), aligned, last (130 - 95 = 35)
    assert training_starts(0, 50, 96, 12) == [0]  # shorter than a window


def test_every_window_dataset_items_and_targets(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 40, "b": 10})
    labels = {uid: np.arange(n, dtype=np.float32)[:, None] for uid, n in {"a": 40, "b": 10}.items()}
    dataset = SequenceDataset(
        ["a", "b"], cache, labels, seq_len=4, slices_per_image=3, mode="train", window_sampling="every", window_step=12, positive_bias=1.0
    )
    assert dataset.items == [("a", 0), ("a", 12), ("a", 24), ("a", 28), ("b", 0)]
    item = dataset[3]
    assert int(item["start"]) == 28 and item["target"][:, 0].tolist() == [29, 32, 35, 38]
    per_study = SequenceDataset(
        ["a", "b"], cache, labels, seq_len=4, slices_per_image=3, mode="train", window_sampling="every", window_steps={"a": 10}
    )
    assert per_study.items == [("a", 0), ("a", 10), ("a", 20), ("a", 28), ("b", 0)]  # 04F: a step per study
    with pytest.raises(ConfigError, match="window_sampling must be one of random, every"):
        resolve_config("03_train_vertebra", {"window_sampling": "all"})


def test_slice_skipping_takes_every_dth_slice(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, {"a": 100})
    labels = {"a": np.arange(100, dtype=np.float32)[:, None]}
    common = dict(seq_len=4, slices_per_image=3, mode="train", window_sampling="every", window_step=100)
    dataset = SequenceDataset(["a"], cache, labels, slice_skip_p=1.0, slice_skip_max=4, **common)
    steps = set()
    np.random.seed(0)
    for _ in range(40):
        item = dataset[0]  # the window at slice 0: 100 slices hold up to 8 windows of 12, d <= 4
        first = item["image"][0, :, 0, 0]  # slice values of image 0 ([-1, 1] scaled)
        values = torch.round((first + 1) * 127.5).int().tolist()
        step = values[1] - values[0]
        steps.add(step)
        assert values == [values[0] + step * i for i in range(3)] and values[0] == int(item["start"]) and int(item["start"]) < step
        assert item["target"][:, 0].tolist() == [values[1] + 3 * step * i for i in range(4)]  # each image's middle slice
    assert steps == {2, 3, 4}
    plain = SequenceDataset(["a"], cache, labels, **common)  # slice_skip_p 0: adjacent slices, no extra draw
    np.random.seed(0)
    assert plain[0]["target"][:, 0].tolist() == [1, 4, 7, 10]


# ----------------------------------------------------------------------------- crops


def test_square_crop_in_the_cache_is_the_native_square_scaled() -> None:
    # a tall box 20 x 40 in a 64 x 64 image -> 40 x 40 centred on the box (native), / 4 in a 16 px cache
    assert square_crop((20, 10, 40, 50), rows=64, cols=64) == (10, 10, 50, 50)
    assert crop_box_in_cache((20, 10, 40, 50), rows=64, cols=64, size=16, margin=0.0, square=True) == (2, 2, 13, 13)
    # a wide box at the top edge: its square moves inside the image, as the native crop cache's does
    assert square_crop((10, 2, 50, 22), rows=64, cols=64) == (10, 0, 50, 40)
    assert crop_box_in_cache((10, 2, 50, 22), rows=64, cols=64, size=16, margin=0.0, square=True) == (2, 0, 13, 10)
    # a margin is added before squaring, on both paths
    assert crop_box_in_cache((20, 10, 40, 50), rows=64, cols=64, size=64, margin=0.1, square=True) == square_crop(
        (20, 10, 40, 50), rows=64, cols=64, margin=0.1
    )
    # without square: today's crop (box + margin, clamped)
    assert crop_box_in_cache((20, 10, 40, 50), rows=64, cols=64, size=16, margin=0.0) == (5, 2, 10, 13)
    assert crop_box((20, 10, 40, 50), (1.0, 1.0), (64, 64), margin=0.5) == (10, 0, 50, 64)


def test_vertebra_stage_takes_box_crop_settings() -> None:
    cfg = resolve_config("03_train_vertebra", {})
    assert cfg.crop_by_box is False and cfg.crop_square is False and cfg.slice_skip_p == 0.0
    cropped = resolve_config("03_train_vertebra", {"crop_by_box": True, "crop_square": True, "crop_margin": 0.0, "crop_size": 64})
    inputs = sequence_inputs(cropped, {"a": (0, 0, 10, 10)})
    assert inputs["crop_square"] is True and inputs["output_size"] == 64 and inputs["crop_margin"] == 0.0
    assert "crops" not in sequence_inputs(cfg, {"a": (0, 0, 10, 10)})  # a run that did not crop sees whole slices
    study = resolve_config("06_train_study", {})
    assert {"crop_square", "intensity", "norm_mean", "norm_std"} <= set(study.to_dict())


# ----------------------------------------------------------------------------- drop list


def test_drop_studies_leaves_them_out_and_warns_about_unknown_ones(caplog: pytest.LogCaptureFixture) -> None:
    train = pd.DataFrame({"StudyInstanceUID": ["1.2.3", "1.2.4", "1.2.5"], "patient_overall": [0, 1, 0]})
    with caplog.at_level(logging.INFO, logger="rsna22_utils.cervical.labels"):
        kept = drop_studies(train, ["1.2.4", "9.9.9"])
    assert kept["StudyInstanceUID"].tolist() == ["1.2.3", "1.2.5"]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.INFO, "drop_studies: 1 studies left out of the folds and labels: 1.2.4") in messages
    assert (logging.WARNING, "drop_studies: 1 listed studies are not in train.csv: 9.9.9") in messages
    assert drop_studies(train, []) is train
    assert resolve_config("00_prepare", {}).drop_studies == []
