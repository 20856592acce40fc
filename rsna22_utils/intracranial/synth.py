"""A synthetic RSNA 2019 competition in the real layout: head CTs with haemorrhages a small CNN can learn.

Why: the pipeline must run end to end in the tests and the demo without the 450 GB download. The
generator writes Kaggle's files:

    stage_2_train.csv                 ID,Label: six rows per train image (ID_<image>_epidural ... _any)
    stage_2_sample_submission.csv     ID,Label (0.5) for every test image
    stage_2_train/ID_<image>.dcm      one axial slice per file (uncompressed 16-bit, rescale tags)
    stage_2_test/ID_<image>.dcm

Each study is 20-60 axial slices of one head (skull, scalp, brain, ventricles) lying on a head-rest
with air around it, so the crop matters; patients have one to three studies, so grouping folds by
PatientID matters. About a third of the studies bleed over a run of neighbouring slices (so the
slice-position smoothing has something to use): about 14 % of the images are `any`. Each subtype
has its own look, at its own place, all at blood density (65-85 HU against brain's 30-40):
epidural a lens against the skull, subdural a thin crescent along it, intraparenchymal a round
clot in the brain, intraventricular blood filling the ventricles, subarachnoid thin streaks
running in from the brain's surface.

Ground truth beside the Kaggle files: `_synthetic/test_labels.csv` (the test images' labels in
the stage_2_train.csv format, for scoring), `_synthetic/images.csv` (every image: split, patient,
study, slice position) and `_synthetic/generator.json` (parameters + version).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rsna22_utils.core.dicom_writer import EXPLICIT_LE, IMPLICIT_LE, SliceWriter, padding_hu
from rsna22_utils.core.files import atomic_write_text
from rsna22_utils.core.pool import run_all
from rsna22_utils.intracranial.labels import LABELS, SAMPLE_SUBMISSION, SUBTYPES, TEST_DIR, TRAIN_DIR, TRAIN_LABELS, rows_from_wide

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
SLICES = (20, 60)  # slices per study, as in the real studies
BLEEDING_STUDIES = 0.32  # fraction of studies with a haemorrhage; with the run lengths below ~14 % of images are `any`
# relative frequency of each subtype among bleeds (the real stage-2 train images: epidural rare, subdural common)
SUBTYPE_WEIGHTS = {"epidural": 0.08, "intraparenchymal": 0.26, "intraventricular": 0.18, "subarachnoid": 0.23, "subdural": 0.25}
HU_AIR, HU_BRAIN, HU_CSF, HU_BONE, HU_SCALP, HU_REST = -1000, 35, 6, 1300, 30, 150
UID_ROOT = "1.2.826.0.1.3680043.10.1019"


@dataclass
class Bleed:
    """One haemorrhage: its subtype, the study slices it spans (inclusive), where it sits, how big it is."""

    subtype: str
    first: int
    last: int
    angle: float  # radians, where on the head's outline (or which side) it sits
    size: float  # relative size (1 = typical)


@dataclass
class StudySpec:
    """Everything needed to render one study's slices and write its headers."""

    study_uid: str
    patient_id: str
    split: str
    image_ids: list[str]
    n_slices: int
    image_size: int
    seed: int
    z0: float
    z_step: float  # mm between slices; negative: z falls with the instance number
    head_scale: float
    head_shift: tuple[float, float]
    transfer_syntax: str
    signed: bool
    padding_value: int | None
    bleeds: list[Bleed] = field(default_factory=list)

    def labels(self) -> np.ndarray:
        """(slices, 6) 0/1 labels in LABELS order."""
        out = np.zeros((self.n_slices, len(LABELS)), dtype=np.int64)
        for bleed in self.bleeds:
            out[bleed.first : bleed.last + 1, LABELS.index(bleed.subtype)] = 1
        out[:, 0] = out[:, 1:].max(axis=1)
        return out


def _hex_ids(rng: np.random.Generator, n: int, used: set[str]) -> list[str]:
    """`n` new `ID_<9 hex>` ids (the real competition's form), none in `used`."""
    out: list[str] = []
    while len(out) < n:
        candidate = f"ID_{int(rng.integers(0, 16**9)):09x}"
        if candidate not in used:
            used.add(candidate)
            out.append(candidate)
    return out


def _sample_bleeds(rng: np.random.Generator, n_slices: int) -> list[Bleed]:
    """A study's haemorrhages: none for most studies, else one to three subtypes over runs of slices."""
    if rng.random() >= BLEEDING_STUDIES:
        return []
    names = list(SUBTYPE_WEIGHTS)
    weights = np.array([SUBTYPE_WEIGHTS[n] for n in names])
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    chosen = rng.choice(names, size=count, replace=False, p=weights / weights.sum())
    bleeds = []
    for subtype in chosen:
        length = max(2, int(round(n_slices * rng.uniform(0.2, 0.55))))
        low, high = int(0.15 * n_slices), int(0.85 * n_slices) - length  # inside the brain's extent
        first = int(rng.integers(low, max(low, high) + 1))
        bleeds.append(
            Bleed(
                str(subtype), first, min(n_slices - 1, first + length - 1), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.8, 1.25))
            )
        )
    return bleeds


