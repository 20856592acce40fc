"""Datasets of every stage, reading slices from the study cache (or, for comparison, DICOMs).

A *slice source* returns one windowed uint8 slice (size, size, n_windows) by (study, slice index
head -> feet); the datasets never know whether it came from the cache or from a DICOM file, so
the cache-vs-DICOM benchmark measures exactly the same training loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.cervical.geometry import crop_box_in_cache
from rsna22_utils.core.cache import CacheSpec, StudyCache, encode_study
from rsna22_utils.core.dicom import read_slice


class SliceSource(Protocol):
    """Where slice pixels come from."""

    spec: CacheSpec

    def slice(self, uid: str, slice_index: int) -> np.ndarray: ...

    def n_slices(self, uid: str) -> int: ...


class CacheSource:
    """Slices from the memory-mapped study cache (the fast path every stage uses)."""

    def __init__(self, cache: StudyCache) -> None:
        self.cache = cache
        self.spec = cache.spec

    def slice(self, uid: str, slice_index: int) -> np.ndarray:
        return np.array(self.cache.volume(uid)[slice_index])  # a writable copy (the cache is a read-only memmap)

    def n_slices(self, uid: str) -> int:
        return int(self.cache.volume(uid).shape[0])


class DicomSource:
    """Slices decoded from their DICOM file on every access, as the 3rd place did (for benchmarks)."""

    def __init__(self, slices: pd.DataFrame, spec: CacheSpec) -> None:
        self.spec = spec
        self._paths = {(u, int(i)): p for u, i, p in slices[["StudyInstanceUID", "slice_index", "path"]].itertuples(index=False)}
        self._counts = slices.groupby("StudyInstanceUID")["slice_index"].max().add(1).to_dict()

    def slice(self, uid: str, slice_index: int) -> np.ndarray:
        hu, _ = read_slice(Path(self._paths[(uid, int(slice_index))]))
        return encode_study(hu[None], self.spec)[0]

    def n_slices(self, uid: str) -> int:
        return int(self._counts[uid])


def neighbour_positions(centres: np.ndarray, n_slices: int, input_slices: int) -> np.ndarray:
    """(len(centres), input_slices) slice positions centred on each centre, clamped to the study's 0..n_slices-1."""
    offsets = np.arange(input_slices) - input_slices // 2
    return np.clip(np.asarray(centres)[:, None] + offsets[None, :], 0, n_slices - 1)


def stack_slices(volume: np.ndarray, centres: np.ndarray, input_slices: int) -> np.ndarray:
    """Box-model inputs of a cached study (n, H, W, windows) uint8: (len(centres), H, W, input_slices * windows).

    Channels are slice-major (slice i-1's windows, slice i's, slice i+1's), as `BoxSliceDataset` builds them.
    """
    positions = neighbour_positions(centres, volume.shape[0], input_slices)
    block = np.asarray(volume[positions.ravel()])  # (b * k, H, W, w)
    b, (h, w, c) = len(positions), block.shape[1:]
    return block.reshape(b, input_slices, h, w, c).transpose(0, 2, 3, 1, 4).reshape(b, h, w, input_slices * c)


