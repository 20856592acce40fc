"""Decode-speed benchmark: dicomsdl vs pydicom, ms per slice on one core, by transfer syntax.

Both backends run interleaved on the same files in the same process (so caches, CPU frequency and
neighbours affect them alike); each file's time is the median of `repeat` full `read_slice` calls
(open + parse + decode + HU conversion), which is what a data loader pays per slice.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from rsna22_utils.cervical.anatomy import BOX_COLUMNS
from rsna22_utils.core.dicom import TRANSFER_SYNTAX_NAMES, DicomReadError, read_slice
from rsna22_utils.core.paths import REPO_ROOT

logger = logging.getLogger(__name__)

BACKENDS = ("dicomsdl", "pydicom")
REALDATA_RSNA = REPO_ROOT.parent / "shared" / "realdata" / "rsna2022"


def default_paths() -> list[Path]:
    """Every real study folder beside the repo (../shared/realdata/rsna2022/{train,test}_images)."""
    folders = [REALDATA_RSNA / split for split in ("train_images", "test_images")]
    studies = sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_dir())
    if not studies:
        raise FileNotFoundError(f"no study folders under {folders[0]} or {folders[1]}: pass DICOM files or study folders explicitly")
    return studies


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.dcm"), key=lambda p: (len(p.stem), p.stem))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such DICOM file or study folder")
    if not files:
        raise FileNotFoundError(f"no .dcm files in {', '.join(map(str, paths))}")
    return files


@contextmanager
def one_core() -> Iterator[str]:
    """Pin this process to its first allowed CPU and every thread pool to one thread; restore after."""
    saved_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved_env})
    restore = []
    try:
        import torch

        torch_threads = torch.get_num_threads()
        restore.append(lambda: torch.set_num_threads(torch_threads))
        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        import cv2

        cv2_threads = cv2.getNumThreads()
        restore.append(lambda: cv2.setNumThreads(cv2_threads))
        cv2.setNumThreads(1)
    except ImportError:
        pass
    where = "one thread (no CPU pinning on this OS)"
    if saved_affinity:
        cpu = min(saved_affinity)
        os.sched_setaffinity(0, {cpu})
        where = f"CPU {cpu}"
    try:
        yield where
    finally:
        if saved_affinity:
            os.sched_setaffinity(0, saved_affinity)
        for fn in restore:
            fn()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_decode(paths: list[Path] | None = None, repeat: int = 5) -> pd.DataFrame:
    """ms/slice of dicomsdl vs pydicom on one core, per transfer syntax; prints and returns the table.

    `paths`: DICOM files and/or study folders (default: every real study in ../shared/realdata).
    Columns: transfer_syntax, name, files, dicomsdl_ms, pydicom_ms, speedup (pydicom / dicomsdl),
    where each ms figure is the mean over files of the per-file median of `repeat` decodes.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    files = _expand(list(paths) if paths else default_paths())
    syntax = {}
    for f in files:
        try:
            syntax[f] = read_slice(f, backend="pydicom")[1]["transfer_syntax"]  # also warms the plugins
            read_slice(f, backend="dicomsdl")
        except DicomReadError as e:
            raise DicomReadError(e.path, f"cannot benchmark: {e.reason}") from None
    times: dict[tuple[Path, str], list[float]] = {(f, b): [] for f in files for b in BACKENDS}
    with one_core() as where:
        logger.info("benchmarking %d files x %d repeats on %s", len(files), repeat, where)
        for r in range(repeat):
            for f in files:
                order = BACKENDS if (r + files.index(f)) % 2 == 0 else BACKENDS[::-1]  # alternate who goes first
                for backend in order:
                    t0 = time.perf_counter()
                    read_slice(f, backend=backend)
                    times[(f, backend)].append(time.perf_counter() - t0)
    rows = [
        {"transfer_syntax": syntax[f], "file": str(f), "backend": b, "ms": 1e3 * statistics.median(times[(f, b)])}
        for f in files
        for b in BACKENDS
    ]
    per_file = pd.DataFrame(rows)
    table = per_file.pivot_table(index="transfer_syntax", columns="backend", values="ms", aggfunc="mean")
    table["files"] = per_file[per_file["backend"] == BACKENDS[0]].groupby("transfer_syntax").size()
    table = table.reset_index().rename(columns={b: f"{b}_ms" for b in BACKENDS})
    table.columns.name = None
    table.insert(1, "name", table["transfer_syntax"].map(lambda s: TRANSFER_SYNTAX_NAMES.get(s, "unknown")))
    table["speedup"] = table["pydicom_ms"] / table["dicomsdl_ms"]
    table = table[["transfer_syntax", "name", "files", "dicomsdl_ms", "pydicom_ms", "speedup"]]
    print(f"decode ms/slice, one core ({where}), median of {repeat}, {len(files)} files (read_slice: open + decode + HU)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return table


def bench_epoch(
    data_dir: Path | None = None,
    work_dir: Path | None = None,
    n_studies: int = 4,
    image_size: int = 512,
    cache_size: int = 256,
    batch_size: int = 16,
    backbone: str = "mobilenetv3_small_050",
    max_slices: int = 0,
    device: str = "auto",
    repeat: int = 3,
) -> pd.DataFrame:
    """One box-model training epoch from the study cache vs decoding DICOMs on the fly, side by side.

    Same dataset class, same slices, same model; only the slice source differs (`CacheSource`:
    the memory-mapped cache; `DicomSource`: read + decode + window + resize every slice, as the
    3rd place's datasets did every epoch). Two figures per source: the data pipeline alone (what
    a GPU waits for: the epoch time whenever the model is faster than the loader) and the full
    epoch with forward + backward on `device` (on a CPU even the tiny model dominates). The data
    pass is the median of `repeat` passes, so one noisy pass cannot move the ratio. The last line
    gives the break-even: with loading overlapped by DataLoader workers an epoch takes about
    max(data, model), so it is >= 10x faster from the cache on any device whose forward + backward
    is at most a tenth of the DICOM data time per slice. Without `data_dir` a synthetic
    competition at Kaggle's 512 px is generated in `work_dir`.
    """
    import tempfile

    import torch
    from torch.utils.data import DataLoader

    from rsna22_utils.cervical.data import BoxSliceDataset, CacheSource, DicomSource
    from rsna22_utils.cervical.models import BoxModel
    from rsna22_utils.core.cache import CacheSpec, StudyCache, build_cache
    from rsna22_utils.core.scan import find_studies

    repeat = max(1, repeat)  # at least one timed data pass per source
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="rsna22-bench-"))
    if data_dir is None:
        from rsna22_utils.cervical.synth import generate_competition

        data_dir = work_dir / "competition"
        if not (data_dir / "train.csv").exists():
            generate_competition(data_dir, n_studies=n_studies, n_test_studies=1, image_size=image_size, median_slices=96, seed=0)
    studies = [d for split, d in find_studies(Path(data_dir)) if split == "train_images"][:n_studies]
    spec = CacheSpec(image_size=cache_size)
    t0 = time.perf_counter()
    root, failures = build_cache(studies, work_dir / "cache", spec)
    cache_seconds = time.perf_counter() - t0
    cache = StudyCache(root)
    table = cache.all_slices()
    if max_slices:
        table = table.iloc[:: max(1, len(table) // max_slices)].reset_index(drop=True)
    for column in ("has_box", *BOX_COLUMNS):
        table[column] = 0.0
    table["has_box"] = 1.0
    table[["x1", "y1"]] = table[["cols", "rows"]].to_numpy() / 2

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    rows = []
    sources = {"study cache": CacheSource(cache), "DICOM on the fly": DicomSource(table, spec)}
    for name, source in sources.items():
        loader = DataLoader(BoxSliceDataset(table, source), batch_size=batch_size, shuffle=True, num_workers=0)
        passes = []
        for _ in tqdm(range(repeat), desc=f"data passes ({name})", leave=False):
            t0 = time.perf_counter()
            for _ in loader:
                pass
            passes.append(time.perf_counter() - t0)
        data_seconds = statistics.median(passes)
        torch.manual_seed(0)
        model = BoxModel(backbone, in_chans=1).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        warm_batch = next(iter(loader))
        for _ in range(2):  # CUDA context, cuDNN algorithm choice, allocator: not part of either epoch
            _box_step(model, optimizer, warm_batch, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in tqdm(loader, desc=f"epoch ({name})", leave=False):
            _box_step(model, optimizer, batch, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"source": name, "slices": len(table), "data_s": data_seconds, "epoch_s": time.perf_counter() - t0})
    result = pd.DataFrame(rows).set_index("source")
    cached, dicom = result.loc["study cache"], result.loc["DICOM on the fly"]
    print(
        f"\nbox-model epoch over {len(table)} slices of {len(studies)} studies ({image_size} px DICOMs -> {cache_size} px), "
        f"batch {batch_size}, {backbone} on {dev}; cache built once in {cache_seconds:.1f} s"
    )
    n = len(table)
    result["data_ms_per_slice"] = 1e3 * result["data_s"] / n
    result["model_ms_per_slice"] = 1e3 * (result["epoch_s"] - result["data_s"]).clip(lower=0) / n
    print(result.round(2).to_string())
    print(
        f"data pipeline (median of {repeat} passes): cache {dicom['data_s'] / cached['data_s']:.1f}x faster than decoding DICOMs; "
        f"full epoch on {dev}: {dicom['epoch_s'] / cached['epoch_s']:.1f}x"
    )
    break_even_ms = result.loc["DICOM on the fly", "data_ms_per_slice"] / 10
    model_ms = result.loc["study cache", "model_ms_per_slice"]
    print(
        f"break-even: with loading overlapped by workers an epoch is ~max(data, model), so it is >= 10x faster from the cache "
        f"wherever forward + backward takes <= {break_even_ms:.2f} ms/slice; here on {dev} it takes {model_ms:.2f} ms/slice "
        + (
            "(data-bound: the full-epoch ratio above is the one that counts)"
            if model_ms <= break_even_ms
            else "(model-bound: the cache cannot show its speed-up on this device)"
        )
    )
    return result


# --------------------------------------------------------------------------- inference


def _box_step(model, optimizer, batch: dict, device) -> None:
    """One training step of the box model (the benchmark's unit of work)."""
    from rsna22_utils.cervical.models import box_loss

    batch = {k: v.to(device) for k, v in batch.items()}
    loss = box_loss(model(batch), batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


KAGGLE_TEST_STUDIES = 1500  # hidden test set: ~1,500 studies
KAGGLE_SLICES = 300  # typical slices per study at 512 x 512
DEFAULT_DECODE_MS = 6.0  # dicomsdl, one core, real JPEG Lossless 512 px slices (when ../shared/realdata is absent)


def _real_decode_ms(n_files: int = 12) -> tuple[float, str]:
    """ms/slice of read_slice (dicomsdl, one core) on real competition files, or the default when absent."""
    files = sorted(REALDATA_RSNA.glob("train_images/*/*.dcm"))[:n_files]
    if not files:
        return DEFAULT_DECODE_MS, f"default {DEFAULT_DECODE_MS} ms (no real files at {REALDATA_RSNA})"
    times = []
    with one_core():
        for f in files:
            read_slice(f, backend="dicomsdl")  # warm
            t0 = time.perf_counter()
            for _ in range(3):
                read_slice(f, backend="dicomsdl")
            times.append((time.perf_counter() - t0) / 3)
    return 1e3 * statistics.median(times), f"measured on {len(files)} real files"


def bench_inference(data_dir: str | Path, weights_dir: str | Path, n_studies: int = 5, num_workers: int = 2) -> pd.DataFrame:
    """Per-study seconds of 07_inference split into decode / preprocessing / models, on CPU (and CUDA), + a projection.

    decode = read_study (dicomsdl); preprocessing = encode_study (window + resize) + crops and
    3-slice stacking (study_images); model = box models on every slice + every study model (with
    flip TTA). The projection to Kaggle's ~1,500 studies x ~300 slices at 512 px scales each part per
    slice: decode by real-file ms/slice (../shared/realdata, dicomsdl, one core), window + resize by
    an encode of a 512 px volume, stacking and models by the ms/slice measured here (model inputs
    do not depend on the DICOM size). Decode + encode run in `num_workers` DataLoader workers
    overlapped with stacking + models, so per study wall = max((decode + encode) / workers,
    stacking + models). Prints and returns the per-study table (projection in `.attrs`).
    """
    import numpy as np
    import torch

    from rsna22_utils.cervical.embed import study_images, study_probabilities
    from rsna22_utils.cervical.study_box import predict_study_box
    from rsna22_utils.cervical.submission import MemoryCache, load_ensemble
    from rsna22_utils.core.cache import encode_study
    from rsna22_utils.core.config import resolve_config
    from rsna22_utils.core.device import autocast
    from rsna22_utils.core.dicom import read_study

    data_dir = Path(data_dir)
    folders = sorted(p for p in (data_dir / "test_images").glob("*") if p.is_dir()) or sorted(
        p for p in (data_dir / "train_images").glob("*") if p.is_dir()
    )
    folders = folders[:n_studies]
    if not folders:
        raise FileNotFoundError(f"{data_dir}: no study folders in test_images/ or train_images/")
    cfg = resolve_config("07_inference", {"data_dir": str(data_dir), "weights_dir": str(weights_dir), "out": "unused.csv"})
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        ensemble = load_ensemble(weights_dir, device)
        for i, folder in enumerate(folders):
            t0 = time.perf_counter()
            volume, table = read_study(folder)
            t1 = time.perf_counter()
            volumes = {spec.name: encode_study(volume, spec) for spec in ensemble.specs}
            slices = table.reset_index(drop=True).assign(slice_index=np.arange(len(table)))
            t2 = time.perf_counter()
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            study_box = predict_study_box(
                ensemble.box.models,
                volumes[ensemble.box.spec.name],
                slices,
                device,
                cfg.box_batch_size,
                cfg,
                cfg.amp,
                ensemble.box.input_slices,
            )
            sync()
            stack_s, model_s = 0.0, time.perf_counter() - t2
            for run in ensemble.study:
                t3 = time.perf_counter()
                images = study_images(run.cfg, MemoryCache(run.spec, folder.name, volumes[run.spec.name], slices), folder.name, study_box)
                t4 = time.perf_counter()
                with torch.inference_mode(), autocast(device, cfg.amp):
                    study_probabilities(run.model, run.cfg, images, device, cfg.sequence_batch_size, cfg.tta_flip)
                sync()
                stack_s, model_s = stack_s + t4 - t3, model_s + time.perf_counter() - t4
            if i == 0:  # the first study warms up kernels / allocators: measured again below
                continue
            rows.append(
                {
                    "device": device.type,
                    "study": folder.name,
                    "slices": len(table),
                    "px": int(volume.shape[1]),
                    "decode_s": t1 - t0,
                    "encode_s": t2 - t1,
                    "stack_s": stack_s,
                    "model_s": model_s,
                }
            )
        if len(folders) == 1:
            logger.warning("one study only: its (warm-up) timing is not in the table; give n_studies >= 2")
    table = pd.DataFrame(rows)
    table["preprocess_s"] = table["encode_s"] + table["stack_s"]
    table["total_s"] = table["decode_s"] + table["preprocess_s"] + table["model_s"]

    decode_ms, decode_source = _real_decode_ms()
    box_spec = load_ensemble(weights_dir, torch.device("cpu")).box.spec
    fake = np.random.default_rng(0).integers(-1000, 2000, (24, 512, 512)).astype(np.int16)
    t0 = time.perf_counter()
    encode_study(fake, box_spec)
    encode_ms = 1e3 * (time.perf_counter() - t0) / len(fake)
    projection = []
    for device, group in table.groupby("device", sort=False):
        per_slice = {col: 1e3 * group[col].sum() / group["slices"].sum() for col in ("stack_s", "model_s")}
        workers_s = KAGGLE_SLICES * (decode_ms + encode_ms) / 1e3 / max(1, num_workers)
        main_s = KAGGLE_SLICES * (per_slice["stack_s"] + per_slice["model_s"]) / 1e3
        projection.append(
            {
                "device": device,
                "decode_ms_slice": decode_ms,
                "encode_ms_slice_512px": encode_ms,
                "stack_ms_slice": per_slice["stack_s"],
                "model_ms_slice": per_slice["model_s"],
                "study_s": max(workers_s, main_s),
                "bound": "decode" if workers_s > main_s else "models",
                "hours_1500": KAGGLE_TEST_STUDIES * max(workers_s, main_s) / 3600,
            }
        )
    projection = pd.DataFrame(projection)
    print(f"07_inference per study ({len(folders) - 1} studies after a warm-up one; {data_dir}, weights {weights_dir})")
    print(
        table[["device", "slices", "px", "decode_s", "preprocess_s", "model_s", "total_s"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"
        )
    )
    print(
        f"\nprojection to {KAGGLE_TEST_STUDIES} studies x {KAGGLE_SLICES} slices at 512 px, {num_workers} decode workers "
        f"(decode {decode_ms:.1f} ms/slice, {decode_source}); per study = max((decode + encode) / workers, stack + models); "
        f"models as measured above, i.e. at these weights' input sizes (box {box_spec.name}):"
    )
    print(projection.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    table.attrs["projection"] = projection
    return table


# The 3rd place's networks (darraghdog/RSNA22 configs): box efficientnet_b1 on 3 slices; vertebra
# resnest50d / efficientnetv2_rw_m and fracture resnest50d / seresnext50_32x4d over 32 images x 3 slices.
ORIGINAL_BACKBONES: tuple[tuple[str, str], ...] = (
    ("box", "efficientnet_b1"),
    ("sequence", "resnest50d"),
    ("sequence", "seresnext50_32x4d"),
    ("sequence", "efficientnetv2_rw_m"),
)


def _throughput(step, images_per_step: int, device, warmup: int, steps: int) -> float:
    """Images per second of `step()` after `warmup` untimed calls (CUDA synchronised)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return images_per_step * steps / (time.perf_counter() - t0)


def _train_and_infer_throughput(model, batch: dict, n_images: int, dtype, device, warmup: int, steps: int) -> tuple[float, float]:
    """Images/s of AdamW training steps and of inference on one batch, under autocast `dtype` (None: fp32)."""
    import contextlib

    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def train_step() -> None:
        with autocast():
            loss = sum(v.float().mean() for v in model(batch).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def infer_step() -> None:
        with torch.inference_mode(), autocast():
            model(batch)

    model.train()
    train = _throughput(train_step, n_images, device, warmup, steps)
    model.eval()
    return train, _throughput(infer_step, n_images, device, warmup, steps)


def bench_backbones(
    backbones: tuple[tuple[str, str], ...] = ORIGINAL_BACKBONES,
    image_size: int = 512,
    batch_images: int = 64,
    seq_len: int = 32,
    device: str = "auto",
    warmup: int = 3,
    steps: int = 10,
    lstm_hidden: int | None = None,
) -> pd.DataFrame:
    """Training (forward + backward + AdamW step) and inference images/s of each network at `image_size`,
    under each AMP dtype the device runs (the kit's own choice first: bf16 on compute capability >= 8,
    fp16 below; fp32 on CPU), with trainable parameters. The figures behind GPU-hour estimates.

    A box network sees `batch_images` single images; a sequence network `batch_images // seq_len`
    windows of `seq_len` 3-slice images (its BiLSTM, `lstm_hidden` = features + 32 as in the 3rd place
    unless given, runs over them).
    """
    import torch

    from rsna22_utils.cervical.models import BoxModel, SequenceModel, feature_size
    from rsna22_utils.core.device import amp_dtype, resolve_device

    dev = resolve_device(device)
    dtypes = [amp_dtype(dev)]
    if dev.type == "cuda":
        dtypes += [d for d in (torch.float16, torch.bfloat16) if d not in dtypes]
    rows = []
    for family, name in backbones:
        torch.manual_seed(0)
        if family == "box":
            model = BoxModel(name, in_chans=3)
            batch = {"image": torch.randn(batch_images, 3, image_size, image_size)}
        else:
            probe = BoxModel(name, in_chans=3).encoder
            hidden = lstm_hidden or feature_size(probe) + 32
            model = SequenceModel(name, in_chans=3, n_outputs=14, lstm_hidden=hidden)
            windows = max(1, batch_images // seq_len)
            batch = {"image": torch.randn(windows, seq_len, 3, image_size, image_size)}
        model.to(dev)
        batch = {k: v.to(dev) for k, v in batch.items()}
        n_images = batch["image"].shape[0] * (batch["image"].shape[1] if batch["image"].ndim == 5 else 1)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for dtype in dtypes:
            train, infer = _train_and_infer_throughput(model, batch, n_images, dtype, dev, warmup, steps)
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
            rows.append(
                {
                    "network": f"{family} {name}",
                    "params_trainable": params,
                    "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
                    "image_size": image_size,
                    "train_img_s": train,
                    "infer_img_s": infer,
                    "peak_gib": peak,
                }
            )
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
        model.cpu()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    capability = ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else "-"
    print(f"networks at {image_size} px on {name} (compute capability {capability}; the kit's AMP dtype: {dtypes[0]})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return table
