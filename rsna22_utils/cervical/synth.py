"""Synthetic RSNA 2022 competitions: CT slices in real DICOM encodings and a whole Kaggle layout.

Why: every stage of the kit (scan, decode, segmentation alignment, box model, fracture model,
metric) must run end to end in CI and on a laptop without the 340 GB competition. The
generator writes exactly Kaggle's files (train.csv, train_bounding_boxes.csv, test.csv,
sample_submission.csv, train_images/, test_images/, segmentations/) with realistic headers
(both z directions, several transfer syntaxes, signed 16-bit and unsigned 12-bit, padding)
and anatomy a small CNN can learn at 96-128 px, plus ground truth under `_synthetic/`.

The DICOM encoding itself (transfer syntaxes, stored values, the slice writer) lives in
`core.dicom_writer`.

Ground truth (outside the Kaggle files): `_synthetic/studies.csv` (per study: split, n_slices,
z_direction, headers, the C1..C7 outer box x0,y0,x1,y1 in pixels with x1/y1 exclusive, and the
first/last head->feet slice index of the cervical spine (slnum_from/slnum_to) and of each
vertebra (C1_from/C1_to ...)), `_synthetic/test_labels.csv` (train.csv format, for scoring),
`_synthetic/boxes.csv` (every drawn break, train and test, with vertebra and slice_index) and
`_synthetic/generator.json` (parameters + version). `competition_specs` + `render_study`
reproduce any study's pixels (also unbroken) without writing files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rsna22_utils.cervical.anatomy import TARGETS, VERTEBRAE
from rsna22_utils.cervical.metric import TRAIN_PREVALENCE
from rsna22_utils.core.dicom_writer import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG2000_LOSSLESS,
    JPEG_LOSSLESS_57,
    JPEG_LOSSLESS_70,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    SliceWriter,
    padding_hu,
    stored_range,
)
from rsna22_utils.core.pool import run_all

if TYPE_CHECKING:
    import nibabel as nib
    import pandas as pd

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Statistics of the real competition, embedded so the generator never needs ../shared (label rates: metric.TRAIN_PREVALENCE).
# Source: ../shared/realdata/rsna2022/csv/train.csv (2019 studies), computed once.
# Same source: number of fractured vertebrae among the 961 fractured studies.
REAL_FRACTURE_COUNTS: dict[int, int] = {1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}
# Source: ../shared/realdata/rsna2022/csv/meta_segmentation.csv (87 segmented studies).
REAL_VERTEBRA_SLICES: tuple[float, ...] = (47.1, 76.2, 46.4, 48.1, 49.3, 50.8, 56.5)  # mean slices C1..C7
REAL_VERTEBRA_SLICES_SD = 18.0
REAL_SERIES_SLICES = (152, 298, 673)  # min, median, max slices per series
REAL_CERVICAL_FIRST, REAL_CERVICAL_LAST = 0.136, 0.819  # mean first/last C1..C7 slice as fraction of series
REAL_Z_FALLING = 0.93  # fraction of studies whose z falls as slice_number grows

LABEL_COLUMNS: tuple[str, ...] = TARGETS
GENERATOR_VERSION = "1"
UID_ROOT = "1.2.826.0.1.3680043"

# Per-study header mix: transfer syntax weights (real train is mostly JPEG Lossless .70 and Explicit LE).
SYNTAX_WEIGHTS: dict[str, float] = {
    EXPLICIT_LE: 0.35,
    IMPLICIT_LE: 0.20,
    JPEG_LOSSLESS_70: 0.30,
    JPEG_LOSSLESS_57: 0.05,
    JPEG_LS_LOSSLESS: 0.04,
    JPEG2000_LOSSLESS: 0.03,
    RLE_LOSSLESS: 0.03,
}


def default_median_slices(image_size: int) -> int:
    """Median slices per study when not given: ~0.94 x image_size (120 at 128 px), 96..298.

    Keeps CPU runs fast while a 96-slice window always fits; at 512 px it is the real median.
    """
    return int(min(REAL_SERIES_SLICES[1], max(96, round(0.94 * image_size))))


def sample_study_labels(rng: np.random.Generator) -> np.ndarray:
    """One study's labels [patient_overall, C1..C7] (0/1 int) following the real train.csv.

    patient_overall ~ Bernoulli(0.476); a fractured study gets k vertebrae (k from the real
    count distribution) drawn without replacement with weights = real per-vertebra prevalence.
    Marginals land within ~0.01 of TRAIN_PREVALENCE.
    """
    labels = np.zeros(8, dtype=np.int64)
    if rng.random() < TRAIN_PREVALENCE["patient_overall"]:
        counts = np.array(list(REAL_FRACTURE_COUNTS), dtype=np.int64)
        p = np.array(list(REAL_FRACTURE_COUNTS.values()), dtype=np.float64)
        k = int(rng.choice(counts, p=p / p.sum()))
        w = np.array([TRAIN_PREVALENCE[v] for v in VERTEBRAE])
        chosen = rng.choice(7, size=k, replace=False, p=w / w.sum())
        labels[0] = 1
        labels[1 + chosen] = 1
    return labels


def sample_labels(n: int, seed: int = 0) -> pd.DataFrame:
    """n label rows (columns patient_overall, C1..C7) from `sample_study_labels`; no images."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame([sample_study_labels(rng) for _ in range(n)], columns=list(LABEL_COLUMNS))