@dataclass(frozen=True)
class InputNorm:
    """How cached uint8 pixels become network inputs: the `Intensity` settings of a run's config.

    `intensity="minmax"` stretches each image (crop) and channel to 0-255 before augmentation, as the
    3rd place did after windowing; then input = (pixels / 255 - mean) / std per channel (one value
    = every channel). The defaults give pixels / 127.5 - 1.
    """

    intensity: str = "window"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @classmethod
    def of(cls, cfg: Any) -> InputNorm:
        """The settings a config records (a config from before these settings existed: the defaults)."""
        default = cls()
        return cls(
            str(getattr(cfg, "intensity", default.intensity)),
            tuple(float(v) for v in getattr(cfg, "norm_mean", default.mean)),
            tuple(float(v) for v in getattr(cfg, "norm_std", default.std)),
        )

    def stretch(self, images: np.ndarray) -> np.ndarray:
        """uint8 (..., H, W, C) -> each image's channels stretched to 0-255 (`minmax`; a flat channel -> 0), else unchanged.

        Pixel v of a channel with range low..high becomes uint8((v - low) * (255 / (high - low))) in float32,
        applied as one lookup table per image (what the float arithmetic gives, at uint8 speed).
        """
        if self.intensity == "window":
            return images
        h, w, c = images.shape[-3:]
        flat = np.ascontiguousarray(images).reshape(-1, h, w * c)
        # min / max over rows first (contiguous rows of W * C values), then over the W pixels of each channel
        low = flat.min(axis=1).reshape(-1, w, c).min(axis=1).astype(np.float32)
        high = flat.max(axis=1).reshape(-1, w, c).max(axis=1).astype(np.float32)
        span = high - low
        values = np.clip(np.arange(256, dtype=np.float32)[None, :, None], low[:, None], high[:, None])  # (n, 256, C)
        tables = np.where(span[:, None] > 0, (values - low[:, None]) * (255.0 / np.maximum(span[:, None], 1.0)), 0.0).astype(np.uint8)
        out = np.empty_like(flat)
        for i, (image, table) in enumerate(zip(flat, tables)):
            out[i] = cv2.LUT(image.reshape(h, w, c), table[:, None, :]).reshape(h, w * c)
        return out.reshape(images.shape)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32 (pixels / 255 - mean) / std per channel."""
        channels = pixels.shape[-3]
        if len(self.mean) not in (1, channels):
            raise ValueError(
                f"norm_mean / norm_std have {len(self.mean)} values, the images have {channels} channels: give 1 or {channels}"
            )
        scale = torch.tensor([255.0 * s for s in self.std], device=pixels.device)[:, None, None]
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], device=pixels.device)[:, None, None]
        return pixels.float().div_(scale).sub_(shift)

    def to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images (..., H, W, C) on any device -> float32 network inputs (..., C, H, W), as `normalise`
        makes them (the trainer's step does this on the device for datasets built with `uint8_images`).

        The copy gets the standard (..., C, H, W) strides even for one channel, where `contiguous()` keeps the
        moved strides: convolution kernels are chosen by stride, and these must be the ones the float items had.
        """
        return self.normalise(pixels.movedim(-1, -3).clone(memory_format=torch.contiguous_format))

    def item_images(self, images: np.ndarray, uint8: bool) -> torch.Tensor:
        """A dataset item's uint8 images (..., H, W, C): as they are with `uint8` (for `to_input` on the device), else network inputs."""
        if uint8:
            return torch.from_numpy(np.ascontiguousarray(images))
        return self.normalise(torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, -3))))

    def to_uint8(self, image: torch.Tensor) -> np.ndarray:
        """A network input (C, H, W) back to uint8 (H, W, C) pixels, for figures."""
        std = torch.tensor(self.std)[:, None, None] * 255.0
        mean = torch.tensor(self.mean)[:, None, None] * 255.0
        return (image.float() * std + mean).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()


WINDOW_INPUT = InputNorm()  # the default: the cache's windowed pixels / 127.5 - 1


@dataclass(frozen=True)
class DeviceInputs:
    """The trainer's `on_device` step for datasets built with `uint8_images`: batch[key] uint8 (..., H, W, C)
    -> float32 network inputs (..., C, H, W) on the device (4x less to copy, no float work in the loader)."""

    norm: InputNorm
    key: str = "image"

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, self.key: self.norm.to_input(batch[self.key])}


def common_input_norm(configs: list[Any], runs: list[Path]) -> InputNorm:
    """The intensity settings every run shares (models averaged on one batch see the same inputs); else an error naming them."""
    norms = {InputNorm.of(c) for c in configs}
    if len(norms) != 1:
        shown = "; ".join(f"{run}: {InputNorm.of(c)}" for run, c in zip(runs, configs))
        raise ValueError(f"the runs in {runs[0].parent} were trained on different input intensities ({shown}): retrain them alike")
    return norms.pop()


