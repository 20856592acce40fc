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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
                ensemble.box.norm,
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


# --------------------------------------------------------------------------- cost of a profile

REALDATA_CSV = REALDATA_RSNA / "csv"

#: Peak dense fp16 throughput (FLOP/s) from the vendors' data sheets: A100 312 TFLOPS (tensor cores),
#: T4 65 TFLOPS (tensor cores), P100 18.7 TFLOPS (PCIe; no tensor cores, fp16 on the CUDA cores).
GPU_PEAK_FP16: dict[str, float] = {"A100": 312e12, "T4": 65e12, "P100": 18.7e12}

#: Fraction of that peak a PyTorch AMP convnet sustains end to end (assumptions, stated with the figures):
#: training on an A100 0.20 (a DALI-fed ResNet-50 trains at roughly 2,500 img/s there, 3 x 8.2 GFLOPs
#: each = ~60 TFLOPS; the grouped / split-attention convs of resnest50d and seresnext50 do no better),
#: training on a T4 0.10; inference at batch size 4-128 on a T4 0.15 (~1,000 ResNet-50 img/s at 224 px in
#: fp16), on a P100 0.30 (no tensor cores: plain fp16 kernels run closer to their lower peak).
TRAIN_UTILISATION: dict[str, float] = {"A100": 0.20, "T4": 0.10}
INFER_UTILISATION: dict[str, float] = {"T4": 0.15, "P100": 0.30}

#: Published runtimes of the original (darraghdog/RSNA22 README), GPU hours per run, for the cross-check.
PUBLISHED_HOURS_PER_RUN: dict[str, float] = {"05_train_fracture": 10.0, "06_train_study": 1.0}


@dataclass(frozen=True)
class TrainingData:
    """The study and slice counts the cost model needs (what each stage trains on).

    `segmented`: slices of each study with a segmentation (01 and 03 train on those); `folds`: the fold
    of every train study (05 and 06 train on all of them); `sample_slices` / `sample_spine`: slices per
    study and slices from the first C1 to the last C7 of a typical study (pairwise), as a distribution
    (05 and 06 do not know each study's length without its DICOMs).
    """

    segmented: dict[str, int]
    folds: dict[str, int]
    sample_slices: tuple[int, ...]
    sample_spine: tuple[int, ...]
    source: str

    def training_studies(self, uids: list[str], fold: int) -> list[str]:
        """The studies of `uids` a run of `fold` trains on: every other fold, all of them for fold -1."""
        from rsna22_utils.core.registry import FULL_DATA_FOLD

        return list(uids) if fold == FULL_DATA_FOLD else [u for u in uids if self.folds.get(u, FULL_DATA_FOLD) != fold]


def real_training_data(csv_dir: Path = REALDATA_CSV) -> TrainingData:
    """The real competition's counts from ../shared/realdata: the 87 segmented studies' slices and C1-C7
    extents (meta_segmentation.csv), the 2,019 train studies and their folds (train_folded_v01.csv).
    The 87 stand for a typical study's length (mean 343 slices, median 298) where 05 / 06 need one."""
    segmentation = pd.read_csv(csv_dir / "meta_segmentation.csv")
    folds = pd.read_csv(csv_dir / "train_folded_v01.csv")
    vertebrae = [f"C{i}" for i in range(1, 8)]
    slices, spine = {}, []
    for uid, study in segmentation.groupby("StudyInstanceUID", sort=True):
        slices[uid] = len(study)
        shown = np.flatnonzero(study.sort_values("ImagePositionPatient_z")[vertebrae].to_numpy().any(axis=1))
        extent = shown[-1] - shown[0] + 1 if len(shown) else len(study)
        spine.append(int(extent))
    return TrainingData(
        segmented=slices,
        folds=dict(zip(folds["StudyInstanceUID"], folds["fold"].astype(int), strict=True)),
        sample_slices=tuple(slices.values()),
        sample_spine=tuple(spine),
        source=f"{csv_dir}: {len(slices)} segmented studies ({sum(slices.values())} slices), {len(folds)} train studies; "
        f"a train study's length = the segmented studies' (mean {np.mean(list(slices.values())):.0f} slices, "
        f"C1-C7 over {np.mean(spine):.0f} of them)",
    )