# ----------------------------------------------------------------------------------------------
# Study specification: everything random about one study, drawn from rng(seed, index).
@dataclass
class Fracture:
    """A cortical break of one vertebra (label 1..7) drawn on slice indices first..last (head->feet)."""

    label: int
    kind: str  # "body" (body / dens) or "arch" (posterior arch, C1 ring)
    first: int
    last: int
    angle: float  # line direction, radians
    offset: tuple[float, float]  # anchor offset as fractions of the part's radii
    side: float  # arch anchor angle on the canal ring, radians


@dataclass
class StudySpec:
    """All parameters of one synthetic study; `render_study(spec)` turns it into pixels."""

    index: int
    uid: str
    split: str
    labels: np.ndarray  # [patient_overall, C1..C7]
    n_slices: int
    image_size: int
    z_falling: bool  # z falls as slice_number grows (93 % of real studies)
    z_top: float
    slice_step: float
    slice_thickness: float
    pixel_spacing: float
    origin_xy: tuple[float, float]
    transfer_syntax: str
    signed: bool
    bits_stored: int
    padding_value: int | None
    segmented: bool
    scale: float  # pixels per reference pixel (128 px, 0.3 mm at 512)
    extents: list[tuple[int, int]]  # per vertebra (C1..C7, T1, T2, ...) first/last slice index
    overlaps: list[int]  # slices shared by vertebra i and i+1
    centre: tuple[float, float]
    drift: tuple[float, float]
    lordosis: float
    rotation: float
    noise: float
    fractures: list[Fracture] = field(default_factory=list)
    seed: tuple[int, int] = (0, 0)

    @property
    def series_uid(self) -> str:
        return f"{self.uid}.1"

    def slice_number(self, index: np.ndarray | int) -> np.ndarray | int:
        """File number n (<n>.dcm) of head->feet slice index."""
        return index + 1 if self.z_falling else self.n_slices - index

    def z(self, index: np.ndarray | int) -> np.ndarray | float:
        """ImagePositionPatient z of head->feet slice index (descending)."""
        return self.z_top - np.asarray(index) * self.slice_step


def _vertebra_extents(rng: np.random.Generator, n: int) -> tuple[list[tuple[int, int]], list[int]]:
    """First/last slice index of C1..C7 (real proportions) and thoracic vertebrae down to the end."""
    first = n * float(np.clip(rng.normal(REAL_CERVICAL_FIRST, 0.05), 0.07, 0.24))
    last = n * float(np.clip(rng.normal(REAL_CERVICAL_LAST, 0.05), 0.72, 0.9))
    lengths = np.array(REAL_VERTEBRA_SLICES) * np.exp(rng.normal(0, 0.15, 7))
    ov_frac = np.array([0.45, 0.12, 0.12, 0.12, 0.12, 0.12])  # C1/C2: the dens rises into C1's ring
    overlap = ov_frac * lengths[:-1]
    k = (last - first) / (lengths.sum() - overlap.sum())
    lengths, overlap = lengths * k, np.maximum(1.0, overlap * k)
    extents, overlaps, start = [], [], first
    for i in range(7):
        a, b = int(round(start)), int(round(start + lengths[i])) - 1
        extents.append((a, max(a + 2, b)))
        if i < 6:
            overlaps.append(int(round(overlap[i])))
            start = extents[-1][1] + 1 - overlaps[-1]
    t_len = lengths[6] * 1.15
    while extents[-1][1] < n - 1:  # thoracic vertebrae (labels 8, 9, ...) below C7
        o = max(1, int(round(0.12 * t_len)))
        a = extents[-1][1] + 1 - o
        overlaps.append(o)
        extents.append((a, a + max(3, int(round(t_len))) - 1))
    return extents, overlaps