def make_specs(n_studies: int, n_test_studies: int, seed: int, image_size: int) -> list[StudySpec]:
    """The studies of a competition: train patients with 1-3 studies each, test studies of other patients."""
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    specs: list[StudySpec] = []
    for split, n in (("train", n_studies), ("test", n_test_studies)):
        made = 0
        while made < n:
            patient = _hex_ids(rng, 1, used)[0]
            for _ in range(min(n - made, int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])))):
                n_slices = int(rng.integers(SLICES[0], SLICES[1] + 1))
                signed = bool(rng.random() < 0.7)
                specs.append(
                    StudySpec(
                        study_uid=f"{UID_ROOT}.{seed}.{len(specs) + 1}",
                        patient_id=patient,
                        split=split,
                        image_ids=_hex_ids(rng, n_slices, used),
                        n_slices=n_slices,
                        image_size=image_size,
                        seed=int(rng.integers(0, 2**31)),
                        z0=float(rng.uniform(-200, 200)),
                        z_step=float(rng.choice([-1.0, 1.0]) * rng.choice([4.0, 5.0])),
                        head_scale=float(rng.uniform(0.85, 1.05)),
                        head_shift=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.12, -0.02))),
                        transfer_syntax=EXPLICIT_LE if rng.random() < 0.8 else IMPLICIT_LE,
                        signed=signed,
                        padding_value=-2000 if signed and rng.random() < 0.5 else None,
                        bleeds=_sample_bleeds(rng, n_slices),
                    )
                )
                made += 1
    return specs


# ----------------------------------------------------------------------------- rendering


def _head_extent(t: float) -> float:
    """Relative head size at height t in [0, 1] (skull base -> vertex): an ellipsoid's cross-section."""
    return float(np.sqrt(max(0.0, 1.0 - ((t - 0.45) / 0.62) ** 2)))


def render_slice(spec: StudySpec, index: int) -> np.ndarray:
    """HU (image_size, image_size) int16 of slice `index` (in head -> feet order: 0 is the vertex)."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.image_size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = (x + 0.5) / size * 2 - 1, (y + 0.5) / size * 2 - 1  # [-1, 1], y down
    t = 1.0 - index / max(1, spec.n_slices - 1)  # 0 = lowest slice, 1 = vertex
    extent = max(0.25, _head_extent(t)) * spec.head_scale
    a, b = 0.58 * extent, 0.72 * extent  # head semi-axes (x, y)
    cx, cy = spec.head_shift
    # elliptic "radius": 1 on the outline of the head
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    angle = np.arctan2((y - cy) / b, (x - cx) / a)
    skull_in, skull_out = 0.86, 0.95
    hu = np.full((size, size), HU_AIR, np.float32)
    rest_top = cy + 0.72 * spec.head_scale + 0.06  # the head-rest: an arc under the head, an air gap between
    rest = (y > rest_top + 0.25 * x**2) & (y < rest_top + 0.25 * x**2 + 0.07) & (np.abs(x) < 0.75)
    hu[rest] = HU_REST
    hu[y > 0.93] = HU_REST  # the table
    hu[r < 1.0] = HU_SCALP
    hu[r < skull_out] = HU_BONE
    brain = r < skull_in
    hu[brain] = HU_BRAIN + 6 * np.cos(9 * angle[brain] + 3 * r[brain])  # grey / white matter texture
    if 0.3 < t < 0.75:  # lateral ventricles
        ventricles = ((np.abs(x - cx) - 0.09 * extent) / (0.05 * extent)) ** 2 + ((y - cy + 0.02) / (0.22 * extent)) ** 2 < 1
        hu[ventricles] = HU_CSF
    for bleed in spec.bleeds:
        if bleed.first <= index <= bleed.last:
            _paint_bleed(hu, bleed, r, angle, x - cx, y - cy, extent, skull_in, rng)
    hu += rng.normal(0, 4, hu.shape).astype(np.float32) * (hu > -500)
    if spec.padding_value is not None:  # outside the scanner's circle of view
        hu[x**2 + y**2 > 1.0] = padding_hu(spec.padding_value)
    return np.clip(np.rint(hu), -3024, 3071).astype(np.int16)


def _paint_bleed(hu, bleed: Bleed, r, angle, dx, dy, extent: float, skull_in: float, rng: np.random.Generator) -> None:
    """Draw one haemorrhage's pixels (blood 65-85 HU) into `hu` in place."""
    blood = float(rng.uniform(65, 85))
    towards = np.angle(np.exp(1j * (angle - bleed.angle)))  # angular distance to the bleed's side, in (-pi, pi]
    s = bleed.size
    if bleed.subtype == "epidural":  # a lens against the skull, thick in the middle
        depth = 0.16 * s * np.clip(1 - (towards / (0.5 * s)) ** 2, 0, None)
        mask = (r < skull_in) & (r > skull_in - depth)
    elif bleed.subtype == "subdural":  # a long thin crescent along the skull
        depth = 0.08 * s * np.clip(1 - (towards / (1.3 * s)) ** 2, 0, None)
        mask = (r < skull_in) & (r > skull_in - depth)
    elif bleed.subtype == "intraparenchymal":  # a round clot inside the brain
        px, py = 0.45 * extent * np.cos(bleed.angle) * 0.58, 0.45 * extent * np.sin(bleed.angle) * 0.72
        mask = ((dx - px) ** 2 + (dy - py) ** 2 < (0.1 * s * extent) ** 2) & (r < skull_in)
    elif bleed.subtype == "intraventricular":  # blood filling the ventricles (or where they would be)
        mask = ((np.abs(dx) - 0.09 * extent) / (0.06 * extent)) ** 2 + ((dy + 0.02) / (0.22 * extent)) ** 2 < 1
    else:  # subarachnoid: streaks running in from the brain's surface (sulci)
        streaks = np.abs(np.sin(7 * (angle - bleed.angle))) < 0.25
        mask = streaks & (np.abs(towards) < 1.2 * s) & (r < skull_in) & (r > skull_in - 0.3)
    hu[mask] = blood


