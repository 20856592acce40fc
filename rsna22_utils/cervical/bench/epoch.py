"""`bench-epoch`: one box-model training epoch from the study cache vs decoding DICOMs on the fly."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsna22_utils.cervical.anatomy import BOX_COLUMNS

if TYPE_CHECKING:  # numpy, pandas, torch: imported where used, since the CLI imports this module to build its parser
    import pandas as pd


def synthetic_competition(work_dir: Path, n_studies: int, image_size: int, median_slices: int = 96, segmented: float = 0.5) -> Path:
    """A synthetic competition at `image_size` px under `work_dir/competition`, generated once and reused."""
    from rsna22_utils.cervical.synth import generate_competition

    data_dir = work_dir / "competition"
    if not (data_dir / "train.csv").exists():
        generate_competition(
            data_dir,
            n_studies=n_studies,
            n_test_studies=1,
            image_size=image_size,
            median_slices=median_slices,
            seed=0,
            segmented_fraction=segmented,
        )
    return data_dir


def _box_step(model, optimizer, batch: dict, device) -> None:
    """One training step of the box model (the benchmark's unit of work)."""
    from rsna22_utils.cervical.models import box_loss

    batch = {k: v.to(device) for k, v in batch.items()}
    loss = box_loss(model(batch), batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _epoch_slices(data_dir: Path, work_dir: Path, n_studies: int, cache_size: int, max_slices: int) -> tuple[Any, pd.DataFrame, float, int]:
    """(cache, slice table with dummy box labels, seconds to build the cache, studies) of the first train studies."""
    from rsna22_utils.core.cache import CacheSpec, StudyCache, build_cache
    from rsna22_utils.core.scan import find_studies

    studies = [d for split, d in find_studies(Path(data_dir)) if split == "train_images"][:n_studies]
    t0 = time.perf_counter()
    root, _ = build_cache(studies, work_dir / "cache", CacheSpec(image_size=cache_size))
    cache_seconds = time.perf_counter() - t0
    cache = StudyCache(root)
    table = cache.all_slices()
    if max_slices:
        table = table.iloc[:: max(1, len(table) // max_slices)].reset_index(drop=True)
    for column in ("has_box", *BOX_COLUMNS):
        table[column] = 0.0
    table["has_box"] = 1.0
    table[["x1", "y1"]] = table[["cols", "rows"]].to_numpy() / 2
    return cache, table, cache_seconds, len(studies)


def _time_source(loader, backbone: str, dev, repeat: int, name: str) -> tuple[float, float]:
    """(median seconds of `repeat` data passes, seconds of one training epoch) over `loader`."""
    import torch
    from tqdm.auto import tqdm

    from rsna22_utils.cervical.models import BoxModel

    passes = []
    for _ in tqdm(range(repeat), desc=f"data passes ({name})", leave=False):
        t0 = time.perf_counter()
        for _ in loader:
            pass
        passes.append(time.perf_counter() - t0)
    torch.manual_seed(0)
    model = BoxModel(backbone, in_chans=1).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warm_batch = next(iter(loader))
    for _ in range(2):  # CUDA context, cuDNN algorithm choice, allocator: not part of either epoch
        _box_step(model, optimizer, warm_batch, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"epoch ({name})", leave=False):
        _box_step(model, optimizer, batch, dev)
    sync()
    return statistics.median(passes), time.perf_counter() - t0


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
    import pandas as pd
    from torch.utils.data import DataLoader

    from rsna22_utils.cervical.data import BoxSliceDataset, CacheSource, DicomSource
    from rsna22_utils.core.cache import CacheSpec
    from rsna22_utils.core.device import resolve_device

    repeat = max(1, repeat)  # at least one timed data pass per source
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="rsna22-bench-"))
    data_dir = data_dir or synthetic_competition(work_dir, n_studies, image_size)
    cache, table, cache_seconds, n_found = _epoch_slices(Path(data_dir), work_dir, n_studies, cache_size, max_slices)
    dev = resolve_device(device)
    rows = []
    for name, source in {
        "study cache": CacheSource(cache),
        "DICOM on the fly": DicomSource(table, CacheSpec(image_size=cache_size)),
    }.items():
        loader = DataLoader(BoxSliceDataset(table, source), batch_size=batch_size, shuffle=True, num_workers=0)
        data_seconds, epoch_seconds = _time_source(loader, backbone, dev, repeat, name)
        rows.append({"source": name, "slices": len(table), "data_s": data_seconds, "epoch_s": epoch_seconds})
    result = pd.DataFrame(rows).set_index("source")
    n = len(table)
    result["data_ms_per_slice"] = 1e3 * result["data_s"] / n
    result["model_ms_per_slice"] = 1e3 * (result["epoch_s"] - result["data_s"]).clip(lower=0) / n
    print(
        f"\nbox-model epoch over {n} slices of {n_found} studies ({image_size} px DICOMs -> {cache_size} px), "
        f"batch {batch_size}, {backbone} on {dev}; cache built once in {cache_seconds:.1f} s"
    )
    _print_epoch(result, repeat, dev)
    return result


def _print_epoch(result: pd.DataFrame, repeat: int, dev: Any) -> None:
    cached, dicom = result.loc["study cache"], result.loc["DICOM on the fly"]
    print(result.round(2).to_string())
    print(
        f"data pipeline (median of {repeat} passes): cache {dicom['data_s'] / cached['data_s']:.1f}x faster than decoding DICOMs; "
        f"full epoch on {dev}: {dicom['epoch_s'] / cached['epoch_s']:.1f}x"
    )
    break_even_ms = dicom["data_ms_per_slice"] / 10
    model_ms = cached["model_ms_per_slice"]
    print(
        f"break-even: with loading overlapped by workers an epoch is ~max(data, model), so it is >= 10x faster from the cache "
        f"wherever forward + backward takes <= {break_even_ms:.2f} ms/slice; here on {dev} it takes {model_ms:.2f} ms/slice "
        + (
            "(data-bound: the full-epoch ratio above is the one that counts)"
            if model_ms <= break_even_ms
            else "(model-bound: the cache cannot show its speed-up on this device)"
        )
    )


def _bench_epoch(args: argparse.Namespace) -> int:
    bench_epoch(
        args.data_dir,
        args.work_dir,
        n_studies=args.studies,
        cache_size=args.cache_size,
        batch_size=args.batch_size,
        device=args.device,
        repeat=args.repeat,
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """bench-epoch."""
    p = subparsers.add_parser("bench-epoch", help="one training epoch from the study cache vs decoding DICOMs, side by side")
    p.add_argument("--data-dir", type=Path, default=None, help="competition folder (default: generate a 512 px synthetic one)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the cache (and generated data) go (default: a temp folder)")
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--cache-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    p.add_argument("--repeat", type=int, default=3, help="data passes per source (the median is reported)")
    p.set_defaults(func=_bench_epoch)
