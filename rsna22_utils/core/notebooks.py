"""Keep the stage notebooks' two forms in sync: `notebooks/<stage>.py` and `notebooks/<stage>.ipynb`.

The `.py` (Jupytext percent format) is the source of truth that people review in diffs; the
paired `.ipynb` is what Kaggle and papermill run. `check_pairs` says where the two disagree
(cell types, sources and tags; outputs, execution counts and other metadata are ignored),
`sync_pairs` rewrites each `.ipynb` from its `.py` with outputs stripped, and `check_thin`
checks that every notebook has exactly one cell tagged `parameters` for papermill.

`start_stage` is what a stage notebook calls after its parameters cell: logging, the resolved
config, one call that runs the stage, and the config as the run saved it.

Command line: `python -m rsna22_utils notebooks check` / `python -m rsna22_utils notebooks sync`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsna22_utils import setup_logging
from rsna22_utils.core.paths import NOTEBOOKS_DIR
from rsna22_utils.core.registry import CONFIG, execute
from rsna22_utils.core.resolve import load_config, resolve_config

logger = logging.getLogger(__name__)

SYNC_HINT = "python -m rsna22_utils notebooks sync"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _read(path: Path) -> Any:
    """A notebook read with jupytext (either form), with an error that names the file."""
    import jupytext  # lazy: CLI start-up (jupytext loads nbformat)

    try:
        return jupytext.read(path)
    except Exception as error:  # jupytext / nbformat raise many kinds
        raise ValueError(f"{path}: cannot read notebook ({type(error).__name__}: {error})") from error


def _normalise_source(source: str | list[str]) -> str:
    if isinstance(source, list):
        source = "".join(source)
    return "\n".join(line.rstrip() for line in source.strip("\n").splitlines())


def cell_signature(nb: Any) -> list[tuple[str, str, tuple[str, ...]]]:
    """(type, source, tags) of every cell: what must agree between the .py and the .ipynb."""
    return [(cell.cell_type, _normalise_source(cell.source), tuple(cell.get("metadata", {}).get("tags", ()))) for cell in nb.cells]


def _first_difference(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"{len(a)} cells in the .py, {len(b)} in the .ipynb"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            what = "type" if x[0] != y[0] else "source" if x[1] != y[1] else "tags"
            return f"cell {i} differs ({what})"
    return "no difference"


def pair_paths(notebooks_dir: Path) -> dict[str, tuple[Path, Path]]:
    """stage -> (.py, .ipynb) for every notebook stem in the folder (either file may be missing)."""
    notebooks_dir = Path(notebooks_dir)
    stems = {p.stem for p in notebooks_dir.glob("*.py")} | {p.stem for p in notebooks_dir.glob("*.ipynb")}
    stems = {s for s in stems if not s.startswith((".", "_"))}
    return {s: (notebooks_dir / f"{s}.py", notebooks_dir / f"{s}.ipynb") for s in sorted(stems)}


def check_pairs(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    """Problems (one line each, naming the file and the fix) where .py and .ipynb disagree; empty = in sync."""
    problems = []
    for py, ipynb in pair_paths(notebooks_dir).values():
        if not py.exists():
            problems.append(f"{ipynb}: no paired {py.name}; run `{SYNC_HINT}` to create it from the .ipynb")
            continue
        if not ipynb.exists():
            problems.append(f"{py}: no paired {ipynb.name}; run `{SYNC_HINT}` to build it")
            continue
        try:
            a, b = cell_signature(_read(py)), cell_signature(_read(ipynb))
        except ValueError as error:
            problems.append(str(error))
            continue
        if a != b:
            problems.append(
                f"{py}: out of sync with {ipynb.name} ({_first_difference(a, b)}); the .py is the source "
                f"of truth: run `{SYNC_HINT}` to rewrite the .ipynb"
            )
    return problems


def _clean_for_ipynb(nb: Any) -> Any:
    """Strip outputs / execution counts and set the generic python3 kernelspec."""
    for i, cell in enumerate(nb.cells):
        # Deterministic ids, so rewriting an unchanged cell does not show up in diffs.
        cell["id"] = f"c{i:02d}-" + hashlib.sha1(_normalise_source(cell.source).encode()).hexdigest()[:8]
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


def write_ipynb(py: Path, ipynb: Path) -> bool:
    """Write `ipynb` from the percent-format `py` unless it already matches; True when written."""
    import jupytext  # lazy: CLI start-up (jupytext loads nbformat)

    nb = _clean_for_ipynb(_read(Path(py)))
    ipynb = Path(ipynb)
    if ipynb.exists():
        try:
            old = _read(ipynb)
        except ValueError:
            old = None
        if (
            old is not None
            and cell_signature(old) == cell_signature(nb)
            and old.metadata.get("kernelspec", {}).get("name") == KERNELSPEC["name"]
            and not any(c.get("outputs") for c in old.cells)
        ):
            return False
    jupytext.write(nb, ipynb)
    logger.info("wrote %s from %s", ipynb, py.name)
    return True


def sync_pairs(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """Rewrite every .ipynb from its .py (a lone .ipynb gets its .py created); the paths written."""
    import jupytext  # lazy: CLI start-up (jupytext loads nbformat)

    changed = []
    for py, ipynb in pair_paths(notebooks_dir).values():
        if not py.exists():
            nb = _read(ipynb)
            jupytext.write(nb, py, fmt="py:percent")
            logger.info("wrote %s from %s (no .py existed)", py, ipynb.name)
            changed.append(py)
            if write_ipynb(py, ipynb):  # strip outputs of the lone .ipynb too
                changed.append(ipynb)
        elif write_ipynb(py, ipynb):
            changed.append(ipynb)
    if not changed:
        logger.info("%s: every notebook pair already in sync", notebooks_dir)
    return changed


@dataclass
class StageSession:
    """One stage run from a notebook: its resolved config, the run, and the config the run saved."""

    stage: str
    config: Any

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    def run(self) -> Any:
        """Run the stage (its registered function) on this config."""
        return execute(self.stage, self.config)

    @property
    def saved_config(self) -> Any:
        """The run's config.json (derived values filled in), or the resolved config when the stage saves none."""
        path = self.out_dir / CONFIG
        return load_config(path) if path.is_file() else self.config


