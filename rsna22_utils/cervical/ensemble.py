"""The submission's ensemble: box + study models of a weights folder, test studies decoded by workers, one study's prediction.

For every test study (`submission.predict_submission` sets the policy around this):

1. a DataLoader worker decodes `test_images/<uid>` (dicomsdl; `read_study`) and encodes it like the
   study cache (`encode_study`: HU -> resized, windowed uint8) at every size / window set the models
   were trained on, plus, for study runs on native-resolution crops (`crop_source="native"`), the
   windowed volume at its own resolution (`crops.NativeSpec`), and hands over one study at a time
   (decode overlaps the models' compute);
2. every box model (`<weights>/01_train_box/*/`) on every slice, averaged -> one study box and the
   slice range of C1-C7 (`study_box.predict_study_box`: the rule of 02_infer_box, with this config's
   `StudyBoxRule` settings, each input built as the box runs' configs say);
3. every study model (`<weights>/06_train_study/*/`: the frozen stage-05 CNN + its StudyHead) on
   the box crops, 3 slices per image, embedded as stage 06 embedded them (`study.study_probabilities`;
   a native run's crops are cut from the study box as the crop cache cut them, `crops.memory_crop_cache`);
   mean of sigmoid probabilities over models, optionally over a horizontal flip.

The weights folder has the layout of a local `runs/` folder (`<stage>/fold<f>-seed<s>/{model.safetensors,
config.json}`), so `--weights runs` works locally and the weights dataset works on Kaggle.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.cervical.configs import SubmissionConfig
from rsna22_utils.cervical.crops import CropCache, NativeSpec, memory_crop_cache
from rsna22_utils.cervical.data import WINDOW_INPUT, InputNorm, common_input_norm
from rsna22_utils.cervical.embed import StudyImages, study_images, study_probabilities
from rsna22_utils.cervical.models import load_run
from rsna22_utils.cervical.stages import TRAIN_BOX, TRAIN_STUDY
from rsna22_utils.cervical.study_box import predict_study_box, shared_input_slices
from rsna22_utils.core.cache import CacheSpec, encode_study
from rsna22_utils.core.device import autocast
from rsna22_utils.core.dicom import read_study
from rsna22_utils.core.registry import finished_runs, parse_run_name, serving_runs
from rsna22_utils.core.timing import NO_TIMER, LapTimer

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- models


@dataclass
class BoxEnsemble:
    """Every box model (mean) + how its inputs are encoded and its outputs turned into a study box."""

    models: list[nn.Module]
    spec: CacheSpec
    input_slices: int = 1  # the runs' box_input_slices: consecutive slices per input
    norm: InputNorm = WINDOW_INPUT  # their input intensity (`data.InputNorm`)


@dataclass
class StudyRun:
    """One stage-06 model and its config (which also says how its stage-05 CNN saw images)."""

    name: str
    model: nn.Module
    cfg: Any

    @property
    def spec(self) -> CacheSpec:
        return CacheSpec.of(self.cfg)

    @property
    def native(self) -> bool:
        """Its stage-05 CNN saw box crops at native resolution (the crop cache), not crops of the resized 00 cache."""
        return bool(self.cfg.crop_by_box) and self.cfg.crop_source == "native"

    @property
    def volume_spec(self) -> CacheSpec | NativeSpec:
        """The volume the decode worker ships for this run."""
        return NativeSpec(self.spec.windows) if self.native else self.spec


@dataclass
class Ensemble:
    """Everything inference runs: box models, study models, and the volumes the worker encodes."""

    box: BoxEnsemble
    study: list[StudyRun]
    device: torch.device

    @property
    def specs(self) -> list[CacheSpec | NativeSpec]:
        """Each representation some model needs, once: resized caches, and native volumes only for native runs."""
        return sorted({self.box.spec, *(run.volume_spec for run in self.study)}, key=lambda s: s.name)

    def reduced(self) -> Ensemble:
        """One box model and one study model: the fallback when time runs short."""
        return Ensemble(BoxEnsemble(self.box.models[:1], self.box.spec, self.box.input_slices, self.box.norm), self.study[:1], self.device)


def runs_in_variant_turns(runs: list[Path], limit: int) -> list[Path]:
    """At most `limit` of `runs` (0: all, in their order), chosen variant by variant in turn: the first run
    (lowest fold, then seed) of each variant, then the second of each, and so on. With the original's
    10 study models, 2 are one resnest50d and one seresnext50 run, seeds 0; 3 add resnest50d seed 1."""
    if limit <= 0 or limit >= len(runs):
        return list(runs)
    by_variant: dict[str, list[Path]] = {}
    for run in sorted(runs, key=lambda r: parse_run_name(r.name)):  # finished_runs: every name parses
        by_variant.setdefault(parse_run_name(run.name).variant, []).append(run)
    turns = itertools.zip_longest(*by_variant.values())
    return [run for turn in turns for run in turn if run is not None][:limit]


def load_box_models(weights_dir: str | Path, device: torch.device, limit: int = 0) -> BoxEnsemble:
    """The `01_train_box` runs of the weights folder that serve test studies (`serving_runs`: the full-data
    runs when there are any); they must share one image size, window set and box_input_slices."""
    models, spec, configs = [], None, {}
    for run in runs_in_variant_turns(serving_runs(finished_runs(weights_dir, TRAIN_BOX)), limit):
        model, cfg = load_run(run, device)
        if spec is not None and CacheSpec.of(cfg) != spec:
            raise ValueError(f"{run}: box model trained on {CacheSpec.of(cfg).name}, the others on {spec.name}")
        spec = CacheSpec.of(cfg)
        models.append(model)
        configs[run] = cfg
    return BoxEnsemble(models, spec, shared_input_slices(configs), common_input_norm(list(configs.values()), list(configs)))


def load_study_models(weights_dir: str | Path, device: torch.device, limit: int = 0) -> list[StudyRun]:
    """The `06_train_study` runs that serve test studies (`serving_runs`): the stage-05 CNN architecture +
    StudyHead, weights from model.safetensors."""
    runs = []
    for run in runs_in_variant_turns(serving_runs(finished_runs(weights_dir, TRAIN_STUDY)), limit):
        model, cfg = load_run(run, device)
        runs.append(StudyRun(f"{run.parent.name}/{run.name}", model, cfg))
    return runs


def load_ensemble(weights_dir: str | Path, device: torch.device, max_box_models: int = 0, max_study_models: int = 0) -> Ensemble:
    """Box and study models of a weights folder (`runs/` locally, the weights dataset on Kaggle); at most
    `max_box_models` / `max_study_models` of them (0: all), chosen by `runs_in_variant_turns`."""
    box = load_box_models(weights_dir, device, max_box_models)
    study = load_study_models(weights_dir, device, max_study_models)
    logger.info(
        "loaded %d box models (%s) and %d study models from %s on %s", len(box.models), box.spec.name, len(study), weights_dir, device
    )
    return Ensemble(box, study, device)


# --------------------------------------------------------------------------- decoding workers


@dataclass
class DecodedStudy:
    """What a worker hands over: the encoded volumes (per cache spec name) and the slice table, or the error."""

    uid: str
    volumes: dict[str, np.ndarray] = field(default_factory=dict)
    slices: pd.DataFrame | None = None
    error: str | None = None
    decode_s: float = 0.0
    encode_s: float = 0.0
    dropped: str = ""  # unreadable slices left out: "k of n (first file: reason)"
    files: int = 0  # .dcm files in the study folder (more than its slices when some share a z position)


def encode_volume(volume_hu: np.ndarray, spec: CacheSpec | NativeSpec) -> np.ndarray:
    """One decoded study as a model of `spec` reads it: the resized cache encoding, or the native windowed volume."""
    return spec.encode(volume_hu) if isinstance(spec, NativeSpec) else encode_study(volume_hu, spec)


def decode_study(
    uid: str, study_dir: Path, specs: list[CacheSpec | NativeSpec], backend: str = "auto", max_dropped: float = 0.0
) -> DecodedStudy:
    """Decode + encode one study, leaving out up to `max_dropped` (a fraction) unreadable slices;
    any failure comes back in `.error` (never raised)."""
    result = DecodedStudy(uid)
    try:
        if not study_dir.is_dir():
            raise FileNotFoundError(f"no study folder {study_dir}")
        t0 = time.perf_counter()
        study = read_study(study_dir, backend=backend, max_dropped=max_dropped)
        volume, table = study
        result.files = sum(1 for path in study_dir.iterdir() if path.suffix.lower() == ".dcm")
        if study.dropped:
            first = study.dropped[0]
            result.dropped = (
                f"{len(study.dropped)} of {len(table) + len(study.dropped)} slices unreadable ({Path(first.path).name}: {first.reason})"
            )
        t1 = time.perf_counter()
        result.volumes = {spec.name: encode_volume(volume, spec) for spec in specs}
        result.slices = table.reset_index(drop=True).assign(slice_index=np.arange(len(table)))
        result.decode_s, result.encode_s = t1 - t0, time.perf_counter() - t1
    except Exception as error:  # reported as this study's fallback reason
        result.error = f"{type(error).__name__}: {error}"
    return result


class TestStudies(Dataset):
    """One item = one decoded, encoded test study (used with batch_size=None, so workers prefetch studies)."""

    def __init__(
        self, uids: list[str], images_dir: Path, specs: list[CacheSpec | NativeSpec], backend: str = "auto", max_dropped: float = 0.0
    ) -> None:
        self.uids, self.images_dir, self.specs, self.backend = list(uids), Path(images_dir), list(specs), backend
        self.max_dropped = max_dropped

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> DecodedStudy:
        uid = self.uids[index]
        return decode_study(uid, self.images_dir / uid, self.specs, self.backend, self.max_dropped)


def _study_as_batch(item: DecodedStudy) -> DecodedStudy:
    """The loader's collate: each batch is one decoded study, as the worker made it."""
    return item


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def study_loader(dataset: TestStudies, num_workers: int) -> DataLoader:
    """Studies one at a time, decoded by `num_workers` processes ahead of the models (0: in this process)."""
    # spawn, not fork: a process that already ran torch / OpenCV thread pools (a notebook that trained,
    # a test session) can deadlock forked workers; spawned ones start clean (a few seconds each, once)
    # a native volume is ~79 MB (300 slices of 512 px): then each worker keeps one study ready, not two
    prefetch = 1 if any(isinstance(spec, NativeSpec) for spec in dataset.specs) else 2
    extra = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init, "multiprocessing_context": "spawn"} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_study_as_batch, **extra)


