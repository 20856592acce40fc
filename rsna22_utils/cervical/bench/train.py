"""`bench-train`: steady-state throughput of a real training stage, beside its network alone and its data alone.

For each variant of the stage in a profile, one run (fold -1, seed 0, ImageNet weights not needed)
is set up by the stage's own function (`box_training`, `vertebra_training`, `fracture_training`,
`study_training`: its dataset, augmentation, model and task), and `core.bench_train` times the
trainer's loader and optimizer step on it. Images are network input images: a 3-slice image counts
one, a window of 32 images counts 32, a study the 06 CNN re-embeds counts its images.

Without `--data-dir` a small synthetic competition at 512 px (every study segmented) is generated
under `--work-dir` once and reused. What the stage reads from earlier stages is made there once too:
00_prepare runs for real; the 02 study boxes and the 04 slice labels come from the 00 segmentation
labels through 02's box rule and 04's label rule (no box or vertebra model needed); 06 freezes a
05 run with random weights. A `--work-dir` that already holds those outputs (a pipeline's `runs/`)
is used as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsna22_utils.cervical.bench.cost import input_size, stage_configs, training_stages
from rsna22_utils.cervical.bench.epoch import synthetic_competition
from rsna22_utils.cervical.stages import PREPARE, TRAIN_FRACTURE

if TYPE_CHECKING:  # pandas, torch: imported where used, since the CLI imports this module to build its parser
    import pandas as pd

    from rsna22_utils.core.train import Training

logger = logging.getLogger(__name__)

BENCH_FOLD, BENCH_SEED = -1, 0  # a full-data run: no validation set to build
SYNTHETIC_STUDIES = 3
JSON_FIELDS = (
    "stage",
    "variant",
    "device",
    "data_img_s_per_worker",
    "data_img_s",
    "network_img_s",
    "trainer_img_s",
    "num_workers",
    "amp_dtype",
    "channels_last",
    "deterministic",
)


def network_images(batch: dict) -> int:
    """Network input images in a training batch (each image 3 dims, channels first or last): B box images,
    B windows of T images, or the N images of the studies a 06 batch re-embeds; a 06 batch of embeddings
    counts its sequence steps."""
    if "images" in batch:
        return int(batch["images"].shape[0])
    if "embeddings" in batch:
        return int(batch["mask"].sum())
    return int(batch["image"].shape[:-3].numel())


def stage_named(name: str) -> str:
    """A training stage from its name or its number (05 -> the stage named 05_train_fracture)."""
    stages = training_stages()
    found = [s for s in stages if s == name or s.split("_", 1)[0] == name]
    if len(found) != 1:
        raise ValueError(f"{name!r}: not a training stage; one of {', '.join(stages)} (or its number)")
    return found[0]


def prepare_inputs(work_dir: Path, data_dir: Path, profile: str) -> None:
    """00_prepare on `data_dir` (once), then 02's study boxes and 04's slice labels from its segmentation labels (once)."""
    from rsna22_utils.cervical.prepare import Prepared
    from rsna22_utils.cervical.sequence import VertebraInference
    from rsna22_utils.cervical.study_box import BoxInference
    from rsna22_utils.core.registry import execute
    from rsna22_utils.core.resolve import resolve_config

    try:
        Prepared.of(work_dir).cache()
    except FileNotFoundError:
        values = {"profile": profile, "data_dir": str(data_dir), "work_dir": str(work_dir), "n_folds": 2, "fold_file": ""}
        execute(PREPARE, resolve_config(PREPARE, values))
    prepared = Prepared.of(work_dir)
    for outputs, name, make in (
        (BoxInference.of(work_dir), "study_boxes", true_study_boxes),
        (VertebraInference.of(work_dir), "slice_labels", true_slice_labels),
    ):
        path = outputs.path(name)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            table = make(prepared)
            if path.suffix == ".parquet":
                table.to_parquet(path, index=False)
            else:
                table.to_csv(path, index=False)
            logger.info("%s from the segmentation labels written to %s", name, path)


def true_study_boxes(prepared: Any) -> pd.DataFrame:
    """02's study boxes (its default box rule) over the labelled slice boxes, as if a box model had predicted them exactly."""
    from rsna22_utils.cervical.study_box import study_boxes

    slices = prepared.read("slice_boxes").rename(columns={"has_box": "p_box"})
    return study_boxes(slices.fillna(0.0))