def _draw_fractures(rng: np.random.Generator, labels: np.ndarray, extents: list[tuple[int, int]]) -> list[Fracture]:
    """One break per fractured vertebra of `labels`: its part (body or arch), slices and line, drawn from `rng`."""
    fractures = []
    for v in np.flatnonzero(labels[1:]):
        a, b = extents[v]
        if v == 0:
            kind_ = "arch"
        elif v == 1:
            kind_ = "body" if rng.random() < 0.7 else "arch"
        else:
            kind_ = "body" if rng.random() < 0.6 else "arch"
        # The break runs through most of the vertebra's height, as real fracture lines do (and as the
        # study-level label, spread over the vertebra's slices by the 3rd place's pseudo-labels, assumes);
        # it is drawn only on the slices where its part (body or arch) is drawn.
        lo_, hi_ = a, b
        length = max(2, int(round(rng.uniform(0.8, 1.0) * (hi_ - lo_ + 1))))
        f0 = int(rng.integers(lo_, max(lo_, hi_ - length + 1) + 1))
        fractures.append(
            Fracture(
                label=int(v + 1),
                kind=kind_,
                first=f0,
                last=min(hi_, f0 + length - 1),
                angle=float(rng.uniform(0, np.pi)),
                offset=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3))),
                side=float(rng.choice([-1, 1]) * rng.uniform(0.35, 1.2)),
            )
        )
    return fractures


def make_study_spec(seed: int, index: int, *, uid: str, split: str, image_size: int, median_slices: int, segmented: bool) -> StudySpec:
    """Draw one study's labels, geometry, headers and fractures from rng(seed, index)."""
    rng = np.random.default_rng([seed, index])
    labels = sample_study_labels(rng)
    low = min(96, median_slices)
    n = int(np.clip(round(median_slices * np.exp(rng.normal(0, 0.3))), low, round(2.25 * median_slices)))
    # Header mix; the first studies are pinned so every small competition has the main variants.
    syntax = str(rng.choice(list(SYNTAX_WEIGHTS), p=np.array(list(SYNTAX_WEIGHTS.values())) / sum(SYNTAX_WEIGHTS.values())))
    kind = rng.random()
    signed, bits, padding = (False, 12, None) if kind < 0.2 else (True, 16, -2000 if kind < 0.45 else None)
    z_falling = bool(rng.random() < REAL_Z_FALLING)
    pinned = {
        0: (JPEG_LOSSLESS_70, False, 12, None, True),
        1: (EXPLICIT_LE, True, 16, None, False),
        2: (IMPLICIT_LE, True, 16, -2000, True),
    }
    if index in pinned:
        syntax, signed, bits, padding, z_falling = pinned[index]
    ps512 = float(np.clip(rng.normal(0.30, 0.04), 0.22, 0.40))
    pixel_spacing = round(ps512 * 512 / image_size, 6)
    thickness512 = float(rng.choice([0.5, 0.625, 1.0], p=[0.05, 0.6, 0.35]))
    step = round(thickness512 * REAL_SERIES_SLICES[1] / median_slices, 4)
    scale = image_size / 128 * (0.30 / ps512) * float(np.exp(rng.normal(0, 0.06)))
    extents, overlaps = _vertebra_extents(rng, n)
    fractures = _draw_fractures(rng, labels, extents)
    return StudySpec(
        index=index,
        uid=uid,
        split=split,
        labels=labels,
        n_slices=n,
        image_size=image_size,
        z_falling=z_falling,
        z_top=round(float(rng.uniform(-50, 450)), 3),
        slice_step=step,
        slice_thickness=step,
        pixel_spacing=pixel_spacing,
        origin_xy=(
            round(-image_size * pixel_spacing / 2 + rng.normal(0, 10), 3),
            round(-image_size * pixel_spacing / 2 + rng.normal(0, 10), 3),
        ),
        transfer_syntax=syntax,
        signed=signed,
        bits_stored=bits,
        padding_value=padding,
        segmented=segmented,
        scale=scale,
        extents=extents,
        overlaps=overlaps,
        centre=(image_size / 2 + rng.normal(0, 2) * scale, image_size * 0.52 + rng.normal(0, 2) * scale),
        drift=(float(rng.normal(0, 3)), float(rng.normal(0, 2))),
        lordosis=float(rng.uniform(2, 6)),
        rotation=float(rng.normal(0, 0.08)),
        noise=float(rng.uniform(12, 25)),
        fractures=fractures,
        seed=(seed, index),
    )