def iter_studies(
    uids: list[str],
    images_dir: Path,
    specs: list[CacheSpec | NativeSpec],
    num_workers: int,
    backend: str = "auto",
    max_dropped: float = 0.0,
) -> Iterator[DecodedStudy]:
    """Decoded studies in `uids` order; a loader that breaks down goes on decoding in this process."""
    done = 0
    try:
        for item in study_loader(TestStudies(uids, images_dir, specs, backend, max_dropped), num_workers):
            done += 1
            yield item
    except GeneratorExit:
        raise
    except Exception as error:  # e.g. a worker killed for memory: decode the rest here
        logger.warning(
            "study loader failed after %d studies (%s: %s); decoding the rest in the main process", done, type(error).__name__, error
        )
        for uid in uids[done:]:
            yield decode_study(uid, images_dir / uid, specs, backend, max_dropped)


# --------------------------------------------------------------------------- one study


class MemoryCache:
    """A one-study stand-in for StudyCache (`.spec`, `.volume(uid)`, `.slices(uid)`) so SequenceDataset runs unchanged."""

    def __init__(self, spec: CacheSpec, uid: str, volume: np.ndarray, slices: pd.DataFrame) -> None:
        self.spec, self._uid, self._volume, self._slices = spec, uid, volume, slices

    @property
    def uids(self) -> list[str]:
        return [self._uid]

    def volume(self, uid: str) -> np.ndarray:
        return self._volume

    def slices(self, uid: str) -> pd.DataFrame:
        return self._slices


