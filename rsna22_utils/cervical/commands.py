"""The competition's commands `synth`, `demo` and `predict` (the bench-* commands live in `cervical.bench`).

Their parsers are built here, and the modules that do the work (which load pydicom, pandas, torch)
are imported only when the command runs, so that building the CLI (`--help`, light commands) stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rsna22_utils.core.demo import add_demo_command


def _cmd_synth(args: argparse.Namespace) -> int:
    from rsna22_utils.cervical.synth import generate_competition  # lazy: loads pydicom

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


def _cmd_demo(args: argparse.Namespace) -> int:
    from rsna22_utils.cervical.demo import run_demo  # lazy: loads pandas
    from rsna22_utils.core.demo import parse_demo_overrides

    overrides = parse_demo_overrides(args.params)
    run_demo(args.out, n_studies=args.studies, image_size=args.image_size, seed=args.seed, overrides=overrides)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from rsna22_utils.cervical.submission import run_cli  # lazy: loads torch

    return run_cli(args)


def add_commands(subparsers: Any) -> None:
    """Add `synth`, `demo` and `predict` to the CLI."""
    _add_synth(subparsers)
    _add_demo(subparsers)
    _add_predict(subparsers)


def _add_predict(subparsers: Any) -> None:
    p = subparsers.add_parser("predict", help="07_inference: test DICOMs -> every box + study model -> submission.csv")
    p.add_argument("--data-dir", type=Path, default=None, help="competition folder with test.csv, test_images/ (default: Kaggle's)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder <stage>/fold<f>-seed<s>/, e.g. runs (default: Kaggle's)")
    p.add_argument("--out", type=Path, default=None, help="submission.csv to write (default: /kaggle/working/submission.csv)")
    p.add_argument("--profile", default=None, help="start from a profile's 07_inference settings (original, demo)")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="07_inference config override")
    p.set_defaults(func=_cmd_predict)


def _add_synth(subparsers: Any) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic competition in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="folder to create (must be empty or absent)")
    p.add_argument("--studies", type=int, default=40, help="number of train studies")
    p.add_argument("--test-studies", type=int, default=None, help="number of test studies (default: studies // 10, at least 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="rows = cols of every slice (Kaggle: 512)")
    p.add_argument("--slices", type=int, default=None, help="median slices per study (default scales with image size)")
    p.add_argument("--segmented", type=float, default=0.5, help="fraction of train studies that get a NIfTI segmentation")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)


def _add_demo(subparsers: Any) -> None:
    # studies: cervical.demo.DEMO_STUDIES (why 90: there), spelt here so that building the CLI does not load pandas
    add_demo_command(subparsers, _cmd_demo, out="demo", image_size=96, studies=90)