def default_training_data() -> TrainingData:
    """The real counts when ../shared/realdata is there, else the competition's published sizes: 87
    segmented and 2,019 train studies of 300 slices, C1-C7 over 200 of them, 5 folds in turn."""
    if (REALDATA_CSV / "meta_segmentation.csv").is_file() and (REALDATA_CSV / "train_folded_v01.csv").is_file():
        return real_training_data()
    uids = [f"study{i}" for i in range(2019)]
    return TrainingData(
        segmented={u: KAGGLE_SLICES for u in uids[:87]},
        folds={u: i % 5 for i, u in enumerate(uids)},
        sample_slices=(KAGGLE_SLICES,),
        sample_spine=(200,),
        source=f"no {REALDATA_CSV}: 87 segmented / 2,019 train studies of {KAGGLE_SLICES} slices assumed",
    )


def _window_count(cfg: Any, n_slices: int) -> int:
    """Training windows of one study per epoch under the config's sampling rule."""
    if getattr(cfg, "window_sampling", "random") == "every":
        from rsna22_utils.cervical.data import training_starts

        return len(training_starts(0, n_slices - 1, cfg.seq_len * cfg.slices_per_image, cfg.window_step))
    return int(cfg.samples_per_study)


def sampling_rule(cfg: Any) -> str:
    """How a stage config turns studies into training images, in words (printed with the table)."""
    from rsna22_utils.cervical.configs import BoxTrainConfig, StudyTrainConfig

    if isinstance(cfg, BoxTrainConfig):
        return "every slice of the segmented studies"
    if isinstance(cfg, StudyTrainConfig):
        span = cfg.seq_len * cfg.slices_per_image
        cnn = "re-embedded every epoch" if cfg.embed_on_the_fly else "embedded once per run"
        return (
            f"one sequence per study: C1-C7 + {cfg.slice_margin} slices a side in back-to-back windows of {span} slices "
            f"({cfg.seq_len} images), {cnn}"
        )
    span = cfg.seq_len * cfg.slices_per_image
    if getattr(cfg, "window_sampling", "random") == "every":
        rule = f"{span}-slice windows starting every {cfg.window_step} slices + first/last"
    else:
        rule = f"{cfg.samples_per_study} random {span}-slice windows per study"
    return rule + (" of the segmented studies" if type(cfg).__name__ == "VertebraTrainConfig" else " of every train study")