def study_cache(run: StudyRun, study: DecodedStudy, study_box: dict[str, float], built: dict[tuple, CropCache]) -> Any:
    """Where `run` reads this study's images: its resized volume, or, for a native run, the crop cache's crop
    (square box + `crop_margin`, slice range + `slice_margin`) cut from the native volume, once per geometry in `built`."""
    if not run.native:
        return MemoryCache(run.spec, study.uid, study.volumes[run.spec.name], study.slices)
    key = (run.volume_spec.name, float(run.cfg.crop_margin), int(run.cfg.slice_margin))
    if key not in built:
        built[key] = memory_crop_cache(
            run.spec,
            study.uid,
            study.volumes[run.volume_spec.name],
            study.slices,
            tuple(study_box[c] for c in BOX_COLUMNS),
            (int(study_box["slnum_from"]), int(study_box["slnum_to"])),
            *key[1:],
        )
    return built[key]


def study_input_key(cfg: Any) -> tuple:
    """What decides the images a study model of config `cfg` is fed (`embed.study_images`): the volume it reads
    (cache size and windows; crops of the resized cache or native crops), its crop, window shape, slice margin
    and intensity. Runs with one key see identical images."""
    crop = None
    if getattr(cfg, "crop_by_box", False):
        crop = (
            int(cfg.crop_size),
            str(getattr(cfg, "crop_source", "cache")),
            float(cfg.crop_margin),
            bool(getattr(cfg, "crop_square", False)),
        )
    shape = (int(cfg.seq_len), int(cfg.slices_per_image), int(getattr(cfg, "slice_margin", 0)))
    return (CacheSpec.of(cfg).name, shape, crop, InputNorm.of(cfg))


