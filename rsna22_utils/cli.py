"""Command line: `python -m rsna22_utils COMMAND ...` (also installed as `rsna22`).

Each command imports its module lazily so `--help` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rsna22_utils", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic competition in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="folder to create (must be empty or absent)")
    p.add_argument("--studies", type=int, default=40, help="number of train studies")
    p.add_argument("--test-studies", type=int, default=None, help="number of test studies (default: studies // 10, at least 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="rows = cols of every slice (Kaggle: 512)")
    p.add_argument("--slices", type=int, default=None, help="median slices per study (default scales with image size)")
    p.add_argument("--segmented", type=float, default=0.5, help="fraction of train studies that get a NIfTI segmentation")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")

    p = sub.add_parser("scan", help="read every study's DICOM headers into one table (one row per slice)")
    p.add_argument("data_dir", type=Path, help="competition folder holding train_images/ and/or test_images/")
    p.add_argument("--out", type=Path, required=True, help="output .parquet (or .csv)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")

    p = sub.add_parser("bench-decode", help="decode speed (ms/slice, one core) of dicomsdl vs pydicom")
    p.add_argument("paths", type=Path, nargs="*", help="DICOM files or study folders (default: every real study in ../shared/realdata)")
    p.add_argument("--repeat", type=int, default=5)

    p = sub.add_parser("bench-epoch", help="one training epoch from the study cache vs decoding DICOMs, side by side")
    p.add_argument("--data-dir", type=Path, default=None, help="competition folder (default: generate a 512 px synthetic one)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the cache (and generated data) go (default: a temp folder)")
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--cache-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    p.add_argument("--repeat", type=int, default=3, help="data passes per source (the median is reported)")

    p = sub.add_parser("demo", help="synthetic competition -> every stage of the pipeline -> report")
    p.add_argument("--out", type=Path, default=Path("demo"), help="working folder of the demo")
    p.add_argument("--studies", type=int, default=60)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "-p",
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="[STAGE:]KEY=VALUE",
        help="change the demo profile: KEY=VALUE for every stage that has KEY, STAGE:KEY=VALUE for one (repeatable)",
    )

    p = sub.add_parser("train", help="run one stage with a config (torchrun-compatible): train STAGE -p key=value ...")
    p.add_argument("stage", help="stage name, e.g. 01_train_box (also the infer stages and 00_prepare)")
    p.add_argument("--profile", default=None, help="start from a profile's settings (original, demo); -p values apply on top")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="07_inference: test DICOMs -> every box + study model -> submission.csv")
    p.add_argument("--data-dir", type=Path, default=None, help="competition folder with test.csv, test_images/ (default: Kaggle's)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder <stage>/fold<f>-seed<s>/, e.g. runs (default: Kaggle's)")
    p.add_argument("--out", type=Path, default=None, help="submission.csv to write (default: /kaggle/working/submission.csv)")
    p.add_argument("--profile", default=None, help="start from a profile's 07_inference settings (original, demo)")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="07_inference config override")

    p = sub.add_parser(
        "bench-inference",
        help="per-study seconds of decode / preprocessing / models + projection to the test set (trained runs, or a profile's ensemble)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="competition folder with test_images/ (or train_images/)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder <stage>/fold<f>-seed<s>/, e.g. runs")
    p.add_argument("--studies", type=int, default=5)
    p.add_argument(
        "--profile", default=None, help="instead of --data-dir / --weights: a profile's ensemble (random weights) on a synthetic study"
    )
    p.add_argument("--slices", type=int, default=24, help="--profile: slices of the synthetic study measured")
    p.add_argument("--device", default="auto", help="--profile: where to measure (auto: cuda when present, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="--profile: also write the tables as JSON")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="--profile: setting overrides")

    p = sub.add_parser("bench-backbones", help="training / inference images per second and parameters of the 3rd place's networks")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--batch-images", type=int, default=64, help="images per step (sequence networks: windows of --seq-len)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backbones", nargs="*", default=None, metavar="FAMILY:NAME", help="e.g. box:efficientnet_b1 sequence:resnest50d")

    p = sub.add_parser("bench-cost", help="expected training cost of a profile: runs, images, FLOPs, measured img/s, GPU hours per stage")
    p.add_argument("--profile", default="original", help="a shipped profile (original, demo) or a .json path")
    p.add_argument("--device", default="auto", help="where to measure training images/s (auto: cuda when present, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    p.add_argument("--measure-images", type=int, default=2, help="images per measured training step (few: keeps CPU runs short)")
    p.add_argument("--measure-size", type=int, default=None, help="px of the measured step (default: the config's, 512 in original)")
    p.add_argument("--stages", nargs="*", default=None, help="training stages to cost (default: 01 03 05 06)")
    p.add_argument(
        "-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="setting of every stage that has it"
    )

    # Modules that own their commands register them here (each parser sets func=callable(args) -> int).
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


# Imported when the parser is built, so they must import their heavy dependencies lazily.
COMMAND_MODULES: tuple[str, ...] = (
    "rsna22_utils.core.kaggle",
    "rsna22_utils.core.runner",
    "rsna22_utils.core.notebooks",
    "rsna22_utils.core.profiles",
    "rsna22_utils.core.weights",
)


def _train(args: argparse.Namespace) -> int:
    import json

    from rsna22_utils.core.config import parse_overrides, resolve_config
    from rsna22_utils.core.registry import execute

    overrides = parse_overrides(args.params)
    if args.profile:
        overrides["profile"] = args.profile
    cfg = resolve_config(args.stage, overrides)
    metrics = execute(args.stage, cfg)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank gets here; one line is enough
        logging.getLogger("rsna22_utils").info("%s done (%s): %s", args.stage, cfg.out_dir, json.dumps(summary, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    from rsna22_utils import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if getattr(args, "func", None) is not None:
        return int(args.func(args) or 0)
    if args.command == "synth":
        from rsna22_utils.cervical.synth import generate_competition

        generate_competition(
            args.out,
            n_studies=args.studies,
            n_test_studies=args.test_studies,
            seed=args.seed,
            image_size=args.image_size,
            median_slices=args.slices,
            segmented_fraction=args.segmented,
            workers=args.workers,
        )
        return 0
    if args.command == "scan":
        from rsna22_utils.core.scan import scan_competition

        failures = scan_competition(args.data_dir, args.out, workers=args.workers)
        return 1 if failures and not args.out.exists() else 0
    if args.command == "bench-decode":
        from rsna22_utils.cervical.bench import bench_decode

        bench_decode(args.paths, repeat=args.repeat)
        return 0
    if args.command == "bench-epoch":
        from rsna22_utils.cervical.bench import bench_epoch

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
    if args.command == "predict":
        from rsna22_utils.cervical.submission import run_cli

        return run_cli(args)
    if args.command == "bench-backbones":
        from rsna22_utils.cervical.bench import ORIGINAL_BACKBONES, bench_backbones

        chosen = tuple(tuple(b.split(":", 1)) for b in args.backbones) if args.backbones else ORIGINAL_BACKBONES
        bench_backbones(chosen, args.image_size, args.batch_images, args.seq_len, args.device, steps=args.steps)
        return 0
    if args.command == "bench-cost":
        from rsna22_utils.cervical.bench import bench_cost
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
    if args.command == "bench-inference":
        from rsna22_utils.cervical.bench import bench_inference, bench_submission
        from rsna22_utils.core.config import parse_overrides

        if args.profile:
            bench_submission(args.profile, n_slices=args.slices, device=args.device, overrides=parse_overrides(args.params), out=args.out)
            return 0
        if args.data_dir is None or args.weights is None:
            print("error: bench-inference needs --data-dir and --weights (trained runs), or --profile NAME", file=sys.stderr)
            return 2
        bench_inference(args.data_dir, args.weights, n_studies=args.studies)
        return 0
    if args.command == "demo":
        from rsna22_utils.cervical.demo import parse_demo_overrides, run_demo

        overrides = parse_demo_overrides(args.params)
        run_demo(args.out, n_studies=args.studies, image_size=args.image_size, seed=args.seed, overrides=overrides)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
