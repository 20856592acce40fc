"""Datasets of every stage, reading slices from the study cache (or, for comparison, DICOMs).

A *slice source* returns one windowed uint8 slice (size, size, n_windows) by (study, slice index
head -> feet); the datasets never know whether it came from the cache or from a DICOM file, so
the cache-vs-DICOM benchmark measures exactly the same training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.core.cache import CacheSpec, StudyCache


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
        from rsna22_utils.core.cache import encode_study
        from rsna22_utils.core.dicom import read_slice

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


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) scaled to [-1, 1]."""
    return _unit_range(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))


def images_to_tensor(images: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """A batch of uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1] on `device`, as `to_tensor` does per image."""
    return _unit_range(torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2))  # np.array: a writable copy


def _unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div_(127.5).sub_(1.0)


def seeded(augment: A.Compose) -> A.Compose:
    """The pipeline, reseeded from numpy's global RNG for one call.

    albumentations draws from its own generator (seeded from the OS unless given a seed); reseeding
    it from numpy's RNG, which the trainer seeds per run, per DataLoader worker and restores on
    resume, makes every augmentation follow the run's seed.
    """
    augment.set_random_seed(int(np.random.randint(2**31)))
    return augment


def box_augmentation(image_size: int) -> A.Compose:
    """Mild geometric + intensity augmentation that keeps the box consistent with the image."""
    return A.Compose(
        [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), border_mode=cv2.BORDER_CONSTANT, p=0.8),
            A.RandomBrightnessContrast(0.1, 0.1, p=0.5),
        ],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, min_visibility=0.3),
    )


class BoxSliceDataset(Dataset):
    """One slice -> image + has_box + C1-C7 box scaled to [0, 1] (box model, stage 01).

    The image is `input_slices` consecutive slices centred on the row's slice (clamped at the
    study's ends), stacked slice-major as channels; the labels are those of the centre slice.
    """

    def __init__(self, table: pd.DataFrame, source: SliceSource, augment: bool = False, input_slices: int = 1) -> None:
        """`table`: StudyInstanceUID, slice_index, has_box, x0..y1 in original pixels, rows, cols."""
        self.table = table.reset_index(drop=True)
        self.source = source
        self.input_slices = input_slices
        self.augment = box_augmentation(source.spec.image_size) if augment else None
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
        image = self.image(index)
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
            "image": to_tensor(image),
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


def sequence_augmentation(n_images: int) -> A.Compose:
    """One random transform applied identically to every image of a sequence (additional targets)."""
    return A.Compose(
        [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), border_mode=cv2.BORDER_CONSTANT, p=0.8),
            A.RandomBrightnessContrast(0.1, 0.1, p=0.5),
        ],
        additional_targets={f"image{i}": "image" for i in range(1, n_images)},
    )


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


def crop_box_in_cache(box: tuple[float, float, float, float], rows: int, cols: int, size: int, margin: float) -> tuple[int, int, int, int]:
    """A study box in original pixels -> integer crop (x0, y0, x1, y1) in cache pixels, `margin` x its size added."""
    x0, y0, x1, y1 = box
    sx, sy = size / cols, size / rows
    w, h = (x1 - x0) * sx, (y1 - y0) * sy
    cx0, cy0 = x0 * sx - margin * w, y0 * sy - margin * h
    cx1, cy1 = x1 * sx + margin * w, y1 * sy + margin * h
    cx0, cy0 = max(0, int(np.floor(cx0))), max(0, int(np.floor(cy0)))
    cx1, cy1 = min(size, int(np.ceil(cx1))), min(size, int(np.ceil(cy1)))
    if cx1 - cx0 < 4 or cy1 - cy0 < 4:  # degenerate box: keep the whole slice
        return 0, 0, size, size
    return cx0, cy0, cx1, cy1


