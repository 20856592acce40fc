"""`bench-cost`: the expected training cost of a profile, and the cost model the other benchmarks share.

GPU hours = runs x epochs x images per epoch x training FLOPs per image / (peak x utilisation): images
per epoch from the real competition's counts (`TrainingData`) and each config's sampling rule, FLOPs
from torch's FlopCounterMode on the network each config builds, peaks from the vendors' data sheets
and utilisation assumed (stated with the figures) wherever no measured throughput replaces it.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsna22_utils.cervical.bench.decode import REALDATA_RSNA
from rsna22_utils.cervical.stages import TRAIN_FRACTURE, TRAIN_STUDY

if TYPE_CHECKING:  # numpy, pandas, torch: imported where used, since the CLI imports this module to build its parser
    import pandas as pd

logger = logging.getLogger(__name__)

KAGGLE_SLICES = 300  # typical slices per study at 512 x 512

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
PUBLISHED_HOURS_PER_RUN: dict[str, float] = {TRAIN_FRACTURE: 10.0, TRAIN_STUDY: 1.0}


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
        from rsna22_utils.core.config import FULL_DATA_FOLD

        return list(uids) if fold == FULL_DATA_FOLD else [u for u in uids if self.folds.get(u, FULL_DATA_FOLD) != fold]


def real_training_data(csv_dir: Path = REALDATA_CSV) -> TrainingData:
    """The real competition's counts from ../shared/realdata: the 87 segmented studies' slices and C1-C7
    extents (meta_segmentation.csv), the 2,019 train studies and their folds (train_folded_v01.csv).
    The 87 stand for a typical study's length (mean 343 slices, median 298) where 05 / 06 need one."""
    import numpy as np
    import pandas as pd

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
    import numpy as np

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

    from rsna22_utils.cervical.bench.backbones import device_sync
    from rsna22_utils.core.device import autocast
    from rsna22_utils.core.timing import throughput

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

    rate = throughput(step, n_images, device_sync(device), warmup=1, steps=steps)
    network.cpu()
    return rate


def stage_configs(stage: str, profile: str, overrides: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """(show_configs row, resolved config with derived fields) of every variant of `stage` in `profile`."""
    from rsna22_utils.cervical.preview import preview_derived
    from rsna22_utils.core.config import settable_fields
    from rsna22_utils.core.registry import get_stage
    from rsna22_utils.core.resolve import resolve_config, show_configs

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

    import numpy as np
    import pandas as pd

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


def _bench_cost(args: argparse.Namespace) -> int:
    from rsna22_utils.core.config import parse_overrides

    bench_cost(
        args.profile,
        overrides=parse_overrides(args.params),
        device=args.device,
        measure_images=args.measure_images,
        measure_size=args.measure_size,
        stages=args.stages,
        out=args.out,
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """bench-cost."""
    p = subparsers.add_parser(
        "bench-cost", help="expected training cost of a profile: runs, images, FLOPs, measured img/s, GPU hours per stage"
    )
    p.add_argument("--profile", default="original", help="a shipped profile (original, demo) or a .json path")
    p.add_argument("--device", default="auto", help="where to measure training images/s (auto: cuda when present, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    p.add_argument("--measure-images", type=int, default=2, help="images per measured training step (few: keeps CPU runs short)")
    p.add_argument("--measure-size", type=int, default=None, help="px of the measured step (default: the config's, 512 in original)")
    p.add_argument("--stages", nargs="*", default=None, help="training stages to cost (default: 01 03 05 06)")
    p.add_argument(
        "-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="setting of every stage that has it"
    )
    p.set_defaults(func=_bench_cost)
