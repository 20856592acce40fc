"""What a network sees: one image per row of the images table, read from the 00 cache, as the seed fed it.

`triplet`: the slice and its two neighbours in the study (the edge slice repeats itself) as three
channels, the target slice in the middle, each windowed when loading (subdural, level 80 width 200)
from the cached HU 0-255. `windows`: the slice alone in the brain, subdural and bone windows (cached).
Values are in [0, 1]; no ImageNet normalisation (the seed used none).
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsna22_utils.intracranial.labels import LABELS
from rsna22_utils.intracranial.prepare import Prepared


def load_image(prepared: Prepared, cache_size: int, row: Any, cfg: Any) -> np.ndarray:
    """float32 (size, size, 3) in [0, 1] of one image (a row of images.parquet) as `cfg.input` says."""
    volume = prepared.volume(cache_size, row.StudyInstanceUID)
    index, last = int(row.slice_index), int(row.n_slices) - 1
    if cfg.input == "triplet":
        neighbours = [max(0, index - 1), index, min(last, index + 1)]
        hu = np.asarray(volume[neighbours, :, :, 0], dtype=np.float32).transpose(1, 2, 0)
        level, width = cfg.triplet_window
        return np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)
    return np.asarray(volume[index, :, :, 1:4], dtype=np.float32) / 255.0


def train_transform(cfg: Any) -> A.Compose:
    """The seed's augmentation: horizontal flip, rotation up to `rotate` degrees, random resized crop to image_size."""
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip),
            A.Rotate(limit=cfg.rotate, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0 if cfg.rotate else 0.0),
            A.RandomResizedCrop(size=(cfg.image_size, cfg.image_size), scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), p=1.0),
        ]
    )


class ImageDataset(Dataset):
    """Rows of the images table -> {"image": (3, size, size), "target": (6,) (labelled rows), "index": row number}."""

    def __init__(self, images: pd.DataFrame, prepared: Prepared, cfg: Any, augment: bool = False) -> None:
        self.images = images.reset_index(drop=True)
        self.prepared, self.cfg = prepared, cfg
        self.transform = train_transform(cfg) if augment else None
        self.labelled = all(label in self.images.columns for label in LABELS) and self.images["any"].notna().all()
        self.targets = np.array(self.images[list(LABELS)], dtype=np.float32) if self.labelled else None
        self.rows = list(self.images.itertuples(index=False))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = load_image(self.prepared, self.cfg.cache_size, self.rows[i], self.cfg)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        elif image.shape[0] != self.cfg.image_size:
            image = cv2.resize(image, (self.cfg.image_size, self.cfg.image_size), interpolation=cv2.INTER_LINEAR)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "index": torch.tensor(i)}
        if self.targets is not None:
            item["target"] = torch.from_numpy(self.targets[i])
        return item


def tta_views(images: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    """The TTA views of a (batch, 3, H, W) batch: identity, hflip, rot-10, rot10 (degrees, counter-clockwise)."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    views = {"identity": lambda x: x, "hflip": lambda x: torch.flip(x, dims=[-1])}
    out = []
    for name in names:
        if name in views:
            out.append(views[name](images))
        elif name.startswith("rot"):
            out.append(rotate(images, float(name[3:]), interpolation=InterpolationMode.BILINEAR))
        else:
            raise ValueError(f"unknown TTA view {name!r}")
    return out
