"""The intracranial competition's commands: `synth` and `demo` (the `score` command is the core's).

The modules that do the work (pydicom, pandas, torch) are imported only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rsna22_utils.core.demo import add_demo_command


def _cmd_synth(args: argparse.Namespace) -> int:
    from rsna22_utils.intracranial.synth import generate_competition  # lazy: loads pydicom

    generate_competition(
        args.out, n_studies=args.studies, n_test_studies=args.test_studies, seed=args.seed, image_size=args.image_size, workers=args.workers
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from rsna22_utils.core.demo import parse_demo_overrides
    from rsna22_utils.intracranial.demo import run_demo  # lazy: loads pandas

    run_demo(args.out, n_studies=args.studies, image_size=args.image_size, seed=args.seed, overrides=parse_demo_overrides(args.params))
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `synth` and `demo` to the CLI."""
    p = subparsers.add_parser("synth", help="write a synthetic RSNA 2019 competition in the Kaggle layout (stage_2_*)")
    p.add_argument("--out", type=Path, required=True, help="folder to create (must be empty or absent)")
    p.add_argument("--studies", type=int, default=40, help="number of train studies")
    p.add_argument("--test-studies", type=int, default=None, help="number of test studies (default: studies // 10, at least 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=512, help="rows = cols of every image (Kaggle: 512)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)

    add_demo_command(
        subparsers, _cmd_demo, out="demo-ich", image_size=128, image_size_help="px of the generated images (the generator's default is 512)"
    )