# ----------------------------------------------------------------------------------------------
# Rendering. Sizes are in reference pixels (128 px image, 0.3 mm/px at 512) times spec.scale.
# Per level C1..C7 then thoracic: body half-width/half-depth, spinous length, transverse half-span.
_BODY = [(0.0, 0.0), (8.5, 7.0), (8.0, 6.2), (8.8, 6.5), (9.6, 6.9), (10.4, 7.3), (11.2, 7.7)]
_SPINOUS = [3.0, 10.0, 6.5, 7.5, 9.0, 11.0, 16.0]
_TRANSVERSE = [17.0, 13.0, 13.5, 14.5, 15.5, 17.0, 20.0]
_THORACIC_BODY, _THORACIC_SPINOUS, _THORACIC_TRANSVERSE = (12.0, 10.0), 15.0, 21.0
HU_AIR, HU_FAT, HU_SOFT, HU_CSF, HU_DISC = -1000, -100, 40, 15, 80
HU_CANCELLOUS, HU_CORTEX, HU_ARCH, HU_LUNG, HU_SKULL = 250, 850, 650, -850, 1100
HU_BREAK = -300  # the fracture gap (blood and fat between the fragments, seen dark in a bone window)


class _Canvas:
    """One slice being painted: HU (float32) and labels, with a rotated spine frame."""

    def __init__(self, n: int, grid: tuple[np.ndarray, np.ndarray]) -> None:
        self.y, self.x = grid
        self.hu = np.full((n, n), HU_AIR, np.float32)
        self.label = np.zeros((n, n), np.uint8)

    def frame(self, cx: float, cy: float, angle: float) -> None:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        self.u, self.v = c * dx + s * dy, -s * dx + c * dy  # v grows posteriorly (down the image)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, spine: bool = True) -> np.ndarray:
        """Normalised elliptic radius (<1 inside) in the spine frame (or image frame)."""
        u, v = (self.u, self.v) if spine else (self.x, self.y)
        return np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)

    def bar(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Distance to the segment (x0,y0)-(x1,y1) in the spine frame."""
        px, py = self.u - x0, self.v - y0
        dx, dy = x1 - x0, y1 - y0
        t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
        return np.hypot(px - t * dx, py - t * dy)

    def bone(self, r: np.ndarray, rmin: float, thick: float, label: int, endplate: bool = False) -> None:
        """Cortical shell (thickness `thick` px) around cancellous bone inside r < 1."""
        inside = r < 1
        shell = inside & (r > 1 - thick / max(rmin, 1e-3))
        self.hu[inside] = HU_CORTEX if endplate else HU_CANCELLOUS
        self.hu[shell] = HU_CORTEX
        self.label[inside] = label

    def fill(self, mask: np.ndarray, value: float, label: int | None = None) -> None:
        self.hu[mask] = value
        if label is not None:
            self.label[mask] = label


def _paint_vertebra(cv: _Canvas, spec: StudySpec, level: int, i: int, s: float) -> dict[str, tuple]:
    """Paint vertebra `level` (0 = C1) on head->feet slice i; returns its parts for fractures."""
    a, b = spec.extents[level]
    label = level + 1
    ov_prev = spec.overlaps[level - 1] if level > 0 else 0
    ov_next = spec.overlaps[level] if level < len(spec.overlaps) else 0
    m = b - a + 1
    th = max(1.0, 1.6 * s)
    parts: dict[str, tuple] = {}
    thoracic = level >= 7
    bx, by = (np.array(_THORACIC_BODY) if thoracic else np.array(_BODY[level])) * s
    if level == 0:  # atlas: anterior arch, two lateral masses, wide posterior arch; no body
        cv.bone(cv.ellipse(0, -1.5 * s, 5 * s, 3 * s), 3 * s, th, label, endplate=True)
        for side in (-1, 1):
            cv.bone(cv.ellipse(side * 11.5 * s, 3 * s, 5 * s, 6.5 * s), 5 * s, th, label)
        ring_r = cv.ellipse(0, 10 * s, 11 * s, 8.5 * s)
        arch = (ring_r < 1) & (ring_r > 1 - 2.6 * s / (8.5 * s)) & (cv.v > 4 * s)
        cv.fill(arch, HU_ARCH, label)
        cv.fill(cv.bar(-10 * s, 5 * s, -_TRANSVERSE[0] * s, 5 * s) < 1.8 * s, HU_ARCH, label)
        cv.fill(cv.bar(10 * s, 5 * s, _TRANSVERSE[0] * s, 5 * s) < 1.8 * s, HU_ARCH, label)
        parts["arch"] = (0.0, 10 * s, 11 * s - 1.3 * s, 8.5 * s - 1.3 * s)
        return parts
    body_last = b - ov_next - max(1, round(0.12 * m))
    arch_first = a + ov_prev
    if level == 1 and i < a + round(0.35 * m):  # the dens of C2 inside C1's ring
        r = 4.5 * s
        cv.bone(cv.ellipse(0, 0, r, r), r, th, label)
        parts["body"] = (0.0, 0.0, r, r)
    elif i <= body_last:
        endplate = i in (a, body_last)
        cv.bone(cv.ellipse(0, 0, bx, by), min(bx, by), th, label, endplate=endplate)
        parts["body"] = (0.0, 0.0, bx, by)
    elif i <= b - ov_next:  # intervertebral disc below the body (unlabelled)
        cv.fill(cv.ellipse(0, 0, bx, by) < 1, HU_DISC)
    if i >= arch_first and i <= b:
        crx, cry = (6.5 if thoracic else 7.5) * s, (5.5 if thoracic else 5.0) * s
        ccy = by + cry + 1.0 * s
        wall = 2.4 * s
        r_out = cv.ellipse(0, ccy, crx + wall, cry + wall)
        r_in = cv.ellipse(0, ccy, crx, cry)
        cv.fill((r_out < 1) & (r_in >= 1) & (cv.v > by * 0.6), HU_ARCH, label)
        cv.fill(r_in < 1, HU_CSF)
        spin = (_THORACIC_SPINOUS if thoracic else _SPINOUS[level]) * s
        back = ccy + cry + wall * 0.5
        cv.fill(cv.bar(0, back, 0, back + spin) < max(1.0, 1.4 * s), HU_ARCH, label)
        if level == 1 or level == 6:  # bifid C2 tip / C7 "prominens" knob
            cv.fill(cv.ellipse(0, back + spin, 2.4 * s, 2.0 * s) < 1, HU_CORTEX, label)
        trans = (_THORACIC_TRANSVERSE if thoracic else _TRANSVERSE[level]) * s
        for side in (-1, 1):
            cv.fill(cv.bar(side * crx, by * 0.7, side * trans, by * 0.9) < max(1.0, 1.5 * s), HU_ARCH, label)
        parts["arch"] = (0.0, ccy, crx + wall / 2, cry + wall / 2)
    return parts


def _break(cv: _Canvas, fracture: Fracture, part: tuple, i: int, s: float) -> np.ndarray:
    """Dark gap with bright edges along a line crossing the cortex of the part; returns the changed pixels."""
    cx, cy, rx, ry = part
    angle = fracture.angle + 0.05 * (i - fracture.first)
    if fracture.kind == "body":
        px, py = cx + fracture.offset[0] * rx, cy + fracture.offset[1] * ry
        half = 1.4 * max(rx, ry)
    else:  # a point on the arch ring, line roughly radial so it cuts the ring
        px, py = cx + rx * np.sin(fracture.side), cy + ry * np.cos(fracture.side)
        angle = np.arctan2(py - cy, px - cx) + 0.3 * np.sin(fracture.angle)
        half = 3.5 * s
    dx, dy = np.cos(angle) * half, np.sin(angle) * half
    # A gap of ~2-3 mm (hematoma and fat, darker than soft tissue) with sclerotic (cortex-bright) edges: a break
    # a small CNN can learn from a few dozen examples, at 96 px as at 512 px (widths never below ~1 px).
    distance = cv.bar(px - dx, py - dy, px + dx, py + dy)
    bone = cv.label == fracture.label
    width = max(2.0, 1.6 * s)
    gap = (distance < width) & bone
    edge = (distance < width + max(1.0, 0.8 * s)) & bone & ~gap
    cv.hu[edge] = np.maximum(cv.hu[edge], HU_CORTEX)
    cv.hu[gap] = HU_BREAK
    return gap | edge


def _paint_body(cv: _Canvas, spec: StudySpec, i: int, cx: float, cy: float) -> None:
    """Soft tissue of slice i around the spine centre (cx, cy): head above C1, neck, chest widening below C7."""
    n, S, s = spec.image_size, spec.n_slices, spec.scale
    c1_top, c7_bottom = spec.extents[0][0], spec.extents[6][1]
    ncx, ncy = n / 2, n * 0.5
    head = i < c1_top
    chest = float(np.clip((i - c7_bottom) / max(1.0, 0.25 * (S - c7_bottom)), 0, 1)) if i > c7_bottom else 0.0
    rx, ry = (46 + 16 * chest) * s, (40 + 4 * chest) * s
    if head:
        h = (c1_top - i) / max(1, c1_top)
        rx, ry = (48 + 6 * h) * s, (44 + 6 * h) * s
    cv.frame(ncx, ncy, 0.0)
    body_r = cv.ellipse(0, 0, rx, ry)
    cv.fill(body_r < 1, HU_FAT)
    cv.fill(body_r < 0.88, HU_SOFT)
    if head:
        h = (c1_top - i) / max(1, c1_top)
        skull = (body_r < 0.93) & (body_r > 0.93 - 4.5 * s / ry)
        if h > 0.45:
            cv.fill(skull, HU_SKULL)
        else:  # skull base: only the occipital bone behind the spine
            cv.fill(skull & (cv.v > ry * (0.5 - h)), HU_SKULL)
    if i < spec.extents[2][1] and i > c1_top - 0.4 * c1_top:  # mandible in front of the upper neck
        jaw = cv.ellipse(0, -6 * s, 30 * s, 27 * s)
        cv.fill((jaw < 1) & (jaw > 1 - 3.5 / 27) & (cv.v < -14 * s), HU_CORTEX)
    if not head:
        cv.fill(cv.ellipse(cx - ncx, cy - ncy - 17 * s, 5 * s, 4.5 * s) < 1, HU_AIR)  # trachea
    if chest > 0:
        for side in (-1, 1):
            lung = cv.ellipse(side * 25 * s, -2 * s, 16 * s * chest + 1e-3, 22 * s * chest + 1e-3)
            cv.fill(lung < 1, HU_LUNG)
        if (i - c7_bottom) % max(3, round(8 * s)) < max(1, round(2 * s)):  # ribs
            rib = cv.ellipse(0, 0, rx * 0.9, ry * 0.9)
            cv.fill((rib < 1) & (rib > 1 - 2.5 * s / ry) & (np.abs(cv.u) > 10 * s), HU_ARCH)


def _paint_breaks(cv: _Canvas, spec: StudySpec, drawn: dict[int, dict], i: int) -> list[tuple]:
    """Draw the fractures that cross slice i on the parts painted there; returns their boxes (i, label, x, y, w, h)."""
    n, s = spec.image_size, spec.scale
    boxes = []
    for f in spec.fractures:
        part = drawn.get(f.label, {}).get(f.kind)
        if f.first <= i <= f.last and part is not None:
            gap = _break(cv, f, part, i, s)
            if gap.sum() >= 2:
                rows, cols = np.nonzero(gap)
                pad = max(2.0, 0.03 * n)
                x0, y0 = max(0.0, cols.min() - pad), max(0.0, rows.min() - pad)
                x1, y1 = min(n, cols.max() + 1 + pad), min(n, rows.max() + 1 + pad)
                boxes.append((i, f.label, float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
    return boxes


def render_study(spec: StudySpec, *, fractures: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Pixels of a study: HU int16 and labels uint8, both (slices, rows, cols) head->feet, and boxes.

    Boxes are (slice_index, x, y, width, height) in pixels around each drawn cortical break.
    With fractures=False the same study is drawn unbroken (same noise), for checks.
    """
    import cv2

    n, S = spec.image_size, spec.n_slices
    s = spec.scale
    rng = np.random.default_rng([*spec.seed, 1])
    hu = np.empty((S, n, n), np.int16)
    labels = np.zeros((S, n, n), np.uint8)
    boxes: list[tuple] = []
    c1_top, c7_bottom = spec.extents[0][0], spec.extents[6][1]
    low, high = stored_range(spec.bits_stored, spec.signed)  # what the DICOM can hold (intercept -1024)
    hu_low, hu_high = max(-3024, low - 1024), min(3071, high - 1024)
    grid = tuple(np.mgrid[0:n, 0:n].astype(np.float32))
    circle = np.hypot(*np.mgrid[0:n, 0:n] - (n - 1) / 2) > n / 2
    for i in range(S):
        noise = rng.standard_normal((n, n)).astype(np.float32) * spec.noise
        cv = _Canvas(n, grid)
        t = np.clip((i - c1_top) / max(1, c7_bottom - c1_top), 0, 1)
        cx = spec.centre[0] + spec.drift[0] * s * (t - 0.5)
        cy = spec.centre[1] + spec.drift[1] * s * (t - 0.5) - spec.lordosis * s * np.sin(np.pi * t)
        _paint_body(cv, spec, i, cx, cy)
        # Spine: every vertebra whose extent contains the slice.
        cv.frame(cx, cy, spec.rotation)
        drawn: dict[int, dict] = {}
        for level, (a, b) in enumerate(spec.extents):
            if a <= i <= b:
                drawn[level + 1] = _paint_vertebra(cv, spec, level, i, s)
        if fractures:
            boxes += _paint_breaks(cv, spec, drawn, i)
        img = cv2.GaussianBlur(cv.hu, (3, 3), 0.6) + noise
        if spec.padding_value is not None:
            img[circle] = padding_hu(spec.padding_value)
        else:
            img[circle] = -1024 + noise[circle] * 0.2
        hu[i] = np.clip(np.rint(img), hu_low, hu_high).astype(np.int16)
        labels[i] = cv.label
    return hu, labels, boxes


# ----------------------------------------------------------------------------------------------
# Writing a study and a whole competition.
def nifti_from_labels(labels: np.ndarray, spec: StudySpec) -> nib.Nifti1Image:
    """Competition-orientation NIfTI from head->feet labels: (cols, rows, slices), rows flipped, ascending z."""
    import nibabel as nib

    data = np.ascontiguousarray(labels.transpose(2, 1, 0)[:, ::-1, ::-1]).astype(np.uint8)
    z_min = float(spec.z(spec.n_slices - 1))
    affine = np.array(
        [
            [-spec.pixel_spacing, 0, 0, 0],
            [0, -spec.pixel_spacing, 0, 0],
            [0, 0, spec.slice_step, z_min],
            [0, 0, 0, 1],
        ],
        dtype=np.float64,
    )
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(np.uint8)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    return image


def write_study(spec: StudySpec, out: Path) -> dict:
    """Render and write one study's DICOMs (and NIfTI when segmented); returns its truth row and boxes."""
    import nibabel as nib

    hu, labels, boxes = render_study(spec)
    folder = out / f"{spec.split}_images" / spec.uid
    writer = SliceWriter(
        transfer_syntax=spec.transfer_syntax,
        study_uid=spec.uid,
        series_uid=spec.series_uid,
        rows=spec.image_size,
        cols=spec.image_size,
        pixel_spacing=(spec.pixel_spacing, spec.pixel_spacing),
        slice_thickness=spec.slice_thickness,
        signed=spec.signed,
        bits_stored=spec.bits_stored,
        padding_value=spec.padding_value,
        x=spec.origin_xy[0],
        y=spec.origin_xy[1],
    )
    for i in range(spec.n_slices):
        number = int(spec.slice_number(i))
        writer.write(folder / f"{number}.dcm", hu[i], sop_uid=f"{spec.series_uid}.{number}", instance_number=number, z=float(spec.z(i)))
    if spec.segmented:
        nib.save(nifti_from_labels(labels, spec), str(out / "segmentations" / f"{spec.uid}.nii"))
    cervical = (labels >= 1) & (labels <= 7)
    on_slice = cervical.any(axis=(1, 2))
    cols_any, rows_any = cervical.any(axis=(0, 1)), cervical.any(axis=(0, 2))
    row = {
        "StudyInstanceUID": spec.uid,
        "split": spec.split,
        "n_slices": spec.n_slices,
        "z_direction": "falling" if spec.z_falling else "rising",
        "transfer_syntax": spec.transfer_syntax,
        "image_size": spec.image_size,
        "pixel_spacing": spec.pixel_spacing,
        "slice_thickness": spec.slice_thickness,
        "z_top": spec.z_top,
        "bits_stored": spec.bits_stored,
        "signed": int(spec.signed),
        "padding_value": spec.padding_value,
        "segmented": int(spec.segmented),
        "x0": int(np.argmax(cols_any)),
        "y0": int(np.argmax(rows_any)),
        "x1": int(len(cols_any) - np.argmax(cols_any[::-1])),
        "y1": int(len(rows_any) - np.argmax(rows_any[::-1])),
        "slnum_from": int(np.argmax(on_slice)),
        "slnum_to": int(len(on_slice) - 1 - np.argmax(on_slice[::-1])),
    }
    for k, v in enumerate(VERTEBRAE, start=1):
        present = np.flatnonzero((labels == k).any(axis=(1, 2)))
        row[f"{v}_from"] = int(present[0]) if len(present) else -1
        row[f"{v}_to"] = int(present[-1]) if len(present) else -1
    box_rows = [
        {
            "StudyInstanceUID": spec.uid,
            "x": round(x, 5),
            "y": round(y, 5),
            "width": round(w, 5),
            "height": round(h, 5),
            "slice_number": int(spec.slice_number(i)),
            "vertebra": f"C{label}",
            "slice_index": i,
        }
        for i, label, x, y, w, h in boxes
    ]
    return {"row": row, "boxes": box_rows}


def _study_uids(seed: int, n: int) -> list[str]:
    """n distinct competition-style StudyInstanceUIDs 1.2.826.0.1.3680043.<n>."""
    rng = np.random.default_rng([seed, 0xC5])
    numbers = rng.choice(np.arange(1000, 33000), size=n, replace=False)
    return [f"{UID_ROOT}.{int(k)}" for k in numbers]


def competition_specs(
    n_studies: int = 40,
    n_test_studies: int | None = None,
    seed: int = 0,
    image_size: int = 128,
    median_slices: int | None = None,
    segmented_fraction: float = 0.5,
) -> list[StudySpec]:
    """The specs `generate_competition` would render (train first, then test); no pixels."""
    n_test = max(3, n_studies // 10) if n_test_studies is None else int(n_test_studies)
    median = default_median_slices(image_size) if median_slices is None else int(median_slices)
    uids = _study_uids(seed, n_studies + n_test)
    rng = np.random.default_rng([seed, 0x5E6])
    n_seg = int(round(segmented_fraction * n_studies))
    segmented = set(rng.choice(n_studies, size=n_seg, replace=False).tolist()) if n_seg else set()
    return [
        make_study_spec(
            seed,
            k,
            uid=uids[k],
            split="train" if k < n_studies else "test",
            image_size=image_size,
            median_slices=median,
            segmented=k in segmented,
        )
        for k in range(n_studies + n_test)
    ]


def generate_competition(
    out: str | Path,
    n_studies: int = 40,
    n_test_studies: int | None = None,
    seed: int = 0,
    image_size: int = 128,
    median_slices: int | None = None,
    segmented_fraction: float = 0.5,
    workers: int | None = None,
) -> Path:
    """Write a synthetic competition in Kaggle's layout under `out` (absent or empty); returns `out`.

    Files: train.csv, train_bounding_boxes.csv, test.csv, sample_submission.csv,
    train_images/<uid>/<n>.dcm, test_images/<uid>/<n>.dcm, segmentations/<uid>.nii, and ground
    truth in _synthetic/ (studies.csv, test_labels.csv, boxes.csv, generator.json).
    median_slices None -> `default_median_slices(image_size)` (120 at 128 px). Deterministic in seed.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output folder exists and is not empty; give a new or empty folder")
    if n_studies < 1 or image_size < 32:
        raise ValueError(f"need n_studies >= 1 and image_size >= 32, got {n_studies}, {image_size}")
    specs = competition_specs(n_studies, n_test_studies, seed, image_size, median_slices, segmented_fraction)
    for folder in ("train_images", "test_images", "segmentations", "_synthetic"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    logger.info(
        "writing %d train + %d test synthetic studies (%d px) to %s with %d workers",
        n_studies,
        len(specs) - n_studies,
        image_size,
        out,
        workers,
    )
    results = _write_studies(specs, out, workers)
    params = {
        "version": GENERATOR_VERSION,
        "n_studies": n_studies,
        "n_test_studies": len(specs) - n_studies,
        "seed": seed,
        "image_size": image_size,
        "median_slices": median_slices or default_median_slices(image_size),
        "segmented_fraction": segmented_fraction,
        "workers": workers,
    }
    _write_tables(out, specs, results, params)
    return out


def _write_studies(specs: list[StudySpec], out: Path, workers: int) -> list[dict]:
    """`write_study` for every spec in `workers` processes; results in spec order; any failure stops the build."""
    tasks = [(spec, out) for spec in specs]
    label = lambda task: f"study {task[0].uid}"
    return run_all(write_study, tasks, workers, "synth studies", "study", label, f"{out}: {{n}} synthetic studies could not be written")


def _write_tables(out: Path, specs: list[StudySpec], results: list[dict], params: dict) -> None:
    """The Kaggle CSVs (train.csv, train_bounding_boxes.csv, test.csv, sample_submission.csv) and the truth in _synthetic/."""
    import pandas as pd

    label_cols = list(LABEL_COLUMNS)
    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]

    def frame(group: list[StudySpec]) -> pd.DataFrame:
        return pd.DataFrame([[s.uid, *map(int, s.labels)] for s in group], columns=["StudyInstanceUID", *label_cols])

    frame(train).to_csv(out / "train.csv", index=False)
    frame(test).to_csv(out / "_synthetic" / "test_labels.csv", index=False)
    boxes = pd.DataFrame(
        [b for r in results for b in r["boxes"]],
        columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number", "vertebra", "slice_index"],
    )
    train_uids = {s.uid for s in train}
    boxes.to_csv(out / "_synthetic" / "boxes.csv", index=False)
    kaggle_boxes = boxes[boxes.StudyInstanceUID.isin(train_uids)]
    kaggle_boxes[["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]].to_csv(out / "train_bounding_boxes.csv", index=False)
    types = [*VERTEBRAE, "patient_overall"]
    rows = [(f"{s.uid}_{t}", s.uid, t) for s in test for t in types]
    pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"]).to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": [r[0] for r in rows], "fractured": 0.5}).to_csv(out / "sample_submission.csv", index=False)
    pd.DataFrame([r["row"] for r in results]).to_csv(out / "_synthetic" / "studies.csv", index=False)
    (out / "_synthetic" / "generator.json").write_text(json.dumps(params, indent=2) + "\n")
    n_files = sum(s.n_slices for s in specs)
    logger.info(
        "wrote %s: train.csv (%d studies), train_bounding_boxes.csv (%d rows), test.csv (%d rows), "
        "sample_submission.csv, %d DICOMs in train_images/ and test_images/, %d segmentations/, "
        "ground truth in _synthetic/",
        out,
        len(train),
        len(kaggle_boxes),
        len(rows),
        n_files,
        sum(s.segmented for s in specs),
    )