def to_tensor(image: np.ndarray, norm: InputNorm = WINDOW_INPUT) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) network input (default: scaled to [-1, 1])."""
    return norm.normalise(torch.from_numpy(np.ascontiguousarray(norm.stretch(image).transpose(2, 0, 1))))


def images_to_tensor(images: np.ndarray, device: torch.device | None = None, norm: InputNorm = WINDOW_INPUT) -> torch.Tensor:
    """A batch of uint8 (B, H, W, C) -> float32 (B, C, H, W) network inputs on `device`, as `to_tensor` does per image."""
    return norm.normalise(torch.from_numpy(np.array(norm.stretch(images))).to(device).permute(0, 3, 1, 2))  # np.array: a writable copy


def seeded(augment: A.Compose) -> A.Compose:
    """The pipeline, reseeded from numpy's global RNG for one call.

    albumentations draws from its own generator (seeded from the OS unless given a seed); reseeding
    it from numpy's RNG, which the trainer seeds per run, per DataLoader worker and restores on
    resume, makes every augmentation follow the run's seed.
    """
    augment.set_random_seed(int(np.random.randint(2**31)))
    return augment


class IndependentCompose(A.Compose):
    """A.Compose whose transforms draw from independent generators.

    albumentations 2's `Compose.set_random_seed` gives every transform the same seed, so their
    apply-or-not draws coincide (with p 0.75 and 0.5, the second applies only when the first
    does); here each transform, nested ones included, gets its own seed derived from the one given.
    """

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        if seed is None:
            return
        nodes = list(_transform_tree(self.transforms))
        for node, node_seed in zip(nodes, np.random.SeedSequence(seed).generate_state(len(nodes))):
            node.random_generator = np.random.default_rng(int(node_seed))
            node.py_random = random.Random(int(node_seed))


def _transform_tree(transforms: Any) -> Any:
    for transform in transforms:
        yield transform
        if isinstance(transform, A.BaseCompose):
            yield from _transform_tree(transform.transforms)


def _original_augmentation(sequence: bool) -> list[A.BasicTransform]:
    """The 3rd place's training transforms (ds_loc_dh_1A / ds_dh_seg_2D / ds_dh_fracseg_3A_crop and their configs).

    hflip 0.5; contrast 0.2 (p 0.75: their A.RandomContrast); shift 0.2, scale 0.2, rotate 20 deg,
    black border (p 0.75); sequences also grid distortion or elastic transform (p 0.5) and 8 black
    holes of 10 % of the image's side, on every sequence (their Cutout had always_apply=True).
    """
    transforms: list[A.BasicTransform] = [
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2, p=0.75),
        # their ShiftScaleRotate(0.2, 0.2, 20), written as the Affine it stands for in albumentations 2
        A.Affine(scale=(0.8, 1.2), translate_percent=(-0.2, 0.2), rotate=(-20, 20), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.75),
    ]
    if sequence:
        transforms += [
            A.OneOf([A.GridDistortion(num_steps=5, distort_limit=0.05, p=1.0), A.ElasticTransform(alpha=1, sigma=50, p=1.0)], p=0.5),
            A.CoarseDropout(num_holes_range=(8, 8), hole_height_range=(0.1, 0.1), hole_width_range=(0.1, 0.1), fill=0, p=1.0),
        ]
    return transforms


def _check_augment(augment: str) -> str:
    if augment not in ("light", "original"):
        raise ValueError(f"augment must be 'light' or 'original', got {augment!r}")
    return augment


def box_augmentation(image_size: int, augment: str = "light") -> A.Compose:
    """Training augmentation of the box model that keeps the box consistent with the image.

    light: mild affine + brightness/contrast; original: the 3rd place's set (`_original_augmentation`).
    """
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, min_visibility=0.3)
    if _check_augment(augment) == "original":
        return IndependentCompose(_original_augmentation(sequence=False), bbox_params=bbox_params)
    transforms = [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), border_mode=cv2.BORDER_CONSTANT, p=0.8),
        A.RandomBrightnessContrast(0.1, 0.1, p=0.5),
    ]
    return A.Compose(transforms, bbox_params=bbox_params)


class BoxSliceDataset(Dataset):
    """One slice -> image + has_box + C1-C7 box scaled to [0, 1] (box model, stage 01).

    The image is `input_slices` consecutive slices centred on the row's slice (clamped at the
    study's ends), stacked slice-major as channels; the labels are those of the centre slice.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        source: SliceSource,
        augment: bool | str = False,
        input_slices: int = 1,
        norm: InputNorm = WINDOW_INPUT,
        uint8_images: bool = False,
    ) -> None:
        """`table`: StudyInstanceUID, slice_index, has_box, x0..y1 in original pixels, rows, cols.

        `augment`: False (none), True (light) or the name of an augmentation set; `norm`: the run's input intensity;
        `uint8_images`: items hold uint8 (H, W, C) images that `DeviceInputs(norm)` finishes on the device.
        """
        self.table = table.reset_index(drop=True)
        self.source, self.norm, self.uint8_images = source, norm, uint8_images
        self.input_slices = input_slices
        self.augment = box_augmentation(source.spec.image_size, "light" if augment is True else augment) if augment else None
        size = source.spec.image_size
        scale = np.stack([size / self.table["cols"], size / self.table["rows"]] * 2, axis=1)
        self.boxes = (self.table[BOX_COLUMNS].to_numpy(dtype=np.float32) * scale).astype(np.float32)
        self.has_box = self.table["has_box"].to_numpy(dtype=np.float32)
        self.uids = self.table["StudyInstanceUID"].to_numpy()
        self.slice_index = self.table["slice_index"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def image(self, index: int) -> np.ndarray:
        """uint8 (H, W, input_slices * windows) of row `index`."""
        uid, centre = self.uids[index], int(self.slice_index[index])
        if self.input_slices == 1:
            return self.source.slice(uid, centre)
        positions = neighbour_positions(np.array([centre]), self.source.n_slices(uid), self.input_slices)[0]
        return np.concatenate([self.source.slice(uid, int(p)) for p in positions], axis=-1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.norm.stretch(self.image(index))
        has_box = float(self.has_box[index])
        box = self.boxes[index] if has_box else np.zeros(4, np.float32)
        if self.augment is not None:
            boxes = [box.tolist()] if has_box else []
            out = seeded(self.augment)(image=image, bboxes=boxes, labels=[1] * len(boxes))
            image = out["image"]
            if has_box and len(out["bboxes"]):
                box = np.asarray(out["bboxes"][0], np.float32)
            elif has_box:
                has_box, box = 0.0, np.zeros(4, np.float32)
        size = image.shape[0]
        return {
            "image": self.norm.item_images(image, self.uint8_images),
            "has_box": torch.tensor(has_box),
            "box": torch.from_numpy(np.clip(box / size, 0.0, 1.0).astype(np.float32)),
            "index": torch.tensor(index),
        }


# --------------------------------------------------------------------------- 2.5D sequences


def sequence_starts(first: int, last: int, span: int, stride: int) -> list[int]:
    """Window starts (slice positions) so windows of `span` slices cover first..last (inclusive).

    The last window is aligned to end at `last`, so nothing is left out; a study shorter than one
    window gets a single window starting at `first` (the rest is padding).
    """
    length = last - first + 1
    if length <= span:
        return [first]
    starts = list(range(first, last - span + 2, max(1, stride)))
    if starts[-1] != last - span + 1:
        starts.append(last - span + 1)
    return starts


def sequence_augmentation(n_images: int, augment: str = "light") -> A.Compose:
    """One random transform applied identically to every image of a sequence (additional targets), as the 3rd place did.

    light: mild affine + brightness/contrast; original: the 3rd place's set (`_original_augmentation`).
    """
    targets = {f"image{i}": "image" for i in range(1, n_images)}
    if _check_augment(augment) == "original":
        return IndependentCompose(_original_augmentation(sequence=True), additional_targets=targets)
    transforms = [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), border_mode=cv2.BORDER_CONSTANT, p=0.8),
        A.RandomBrightnessContrast(0.1, 0.1, p=0.5),
    ]
    return A.Compose(transforms, additional_targets=targets)