def start_stage(stage: str, overrides: dict[str, Any] | None = None, profile: str = "", variant: str = "", **run: Any) -> StageSession:
    """A notebook's set-up: show the kit's log lines, resolve the stage's config (`run`: fold / seed).

    `profile` / `variant` (the notebook's parameters) apply unless `overrides` name their own (the runner's).
    """
    setup_logging()
    values = {**(overrides or {}), **run}
    for key, value in (("profile", profile), ("variant", variant)):
        if value:
            values.setdefault(key, value)
    return StageSession(stage, resolve_config(stage, values))


def check_thin(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    """Problems where a notebook does not have exactly one code cell tagged `parameters` (papermill needs it)."""
    problems = []
    for py, ipynb in pair_paths(notebooks_dir).values():
        path = py if py.exists() else ipynb
        try:
            nb = _read(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", ())]
        if len(tagged) != 1:
            problems.append(
                f"{path}: {len(tagged)} cells tagged `parameters` (need exactly one, a code cell "
                f'starting with `# %% tags=["parameters"]` holding fold/seed/overrides literals)'
            )
        elif nb.cells[tagged[0]].cell_type != "code":
            problems.append(f"{path}: the cell tagged `parameters` (cell {tagged[0]}) is not a code cell")
    return problems


def _cmd_check(args: argparse.Namespace) -> int:
    problems = check_pairs(args.dir) + check_thin(args.dir)
    for problem in problems:
        logger.error("%s", problem)
    if not problems:
        logger.info("%s: %d notebook pairs in sync, each with one parameters cell", args.dir, len(pair_paths(args.dir)))
    return 1 if problems else 0


def _cmd_sync(args: argparse.Namespace) -> int:
    sync_pairs(args.dir)
    problems = check_thin(args.dir)
    for problem in problems:
        logger.warning("%s", problem)
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `notebooks check` and `notebooks sync` to the CLI."""
    p = subparsers.add_parser("notebooks", help="check / sync the notebooks' .py and .ipynb pairs")
    sub = p.add_subparsers(dest="notebooks_command", required=True)
    c = sub.add_parser("check", help="exit 1 when a .py and its .ipynb disagree or a parameters cell is missing")
    c.add_argument("--dir", type=Path, default=NOTEBOOKS_DIR, help="notebooks folder (default: the repo's)")
    c.set_defaults(func=_cmd_check)
    s = sub.add_parser("sync", help="rewrite each .ipynb from its .py (outputs stripped)")
    s.add_argument("--dir", type=Path, default=NOTEBOOKS_DIR, help="notebooks folder (default: the repo's)")
    s.set_defaults(func=_cmd_sync)
