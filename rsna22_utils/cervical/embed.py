"""A study as a sequence of frozen-CNN embeddings: its box crops inside the slice range, in windows of
3-slice images, as the stage-05 CNN saw them. Stage 06 embeds every train study with it, the
submission every test study; neither needs the trainer for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.cervical.configs import StudyTrainConfig
from rsna22_utils.cervical.data import SequenceDataset, sequence_inputs
from rsna22_utils.cervical.models import fit_length


def study_windows(
    uids: list[str],
    cache: Any,
    ranges: dict[str, tuple[int, int]],
    crops: dict[str, tuple],
    cfg: StudyTrainConfig,
    uint8_images: bool = False,
) -> SequenceDataset:
    """Back-to-back windows of `seq_len` images (3-slice crops, as its stage-05 CNN saw them) covering each study's slice range
    (`uint8_images`: items hold the uint8 pixels, for `InputNorm.to_input` on the device)."""
    stride = cfg.seq_len * cfg.slices_per_image
    inputs = sequence_inputs(cfg, crops)
    return SequenceDataset(uids, cache, None, mode="infer", stride=stride, ranges=ranges, uint8_images=uint8_images, **inputs)


def encode_windows(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(windows, seq_len, C, H, W) -> CNN embeddings (windows, seq_len, features) in float32."""
    return encoder(images.flatten(0, 1)).view(*images.shape[:2], -1).float()


def join_windows(parts: list[tuple[int, np.ndarray | torch.Tensor]], first: int, last: int, slices_per_image: int) -> Any:
    """Kept embeddings of each window (start, (images, features)) -> one sequence of the study's images in range."""
    parts = sorted(parts, key=lambda part: part[0])
    values = [p for _, p in parts]
    sequence = torch.cat(values) if isinstance(values[0], torch.Tensor) else np.concatenate(values)
    return sequence[: max(1, (last - first + 1 + slices_per_image - 1) // slices_per_image)]


def embed_studies(
    encoder: nn.Module, cache: Any, uids: list[str], cfg: StudyTrainConfig, crops: dict, ranges: dict, device: torch.device
) -> dict[str, np.ndarray]:
    """Frozen CNN embeddings of every 3-slice image inside each study's slice range."""
    dataset = study_windows(uids, cache, ranges, crops, cfg)
    loader = DataLoader(dataset, batch_size=max(1, cfg.infer_batch_size), num_workers=cfg.num_workers, shuffle=False)
    chunks: dict[str, list[tuple[int, np.ndarray]]] = {}
    with torch.inference_mode():
        for batch in tqdm(loader, desc="embed studies", unit="batch"):
            features = encode_windows(encoder, batch["image"].to(device)).cpu().numpy()
            for b in range(features.shape[0]):
                uid = dataset.uids[int(batch["study"][b])]
                keep = batch["mask"][b].numpy() > 0.5
                chunks.setdefault(uid, []).append((int(batch["start"][b]), features[b][keep]))
    return {uid: join_windows(parts, *ranges[uid], cfg.slices_per_image) for uid, parts in chunks.items()}


# ----------------------------------------------------------------------------- one study at inference


@dataclass
class StudyImages:
    """One study's windows of box crops, ready for a study model."""

    images: torch.Tensor  # (windows, seq_len, C, H, W)
    masks: torch.Tensor  # (windows, seq_len): 1 where the image lies inside the study
    starts: list[int]  # first slice of each window
    first: int  # the study's slice range (from its box)
    last: int


def study_images(
    cfg: StudyTrainConfig, cache: Any, uid: str, study_box: dict[str, float], device: torch.device | None = None
) -> StudyImages:
    """The windows of one study (box crops inside its slice range, widened by `slice_margin`) as a study
    model of config `cfg` sees them. For `crop_source="native"`, `cache` holds the study's crops already
    (`crops.memory_crop_cache`). With `device`, the uint8 crops are moved there and become network inputs
    there (the same values, a quarter of the bytes to move, no float work on the CPU)."""
    margin, n = int(getattr(cfg, "slice_margin", 0)), int(cache.volume(uid).shape[0])
    first, last = max(0, int(study_box["slnum_from"]) - margin), min(n - 1, int(study_box["slnum_to"]) + margin)
    box = tuple(study_box[c] for c in BOX_COLUMNS)
    dataset = study_windows([uid], cache, {uid: (first, last)}, {uid: box}, cfg, uint8_images=device is not None)
    items = [dataset[i] for i in range(len(dataset))]
    images, masks = torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])
    if device is not None:
        images = dataset.norm.to_input(images.to(device))
    return StudyImages(images, masks, [int(it["start"]) for it in items], first, last)


def study_probabilities(
    model: nn.Module, cfg: StudyTrainConfig, study: StudyImages, device: torch.device, batch_size: int, flip: bool = False
) -> np.ndarray:
    """One study model on one study's windows -> 8 probabilities (TARGETS order); `flip` averages a
    horizontally mirrored pass. Call under inference mode and autocast."""
    probs = []
    for mirrored in [False, True] if flip else [False]:
        parts = []
        for at in range(0, len(study.images), batch_size):
            chunk = study.images[at : at + batch_size].to(device)
            features = encode_windows(model.encoder, chunk.flip(-1) if mirrored else chunk)
            keep = study.masks[at : at + batch_size].to(device) > 0.5
            parts += [(study.starts[at + b], features[b][keep[b]]) for b in range(features.shape[0])]
        sequence = join_windows(parts, study.first, study.last, cfg.slices_per_image)[None]
        sequence, mask = fit_length(sequence, torch.ones(1, sequence.shape[1], device=device), model.max_len)
        probs.append(torch.sigmoid(model.head(sequence.float(), mask).float())[0].cpu().numpy())
    return np.mean(probs, axis=0)
