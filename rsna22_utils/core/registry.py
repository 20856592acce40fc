"""The stage registry and the run-folder layout: the one table every part of the kit reads.

A competition package (`rsna22_utils.<name>` with a `stages` module) registers its stages in order
(`register(Stage(...))`); the config system, the runner, the Kaggle metadata, the demo, the notebook
checks and the tests all read `stages()`, the stages of the selected competition
(`select_competition`, `--competition NAME` on the command line, else $RSNA22_KIT_COMPETITION, else
cervical). Importing this module imports no competition and no torch: a stage names its function as
"module:function", imported when the stage runs.

Run folders (the only place that knows their names):

    {work_dir}/{stage}/                       a stage that runs once
    {work_dir}/{stage}/fold{f}-seed{s}/       one run of a per-fold stage
    {work_dir}/{stage}/{variant}-fold{f}-seed{s}/   one run of a named variant of it (a profile's
                                              several models for one stage, e.g. two backbones)

Fold -1 is a full-data run: it trains on every fold and validates on none.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from rsna22_utils.core.config import FULL_DATA_FOLD, VARIANT_NAME
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.files import run_lock
from rsna22_utils.core.paths import NOTEBOOKS_DIR

# The competition whose stages the kit runs: a package `rsna22_utils.<name>` whose `stages` module registers
# them. The selection is also written to this environment variable, so notebook kernels and subprocesses
# (papermill, torchrun) run the same competition.
COMPETITION_ENV = "RSNA22_KIT_COMPETITION"
DEFAULT_COMPETITION = "cervical"
_PACKAGE_ROOT = "rsna22_utils"

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RUNS_FILE = "_runs.json"  # {work_dir}/{stage}/: the runner's record of its last sweep of the stage (core.runner)
MANIFEST = "manifest.json"  # the weights dataset's list of the runs it ships (core.kaggle)
_RUN_NAME = re.compile(r"^(?:(?P<variant>[A-Za-z0-9_]+)-)?fold(?P<fold>-?\d+)-seed(?P<seed>\d+)$")


@dataclass(frozen=True)
class Stage:
    """One stage: its config class, the function that runs it, and how its runs are laid out."""

    name: str  # also the notebook's name ({notebooks_dir}/{name}.py) and the folder under work_dir
    config: type  # the stage's config dataclass (core.config groups)
    function: str  # "module:function" taking the resolved config, returning its results (a dict of metrics, a table)
    per_fold: bool = False  # one run per fold x seed, else one run
    prepares: bool = False  # prepares the data every later stage reads (their `prepared_dir`); one stage per competition
    trains: bool = False  # writes weights (its runs can be loaded with core.runs.load_run)
    submission: bool = False  # the Kaggle submission loads this stage's runs (they go in the weights dataset)
    kaggle_internet: bool = True  # its Kaggle kernel may use the internet (a code-competition submission may not)
    # settings that a saved config.json may lack because the run predates them, with the value
    # that reproduces how such a run was trained
    older_run_defaults: dict[str, Any] = field(default_factory=dict)
    # "module:function": config -> the stage's network with random weights (`config show --count-params`)
    network: str = ""
    # "module:function": config -> a copy with its derived fields as the stage would fill them from the
    # earlier stages of the config's profile (`config show` before anything has run)
    preview: str = ""
    notebooks_dir: Path = NOTEBOOKS_DIR  # where the competition keeps its stage notebooks
    # files of a once-run stage that the submission reads ({work_dir}/{stage}/{file}); the weights dataset ships them
    submission_files: tuple[str, ...] = ()

    @property
    def notebook(self) -> Path:
        return Path(self.notebooks_dir) / f"{self.name}.py"

    def call(self, which: str, cfg: Any) -> Any:
        """Call one of the stage's "module:function" hooks (`function`, `network`, `preview`) on a config."""
        target = getattr(self, which)
        if not target:
            raise ValueError(f"stage {self.name!r} has no {which} hook")
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(cfg)

    def run(self, cfg: Any) -> Any:
        """Run the stage function on a resolved config, holding the run folder's lock (a second process on
        the same run stops), every random number generator seeded from the run's seed first (networks
        are built before the trainer starts: their initial weights too)."""
        from rsna22_utils.core.device import seed_everything  # lazy: imports torch, which the registry never needs otherwise

        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        # one process per run folder (under torchrun the first rank holds it for the group)
        lock = run_lock(cfg.out_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
        with lock:
            seed_everything(getattr(cfg, "seed", 0))
            return self.call("function", cfg)


_STAGES: dict[str, dict[str, Stage]] = {}  # competition package -> its stages in pipeline order
_selected: str | None = None


def competition_package(name: str) -> str:
    """The package `rsna22_utils.<name>` of a competition `<name>` (a full package name, as older settings give it, is kept)."""
    name = name.strip()
    return name if name.startswith(_PACKAGE_ROOT + ".") else f"{_PACKAGE_ROOT}.{name}"


def available_competitions() -> list[str]:
    """Short names of the packages under rsna22_utils that have a `stages` module."""
    root = importlib.import_module(_PACKAGE_ROOT)
    return sorted(
        info.name
        for info in pkgutil.iter_modules(root.__path__)
        if info.ispkg and importlib.util.find_spec(f"{_PACKAGE_ROOT}.{info.name}.stages") is not None
    )


def select_competition(name: str | None = None) -> str:
    """Make `name` (default: $RSNA22_KIT_COMPETITION, else cervical) the competition whose stages the kit runs.

    Returns its package. The choice is written to $RSNA22_KIT_COMPETITION so that notebook kernels and
    subprocesses started from here inherit it. An unknown name is a ConfigError naming the choices.
    """
    global _selected
    name = name or os.environ.get(COMPETITION_ENV) or DEFAULT_COMPETITION
    package = competition_package(name)
    try:
        found = importlib.util.find_spec(package + ".stages") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ValueError(
            f"unknown competition {name!r}: no package {package} with a stages module (competitions: {', '.join(available_competitions())})"
        )
    _selected = package
    os.environ[COMPETITION_ENV] = package
    return package


def competition() -> str:
    """The package of the selected competition (selected from the environment on first use)."""
    return _selected if _selected is not None else select_competition()


def register(stage: Stage, package: str | None = None) -> Stage:
    """Add a stage to a competition (default: the selected one) after its own stages (in pipeline order).

    A competition's `stages` module passes its own package, so importing it registers its stages there
    whichever competition is selected. Registering another stage under a taken name is an error.
    """
    package = competition_package(package) if package else competition()
    importlib.import_module(package + ".stages")  # its own stages first (a no-op while that module itself registers)
    table = _STAGES.setdefault(package, {})
    if stage.name in table and table[stage.name] != stage:
        raise ValueError(f"stage {stage.name!r} is already registered")
    table[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage of the selected competition (tests that register a toy stage)."""
    _STAGES.get(competition(), {}).pop(name, None)


def stages() -> dict[str, Stage]:
    """Every stage of the selected competition, in pipeline order (importing its `stages` module registers them once)."""
    package = competition()
    importlib.import_module(package + ".stages")
    return dict(_STAGES.get(package, {}))


def get_stage(name: str) -> Stage:
    """The registered stage `name`, or an error that suggests close names."""
    known = stages()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown stage {name!r}.{hint} Stages: {', '.join(known)}")
    return known[name]


def prepare_stage() -> Stage:
    """The stage that prepares the data the others read (the one registered with `prepares=True`)."""
    found = [stage for stage in stages().values() if stage.prepares]
    if len(found) != 1:
        names = ", ".join(stage.name for stage in found) or "none"
        raise ConfigError(f"competition {competition()}: exactly one stage must prepare the data (prepares=True), found {names}")
    return found[0]


# ----------------------------------------------------------------------------- run folders


def stage_dir(work_dir: str | Path, stage: str) -> Path:
    return Path(work_dir) / stage


class RunKey(NamedTuple):
    """Which run of a per-fold stage a folder holds (sorts by variant, then fold, then seed)."""

    variant: str
    fold: int
    seed: int


def run_name(fold: int, seed: int, variant: str = "") -> str:
    if not VARIANT_NAME.match(variant):
        raise ValueError(f"variant name {variant!r}: use letters, digits and _ only")
    return f"{variant + '-' if variant else ''}fold{int(fold)}-seed{int(seed)}"


def parse_run_name(name: str) -> RunKey | None:
    """(variant, fold, seed) of a run folder name, None for anything else."""
    match = _RUN_NAME.match(name)
    if not match:
        return None
    return RunKey(match.group("variant") or "", int(match.group("fold")), int(match.group("seed")))


def run_dir(work_dir: str | Path, stage: str, fold: int | None = None, seed: int | None = None, variant: str = "") -> Path:
    """Where one run of `stage` writes: a (variant-)fold x seed folder for per-fold stages, the stage folder otherwise."""
    base = stage_dir(work_dir, stage)
    if get_stage(stage).per_fold:
        if fold is None or seed is None:
            raise ValueError(f"stage {stage!r} runs per fold x seed: give both")
        return base / run_name(fold, seed, variant)
    return base


def run_dirs(work_dir: str | Path, stage: str, require: str | None = None) -> list[Path]:
    """The run folders of a per-fold stage (holding `require` when given), sorted by (variant, fold, seed)."""
    base = stage_dir(work_dir, stage)
    found = [p for p in base.glob("*fold*-seed*") if p.is_dir() and parse_run_name(p.name)]
    if require:
        found = [p for p in found if (p / require).is_file()]
    return sorted(found, key=lambda p: parse_run_name(p.name))


def out_of_fold(runs: list[Path], fold: int) -> list[Path]:
    """The runs that did not train on `fold`: those that validated on it (a run of fold f trains on
    every other fold; a full-data run, fold -1, trained on every fold and serves the test set only)."""
    keys = {run: parse_run_name(run.name) for run in runs}
    return [run for run, key in keys.items() if key is not None and key.fold == fold != FULL_DATA_FOLD]


def out_of_fold_runs(runs: list[Path], folds: list[int], stage: str) -> dict[int, list[Path]]:
    """`out_of_fold(runs, f)` of every fold in `folds`: the runs of `stage` that predict the fold's studies
    without having trained on them; a fold with none is an error that names it and how to train it."""
    chosen = {fold: out_of_fold(runs, fold) for fold in folds}
    missing = [fold for fold, found in chosen.items() if not found]
    if missing:
        listed = " ".join(map(str, missing))
        raise ValueError(
            f"out_of_fold: no finished {stage} run of fold(s) {listed}, so their training studies have no model that did "
            f"not train on them (a run of fold f trains on every other fold; runs found: {', '.join(r.name for r in runs)}); "
            f"train those folds (python -m rsna22_utils run {stage} --folds {listed}) or set out_of_fold=false"
        )
    return chosen


def serving_runs(runs: list[Path]) -> list[Path]:
    """The runs that predict unseen (test) studies: the full-data runs (fold -1) when there are any, as
    in the original's submission; otherwise every cross-validation run."""
    full = [run for run in runs if (key := parse_run_name(run.name)) is not None and key.fold == FULL_DATA_FOLD]
    return full or list(runs)


def expected_runs(weights_dir: str | Path, stage: str) -> tuple[list[str], Path] | None:
    """The run folders of `stage` a weights folder should hold, and the file that says so: the weights
    dataset's manifest.json, else the runner's record of the stage's last sweep (`<stage>/_runs.json`,
    failed runs included); None when neither exists. Why: a deleted or failed run otherwise shrinks the
    ensemble that `finished_runs` finds without a word."""
    root = Path(weights_dir)
    for source in (root / MANIFEST, stage_dir(root, stage) / RUNS_FILE):
        if not source.is_file():
            continue
        try:
            entries = json.loads(source.read_text())["runs"]
            if source.name == MANIFEST:
                entries = [entry for entry in entries if entry["stage"] == stage]
            names = [run_name(entry["fold"], entry["seed"], entry.get("variant") or "") for entry in entries if entry["fold"] is not None]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{source}: not a list of runs ({type(error).__name__}: {error})") from error
        return names, source
    return None


def finished_runs(work_dir: str | Path, stage: str) -> list[Path]:
    """Run folders that hold final weights and their config, sorted (variant, fold, seed); an error when none does."""
    runs = run_dirs(work_dir, stage, require=WEIGHTS)
    missing = [r for r in runs if not (r / CONFIG).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: {WEIGHTS} without {CONFIG}")
    if not runs:
        raise FileNotFoundError(f"{stage_dir(work_dir, stage)}: no finished run (fold*-seed*/{WEIGHTS}); train {stage} first")
    return runs


def execute(stage: str, cfg: Any) -> Any:
    """Run one stage with its resolved config (what notebooks and `python -m rsna22_utils train` do)."""
    return get_stage(stage).run(cfg)
