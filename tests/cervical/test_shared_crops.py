"""The submission prepares a study's inputs once and feeds every model exactly the images it was fed before:
study crops cut once per distinct input (`ensemble.predict_study`), box inputs gathered on the device from
slices stretched once (`study_box.box_input_batches`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rsna22_utils.cervical import ensemble
from rsna22_utils.cervical.data import WINDOW_INPUT, InputNorm, images_to_tensor, stack_slices
from rsna22_utils.cervical.ensemble import BoxEnsemble, DecodedStudy, Ensemble, StudyRun, study_cache, study_input_key
from rsna22_utils.cervical.study_box import box_input_batches
from rsna22_utils.core.cache import CacheSpec
from rsna22_utils.core.resolve import resolve_config

UID, N_SLICES, NATIVE_PX, CACHE_PX = "s1", 40, 64, 32
BOX = {"x0": 14.0, "y0": 10.0, "x1": 44.0, "y1": 50.0, "slnum_from": 6, "slnum_to": 31}


def _run(name: str, **settings) -> StudyRun:
    cfg = resolve_config("06_train_study", {"device": "cpu"})
    fields = dict(image_size=CACHE_PX, seq_len=4, slices_per_image=3, crop_by_box=True, crop_size=24, crop_source="cache")
    fields.update(crop_margin=0.1, crop_square=True, intensity="minmax", norm_mean=[0.2, 0.3, 0.4], norm_std=[0.3, 0.3, 0.3])
    for key, value in {**fields, **settings}.items():
        setattr(cfg, key, value)  # what a 06 run derives from its 05 run
    return StudyRun(name, None, cfg)  # type: ignore[arg-type]  # study_probabilities is replaced below


def _study(runs: list[StudyRun]) -> DecodedStudy:
    """A decoded study as the workers ship it: the resized volume and, for native runs, the native one."""
    rng = np.random.default_rng(0)
    volumes = {}
    for spec in sorted({run.volume_spec for run in runs}, key=lambda s: s.name):
        px = CACHE_PX if isinstance(spec, CacheSpec) else NATIVE_PX
        volumes[spec.name] = rng.integers(0, 256, (N_SLICES, px, px, 1)).astype(np.uint8)
    slices = pd.DataFrame({"StudyInstanceUID": UID, "slice_index": range(N_SLICES), "rows": NATIVE_PX, "cols": NATIVE_PX})
    return DecodedStudy(UID, volumes, slices)


def test_each_model_is_fed_the_images_it_cut_for_itself_and_each_input_is_cut_once(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [
        _run("a0"),
        _run("native0", crop_source="native", slice_margin=2),
        _run("a1"),  # the same input as a0
        _run("longer", seq_len=6),
        _run("native1", crop_source="native", slice_margin=2),  # the same input as native0
        _run("whole", crop_by_box=False, intensity="window", norm_mean=[0.5], norm_std=[0.5]),
        _run("a2"),
    ]
    assert len({study_input_key(run.cfg) for run in runs}) == 4
    study = _study(runs)
    fed, cut = [], []
    real_images = ensemble.study_images

    def count_cuts(cfg, cache, uid, study_box, device=None):
        cut.append(cfg.crop_source)
        return real_images(cfg, cache, uid, study_box, device)

    def record(model, cfg, images, device, batch_size, flip=False):
        position = next(i for i, run in enumerate(runs) if run.cfg is cfg)
        fed.append((runs[position].name, images.images, images.masks, images.starts, images.first, images.last))
        return np.full(8, 1.0 / (3 + position))

    monkeypatch.setattr(ensemble, "predict_study_box", lambda *args: dict(BOX))
    monkeypatch.setattr(ensemble, "study_images", count_cuts)
    monkeypatch.setattr(ensemble, "study_probabilities", record)
    sub = resolve_config("07_inference", {"device": "cpu", "out": "unused.csv"})
    mixed = Ensemble(BoxEnsemble([], CacheSpec(image_size=CACHE_PX)), runs, torch.device("cpu"))
    probabilities = ensemble.predict_study(mixed, study, sub, flip=False)

    assert len(cut) == 4 and len(fed) == len(runs)  # cut once per input, every model fed
    assert [name for name, *_ in fed] == ["a0", "a1", "a2", "native0", "native1", "longer", "whole"]  # grouped by input
    expected = np.mean([np.full(8, 1.0 / (3 + position)) for position in range(len(runs))], axis=0)  # the ensemble's order
    assert np.array_equal(probabilities, expected)
    by_name = {name: rest for name, *rest in fed}
    for run in runs:
        own = real_images(run.cfg, study_cache(run, study, BOX, {}), UID, BOX)  # the run cutting its own images, on the CPU
        images, masks, starts, first, last = by_name[run.name]
        assert images.dtype == own.images.dtype == torch.float32 and images.shape == own.images.shape, run.name
        assert torch.equal(images, own.images) and torch.equal(masks, own.masks), run.name
        assert (starts, first, last) == (own.starts, own.first, own.last), run.name
    assert by_name["a0"][0] is by_name["a1"][0] is by_name["a2"][0]  # one tensor, shared


@pytest.mark.parametrize("input_slices", [1, 3])
def test_box_inputs_equal_the_stacked_and_stretched_images(input_slices: int) -> None:
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 256, (23, 16, 16, 2)).astype(np.uint8)
    volume[4] = 9  # a flat slice
    channels = 2 * input_slices
    for norm in [WINDOW_INPUT, InputNorm("minmax", tuple(np.linspace(0.2, 0.4, channels)), tuple(np.linspace(0.3, 0.5, channels)))]:
        batches = list(box_input_batches(volume, 8, input_slices, norm, torch.device("cpu")))
        assert [len(index) for index, _ in batches] == [8, 8, 7]
        for index, images in batches:
            want = images_to_tensor(stack_slices(volume, index, input_slices), torch.device("cpu"), norm)  # per batch, as before
            assert images.shape == want.shape == (len(index), channels, 16, 16)
            assert images.stride() == want.stride() and torch.equal(images, want)
