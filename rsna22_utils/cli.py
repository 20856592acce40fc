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
    "rsna22_utils.cervical.bench.decode",
    "rsna22_utils.cervical.bench.epoch",
    "rsna22_utils.cervical.bench.backbones",
    "rsna22_utils.cervical.bench.cost",
    "rsna22_utils.cervical.bench.inference",
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
    if args.command == "predict":
        from rsna22_utils.cervical.submission import run_cli

        return run_cli(args)
    if args.command == "demo":
        from rsna22_utils.cervical.demo import parse_demo_overrides, run_demo

        overrides = parse_demo_overrides(args.params)
        run_demo(args.out, n_studies=args.studies, image_size=args.image_size, seed=args.seed, overrides=overrides)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
