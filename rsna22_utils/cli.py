"""Command line: `python -m rsna22_utils [--competition NAME] COMMAND ...` (also installed as `rsna22`).

Every command is registered by the module that owns it (`add_commands(subparsers)`): the core's
modules and the selected competition's (`COMMAND_MODULES` beside its stage table). Those modules
import their heavy dependencies lazily, so `--help` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rsna22_utils import setup_logging
from rsna22_utils.core.registry import (
    COMPETITION_ENV,
    DEFAULT_COMPETITION,
    available_competitions,
    competition,
    competition_package,
    select_competition,
)

CORE_COMMAND_MODULES: tuple[str, ...] = (
    "rsna22_utils.core.scan",
    "rsna22_utils.core.runner",
    "rsna22_utils.core.resolve",
    "rsna22_utils.core.notebooks",
    "rsna22_utils.core.kaggle",
    "rsna22_utils.core.weights",
    "rsna22_utils.core.score",
)


def command_modules() -> tuple[str, ...]:
    """The core's command modules, then the selected competition's."""
    stages_module = importlib.import_module(competition() + ".stages")
    return CORE_COMMAND_MODULES + tuple(getattr(stages_module, "COMMAND_MODULES", ()))


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--competition",
        default=None,
        metavar="NAME",
        help=f"the competition whose stages and commands to use ({', '.join(available_competitions())}; "
        f"default: ${COMPETITION_ENV}, else {DEFAULT_COMPETITION})",
    )


def _parser() -> argparse.ArgumentParser:
    """The full parser: global options and every command of the core and of the selected competition."""
    parser = argparse.ArgumentParser(prog="python -m rsna22_utils", description=__doc__, allow_abbrev=False)
    _add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():  # each parser sets func=callable(args) -> exit code
        importlib.import_module(module).add_commands(subparsers)
    _accept_competition(subparsers)
    return parser


def _accept_competition(subparsers: argparse._SubParsersAction) -> None:
    """`COMMAND [SUBCOMMAND] --competition NAME` too (main reads it before parsing; a nested command's own
    parser takes the arguments after its name)."""
    for command in subparsers.choices.values():
        nested = [action for action in command._actions if isinstance(action, argparse._SubParsersAction)]
        for action in nested:
            _accept_competition(action)
        if not nested:
            command.add_argument("--competition", default=argparse.SUPPRESS, metavar="NAME", help="the competition (as the global option)")


def _selected_competition(argv: list[str]) -> str | None:
    """`--competition NAME` from the command line, read before the commands are known."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_global_options(early)
    known, _ = early.parse_known_args(argv)
    return known.competition


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        select_competition(_selected_competition(argv))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = _parser()
    args = parser.parse_args(argv)
    if args.competition and competition_package(args.competition) != competition():  # e.g. an abbreviated `--comp`
        parser.error(f"--competition {args.competition}: give the option in full (the commands were chosen for {competition()})")
    setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