def images_per_epoch(cfg: Any, data: TrainingData, fold: int) -> float:
    """Images one run of `fold` pushes through its CNN per epoch (a sequence of n images counts n)."""
    from rsna22_utils.cervical.configs import BoxTrainConfig, FractureTrainConfig, StudyTrainConfig, VertebraTrainConfig

    if isinstance(cfg, BoxTrainConfig):
        return float(sum(data.segmented[u] for u in data.training_studies(list(data.segmented), fold)))
    if isinstance(cfg, VertebraTrainConfig):
        studies = data.training_studies(list(data.segmented), fold)
        return float(sum(_window_count(cfg, data.segmented[u]) for u in studies) * cfg.seq_len)
    studies = len(data.training_studies(list(data.folds), fold))
    if isinstance(cfg, FractureTrainConfig):
        return studies * float(np.mean([_window_count(cfg, n) for n in data.sample_slices])) * cfg.seq_len
    if isinstance(cfg, StudyTrainConfig):
        span = cfg.seq_len * cfg.slices_per_image
        windows = [
            -(-study_range(n, extent, cfg.slice_margin) // span) for n, extent in zip(data.sample_slices, data.sample_spine, strict=True)
        ]
        return studies * float(np.mean(windows)) * cfg.seq_len
    raise ValueError(f"{type(cfg).__name__}: no training data rule for this stage")


def study_range(n_slices: int, spine: int, margin: int) -> int:
    """Slices a study model embeds: the C1-C7 range + `margin` a side, within the study."""
    return int(min(n_slices, spine + 2 * margin))


def input_size(cfg: Any) -> int:
    """Rows = cols of the images a stage's network sees (the box crop's size when it crops)."""
    return int(cfg.crop_size) if getattr(cfg, "crop_by_box", False) else int(cfg.image_size)


def input_channels(network: Any) -> int:
    """Channels of the network's first convolution (what the stage stacks: windows x slices)."""
    from torch import nn

    return next(m for m in network.modules() if isinstance(m, nn.Conv2d)).in_channels


def example_batch(network: Any, cfg: Any, n_images: int, size: int | None = None, device: Any = "cpu") -> dict:
    """A random batch of `n_images` images in the network's input layout: (n, C, H, W) for a box model,
    one sequence (1, n, C, H, W) + mask for the sequence and study models."""
    import torch

    from rsna22_utils.cervical.configs import BoxTrainConfig

    size = size or input_size(cfg)
    channels = input_channels(network)
    if isinstance(cfg, BoxTrainConfig):
        return {"image": torch.randn(n_images, channels, size, size, device=device)}
    return {"image": torch.randn(1, n_images, channels, size, size, device=device), "mask": torch.ones(1, n_images, device=device)}


def forward_flops(module: Any, inputs: Any) -> int:
    """FLOPs of one forward pass `module(inputs)` (inputs: a tensor or a batch dict), counted by
    torch.utils.flop_counter on the meta device (shapes only, no compute) on copies of both. On `meta`
    an LSTM runs as its matrix products, so they are counted too (on CPU its fused kernel is not)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(module).to("meta").eval()
    inputs = {k: v.to("meta") for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(inputs)
    return int(counter.get_total_flops())


def training_flops_per_image(network: Any, cfg: Any, n_images: int = 2) -> tuple[float, float]:
    """(forward FLOPs per image, training FLOPs per image and epoch). Training = 3 x forward (backward ~
    2 x forward) for networks trained end to end; a study model's CNN is frozen (forward only) and only
    its head (BiLSTM + attention, the rest of the forward) trains: CNN + 3 x head with `embed_on_the_fly`
    (the CNN runs every epoch, as in the original), CNN / epochs + 3 x head without (embedded once per run)."""
    from rsna22_utils.cervical.configs import StudyTrainConfig

    batch = example_batch(network, cfg, n_images, device="meta")
    forward = forward_flops(network, batch) / n_images
    if isinstance(cfg, StudyTrainConfig):
        cnn = forward_flops(network.encoder, batch["image"].flatten(0, 1)) / n_images
        return forward, cnn / (1 if cfg.embed_on_the_fly else cfg.epochs) + 3 * (forward - cnn)
    return forward, 3 * forward


def measure_training(network: Any, cfg: Any, device: Any, n_images: int = 2, size: int | None = None, steps: int = 1) -> float:
    """Training images/s of `network` on `device`: AdamW steps on one random batch of `n_images` images
    (one untimed step first), under the kit's AMP choice; a study model's frozen CNN runs forward only."""
    import torch

    from rsna22_utils.core.device import autocast

    network = network.to(device).train()
    batch = example_batch(network, cfg, n_images, size, device)
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and bool(getattr(cfg, "amp", False)))

    def step() -> None:
        with autocast(device, bool(getattr(cfg, "amp", False))):
            loss = sum(v.float().mean() for v in network(batch).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    rate = _throughput(step, n_images, device, warmup=1, steps=steps)
    network.cpu()
    return rate


def stage_configs(stage: str, profile: str, overrides: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """(show_configs row, resolved config with derived fields) of every variant of `stage` in `profile`."""
    from rsna22_utils.cervical.configs import preview_derived
    from rsna22_utils.core.config import resolve_config, settable_fields
    from rsna22_utils.core.profiles import show_configs
    from rsna22_utils.core.registry import get_stage

    fields = set(settable_fields(get_stage(stage).config))
    own = {k: v for k, v in overrides.items() if k in fields}
    out = []
    for row in show_configs(stage, profile, own):
        values = {**own, "profile": profile, "fold": row["folds"][0], "seed": row["seeds"][0]}
        if row["variant"]:
            values["variant"] = row["variant"]
        out.append((row, preview_derived(resolve_config(stage, values))))
    return out


def training_stages() -> list[str]:
    """The stages that train a network once per fold x seed (01, 03, 05, 06)."""
    from rsna22_utils.core.registry import stages

    return [name for name, entry in stages().items() if entry.per_fold and entry.network]


def bench_cost(
    profile: str = "original",
    data: TrainingData | None = None,
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    measure_images: int = 2,
    measure_size: int | None = None,
    stages: list[str] | None = None,
    out: str | Path | None = None,
) -> pd.DataFrame:
    """Expected training cost of every stage and variant of `profile`: one row per variant with its runs
    (folds x seeds), epochs, images per epoch (from `data`, the real competition's counts by default, and
    the config's sampling rule), FLOPs per training image (FlopCounterMode, LSTMs included; 3 x forward, a study
    model's frozen CNN 1 x), images/s measured on `device` (a step of `measure_images` images at
    `measure_size`, default the config's own), and GPU hours at `GPU_PEAK_FP16` x `TRAIN_UTILISATION`:

        GPU h = runs x epochs x images/epoch x FLOPs/image / (peak x utilisation) / 3600

    Validation passes are not counted (fold -1 runs have none). Prints the table, the formula and the
    cross-check against the original's published runtimes; `out` also writes it as JSON.
    """
    import json

    from rsna22_utils.cervical.models import create_network
    from rsna22_utils.core.device import resolve_device

    data = data or default_training_data()
    dev = resolve_device(device)
    rows, rules = [], {}
    for stage in stages or training_stages():
        for row, cfg in stage_configs(stage, profile, overrides or {}):
            network = create_network(cfg)
            forward, train = training_flops_per_image(network, cfg)
            folds, seeds = row["folds"], row["seeds"]
            per_fold = [images_per_epoch(cfg, data, fold) for fold in folds]
            t0 = time.perf_counter()
            rate = measure_training(network, cfg, dev, measure_images, measure_size)
            logger.info("%s %s: %.2f img/s measured in %.1f s", stage, row["variant"], rate, time.perf_counter() - t0)
            runs = len(folds) * len(seeds)
            record = {
                "stage": stage,
                "variant": row["variant"],
                "backbone": cfg.backbone,
                "px": input_size(cfg),
                "folds": len(folds),
                "seeds": len(seeds),
                "runs": runs,
                "epochs": int(cfg.epochs),
                "images_per_epoch": float(np.mean(per_fold)),
                "fwd_gflops_per_image": forward / 1e9,
                "train_gflops_per_image": train / 1e9,
                "total_pflops": runs * cfg.epochs * float(np.mean(per_fold)) * train / 1e15,
                f"measured_img_s_{dev.type}": rate,
            }
            for gpu, utilisation in TRAIN_UTILISATION.items():
                hours = record["total_pflops"] * 1e15 / (GPU_PEAK_FP16[gpu] * utilisation) / 3600
                record[f"gpu_h_{gpu}"] = hours
                record[f"gpu_h_per_run_{gpu}"] = hours / runs
            rows.append(record)
            rules[f"{stage} {row['variant']}".strip()] = sampling_rule(cfg)
    table = pd.DataFrame(rows)
    _print_cost(table, profile, data, rules, dev, measure_images, measure_size)
    if out:
        payload = {"profile": profile, "data": data.source, "sampling": rules, "rows": table.to_dict(orient="records")}
        Path(out).write_text(json.dumps(payload, indent=2))
        logger.info("wrote %s", out)
    return table


def _print_cost(table: pd.DataFrame, profile: str, data: TrainingData, rules: dict, dev: Any, n_images: int, size: int | None) -> None:
    print(f"training cost of profile {profile!r}; data: {data.source}")
    print("images per epoch (validation not counted):")
    for name, rule in rules.items():
        print(f"  {name}: {rule}")
    shown = table.drop(columns=[c for c in table.columns if c.startswith("gpu_h_per_run")])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    assumptions = ", ".join(f"{gpu} {GPU_PEAK_FP16[gpu] / 1e12:g} TFLOPS fp16 peak x {u:.0%}" for gpu, u in TRAIN_UTILISATION.items())
    print(
        "total PFLOPs = runs x epochs x images/epoch x train GFLOPs/image / 1e6; train FLOPs = 3 x forward "
        "(06: frozen CNN forward + 3 x head; the CNN's share / epochs unless embed_on_the_fly)"
    )
    print(f"GPU h = total FLOPs / (peak x utilisation) / 3600 with {assumptions}")
    print(
        f"measured: one AdamW step of {n_images} images at {size or 'the config size'} px on {dev} after a warm-up step "
        "(sequence networks: one sequence of that many images)"
    )
    for gpu in TRAIN_UTILISATION:
        print(f"total {gpu} GPU hours: {table[f'gpu_h_{gpu}'].sum():,.0f}")
    for stage, published in PUBLISHED_HOURS_PER_RUN.items():
        for _, row in table[table["stage"] == stage].iterrows():
            flops_per_run = row["total_pflops"] * 1e15 / row["runs"]
            implied = flops_per_run / (published * 3600) / GPU_PEAK_FP16["A100"]
            print(
                f"cross-check {stage} {row['variant']}: estimate {row['gpu_h_per_run_A100']:.1f} A100 h per run vs published "
                f"~{published:g} h; the published time means {flops_per_run / published / 3600 / 1e12:.0f} TFLOPS sustained "
                f"= {implied:.0%} of an A100's fp16 peak"
            )


# --------------------------------------------------------------------------- cost of the submission

KAGGLE_HOURS = 9.0  # Kaggle's limit for a GPU submission notebook
KAGGLE_DECODE_WORKERS = 2  # DataLoader workers that decode + encode test studies beside the models


def serving_count(folds: list[int], seeds: list[int]) -> int:
    """Runs of a variant that predict test studies: its full-data runs (fold -1) x seeds when the sweep has
    them, else every fold x seed (`registry.serving_runs`)."""
    from rsna22_utils.core.registry import FULL_DATA_FOLD

    return len(seeds) * (1 if FULL_DATA_FOLD in folds else len(folds))


@dataclass
class SubmissionFamily:
    """One kind of model of the submission (the box models, or one study-model variant)."""

    name: str
    count: int  # serving runs in the profile
    cfg: Any
    network: Any
    fwd_flops_per_image: float


def submission_families(profile: str, overrides: dict[str, Any] | None = None) -> list[SubmissionFamily]:
    """The box family (01) and one family per 06 variant of `profile`, with random-weight networks."""
    from rsna22_utils.cervical.models import create_network

    families = []
    for stage in ("01_train_box", "06_train_study"):
        for row, cfg in stage_configs(stage, profile, overrides or {}):
            network = create_network(cfg).eval()
            n = 2
            flops = forward_flops(network, example_batch(network, cfg, n, device="meta")) / n
            name = "box" if stage == "01_train_box" else f"study {row['variant'] or cfg.backbone}"
            families.append(SubmissionFamily(name, serving_count(row["folds"], row["seeds"]), cfg, network, flops))
    return families


def study_images_per_model(cfg: Any, range_slices: int, flip: bool) -> int:
    """Images one study model's CNN embeds for a study range: back-to-back windows of seq_len images,
    twice with flip TTA."""
    span = cfg.seq_len * cfg.slices_per_image
    return -(-range_slices // span) * cfg.seq_len * (2 if flip else 1)


def _time_one_study(folder: Path, box: SubmissionFamily, study_net: Any, run_cfg: Any, sub: Any, dev: Any) -> tuple[dict, int, int]:
    """Seconds of each part of predicting one study with one box and one study model (the submission's own
    functions; on CUDA a first untimed pass warms kernels): (times, slices, images the study CNN embedded)."""
    import torch

    from rsna22_utils.cervical.embed import study_images, study_probabilities
    from rsna22_utils.cervical.study_box import predict_study_box
    from rsna22_utils.cervical.submission import MemoryCache
    from rsna22_utils.core.cache import CacheSpec, encode_study
    from rsna22_utils.core.device import autocast
    from rsna22_utils.core.dicom import read_study

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    box_spec, run_spec = CacheSpec.of(box.cfg), CacheSpec.of(run_cfg)
    box_net, study_net = box.network.to(dev), study_net.to(dev)
    for _ in range(2 if dev.type == "cuda" else 1):
        t0 = time.perf_counter()
        volume, table = read_study(folder)
        t1 = time.perf_counter()
        volumes = {spec.name: encode_study(volume, spec) for spec in {box_spec, run_spec}}
        slices = table.reset_index(drop=True).assign(slice_index=np.arange(len(table)))
        t2 = time.perf_counter()
        predict_study_box([box_net], volumes[box_spec.name], slices, dev, sub.box_batch_size, sub, sub.amp, box.cfg.box_input_slices)
        sync()
        t3 = time.perf_counter()
        n = len(table)
        full = {"x0": 0.0, "y0": 0.0, "x1": float(volume.shape[2]), "y1": float(volume.shape[1]), "slnum_from": 0, "slnum_to": n - 1}
        images = study_images(run_cfg, MemoryCache(run_spec, folder.name, volumes[run_spec.name], slices), folder.name, full)
        t4 = time.perf_counter()
        with torch.inference_mode(), autocast(dev, sub.amp):
            study_probabilities(study_net, run_cfg, images, dev, sub.sequence_batch_size, sub.tta_flip)
        sync()
        t5 = time.perf_counter()
    box_net.cpu(), study_net.cpu()
    times = {"decode": t1 - t0, "encode": t2 - t1, "box": t3 - t2, "stack": t4 - t3, "study": t5 - t4}
    return times, n, int(images.images.shape[0] * images.images.shape[1]) * (2 if sub.tta_flip else 1)


def bench_submission(
    profile: str = "original",
    n_slices: int = 24,
    image_size: int = 512,
    work_dir: str | Path | None = None,
    device: str = "auto",
    measure_seq_len: int | None = 4,
    overrides: dict[str, Any] | None = None,
    test_studies: int = KAGGLE_TEST_STUDIES,
    test_slices: int = KAGGLE_SLICES,
    data: TrainingData | None = None,
    out: str | Path | None = None,
) -> dict[str, pd.DataFrame]:
    """Per-study cost of the submission `profile` ensembles: measured here on one synthetic study of
    `n_slices` slices at `image_size` px with one model per family (random weights), then scaled to the
    profile's model counts and a `test_slices`-slice study; FLOPs per study and family from the FLOP
    counter; a projection to `test_studies` studies on a T4 and a P100 (`GPU_PEAK_FP16` x
    `INFER_UTILISATION`) against Kaggle's 9 h, and how many study models fit when all do not.

    decode = read_study; preprocessing = encode_study (window + resize, every cache spec) + study_images
    (crops, 3-slice stacking); box = every slice through one box model; study = one study model over its
    range (flip TTA per `tta_flip`; `measure_seq_len` shortens its windows for the CPU measurement, the
    time per image is what scales). A study's range on the test set = the C1-C7 extent (+2 slices a side)
    of the real segmented studies. Decode + encode run in `KAGGLE_DECODE_WORKERS` workers beside the
    models, so a study takes max(CPU side / workers, stacking + models).
    """
    import dataclasses
    import json
    import tempfile

    from rsna22_utils.cervical.configs import SubmissionConfig
    from rsna22_utils.cervical.synth import generate_competition
    from rsna22_utils.core.config import resolve_config, settable_fields
    from rsna22_utils.core.device import resolve_device

    data = data or default_training_data()
    dev = resolve_device(device)
    own = {k: v for k, v in (overrides or {}).items() if k in settable_fields(SubmissionConfig)}  # the rest go to 01 / 06
    sub = resolve_config("07_inference", {"profile": profile, "out": "unused.csv", **own})
    families = submission_families(profile, overrides)
    box, studies = families[0], families[1:]
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="rsna22-bench-"))
    data_dir = work_dir / "competition"
    if not (data_dir / "test.csv").exists():
        generate_competition(data_dir, n_studies=1, n_test_studies=1, image_size=image_size, median_slices=n_slices, seed=0, workers=1)
    folder = next(p for p in sorted((data_dir / "test_images").iterdir()) if p.is_dir())

    measured = studies[0]
    run_cfg = dataclasses.replace(measured.cfg, seq_len=measure_seq_len) if measure_seq_len else measured.cfg
    times, n, computed = _time_one_study(folder, box, measured.network, run_cfg, sub, dev)

    spine = round(float(np.mean(data.sample_spine)))
    range_slices = study_range(test_slices, spine, measured.cfg.slice_margin)
    per_slice = {k: times[k] / n for k in ("decode", "encode", "box")}
    study_s_per_image = times["study"] / computed
    stack_s_per_slice = times["stack"] / n
    measured_rows = [
        {"part": "decode", "models": 1, "measured_s": times["decode"], "per": f"{1e3 * per_slice['decode']:.1f} ms/slice"},
        {"part": "preprocess (encode)", "models": 1, "measured_s": times["encode"], "per": f"{1e3 * per_slice['encode']:.1f} ms/slice"},
        {
            "part": "preprocess (crops, stacking)",
            "models": 1,
            "measured_s": times["stack"],
            "per": f"{1e3 * stack_s_per_slice:.1f} ms/slice",
        },
        {"part": f"box ({box.cfg.backbone})", "models": 1, "measured_s": times["box"], "per": f"{1e3 * per_slice['box']:.1f} ms/slice"},
        {
            "part": f"{measured.name} ({measured.cfg.backbone})",
            "models": 1,
            "measured_s": times["study"],
            "per": f"{1e3 * study_s_per_image:.1f} ms/image ({computed} images)",
        },
    ]
    measured_table = pd.DataFrame(measured_rows)

    decode_ms, decode_source = _real_decode_ms()
    per_image = {family.name: per_slice["box"] if family is box else study_s_per_image for family in families}
    family_table = _family_table(families, per_image, dev.type, test_slices, spine, sub.tta_flip)
    cpu_side_s = test_slices * (decode_ms / 1e3 + per_slice["encode"]) / KAGGLE_DECODE_WORKERS
    stack_s = stack_s_per_slice * range_slices * sum(f.count for f in studies)  # every study model crops and stacks its images
    projection = _projection(family_table, [dev.type, *INFER_UTILISATION], cpu_side_s, stack_s, test_studies)
    _print_submission(
        measured_table, family_table, projection, dev, n, image_size, measure_seq_len, (decode_ms, decode_source), range_slices, sub
    )
    result = {"measured": measured_table, "families": family_table, "projection": projection}
    if out:
        Path(out).write_text(json.dumps({k: v.to_dict(orient="records") for k, v in result.items()}, indent=2, default=str))
        logger.info("wrote %s", out)
    return result


def _family_table(
    families: list[SubmissionFamily], seconds_per_image: dict[str, float], here: str, test_slices: int, spine: int, flip: bool
) -> pd.DataFrame:
    """Per family: models, images each model sees per test study, FLOPs per study, and seconds per study
    on this device (measured s/image x images x models) and on each GPU of `INFER_UTILISATION`."""
    rows = []
    for i, family in enumerate(families):
        if i == 0:  # the box family: every slice
            images = test_slices
        else:
            images = study_images_per_model(family.cfg, study_range(test_slices, spine, family.cfg.slice_margin), flip)
        tflops = family.count * images * family.fwd_flops_per_image / 1e12
        row = {
            "family": f"{family.name} ({family.cfg.backbone})",
            "models": family.count,
            "images_per_model": images,
            "fwd_gflops_per_image": family.fwd_flops_per_image / 1e9,
            "tflops_per_study": tflops,
            f"{here}_s_per_study": family.count * images * seconds_per_image[family.name],
        }
        for gpu, utilisation in INFER_UTILISATION.items():
            row[f"{gpu}_s_per_study"] = tflops * 1e12 / (GPU_PEAK_FP16[gpu] * utilisation)
        rows.append(row)
    return pd.DataFrame(rows)


def _projection(families: pd.DataFrame, devices: list[str], cpu_side_s: float, stack_s: float, test_studies: int) -> pd.DataFrame:
    """Hours for `test_studies` on each device, whether they fit Kaggle's limit, and how many study models
    (all box models kept) would: a study takes max(CPU side, stacking + box + study models)."""
    budget = KAGGLE_HOURS * 3600 / test_studies
    n_study = int(families.loc[1:, "models"].sum())
    rows = []
    for where in devices:
        box_s = float(families.loc[0, f"{where}_s_per_study"])
        study_s = float(families.loc[1:, f"{where}_s_per_study"].sum())
        per_model = (study_s + stack_s) / max(1, n_study)
        wall = max(cpu_side_s, stack_s + box_s + study_s)
        fit = n_study if wall <= budget else int(max(0, (budget - box_s) // per_model)) if cpu_side_s <= budget else 0
        rows.append(
            {
                "device": where,
                "decode_encode_s": cpu_side_s,
                "stack_s": stack_s,
                "box_s": box_s,
                "study_s": study_s,
                "study_wall_s": wall,
                f"hours_{test_studies}": test_studies * wall / 3600,
                "hours_models_only": test_studies * (box_s + study_s) / 3600,
                "fits_9h": wall <= budget,
                "study_models_that_fit": min(fit, n_study),
            }
        )
    return pd.DataFrame(rows)


def _print_submission(
    measured: pd.DataFrame,
    families: pd.DataFrame,
    projection: pd.DataFrame,
    dev: Any,
    n: int,
    image_size: int,
    seq_len: int | None,
    decode: tuple[float, str],
    range_slices: int,
    sub: Any,
) -> None:
    decode_ms, decode_source = decode
    test_studies = int(projection.filter(like="hours_").columns[0].removeprefix("hours_"))
    fmt = {"float_format": lambda v: f"{v:,.2f}", "index": False}
    print(
        f"submission, measured on {dev}: one synthetic study of {n} slices at {image_size} px, one model per family "
        f"(random weights; study windows of {seq_len or 'the config'} images, flip TTA {sub.tta_flip})"
    )
    print(measured.to_string(**fmt))
    print(
        f"\nper test study of {KAGGLE_SLICES} slices (study models over {range_slices} slices: the real segmented studies' mean C1-C7 "
        f"extent + slice_margin a side); {dev.type}_s scales the measured ms per slice / image by images x models; GPU s = "
        "FLOPs / (peak x utilisation) with "
        + ", ".join(f"{g} {GPU_PEAK_FP16[g] / 1e12:g} TFLOPS fp16 x {u:.0%}" for g, u in INFER_UTILISATION.items())
    )
    print(families.to_string(**fmt))
    print(
        f"\nprojection to {test_studies} studies: per study = max(decode + encode on {KAGGLE_DECODE_WORKERS} workers "
        f"(decode {decode_ms:.1f} ms/slice, {decode_source}), stacking + box + study models); Kaggle limit {KAGGLE_HOURS:g} h "
        f"(the kit's time_budget_hours {sub.time_budget_hours:g}); study_models_that_fit: the most study models (all box models kept) "
        "within the limit (SubmissionConfig.max_study_models); hours_models_only: box + study models alone (stacking is "
        "CPU time of this machine, repeated per study model)"
    )
    print(projection.to_string(**fmt))