def augment_sequence(images: np.ndarray, pipeline: A.Compose) -> np.ndarray:
    """uint8 images (n, H, W, C) -> the same random transform applied to each (`pipeline` from `sequence_augmentation`,
    reseeded from numpy's RNG by `seeded`)."""
    n = len(images)
    out = seeded(pipeline)(image=images[0], **{f"image{i}": images[i] for i in range(1, n)})
    return np.stack([out["image"]] + [out[f"image{i}"] for i in range(1, n)])


def positive_slices(labels: np.ndarray, fraction: float = 0.5, per_column: bool = False) -> np.ndarray:
    """Slices (rows of `labels`, soft targets) where some column reaches `fraction` of its peak (> 0).

    Soft targets differ in scale (ratios peak at 1, fracture labels at the vertebra model's
    confidence), so a fixed threshold such as 0.5 can miss every fracture slice; relative to each
    column's peak it cannot. `per_column=True` gives the (slices, columns) mask instead.
    """
    labels = np.asarray(labels, dtype=np.float64)
    peak = labels.max(axis=0, initial=0.0)
    mask = (labels >= fraction * peak[None, :]) & (peak[None, :] > 0)
    return mask if per_column else mask.any(axis=1)


def training_starts(first: int, last: int, span: int, step: int) -> list[int]:
    """Training window starts that cover first..last (inclusive): every slice position divisible by `step`
    whose window ends inside the range, plus the first and the last window (the 3rd place's sampler,
    ds_dh_seg_2D.py); a range shorter than one window gets one window at `first`."""
    last_start = last - span + 1
    if last_start <= first:
        return [first]
    aligned = range(-(-first // step) * step, last_start + 1, step)
    return sorted({first, last_start, *aligned})


class SequenceDataset(Dataset):
    """Sequences of `seq_len` images, each `slices_per_image` adjacent slices as channels (stages 03, 05, 06).

    A window starting at slice position s covers slices s .. s + seq_len * slices_per_image - 1;
    image i stacks slices s + k*i .. s + k*i + k - 1 (k = slices_per_image) and is labelled with
    its middle slice. Positions outside the study are black and masked out of the loss.

    - `mode="train"`, `window_sampling="random"`: `samples_per_study` random windows per study and
      epoch; with probability `positive_bias` the window is drawn among those holding a positive
      label (a fracture). `window_sampling="every"`: every window of `training_starts` (slices
      divisible by `window_step`, or the study's `window_steps[uid]`, plus the first and the last)
      once per epoch. With probability
      `slice_skip_p` a training window takes every d-th slice instead (d from 2 to `slice_skip_max`,
      at most what the study holds after the start; the 3rd place's ds_dh_seg_2H.py).
    - `mode="infer"`: overlapping windows (`stride` slices apart) that cover each study's range.
    `per_slice=True`: `target` and `mask` per slice (seq_len * slices_per_image) instead of per image.
    Every item has `slice_position` (span,): each slice's relative position in the study, (index + 1) / n.
    `labels[uid]` is a float array (n_slices, n_targets) (`positive_labels`, default `labels`,
    decides which windows count as positive); `ranges[uid]` = (first, last) slice
    positions to cover (default: the whole study); `crops[uid]` = study box in original pixels
    (`geometry.crop_box_in_cache`: `crop_margin`, `crop_square`). `augment`: False, True (light) or an augmentation
    set's name; `norm`: how pixels become network inputs; `uint8_images`: items hold uint8 (seq_len, H, W, C)
    images that `DeviceInputs(norm)` finishes on the device.
    """

    def __init__(
        self,
        uids: list[str],
        cache: StudyCache,
        labels: dict[str, np.ndarray] | None = None,
        *,
        seq_len: int = 32,
        slices_per_image: int = 3,
        mode: str = "train",
        samples_per_study: int = 1,
        positive_bias: float = 0.5,
        window_sampling: str = "random",
        window_step: int = 12,
        window_steps: dict[str, int] | None = None,
        slice_skip_p: float = 0.0,
        slice_skip_max: int = 4,
        stride: int | None = None,
        ranges: dict[str, tuple[int, int]] | None = None,
        crops: dict[str, tuple[float, float, float, float]] | None = None,
        crop_margin: float = 0.1,
        crop_square: bool = False,
        output_size: int | None = None,
        augment: bool | str = False,
        norm: InputNorm = WINDOW_INPUT,
        positive_labels: dict[str, np.ndarray] | None = None,
        per_slice: bool = False,
        uint8_images: bool = False,
    ) -> None:
        if mode not in ("train", "infer"):
            raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
        if window_sampling not in ("random", "every"):
            raise ValueError(f"window_sampling must be 'random' or 'every', got {window_sampling!r}")
        self.uids, self.cache, self.labels = list(uids), cache, labels
        self.positive_labels = positive_labels if positive_labels is not None else labels
        self.study_index = {uid: i for i, uid in enumerate(self.uids)}
        self.seq_len, self.k, self.mode, self.per_slice = seq_len, slices_per_image, mode, per_slice
        self.span = seq_len * slices_per_image
        self.positive_bias = positive_bias
        self.slice_skip_p, self.slice_skip_max = slice_skip_p, slice_skip_max
        self.output_size = output_size or cache.spec.image_size
        self.augment = sequence_augmentation(seq_len, "light" if augment is True else augment) if augment else None
        self.norm, self.uint8_images = norm, uint8_images
        self.n_slices = {uid: int(cache.volume(uid).shape[0]) for uid in self.uids}
        self.ranges = {uid: (ranges or {}).get(uid, (0, self.n_slices[uid] - 1)) for uid in self.uids}
        self.crops: dict[str, tuple[int, int, int, int]] = {}
        if crops:
            size = cache.spec.image_size
            for uid in self.uids:
                if uid in crops:
                    table = cache.slices(uid)
                    rows, cols = int(table["rows"].iloc[0]), int(table["cols"].iloc[0])
                    self.crops[uid] = crop_box_in_cache(crops[uid], rows, cols, size, crop_margin, crop_square)
        self.items: list[tuple[str, int | None]]
        if mode == "train" and window_sampling == "every":
            steps = {uid: int((window_steps or {}).get(uid, window_step)) for uid in self.uids}
            self.items = [(uid, start) for uid in self.uids for start in training_starts(*self.ranges[uid], self.span, steps[uid])]
        elif mode == "train":
            self.items = [(uid, None) for uid in self.uids for _ in range(samples_per_study)]
        else:
            stride = stride or self.span // 2
            self.items = [(uid, start) for uid in self.uids for start in sequence_starts(*self.ranges[uid], self.span, stride)]

    def __len__(self) -> int:
        return len(self.items)

    def _random_start(self, uid: str) -> int:
        first, last = self.ranges[uid]
        low, high = first - self.span // 4, max(first, last - self.span + 1 + self.span // 4)
        if self.positive_labels is not None and np.random.random() < self.positive_bias:
            positive = np.flatnonzero(positive_slices(self.positive_labels[uid][first : last + 1])) + first
            if len(positive):
                centre = int(np.random.choice(positive))
                return int(np.clip(centre - np.random.randint(0, self.span), low, high))
        return int(np.random.randint(low, high + 1))

    def _skip(self, uid: str, start: int) -> tuple[int, int]:
        """(start, step) of a training window: with probability `slice_skip_p`, every d-th slice from a random offset."""
        if self.slice_skip_p <= 0 or np.random.random() >= self.slice_skip_p:
            return start, 1
        most = min(self.slice_skip_max, (self.n_slices[uid] - max(start, 0)) // self.span)
        if most < 2:
            return start, 1
        step = int(np.random.randint(2, most + 1))
        return start + int(np.random.randint(step)), step

    def window(self, uid: str, start: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (seq_len, H, W, k * n_windows) and the in-study mask (seq_len,) of one window (every `step`-th slice)."""
        volume = self.cache.volume(uid)
        n = volume.shape[0]
        positions = start + step * np.arange(self.span)
        inside = (positions >= 0) & (positions < n)
        x0, y0, x1, y1 = self.crops.get(uid, (0, 0, volume.shape[2], volume.shape[1]))
        block = np.zeros((self.span, y1 - y0, x1 - x0, volume.shape[3]), np.uint8)
        if inside.any():
            lo, hi = positions[inside][0], positions[inside][-1] + 1
            block[inside] = volume[lo:hi, y0:y1, x0:x1] if step == 1 else volume[lo:hi, y0:y1, x0:x1][::step]
        size = self.output_size
        if block.shape[1] != size or block.shape[2] != size:
            block = np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, -1) for s in block])
        # (span, H, W, w) -> (seq_len, k, H, W, w) -> (seq_len, H, W, k * w)
        images = block.reshape(self.seq_len, self.k, size, size, -1).transpose(0, 2, 3, 1, 4).reshape(self.seq_len, size, size, -1)
        centre = positions[self.k // 2 :: self.k]
        return self.norm.stretch(images), (centre >= 0) & (centre < n)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        uid, start = self.items[index]
        if start is None:
            start = self._random_start(uid)
        step = 1
        if self.mode == "train":
            start, step = self._skip(uid, start)
        images, mask = self.window(uid, start, step)
        if self.augment is not None:
            images = augment_sequence(images, self.augment)
        n = self.n_slices[uid]
        positions = start + step * np.arange(self.span)
        if self.per_slice:
            mask = (positions >= 0) & (positions < n)
        item = {
            "image": self.norm.item_images(images, self.uint8_images),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "study": torch.tensor(self.study_index[uid]),
            "start": torch.tensor(start),
            "slice_position": torch.from_numpy(((positions + 1) / n).astype(np.float32)),
        }
        if self.labels is not None:
            labelled = positions if self.per_slice else positions[self.k // 2 :: self.k]
            item["target"] = torch.from_numpy(self.labels[uid][np.clip(labelled, 0, n - 1)].astype(np.float32))
        return item


def sequence_inputs(cfg: Any, crops: dict[str, tuple] | None = None) -> dict[str, Any]:
    """SequenceDataset arguments that make its images those a run of config `cfg` saw: window shape,
    box crop and intensity. A run that cropped sees `crop_size` images: cut here from the study
    cache by `crops` (crop_source=cache), or already cut by the crop cache (crop_source=native).
    Training, 04, 06 and the submission all build their windows from this."""
    inputs: dict[str, Any] = dict(seq_len=int(cfg.seq_len), slices_per_image=int(cfg.slices_per_image), norm=InputNorm.of(cfg))
    if getattr(cfg, "crop_by_box", False):
        inputs["output_size"] = int(cfg.crop_size)
        if getattr(cfg, "crop_source", "cache") == "cache" and crops:
            inputs.update(crops=crops, crop_margin=float(cfg.crop_margin), crop_square=bool(getattr(cfg, "crop_square", False)))
    return inputs


def spread_window_predictions(
    predictions: dict[str, list[tuple[int, np.ndarray]]], n_slices: dict[str, int], slices_per_image: int
) -> dict[str, np.ndarray]:
    """Per-window image outputs -> per-slice means: each image's output counts for its k slices.

    `predictions[uid]` lists (start, outputs (seq_len, K)); overlapping windows are averaged.
    Slices no window covered get NaN.
    """
    result = {}
    for uid, windows in predictions.items():
        n, k = n_slices[uid], slices_per_image
        total = np.zeros((n, windows[0][1].shape[1]), np.float64)
        count = np.zeros(n, np.float64)
        for start, outputs in windows:
            positions = start + np.arange(outputs.shape[0] * k)
            per_slice = np.repeat(outputs, k, axis=0)
            inside = (positions >= 0) & (positions < n)
            np.add.at(total, positions[inside], per_slice[inside])
            np.add.at(count, positions[inside], 1.0)
        with np.errstate(invalid="ignore"):
            result[uid] = total / count[:, None]
    return result
