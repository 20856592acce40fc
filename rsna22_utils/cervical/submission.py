"""Kaggle inference (07_inference): test DICOMs -> the ensemble (`ensemble.py`) -> submission.csv, under Kaggle's rules.

    python -m rsna22_utils predict --data-dir D --weights W --out submission.csv [-p key=value]

Every study of `test.csv`, in the order of the file, is decoded and predicted by the ensemble
(`ensemble.py`: box models -> study box -> crops -> study models). This module is the policy around it.

Before the first study, a pre-flight (`preflight`) fails the run with one SetupError when anything
the loop needs is missing: a decoder for a transfer syntax of the test studies, the weights folder,
a box or study run, or a model that does not run (every model, flip TTA included, on a synthetic
study of a real study's size). Kaggle's public test.csv, whose 3 studies have no images, still
loads and self-tests the models before its rows get the prior.

After that the submission degrades per study: a study that cannot be read or predicted gets the
train prevalence (one warning line naming the study and the reason), unless more studies fail than
`max_failed_fraction` allows (or all do): then TooManyFailures fails the run rather than submit
priors. The time budget (`TimeBudget`) picks, before each study, the full ensemble, one box + one
study model without TTA, or, as the last resort, the prior. The log ends with a summary: studies
in full / reduced / prior, and why.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from rsna22_utils.cervical.anatomy import TARGETS
from rsna22_utils.cervical.configs import SubmissionConfig
from rsna22_utils.cervical.ensemble import (
    DecodedStudy,
    Ensemble,
    UnpredictableStudy,
    encode_volume,
    iter_studies,
    load_ensemble,
    predict_study,
)
from rsna22_utils.cervical.metric import TRAIN_PREVALENCE
from rsna22_utils.cervical.stages import INFERENCE, TRAIN_BOX, TRAIN_STUDY
from rsna22_utils.core.config import parse_overrides
from rsna22_utils.core.decoders import decoder_problems, transfer_syntax
from rsna22_utils.core.device import resolve_device
from rsna22_utils.core.dicom import TRANSFER_SYNTAX_NAMES, study_folder_problem
from rsna22_utils.core.registry import CONFIG, MANIFEST, RUNS_FILE, WEIGHTS, expected_runs, run_dirs, serving_runs
from rsna22_utils.core.resolve import resolve_config

logger = logging.getLogger(__name__)

PROBABILITY_CLIP = 1e-6  # submitted values lie in [clip, 1 - clip], strictly inside (0, 1)


# --------------------------------------------------------------------------- time budget


class TimeBudget:
    """Chooses, before each study, the full ensemble, the reduced one, or the prior, from what the rest would cost.

    Seconds per study in a mode are the median over steady-state studies of that mode: the first
    `warmup` studies of the run (worker start-up, first-call warm-up) are left out, so one slow
    start cannot lock the run into reduced mode. Re-evaluated before every study, so the run goes
    back to full mode when time allows again:

    full     when every remaining study fits in full (or no steady-state full study was timed yet);
    reduced  otherwise (one box + one study model, no flip TTA), while one more reduced study fits;
    prior    the last resort, for the studies left once not even one reduced study fits.
    """

    def __init__(
        self,
        budget_s: float,
        n_studies: int,
        clock: Callable[[], float] = time.perf_counter,
        start: float | None = None,
        warmup: int = 1,
    ) -> None:
        self.budget_s, self.n_studies, self.clock, self.warmup = budget_s, n_studies, clock, warmup
        self.start = clock() if start is None else start
        self.mode = "full"
        self.times: dict[str, list[float]] = {"full": [], "reduced": []}
        self.recorded = 0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def per_study(self, mode: str) -> float | None:
        """Median steady-state seconds of one study in `mode`; None before any was timed."""
        times = self.times[mode]
        return float(np.median(times)) if times else None

    def decide(self, done: int) -> str:
        """The mode for study number `done` (0-based); logs each change with its reason."""
        left, remaining = self.budget_s - self.elapsed(), self.n_studies - done
        full, reduced = self.per_study("full"), self.per_study("reduced")
        if left <= 0:
            mode, why = "prior", f"elapsed {self.elapsed():.0f} s is past the budget of {self.budget_s:.0f} s"
        elif full is None or remaining * full <= left:
            mode, why = "full", f"{remaining} studies x {full or 0:.1f} s fit in the {left:.0f} s left"
        elif reduced is None or reduced <= left:
            mode, why = "reduced", f"{remaining} studies x {full:.1f} s in full > {left:.0f} s left"
        else:
            mode, why = "prior", f"{left:.0f} s left, less than one reduced study ({reduced:.1f} s)"
        if mode != self.mode:
            what = {"full": "every model + flip TTA", "reduced": "one box model + one study model, no flip TTA"}
            logger.warning("time budget: %s -> %s from study %d on", why, what.get(mode, "the train prevalence"), done + 1)
            self.mode = mode
        return mode

    def record(self, mode: str, seconds: float) -> None:
        """The wall seconds one study took in `mode` (decode wait included: what the budget pays)."""
        self.recorded += 1
        if mode in self.times and self.recorded > self.warmup:
            self.times[mode].append(seconds)


# --------------------------------------------------------------------------- pre-flight

#: The self-test study: a typical test study, ~300 slices of 512 x 512 (the models see it at their own sizes).
SELF_TEST_SHAPE = (300, 512, 512)
#: Kaggle's public test.csv (the interactive editor, the save run) lists 3 studies and ships no images for them.
KAGGLE_PLACEHOLDER_STUDIES = 3


class SubmissionError(RuntimeError):
    """The submission must not be written: the Kaggle run fails instead of submitting priors."""


class SetupError(SubmissionError):
    """Weights, models, decoders or the self-test failed before the first study (the message says which and why)."""


class TooManyFailures(SubmissionError):
    """More test studies failed than `max_failed_fraction` allows (or every study did)."""


def load_models(cfg: SubmissionConfig) -> Ensemble:
    """Every box and study model of `cfg.weights_dir`, or a SetupError that names the folder and what is missing."""
    weights = Path(cfg.weights_dir)
    if not weights.is_dir():
        raise SetupError(
            f"{weights}: weights folder not found; on Kaggle add the weights dataset (weights_dataset of kaggle-settings.json) "
            "to the notebook, locally pass --weights runs"
        )
    try:
        return load_ensemble(weights, resolve_device(cfg.device), cfg.max_box_models, cfg.max_study_models)
    except Exception as error:  # missing runs, a config or weights file that does not load, no CUDA
        raise SetupError(f"{weights}: cannot load the submission's models: {type(error).__name__}: {error}") from error


def check_expected_models(cfg: SubmissionConfig) -> list[str]:
    """A SetupError when a serving run that the weights folder lists (the weights dataset's manifest, or the
    runner's record) is missing from it; with `allow_missing_models`, one warning per stage and a note for the
    run's summary instead. Why: the ensemble would otherwise shrink without a word."""
    weights, notes = Path(cfg.weights_dir), []
    for stage in (TRAIN_BOX, TRAIN_STUDY):
        try:
            expected = expected_runs(weights, stage)
        except ValueError as error:
            raise SetupError(f"cannot tell which models the submission expects: {error}") from error
        if expected is None:
            logger.info("%s: no %s and no %s/%s: every finished %s run found is loaded", weights, MANIFEST, stage, RUNS_FILE, stage)
            continue
        names, source = expected
        found = {run.name for run in run_dirs(weights, stage, require=WEIGHTS) if (run / CONFIG).is_file()}
        wanted = [run.name for run in serving_runs([Path(name) for name in names])]
        missing = [name for name in wanted if name not in found]
        if not missing:
            continue
        what = f"{len(missing)} of the {len(wanted)} {stage} runs listed in {source} are missing: {', '.join(missing)}"
        if not cfg.allow_missing_models:
            raise SetupError(f"{weights}: {what}; restore them, or set allow_missing_models=true to submit without them")
        logger.warning("%s: %s; allow_missing_models: the ensemble goes on without them", weights, what)
        notes.append(f"{stage} without {', '.join(missing)} (allow_missing_models)")
    return notes


def check_test_decoders(images_dir: Path, uids: list[str], backend: str) -> dict[str, int]:
    """Transfer syntax -> studies, from the first file of each test study; SetupError when one has no decoder here.

    A study whose first file cannot be read is left to fail on its own (a per-study fallback).
    """
    studies: dict[str, list[str]] = {}
    for uid in uids:
        first = min((images_dir / uid).glob("*.dcm"), default=None)
        try:
            syntax = transfer_syntax(first) if first is not None else None
        except Exception:  # that study's own failure, reported when it is decoded
            syntax = None
        if syntax:
            studies.setdefault(syntax, []).append(uid)
    problems = decoder_problems(studies, backend)
    if problems:
        lines = [
            f"{TRANSFER_SYNTAX_NAMES.get(syntax, 'unknown')} {syntax} ({len(studies[syntax])} studies, e.g. {studies[syntax][0]}): {why}"
            for syntax, why in problems.items()
        ]
        raise SetupError(
            f"{images_dir}: no {backend} decoder for the test studies' transfer syntaxes:\n  "
            + "\n  ".join(lines)
            + "\n  install the decoders (the wheels dataset: see the wheel installs logged above) or set dicom_backend"
        )
    found = ", ".join(f"{TRANSFER_SYNTAX_NAMES.get(syntax, syntax)} x{len(group)}" for syntax, group in sorted(studies.items()))
    logger.info("decoders: %s reads every transfer syntax of the test studies (%s)", backend, found or "no study")
    return {syntax: len(group) for syntax, group in studies.items()}


def self_test_study(shape: tuple[int, int, int] = SELF_TEST_SHAPE) -> tuple[np.ndarray, pd.DataFrame]:
    """A synthetic HU volume of a real study's size (air, a neck, a vertebral body) and its slice table."""
    n, rows, cols = shape
    y, x = np.mgrid[:rows, :cols]
    y, x = y / rows, x / cols
    hu = np.full((rows, cols), -1000, np.int16)
    hu[((x - 0.5) / 0.38) ** 2 + ((y - 0.5) / 0.3) ** 2 <= 1] = 40
    hu[((x - 0.5) / 0.06) ** 2 + ((y - 0.55) / 0.06) ** 2 <= 1] = 700
    slices = pd.DataFrame({"StudyInstanceUID": "self-test", "slice_number": np.arange(1, n + 1), "rows": rows, "cols": cols})
    return np.broadcast_to(hu, shape), slices.assign(slice_index=np.arange(n))


def self_test(ensemble: Ensemble, cfg: SubmissionConfig) -> float:
    """Every model (with flip TTA when set) once on `self_test_study`: the seconds, or a SetupError with the reason.

    Why: a run that only meets its models at the first test study submits priors when they fail
    (Kaggle's public test.csv has no images at all); this fails the run before the loop instead.
    """
    started = time.perf_counter()
    try:
        volume, slices = self_test_study()
        study = DecodedStudy("self-test", {spec.name: encode_volume(volume, spec) for spec in ensemble.specs}, slices)
        probabilities = np.asarray(predict_study(ensemble, study, cfg, flip=cfg.tta_flip))
    except Exception as error:
        raise SetupError(
            f"self-test: the ensemble of {cfg.weights_dir} fails on a {SELF_TEST_SHAPE} study: {type(error).__name__}: {error}"
        ) from error
    if probabilities.shape != (len(TARGETS),) or not np.all((probabilities >= 0) & (probabilities <= 1)):
        raise SetupError(f"self-test: the ensemble of {cfg.weights_dir} gave {probabilities!r}, not {len(TARGETS)} probabilities")
    seconds = time.perf_counter() - started
    logger.info(
        "self-test: %d box + %d study models on a %s study in %.1f s",
        len(ensemble.box.models),
        len(ensemble.study),
        SELF_TEST_SHAPE,
        seconds,
    )
    return seconds


def preflight(cfg: SubmissionConfig, images_dir: Path, uids: list[str], report: RunReport) -> tuple[Ensemble, float]:
    """What must work before the first study, else one SetupError: decoders for the test set, the ensemble the
    weights list (`check_expected_models`), every model, a self-test.

    Returns the ensemble and the self-test's seconds.
    """
    check_test_decoders(images_dir, uids, cfg.dicom_backend)
    report.notes += check_expected_models(cfg)
    ensemble = load_models(cfg)
    return ensemble, self_test(ensemble, cfg)


# --------------------------------------------------------------------------- outcomes


@dataclass
class StudyOutcome:
    """What one test study got: full / reduced predictions, or the prior and why."""

    mode: str  # full | reduced | prior
    reason: str = ""  # the kind of fallback: unreadable, prediction failed, no study folder, time budget, placeholder test.csv
    detail: str = ""  # the message of this study's fallback
    failed: bool = False  # counts against max_failed_fraction
    partial: bool = False  # predicted from the readable slices only (detail says which were left out)


@dataclass
class RunReport:
    """Every test study's outcome; fails the run as soon as more studies failed than allowed."""

    n_studies: int
    max_failed_fraction: float
    outcomes: dict[str, StudyOutcome] = field(default_factory=dict)
    self_test_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # run-wide degradations for the summary (duplicate rows, missing models)

    @property
    def max_failures(self) -> int:
        """Failed studies the run tolerates: a fraction of test.csv's, never all of them."""
        return min(int(self.max_failed_fraction * self.n_studies), max(self.n_studies - 1, 0))

    @property
    def failures(self) -> int:
        return sum(o.failed for o in self.outcomes.values())

    def add(self, uid: str, outcome: StudyOutcome, check: bool = True) -> None:
        """Record one study (a fallback is logged); raise TooManyFailures once failures pass `max_failures`
        (`check=False`: later, by `check`)."""
        self.outcomes[uid] = outcome
        if outcome.failed:
            logger.warning("study %s: %s -> prior", uid, outcome.detail)
        if check:
            self.check(f"last {uid}: {outcome.detail}")

    def check(self, context: str) -> None:
        """TooManyFailures when more studies failed than `max_failures` (`context`: where, or which study was last)."""
        if self.failures > self.max_failures:
            raise TooManyFailures(
                f"{self.failures} of {self.n_studies} test studies failed (max_failed_fraction {self.max_failed_fraction} allows "
                f"{self.max_failures}), {context}; no submission of priors is written. {self.summary()}"
            )

    def summary(self) -> str:
        """One line: studies in full / reduced / prior, the prior's reasons with an example each, the failures."""
        modes = [o.mode for o in self.outcomes.values()]
        reasons: dict[str, list[tuple[str, StudyOutcome]]] = {}
        for uid, outcome in self.outcomes.items():
            if outcome.mode == "prior":
                reasons.setdefault(outcome.reason, []).append((uid, outcome))
        why = "; ".join(f"{len(group)} {reason} (e.g. {group[0][0]}: {group[0][1].detail[:120]})" for reason, group in reasons.items())
        partial = [(uid, o) for uid, o in self.outcomes.items() if o.partial]
        some = f", {len(partial)} of them from part of their slices (e.g. {partial[0][0]}: {partial[0][1].detail[:120]})" if partial else ""
        return (
            f"{self.n_studies} studies: {modes.count('full')} full, {modes.count('reduced')} reduced{some}, {modes.count('prior')} prior"
            f"{f' ({why})' if why else ''}; {self.failures} failed of {self.max_failures} allowed; self-test {self.self_test_s:.1f} s"
            + "".join(f"; {note}" for note in self.notes)
        )


# --------------------------------------------------------------------------- submission


def train_prevalence(data_dir: str | Path) -> dict[str, float]:
    """Per-target prevalence of `data_dir/train.csv` when present, else the real competition's (TRAIN_PREVALENCE)."""
    path = Path(data_dir) / "train.csv"
    if path.is_file():
        try:
            labels = pd.read_csv(path)
            return {t: float(labels[t].mean()) for t in TARGETS}
        except Exception as error:  # the constants are a fine fallback
            logger.warning("%s: cannot read prevalences (%s); using the competition's", path, error)
    return dict(TRAIN_PREVALENCE)


TEST_COLUMNS = ("row_id", "StudyInstanceUID", "prediction_type")


def read_test_table(data_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """test.csv (row_id, StudyInstanceUID, prediction_type) with one row per row_id, and a note when repeated
    rows were dropped (Kaggle scores one value per row_id); a SetupError names the file, the line or column
    and what was expected."""
    path = Path(data_dir) / "test.csv"
    if not path.is_file():
        raise SetupError(f"{path}: no test.csv (is data_dir the competition folder?)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as error:
        raise SetupError(f"{path}: not a readable CSV ({type(error).__name__}: {str(error).strip()[:200]})") from error
    _check_test_columns(table, path)
    table = table[list(TEST_COLUMNS)]
    line = pd.Series(np.arange(len(table)) + 2, index=table.index)  # the file's line (its header is line 1)
    for column in TEST_COLUMNS:
        empty = table[column].str.strip() == ""
        if empty.any():
            raise SetupError(f"{path}: line {line[empty].iloc[0]}: empty {column} ({int(empty.sum())} such rows)")
    bad = ~table["prediction_type"].isin(TARGETS)
    if bad.any():
        raise SetupError(
            f"{path}: line {line[bad].iloc[0]}: prediction_type {table.loc[bad, 'prediction_type'].iloc[0]!r} is not one of "
            f"{', '.join(TARGETS)} ({int(bad.sum())} such rows)"
        )
    return _one_row_per_id(table, line, path)


def _check_test_columns(table: pd.DataFrame, path: Path) -> None:
    """SetupError naming a missing column, or one spelt with spaces or another case."""
    for column in TEST_COLUMNS:
        if column in table.columns:
            continue
        near = [name for name in table.columns if name.strip().lower() == column.lower()]
        found = f"a column {near[0]!r} (spaces or case differ)" if near else f"columns {list(table.columns)}"
        raise SetupError(f"{path}: no column {column!r}; expected {', '.join(TEST_COLUMNS)}, found {found}")


def _one_row_per_id(table: pd.DataFrame, line: pd.Series, path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Drop rows that repeat an earlier row (one warning); a row_id given two studies or types is a SetupError."""
    repeated = table.duplicated(keep="first")
    clash = table[~repeated]["row_id"].duplicated(keep=False)
    if clash.any():
        rows = table[~repeated][clash]
        first = rows.iloc[0]
        other = rows[rows["row_id"] == first["row_id"]].iloc[1]
        raise SetupError(
            f"{path}: row_id {first['row_id']} on line {line[first.name]} ({first['StudyInstanceUID']}, {first['prediction_type']}) "
            f"and line {line[other.name]} ({other['StudyInstanceUID']}, {other['prediction_type']}): one row_id, two rows"
        )
    if not repeated.any():
        return table, []
    example = f"line {line[repeated].iloc[0]}: {table.loc[repeated, 'row_id'].iloc[0]}"
    logger.warning("%s: %d rows repeat an earlier row (e.g. %s); one row per row_id is written", path, repeated.sum(), example)
    return table[~repeated].reset_index(drop=True), [f"test.csv: {int(repeated.sum())} repeated rows dropped (e.g. {example})"]


def check_output(out: Path) -> None:
    """A SetupError, before any model loads, when `out` cannot be written: its folder is created and a probe
    file written and removed there. Why: a run that learns it only at the end has spent its hours."""
    blocker = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise SetupError(f"{out}: cannot write the submission there, {blocker} is a file, not a folder")
    if out.is_dir():
        raise SetupError(f"{out}: cannot write the submission there, it is a folder (give a file path, e.g. {out / 'submission.csv'})")
    probe = out.with_name(f".{out.name}.probe")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SetupError(f"{out}: cannot write the submission there ({type(error).__name__}: {error.strerror or error})") from error


def submission_rows(test: pd.DataFrame, predictions: dict[str, np.ndarray], prior: dict[str, float]) -> pd.DataFrame:
    """test.csv's rows, in its order, with `fractured` from the study's prediction (or the prior)."""
    column = {t: i for i, t in enumerate(TARGETS)}
    values = [
        float(predictions[uid][column[kind]]) if uid in predictions else prior[kind]
        for uid, kind in zip(test["StudyInstanceUID"], test["prediction_type"])
    ]
    values = np.clip(np.nan_to_num(np.asarray(values, float), nan=0.5), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return pd.DataFrame({"row_id": test["row_id"].to_numpy(), "fractured": values})


def known_failures(uids: list[str], images_dir: Path, report: RunReport) -> list[str]:
    """The studies to decode. Those that cannot be (no folder, no readable file) are counted in `report` now,
    so that a run that could not finish is refused before any model loads (TooManyFailures) and one that
    goes on knows it will. Kaggle's placeholder test.csv (no study has images) gets the prior, uncounted."""
    present = [uid for uid in uids if (images_dir / uid).is_dir()]
    placeholder = not present and len(uids) <= KAGGLE_PLACEHOLDER_STUDIES
    if placeholder:
        logger.warning(
            "%s: none of test.csv's %d studies has images: Kaggle's public placeholder test.csv; the self-test below runs the "
            "models on a synthetic study, and these rows get the prior",
            images_dir,
            len(uids),
        )
    for uid in uids:
        if uid not in present:
            missing = f"no study folder {images_dir / uid}"
            reason = "placeholder test.csv" if placeholder else "no study folder"
            report.add(uid, StudyOutcome("prior", reason, missing, failed=not placeholder), check=False)
    readable = []
    for uid in present:
        problem = study_folder_problem(images_dir / uid)
        if problem is None:
            readable.append(uid)
        else:
            report.add(uid, StudyOutcome("prior", "no readable file", f"{images_dir / uid}: {problem}", failed=True), check=False)
    report.check("known before the first study")
    if report.failures:
        logger.warning(
            "%d of %d test studies cannot be read (max_failed_fraction allows %d): they get the prior, the run goes on",
            report.failures,
            len(uids),
            report.max_failures,
        )
    return readable


def predict_studies(
    ensemble: Ensemble, uids: list[str], images_dir: Path, cfg: SubmissionConfig, budget: TimeBudget, report: RunReport
) -> dict[str, np.ndarray]:
    """Every study of `uids` in the mode the budget picks; a study that fails gets the prior (in `report`), the others go on."""
    predictions: dict[str, np.ndarray] = {}
    reduced = ensemble.reduced()
    bar = tqdm(total=len(uids), desc="test studies", unit="study")
    studies = iter_studies(uids, images_dir, ensemble.specs, cfg.num_workers, cfg.dicom_backend, cfg.max_dropped_slices)
    t_last = time.perf_counter()
    try:
        for done, study in enumerate(studies):
            mode = budget.decide(done)
            if mode == "prior":
                break
            if study.error is not None:
                report.add(study.uid, StudyOutcome("prior", "unreadable", study.error, failed=True))
            else:
                try:
                    model = ensemble if mode == "full" else reduced
                    predictions[study.uid] = predict_study(model, study, cfg, flip=cfg.tta_flip and mode == "full")
                    outcome = StudyOutcome(mode, detail=study.dropped, partial=bool(study.dropped))
                except UnpredictableStudy as error:
                    outcome = StudyOutcome("prior", "too few slices", str(error), failed=True)
                except Exception as error:  # this study gets the prior, the others go on
                    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    outcome = StudyOutcome("prior", "prediction failed", f"{type(error).__name__}: {detail}", failed=True)
                report.add(study.uid, outcome)
            now = time.perf_counter()
            budget.record(mode, now - t_last)  # includes waiting for the decode: what the budget pays
            t_last = now
            bar.update(1)
    finally:
        studies.close()
        bar.close()
    skipped = [uid for uid in uids if uid not in report.outcomes]
    for uid in skipped:
        report.add(uid, StudyOutcome("prior", "time budget", "time budget"))
    if skipped:
        logger.warning("time budget: %d studies get the prior", len(skipped))
    return predictions


def predict_submission(cfg: Any) -> pd.DataFrame:
    """Write `cfg.out` (row_id, fractured) for every row of `cfg.data_dir/test.csv`, in order; returns it.

    Fails loudly on setup (SetupError: weights, models, decoders, the self-test) and when more
    studies fail than `max_failed_fraction` allows (TooManyFailures); otherwise a study that cannot
    be read or predicted, or that the time budget leaves out, gets the train prevalence.
    """
    started = time.perf_counter()
    data_dir, out = Path(cfg.data_dir), Path(cfg.out)
    test, notes = read_test_table(data_dir)
    check_output(out)
    prior = train_prevalence(data_dir)
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    images_dir = data_dir / "test_images"
    logger.info("07_inference: %d test studies (%d rows) from %s, weights %s", len(uids), len(test), data_dir, cfg.weights_dir)

    report = RunReport(len(uids), cfg.max_failed_fraction, notes=notes)
    readable = known_failures(uids, images_dir, report)
    ensemble, report.self_test_s = preflight(cfg, images_dir, readable, report)

    budget = TimeBudget(cfg.time_budget_hours * 3600.0, len(readable), start=started)
    predictions = predict_studies(ensemble, readable, images_dir, cfg, budget, report)
    submission = submission_rows(test, predictions, prior)
    out.parent.mkdir(parents=True, exist_ok=True)
    submission.to_csv(out, index=False)
    seconds = time.perf_counter() - started
    summary = report.summary()
    logger.info("submission of %d rows written to %s in %.1f s; %s", len(submission), out, seconds, summary)
    fallbacks = {uid: o.detail for uid, o in report.outcomes.items() if o.mode == "prior"}
    modes = {uid: o.mode for uid, o in report.outcomes.items()}
    submission.attrs.update(predicted=len(predictions), fallbacks=fallbacks, modes=modes, summary=summary, seconds=seconds)
    return submission


# --------------------------------------------------------------------------- CLI


def run_cli(args: argparse.Namespace) -> int:
    """`predict`: resolve the 07_inference config from the arguments and write the submission."""
    overrides = parse_overrides(args.params)
    for key, value in (("profile", args.profile), ("data_dir", args.data_dir), ("weights_dir", args.weights), ("out", args.out)):
        if value is not None:
            overrides[key] = str(value)
    try:
        submission = predict_submission(resolve_config(INFERENCE, overrides))
    except SubmissionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(submission.head(8).to_string(index=False))
    return 0