def true_slice_labels(prepared: Any) -> pd.DataFrame:
    """04's slice labels (`labels.fracture_slice_labels`, no rescaling) with the vertebra ratios as its predictions."""
    import numpy as np
    import pandas as pd

    from rsna22_utils.cervical.anatomy import VERTEBRAE
    from rsna22_utils.cervical.labels import fracture_slice_labels
    from rsna22_utils.cervical.sequence import FRACTURE, PREDICTED

    ratios = prepared.read("vertebra_ratios").sort_values(["StudyInstanceUID", "slice_index"])
    study_labels = prepared.read("folds").set_index("StudyInstanceUID")[list(VERTEBRAE)]
    frames = []
    for uid, group in ratios.groupby("StudyInstanceUID", sort=True):
        vertebra, fracture = fracture_slice_labels(
            group[list(VERTEBRAE)].to_numpy(float), study_labels.loc[uid].to_numpy(float), rescale=False
        )
        frame = pd.DataFrame(vertebra, columns=PREDICTED)
        frame[FRACTURE] = fracture
        frame.insert(0, "slice_index", group["slice_index"].to_numpy(np.int64))
        frame.insert(0, "StudyInstanceUID", uid)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _fracture_run_for(cfg: Any, profile: str, overrides: dict[str, Any]) -> None:
    """The 05 run a 06 run freezes (its variant, fold and seed), with random weights, unless it exists."""
    from rsna22_utils.cervical.sequence import fracture_training
    from rsna22_utils.core.config import save_config
    from rsna22_utils.core.registry import CONFIG, WEIGHTS
    from rsna22_utils.core.runs import save_weights

    fracture = resolve_run_config(TRAIN_FRACTURE, profile, cfg.variant, Path(cfg.work_dir), overrides)
    out = Path(fracture.out_dir)
    if (out / WEIGHTS).is_file() and (out / CONFIG).is_file():
        return
    training = fracture_training(fracture)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(training.model, out / WEIGHTS)
    save_config(training.cfg, out / CONFIG)
    logger.info("05 run with random weights for 06 to freeze written to %s", out)


def resolve_run_config(stage: str, profile: str, variant: str, work_dir: Path, overrides: dict[str, Any]) -> Any:
    """The benchmarked run's config: the profile's variant, fold -1, seed 0, no pretrained download, no
    encoder copied from a 03 run (weights do not change the speed), then the `overrides` the stage has."""
    from rsna22_utils.core.config import settable_fields
    from rsna22_utils.core.registry import get_stage
    from rsna22_utils.core.resolve import resolve_config

    fields = set(settable_fields(get_stage(stage).config))
    values: dict[str, Any] = {"profile": profile, "fold": BENCH_FOLD, "seed": BENCH_SEED, "work_dir": str(work_dir)}
    values.update({k: v for k, v in {"pretrained": False, "init_encoder_from": ""}.items() if k in fields})
    values.update({k: v for k, v in overrides.items() if k in fields})
    if variant:
        values["variant"] = variant
    return resolve_config(stage, values)


def stage_training(cfg: Any, profile: str, overrides: dict[str, Any]) -> Training:
    """The run's model, task and datasets from its stage's own function (06: its on-the-fly data path when
    `embed_on_the_fly`, the head left at its initial weights)."""
    from rsna22_utils.cervical.box import box_training
    from rsna22_utils.cervical.configs import BoxTrainConfig, FractureTrainConfig, StudyTrainConfig, VertebraTrainConfig
    from rsna22_utils.cervical.sequence import fracture_training, vertebra_training
    from rsna22_utils.cervical.study import study_training

    if isinstance(cfg, StudyTrainConfig):
        _fracture_run_for(cfg, profile, overrides)
        return study_training(cfg, start_head=not cfg.embed_on_the_fly)
    builders = {BoxTrainConfig: box_training, VertebraTrainConfig: vertebra_training, FractureTrainConfig: fracture_training}
    return builders[type(cfg)](cfg)