class UnpredictableStudy(ValueError):
    """A decoded study the models cannot take (too few slices in its box's slice range): it gets the prior."""


def check_images(images: StudyImages, run: StudyRun, study: DecodedStudy) -> None:
    """UnpredictableStudy, saying why, when no image of `images` lies inside the study: the study model
    would get an empty sequence (a one-slice study, a box range of one slice at the study's end)."""
    if bool((images.masks > 0.5).any()):
        return
    n = len(study.slices)
    why = (
        f"too few slices: no complete {run.cfg.slices_per_image}-slice image of {run.name} in the box's slice range "
        f"{images.first}..{images.last} of the study's {n} slice{'s' if n != 1 else ''}"
    )
    if n == 1 and study.files > 1:
        why += f" (its {study.files} files share one z position: not an axial series?)"
    raise UnpredictableStudy(why)


def predict_study(ensemble: Ensemble, study: DecodedStudy, cfg: SubmissionConfig, flip: bool, timer: LapTimer = NO_TIMER) -> np.ndarray:
    """Box -> crops -> every study model (mean of probabilities) for one decoded study; TARGETS order.
    UnpredictableStudy when the study has too few slices for a study model.

    The study is cropped and stacked once per distinct input (`study_input_key`), on the device, and every
    model that takes that input is fed the same tensor; the inputs of one key are freed before the next.
    `timer` (a no-op by default) gets a lap per part: "box" (slices), "crops" (once per input) and "study
    models" (images, each flip counted), so a benchmark times this code itself."""
    device = ensemble.device
    timer.start()
    study_box = predict_study_box(
        ensemble.box.models,
        study.volumes[ensemble.box.spec.name],
        study.slices,
        device,
        cfg.box_batch_size,
        cfg,
        cfg.amp,
        ensemble.box.input_slices,
        ensemble.box.norm,
        cfg.amp_dtype,
    )
    timer.lap("box", len(study.slices) * len(ensemble.box.models))
    takers: dict[tuple, list[int]] = {}  # input key -> the positions of the models that take it
    for position, run in enumerate(ensemble.study):
        takers.setdefault(study_input_key(run.cfg), []).append(position)
    outputs: list[np.ndarray] = [np.empty(0)] * len(ensemble.study)
    crops: dict[tuple, CropCache] = {}
    with torch.inference_mode(), autocast(device, cfg.amp, cfg.amp_dtype):
        for positions in takers.values():
            first = ensemble.study[positions[0]]
            images = study_images(first.cfg, study_cache(first, study, study_box, crops), study.uid, study_box, device)
            check_images(images, first, study)
            n_images = int(images.images.shape[0] * images.images.shape[1])
            timer.lap("crops", n_images)
            for position in positions:
                run = ensemble.study[position]
                outputs[position] = study_probabilities(run.model, run.cfg, images, device, cfg.sequence_batch_size, flip)
                timer.lap("study models", n_images * (2 if flip else 1))
            del images
    return np.mean(outputs, axis=0)  # in the ensemble's order, as before