# ----------------------------------------------------------------------------- writing


def write_study(spec: StudySpec, out: Path) -> list[dict]:
    """Write the study's slices as `<split dir>/ID_<image>.dcm`; returns one row per image (ground truth)."""
    folder = Path(out) / (TRAIN_DIR if spec.split == "train" else TEST_DIR)
    writer = SliceWriter(
        transfer_syntax=spec.transfer_syntax,
        study_uid=spec.study_uid,
        series_uid=f"{spec.study_uid}.1",
        rows=spec.image_size,
        cols=spec.image_size,
        pixel_spacing=(230.0 / spec.image_size,) * 2,  # a 23 cm field of view
        slice_thickness=abs(spec.z_step),
        signed=spec.signed,
        bits_stored=16 if spec.signed else 12,
        padding_value=spec.padding_value,
    )
    writer.ds.PatientID = writer.ds.PatientName = spec.patient_id
    labels = spec.labels()
    rows = []
    for index, image_id in enumerate(spec.image_ids):  # index: head -> feet
        instance = index + 1 if spec.z_step < 0 else spec.n_slices - index
        z = spec.z0 + spec.z_step * (instance - 1)
        writer.write(
            folder / f"{image_id}.dcm", render_slice(spec, index), sop_uid=f"{spec.study_uid}.1.{instance}", instance_number=instance, z=z
        )
        rows.append(
            {"ID": image_id, "split": spec.split, "PatientID": spec.patient_id, "StudyInstanceUID": spec.study_uid, "slice_index": index}
            | dict(zip(LABELS, labels[index].tolist()))
        )
    return rows


def generate_competition(
    out: str | Path,
    n_studies: int = 40,
    n_test_studies: int | None = None,
    seed: int = 0,
    image_size: int = 512,
    workers: int | None = None,
) -> Path:
    """Write a synthetic competition to `out` (absent or empty); returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the generator writes into a new folder")
    if n_studies < 2 or image_size < 32:
        raise ValueError(f"need at least 2 train studies and 32 px images, got {n_studies} studies at {image_size} px")
    n_test = max(2, n_studies // 10) if n_test_studies is None else n_test_studies
    specs = make_specs(n_studies, n_test, seed, image_size)
    tasks = [(spec, out) for spec in specs]
    label = lambda task: f"study {task[0].study_uid}"
    rows = run_all(
        write_study,
        tasks,
        workers or os.cpu_count() or 1,
        "synth studies",
        "study",
        label,
        f"{out}: {{n}} synthetic studies could not be written",
    )
    images = pd.DataFrame([row for study in rows for row in study])
    _write_tables(out, images, {"n_studies": n_studies, "n_test_studies": n_test, "seed": seed, "image_size": image_size})
    return out


def _write_tables(out: Path, images: pd.DataFrame, params: dict) -> None:
    train, test = images[images["split"] == "train"], images[images["split"] == "test"]
    rows_from_wide(train).astype({"Label": np.int64}).to_csv(out / TRAIN_LABELS, index=False)
    rows_from_wide(test.assign(**{label: 0.5 for label in LABELS})).to_csv(out / SAMPLE_SUBMISSION, index=False)
    truth = out / "_synthetic"
    truth.mkdir(parents=True, exist_ok=True)
    rows_from_wide(test).astype({"Label": np.int64}).to_csv(truth / "test_labels.csv", index=False)
    images.to_csv(truth / "images.csv", index=False)
    atomic_write_text(truth / "generator.json", json.dumps({**params, "version": GENERATOR_VERSION}, indent=2) + "\n")
    logger.info(
        "wrote a synthetic competition to %s: %d train images (%.1f %% any) in %d studies of %d patients, %d test images",
        out,
        len(train),
        100 * train["any"].mean(),
        train["StudyInstanceUID"].nunique(),
        train["PatientID"].nunique(),
        len(test),
    )


__all__ = ["SUBTYPES", "generate_competition", "make_specs", "render_slice", "write_study"]