def bench_train(
    stage: str,
    profile: str = "original",
    variants: list[str] | None = None,
    device: str = "cpu",
    steps: int = 5,
    data_dir: Path | None = None,
    work_dir: Path | None = None,
    data_only: bool = False,
    overrides: dict[str, Any] | None = None,
    n_studies: int = SYNTHETIC_STUDIES,
    image_size: int = 512,
) -> list[dict[str, Any]]:
    """One row per variant of `stage` in `profile` (all, or `variants`): the JSON_FIELDS and more (bottleneck,
    batch size, input px, backbone, torch version). `overrides` are settings of any stage (e.g. batch_size)."""
    import torch

    from rsna22_utils.core.bench_train import measure_training

    stage = stage_named(stage)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="rsna22-bench-train-"))
    data_dir = Path(data_dir) if data_dir else synthetic_competition(work_dir, n_studies, image_size, segmented=1.0)
    prepare_inputs(work_dir, data_dir, profile)
    overrides = {**(overrides or {}), "device": device}
    known = [row["variant"] for row, _ in stage_configs(stage, profile, {})]
    unknown = sorted(set(variants or []) - set(known))
    if unknown:
        raise ValueError(f"{stage} in profile {profile!r} has no variant {', '.join(unknown)}; it has: {', '.join(known) or '(none)'}")
    rows = []
    for variant in [v for v in known if not variants or v in variants]:
        cfg = resolve_run_config(stage, profile, variant, work_dir, overrides)
        training = stage_training(cfg, profile, overrides)
        logger.info("bench-train %s %s: %d training items", stage, variant or "-", len(training.train_dataset))
        measured = measure_training(training, network_images, n_steps=steps, data_only=data_only)
        extra = {"backbone": training.cfg.backbone, "input_px": input_size(training.cfg), "steps": steps, "torch": torch.__version__}
        rows.append({"stage": stage, "variant": variant, **measured, **extra})
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The table, one line per variant, and which part bounds each."""
    import pandas as pd

    table = pd.DataFrame(rows)
    shown = ["stage", "variant", "backbone", "input_px", "batch_size", "num_workers", "data_img_s_per_worker", "data_img_s"]
    shown += ["network_img_s", "trainer_img_s", "bottleneck", "amp_dtype", "autocast_dtype", "channels_last", "deterministic", "device"]
    print("images/s, a window of n images counts n (steady state after a warm-up; data: the trainer's loader alone)")
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:,.1f}"))


def _bench_train(args: argparse.Namespace) -> int:
    from rsna22_utils.core.config import parse_overrides

    try:
        stage = stage_named(args.stage)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = bench_train(
        stage,
        args.profile,
        args.variants,
        args.device,
        args.steps,
        args.data_dir,
        args.work_dir,
        args.data_only,
        parse_overrides(args.params),
        args.studies,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_rows(rows)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """bench-train."""
    p = subparsers.add_parser("bench-train", help="steady-state img/s of a training stage: its data alone, its network alone, both")
    p.add_argument("stage", help="a training stage, by name or number (01, 03, 05, 06)")
    p.add_argument("--profile", default="original", help="a shipped profile (original, demo) or a .json path")
    p.add_argument("--variants", nargs="*", default=None, help="the variants to measure (default: every variant of the stage)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (data: as many batches) after 2 warm-up ones")
    p.add_argument("--data-dir", type=Path, default=None, help="competition folder (default: generate a small 512 px synthetic one)")
    p.add_argument("--work-dir", type=Path, default=None, help="runs folder: prepared inputs are made here once and reused (default: temp)")
    p.add_argument("--studies", type=int, default=SYNTHETIC_STUDIES, help="train studies of the generated competition")
    p.add_argument("--data-only", action="store_true", help="measure the data alone (no network step)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per variant")
    p.add_argument(
        "-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="setting of every stage that has it"
    )
    p.set_defaults(func=_bench_train)
