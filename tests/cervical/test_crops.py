"""The native-resolution crop cache (cervical.crops) and how stage 06 trains on its inputs (on-the-fly embedding, out-of-fold evidence)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rsna22_utils.cervical.crops import CropVolume, NativeSpec, memory_crop_cache, open_crop_cache, stored_range
from rsna22_utils.cervical.geometry import square_crop
from rsna22_utils.cervical.prepare import Prepared
from rsna22_utils.cervical.study_box import study_crops
from rsna22_utils.core.dicom import read_study, window
from tests.helpers import TINY_COMMON, TINY_STAGES, tiny_settings


def test_square_crop_pads_the_short_side_and_stays_inside_the_image() -> None:
    assert square_crop((100, 120, 160, 220), 512, 512) == (80, 120, 180, 220)  # 60 x 100 -> 100 x 100 around the centre
    assert square_crop((100, 100, 200, 150), 512, 512, margin=0.1) == (90, 65, 210, 185)  # 100 * 1.2 = 120
    assert square_crop((0, 10, 20, 110), 512, 512) == (0, 10, 100, 110)  # moved inside at the left edge, still square
    assert square_crop((5, 5, 7, 9), 64, 48) == (0, 0, 48, 64)  # degenerate: whole slice
    assert stored_range(3, 40, 45, 2) == (1, 42) and stored_range(1, 44, 45, 2) == (0, 44)


def test_crop_volume_reads_black_outside_its_stored_slices() -> None:
    array = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1) + 1
    volume = CropVolume(array, first=4, n_slices=10)
    assert volume.shape == (10, 2, 2, 1)
    block = volume[2:9, 0:2, 0:1]
    assert block.shape == (7, 2, 1, 1)
    assert not block[:2].any() and not block[5:].any()
    np.testing.assert_array_equal(block[2:5], array[:, :, 0:1])
    np.testing.assert_array_equal(volume[5], array[1])


def test_crop_cache_holds_the_squared_box_at_native_resolution_and_is_reused(tiny_pipeline, tmp_path: Path) -> None:
    work_dir = tiny_pipeline["work_dir"]
    cache = Prepared(work_dir / "00_prepare").cache()
    boxes, ranges = study_crops(work_dir)
    root = tmp_path / "crops"
    crop_cache = open_crop_cache(cache, root, boxes, ranges, crop_margin=0.1, slice_margin=2, workers=1)
    assert crop_cache.uids == sorted(set(boxes) & set(cache.uids))
    files = sorted(root.rglob("*.npy"))
    assert len(files) == len(crop_cache.uids)
    assert not [p for p in root.rglob("*") if p.is_file() and p.suffix != ".npy"]  # no temp files left
    for uid in crop_cache.uids:
        table = cache.slices(uid)
        hu, _ = read_study(Path(table["path"].iloc[0]).parent, slices=table)
        crop = square_crop(boxes[uid], hu.shape[1], hu.shape[2], 0.1)
        z = stored_range(*ranges[uid], len(hu), 2)
        stored = crop_cache.volume(uid)
        assert stored.shape[0] == len(hu) and stored.first == z[0]
        assert stored.array.shape[1] == crop[3] - crop[1] and stored.array.shape[2] == crop[2] - crop[0]
        if crop[2] - crop[0] < hu.shape[2] and crop[3] - crop[1] < hu.shape[1]:
            assert stored.array.shape[1] == stored.array.shape[2]  # square where the image allows
        np.testing.assert_array_equal(stored.array, window(hu[z[0] : z[1] + 1, crop[1] : crop[3], crop[0] : crop[2]], cache.spec.windows))
        # the submission cuts the same pixels from the native volume its workers ship
        memory = memory_crop_cache(cache.spec, uid, NativeSpec(cache.spec.windows).encode(hu), table, boxes[uid], ranges[uid], 0.1, 2)
        np.testing.assert_array_equal(memory.volume(uid).array, stored.array)
    on_disk = sum(p.stat().st_size for p in files)
    assert crop_cache.nbytes() <= on_disk <= crop_cache.nbytes() + 256 * len(files)  # payload + .npy headers
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = open_crop_cache(cache, root, boxes, ranges, crop_margin=0.1, slice_margin=1, workers=1)  # narrower range: reused
    assert {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*.npy"))} == mtimes  # the same files, none decoded again
    assert again.nbytes() == crop_cache.nbytes()


def _study_config(tiny_pipeline, work_dir: Path, **changes):
    from rsna22_utils.core.resolve import resolve_config

    common = {**TINY_COMMON, "work_dir": str(work_dir), "prepared_dir": str(work_dir / "00_prepare"), "fold": 0, "seed": 0}
    values = {**common, **TINY_STAGES["06_train_study"], "max_steps_per_epoch": 1, "out_dir": str(work_dir / "06_test"), **changes}
    return resolve_config("06_train_study", tiny_settings("06_train_study", values))


def _bn_means(state: dict) -> dict[str, torch.Tensor]:
    return {k.split("encoder.", 1)[1]: v for k, v in state.items() if k.startswith("encoder.") and k.endswith("running_mean")}


@pytest.mark.parametrize("bn_update", [False, True])
def test_study_model_embeds_on_the_fly_and_updates_batch_norm_only_when_asked(tiny_pipeline, tmp_path: Path, bn_update: bool) -> None:
    from safetensors.torch import load_file

    from rsna22_utils.cervical.study import train_study

    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    cfg = _study_config(tiny_pipeline, work_dir, embed_on_the_fly=True, frozen_bn_update=bn_update, slice_margin=2, cnn_chunk_size=5)
    metrics = train_study(cfg)
    assert np.isfinite(metrics["metrics"]["metric"]) and metrics["n_train"] > 0
    fracture = _bn_means(load_file(str(work_dir / "05_train_fracture" / "fold0-seed0" / "model.safetensors")))
    study = _bn_means(load_file(str(Path(cfg.out_dir) / "model.safetensors")))
    assert fracture.keys() == study.keys() and fracture
    changed = any(not torch.equal(fracture[k], study[k]) for k in fracture)
    assert changed == bn_update


def test_study_model_on_native_crops_with_slice_margin(tiny_pipeline, tmp_path: Path) -> None:
    from rsna22_utils.cervical.embed import study_images, study_windows
    from rsna22_utils.cervical.study import StudyImages, study_inputs, train_study

    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    run_config = work_dir / "05_train_fracture" / "fold0-seed0" / "config.json"
    saved = json.loads(run_config.read_text())
    run_config.write_text(json.dumps({**saved, "crop_source": "native"}))  # as a 05 run on native crops records it
    cfg = _study_config(tiny_pipeline, work_dir, embed_on_the_fly=True, slice_margin=2)
    metrics = train_study(cfg)
    assert np.isfinite(metrics["metrics"]["metric"]) and metrics["n_train"] > 0
    assert list((work_dir / "02_infer_box" / "crops").rglob("*.npy"))
    # the images of a training study are those the submission builds for it (same crop, same margin)
    trained = json.loads((Path(cfg.out_dir) / "config.json").read_text())
    assert trained["crop_source"] == "native" and trained["slice_margin"] == 2
    cfg = _study_config(tiny_pipeline, work_dir, slice_margin=2)
    cfg.crop_source, cfg.crop_size, cfg.crop_margin = "native", saved["crop_size"], saved["crop_margin"]
    cfg.seq_len, cfg.slices_per_image = saved["seq_len"], saved["slices_per_image"]
    cache = Prepared(work_dir / "00_prepare").cache()
    boxes, ranges = study_crops(work_dir)
    uid = sorted(set(boxes) & set(cache.uids))[0]
    crop_cache, crops, wide = study_inputs(cfg, cache, boxes, ranges)
    assert wide[uid] == stored_range(*ranges[uid], len(cache.slices(uid)), 2)
    train_images = StudyImages([uid], study_windows([uid], crop_cache, wide, crops, cfg), None).images(uid)
    table = cache.slices(uid)
    hu, _ = read_study(Path(table["path"].iloc[0]).parent, slices=table)
    memory = memory_crop_cache(cache.spec, uid, window(hu, cache.spec.windows), table, boxes[uid], ranges[uid], cfg.crop_margin, 2)
    row = dict(zip(["x0", "y0", "x1", "y1"], boxes[uid]), slnum_from=ranges[uid][0], slnum_to=ranges[uid][1])
    submitted = study_images(cfg, memory, uid, row)
    kept = submitted.images[submitted.masks > 0.5][: len(train_images)]
    expected = torch.stack([torch.from_numpy(i.transpose(2, 0, 1).copy()).float() / 127.5 - 1 for i in train_images])
    torch.testing.assert_close(kept, expected)


def test_fracture_model_trains_on_native_crops_built_on_first_use(tiny_pipeline, tmp_path: Path) -> None:
    from rsna22_utils.cervical.sequence import train_fracture
    from rsna22_utils.core.resolve import resolve_config

    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    common = {**TINY_COMMON, "work_dir": str(work_dir), "prepared_dir": str(work_dir / "00_prepare"), "fold": 0, "seed": 0}
    values = {**common, **TINY_STAGES["05_train_fracture"], "crop_source": "native", "out_dir": str(work_dir / "05_native")}
    cfg = resolve_config("05_train_fracture", tiny_settings("05_train_fracture", values))
    metrics = train_fracture(cfg)
    assert metrics["n_train"] > 0 and np.isfinite(metrics["history"][-1]["train_loss"])
    stored = list((work_dir / "02_infer_box" / "crops").rglob("*.npy"))
    assert stored and all("_z" in p.name for p in stored)
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["crop_source"] == "native"


def test_study_evidence_fit_out_of_fold_uses_each_studys_own_fold_run(tiny_pipeline, tmp_path: Path) -> None:
    from rsna22_utils.cervical.configs import settings_from_fracture_run
    from rsna22_utils.cervical.embed import embed_studies
    from rsna22_utils.cervical.models import fit_length, load_run, study_model
    from rsna22_utils.cervical.study import out_of_fold_evidence, study_inputs, train_study
    from rsna22_utils.core.config import with_derived
    from rsna22_utils.core.registry import execute
    from rsna22_utils.core.resolve import resolve_config

    work_dir = tmp_path / "runs"
    shutil.copytree(tiny_pipeline["work_dir"], work_dir)
    cfg = _study_config(tiny_pipeline, work_dir, evidence_fit="out_of_fold")
    with pytest.raises(FileNotFoundError, match=r"fold1-seed0: no finished stage-05 run of fold 1.*evidence_fit='in_sample'"):
        train_study(cfg)  # the tiny pipeline trained 05 on fold 0 only

    fracture = {**TINY_COMMON, **TINY_STAGES["05_train_fracture"], "work_dir": str(work_dir), "fold": 1, "seed": 0}
    execute("05_train_fracture", resolve_config("05_train_fracture", tiny_settings("05_train_fracture", fracture)))
    metrics = train_study(cfg)
    assert np.isfinite(metrics["metrics"]["metric"]) and metrics["n_train"] > 0
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["evidence_fit"] == "out_of_fold"

    # the training studies (fold 1) get the evidence of the 05 run of fold 1, not that of fold 0's run, which trained on them
    device = torch.device("cpu")
    own, own_cfg = load_run(work_dir / "05_train_fracture" / "fold1-seed0", device)
    other, _ = load_run(work_dir / "05_train_fracture" / "fold0-seed0", device)
    prepared = Prepared(work_dir / "00_prepare")
    cfg = with_derived(cfg, **settings_from_fracture_run(own_cfg))
    folds = prepared.read("folds")
    boxes, ranges = study_crops(work_dir)
    training = folds[(folds["fold"] == 1) & folds["StudyInstanceUID"].isin(ranges)]
    cache, crops, ranges = study_inputs(cfg, prepared.cache(), boxes, ranges)
    evidence = out_of_fold_evidence(cfg, cache, crops, ranges, training, device)
    assert sorted(evidence) == sorted(training["StudyInstanceUID"])
    for model, same in ((own, True), (other, False)):
        embeddings = embed_studies(model.encoder, cache, sorted(evidence), cfg, crops, ranges, device)
        head = study_model(cfg, model).head
        with torch.no_grad():
            sequences = {
                u: fit_length(torch.from_numpy(e).float()[None], torch.ones(1, len(e)), cfg.max_len) for u, e in embeddings.items()
            }
            expected = {u: head.evidence(*sequence)[0].numpy() for u, sequence in sequences.items()}
        assert all(np.allclose(evidence[u], expected[u], atol=1e-5) for u in evidence) == same