class SequenceDataset(Dataset):
    """Sequences of `seq_len` images, each `slices_per_image` adjacent slices as channels (stages 03, 05, 06).

    A window starting at slice position s covers slices s .. s + seq_len * slices_per_image - 1;
    image i stacks slices s + k*i .. s + k*i + k - 1 (k = slices_per_image) and is labelled with
    its middle slice. Positions outside the study are black and masked out of the loss.

    - `mode="train"`: `samples_per_study` random windows per study and epoch; with probability
      `positive_bias` the window is drawn among those holding a positive label (a fracture).
    - `mode="infer"`: overlapping windows (`stride` slices apart) that cover each study's range.
    `per_slice=True`: `target` and `mask` per slice (seq_len * slices_per_image) instead of per image.
    Every item has `slice_position` (span,): each slice's relative position in the study, (index + 1) / n.
    `labels[uid]` is a float array (n_slices, n_targets) (`positive_labels`, default `labels`,
    decides which windows count as positive); `ranges[uid]` = (first, last) slice
    positions to cover (default: the whole study); `crops[uid]` = study box in original pixels.
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
        stride: int | None = None,
        ranges: dict[str, tuple[int, int]] | None = None,
        crops: dict[str, tuple[float, float, float, float]] | None = None,
        crop_margin: float = 0.1,
        output_size: int | None = None,
        augment: bool = False,
        positive_labels: dict[str, np.ndarray] | None = None,
        per_slice: bool = False,
    ) -> None:
        if mode not in ("train", "infer"):
            raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
        self.uids, self.cache, self.labels = list(uids), cache, labels
        self.positive_labels = positive_labels if positive_labels is not None else labels
        self.study_index = {uid: i for i, uid in enumerate(self.uids)}
        self.seq_len, self.k, self.mode, self.per_slice = seq_len, slices_per_image, mode, per_slice
        self.span = seq_len * slices_per_image
        self.positive_bias = positive_bias
        self.output_size = output_size or cache.spec.image_size
        self.augment = sequence_augmentation(seq_len) if augment else None
        self.n_slices = {uid: int(cache.volume(uid).shape[0]) for uid in self.uids}
        self.ranges = {uid: (ranges or {}).get(uid, (0, self.n_slices[uid] - 1)) for uid in self.uids}
        self.crops: dict[str, tuple[int, int, int, int]] = {}
        if crops:
            size = cache.spec.image_size
            for uid in self.uids:
                if uid in crops:
                    table = cache.slices(uid)
                    rows, cols = int(table["rows"].iloc[0]), int(table["cols"].iloc[0])
                    self.crops[uid] = crop_box_in_cache(crops[uid], rows, cols, size, crop_margin)
        if mode == "train":
            self.items = [(uid, -1) for uid in self.uids for _ in range(samples_per_study)]
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

    def window(self, uid: str, start: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (seq_len, H, W, k * n_windows) and the in-study mask (seq_len,) of one window."""
        volume = self.cache.volume(uid)
        n = volume.shape[0]
        positions = start + np.arange(self.span)
        inside = (positions >= 0) & (positions < n)
        x0, y0, x1, y1 = self.crops.get(uid, (0, 0, volume.shape[2], volume.shape[1]))
        block = np.zeros((self.span, y1 - y0, x1 - x0, volume.shape[3]), np.uint8)
        if inside.any():
            lo, hi = positions[inside][0], positions[inside][-1] + 1
            block[inside] = volume[lo:hi, y0:y1, x0:x1]
        size = self.output_size
        if block.shape[1] != size or block.shape[2] != size:
            block = np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, -1) for s in block])
        # (span, H, W, w) -> (seq_len, k, H, W, w) -> (seq_len, H, W, k * w)
        images = block.reshape(self.seq_len, self.k, size, size, -1).transpose(0, 2, 3, 1, 4).reshape(self.seq_len, size, size, -1)
        centre = positions[self.k // 2 :: self.k]
        return images, (centre >= 0) & (centre < n)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        uid, start = self.items[index]
        if start < 0:
            start = self._random_start(uid)
        images, mask = self.window(uid, start)
        if self.augment is not None:
            out = seeded(self.augment)(image=images[0], **{f"image{i}": images[i] for i in range(1, self.seq_len)})
            images = np.stack([out["image"]] + [out[f"image{i}"] for i in range(1, self.seq_len)])
        n = self.n_slices[uid]
        positions = start + np.arange(self.span)
        if self.per_slice:
            mask = (positions >= 0) & (positions < n)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(127.5).sub_(1.0),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "study": torch.tensor(self.study_index[uid]),
            "start": torch.tensor(start),
            "slice_position": torch.from_numpy(((positions + 1) / n).astype(np.float32)),
        }
        if self.labels is not None:
            labelled = positions if self.per_slice else start + self.k // 2 + self.k * np.arange(self.seq_len)
            item["target"] = torch.from_numpy(self.labels[uid][np.clip(labelled, 0, n - 1)].astype(np.float32))
        return item


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
