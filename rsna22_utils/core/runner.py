"""Run a stage notebook for every fold x seed with papermill: skip what is done, go on after a failure.

`run_stage("01_train_box", folds=[0, 1, 2, 3], seeds=[0])` executes `notebooks/01_train_box.ipynb`
(rebuilt from the `.py` with jupytext when missing or older) once per fold and seed, into
`{work_dir}/{stage}/fold{f}-seed{s}/`:

    <stage>.ipynb     the executed notebook (cell outputs, figures; also when the run failed)
    _complete.json    written on success; a run that has it is skipped unless force=True

A failed run is recorded (its last error line and executed notebook) and the runner goes on.
At the end a table of done / skipped / failed runs is logged and written to
`{work_dir}/{stage}/_runs.json`. `devices=["0", "1"]` spreads the runs over the GPUs of one
machine (one run per GPU at a time, CUDA_VISIBLE_DEVICES set for each run's kernel);
`nproc=N > 1` runs `python -m torch.distributed.run ... -m rsna22_utils train STAGE` instead of
the notebook (multi-GPU DDP training of one fold), logging to `train.log`.

Command line: `python -m rsna22_utils run STAGE --folds 0 1 2 3 --seeds 0 -p epochs=10`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rsna22_utils.core.config import parse_overrides, parse_value
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.files import LOCK_FILE, run_lock
from rsna22_utils.core.notebooks import write_ipynb
from rsna22_utils.core.paths import NOTEBOOKS_DIR, REPO_ROOT
from rsna22_utils.core.profiles import load_profile
from rsna22_utils.core.registry import RUNS_FILE, execute, get_stage, run_name, stage_dir, stages
from rsna22_utils.core.resolve import resolve_config

logger = logging.getLogger(__name__)

COMPLETE_FILE = "_complete.json"


@dataclass
class RunResult:
    """Outcome of one run of a stage (one fold x seed, or the single run of a fold-less stage)."""

    stage: str
    fold: int | None
    seed: int | None
    status: str  # "done" | "skipped" | "failed"
    out_dir: str
    notebook: str  # executed notebook (or train.log for torchrun runs)
    seconds: float = 0.0
    error: str = ""
    device: str | None = None
    variant: str = ""


@dataclass
class RunSummary:
    """All runs of one `run_stage` call, split by outcome."""

    stage: str
    completed: list[RunResult] = field(default_factory=list)
    skipped: list[RunResult] = field(default_factory=list)
    failed: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no run failed."""
        return not self.failed

    @property
    def runs(self) -> list[RunResult]:
        return self.completed + self.skipped + self.failed

    def add(self, result: RunResult) -> None:
        {"done": self.completed, "skipped": self.skipped, "failed": self.failed}[result.status].append(result)


@dataclass
class _RunSpec:
    stage: str
    fold: int | None
    seed: int | None
    out_dir: Path
    parameters: dict[str, Any]
    overrides: dict[str, Any]
    variant: str = ""


# ----------------------------------------------------------------------------------- helpers


def _format_value(value: Any) -> str:
    """A value as a `-p key=VALUE` string that parses back to the same value."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value == value.strip() and parse_value(value) == value:
        return value
    return json.dumps(value)


def torchrun_command(stage: str, fold: int | None, seed: int | None, overrides: dict[str, Any] | None, nproc: int) -> list[str]:
    """The `torch.distributed.run` command line that trains one fold x seed of `stage` on `nproc` GPUs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(nproc))]
    cmd += ["-m", "rsna22_utils", "train", stage]
    if fold is not None:
        cmd += ["-p", f"fold={int(fold)}"]
    if seed is not None:
        cmd += ["-p", f"seed={int(seed)}"]
    for key, value in (overrides or {}).items():
        if key in ("fold", "seed") and fold is not None:
            continue
        cmd += ["-p", f"{key}={_format_value(value)}"]
    return cmd


def _is_this_python(executable: str) -> bool:
    if executable in {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}:
        return True  # jupyter_client substitutes sys.executable for these
    here, there = Path(sys.executable), Path(executable)
    if os.path.abspath(there) == os.path.abspath(here):
        return True
    # bin/python vs bin/python3 of the same environment (do not resolve across environments)
    return there.parent.absolute() == here.parent.absolute() and there.resolve() == here.resolve()


def default_kernel_name() -> str:
    """A Jupyter kernel that runs THIS interpreter: `python3` when it does, else a kernelspec registered for it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # lazy: CLI start-up

    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec("python3")
        if spec.argv and _is_this_python(spec.argv[0]):
            return "python3"
        logger.info("kernel python3 runs %s, not %s; using a kernel registered for this one", spec.argv[0], sys.executable)
    except NoSuchKernel:
        pass
    name = "rsna22-kit-" + hashlib.sha1(os.path.abspath(sys.executable).encode()).hexdigest()[:8]
    try:
        spec = manager.get_kernel_spec(name)
        if spec.argv and _is_this_python(spec.argv[0]):
            return name
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install  # lazy: CLI start-up

    try:
        path = install(kernel_name=name, display_name=f"rsna22-kit ({sys.executable})", prefix=sys.prefix)
    except OSError:
        path = install(kernel_name=name, display_name=f"rsna22-kit ({sys.executable})", user=True)
    logger.info("registered kernel %s for %s at %s", name, sys.executable, path)
    return name


def ensure_ipynb(stage: str, notebooks_dir: Path | None = None) -> Path:
    """`notebooks_dir/<stage>.ipynb` (default: the registered stage's notebook folder), rebuilt from `<stage>.py`
    with jupytext when it is missing or older."""
    if notebooks_dir is None:
        known = stages()
        notebooks_dir = known[stage].notebook.parent if stage in known else NOTEBOOKS_DIR
    notebooks_dir = Path(notebooks_dir)
    py, ipynb = notebooks_dir / f"{stage}.py", notebooks_dir / f"{stage}.ipynb"
    if not py.exists() and not ipynb.exists():
        known = sorted({p.stem for p in notebooks_dir.glob("*.py")} | {p.stem for p in notebooks_dir.glob("*.ipynb")})
        raise FileNotFoundError(
            f"stage {stage!r}: neither {py} nor {ipynb} exists (stages in {notebooks_dir}: {', '.join(known) or 'none'})"
        )
    if py.exists() and (not ipynb.exists() or ipynb.stat().st_mtime < py.stat().st_mtime):
        write_ipynb(py, ipynb)
    return ipynb


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Temporarily set (or with None, leave alone) environment variables; kernels inherit them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pythonpath() -> str:
    """PYTHONPATH with the repo first, so kernels and torchrun workers import this checkout's rsna22_utils."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(REPO_ROOT)] + [p for p in parts if Path(p).absolute() != REPO_ROOT])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _error_line(error: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError  # lazy: CLI start-up

    if isinstance(error, PapermillExecutionError):
        return f"{error.ename}: {_last_line(error.evalue)}"
    return f"{type(error).__name__}: {_last_line(str(error))}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_complete(spec: _RunSpec, seconds: float, notebook: Path, source: Path | None, device: str | None) -> None:
    record = {
        "stage": spec.stage,
        "fold": spec.fold,
        "seed": spec.seed,
        "parameters": spec.parameters,
        "seconds": round(seconds, 2),
        "finished_at": _now(),
        "notebook": str(notebook),
        "source": str(source) if source else None,
        "device": device,
    }
    path = spec.out_dir / COMPLETE_FILE
    path.write_text(json.dumps(record, indent=2, default=str))
    logger.info("wrote %s", path)


# ------------------------------------------------------------------------------- execution


def _label(spec: _RunSpec) -> str:
    if spec.fold is None:
        return spec.stage
    return f"{spec.stage}{' ' + spec.variant if spec.variant else ''} fold {spec.fold} seed {spec.seed}"


KERNEL_TQDM_MININTERVAL = 5.0  # seconds between progress-bar redraws inside papermill kernels


@contextlib.contextmanager
def _kernel_sockets() -> Iterator[dict[str, Any]]:
    """papermill (nbclient) kwargs: the kernel talks over unix sockets in a private folder, not TCP ports.

    With TCP, jupyter_client picks "free" ports by binding port 0 and closing the socket again, and
    the kernel binds them only later; its LocalPortCache guards that gap within one process only, so a
    kernel started at the same time by another process (the per-GPU children of `devices=`) can take a
    port first, and the loser dies with "Address already in use" ("Kernel died before replying to
    kernel_info"). Sockets in a fresh folder of our own cannot collide.
    """
    if os.name == "nt":  # no ipc transport there
        yield {}
        return

    from traitlets.config import Config  # lazy: CLI start-up

    with tempfile.TemporaryDirectory(prefix="rsna22-kernel-") as folder:
        yield {"config": Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(folder, "kernel")}})}


def _execute_notebook(spec: _RunSpec, source: Path, kernel_name: str, timeout: float | None) -> RunResult:
    """Run one notebook with papermill; never raises, the failure is in the result.

    The kernel's stdout / stderr (its logs and progress bars) stream straight to ours, as if the
    stage ran here; the executed notebook keeps them too.
    """
    import papermill  # lazy: CLI start-up

    device = os.environ.get("CUDA_VISIBLE_DEVICES")
    executed = spec.out_dir / f"{spec.stage}.ipynb"
    result = RunResult(spec.stage, spec.fold, spec.seed, "failed", str(spec.out_dir), str(executed), device=device, variant=spec.variant)
    start = time.perf_counter()
    on = f" on GPU {device}" if device is not None else ""
    logger.info("%s%s: executing %s -> %s", _label(spec), on, source, executed)
    try:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        (spec.out_dir / COMPLETE_FILE).unlink(missing_ok=True)
        # bars redraw at most every few seconds: the executed notebook keeps every redraw (tqdm's
        # default is 0.1 s); TQDM_MININTERVAL set by the user wins
        bar_interval = None if "TQDM_MININTERVAL" in os.environ else str(KERNEL_TQDM_MININTERVAL)
        with _environ(PYTHONPATH=_pythonpath(), TQDM_MININTERVAL=bar_interval), _kernel_sockets() as sockets:
            papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=spec.parameters,
                kernel_name=kernel_name,
                cwd=str(REPO_ROOT),
                progress_bar=False,
                stdout_file=sys.stdout,
                stderr_file=sys.stderr,
                execution_timeout=timeout,
                **sockets,
            )
    except Exception as error:  # any failure of one run must not stop the others
        result.seconds = time.perf_counter() - start
        result.error = _error_line(error)
        logger.error("%s FAILED after %.1f s: %s (executed notebook: %s)", _label(spec), result.seconds, result.error, executed)
        return result
    result.seconds = time.perf_counter() - start
    result.status = "done"
    _write_complete(spec, result.seconds, executed, source, device)
    logger.info("%s done in %.1f s: %s", _label(spec), result.seconds, executed)
    return result


def _execute_torchrun(spec: _RunSpec, nproc: int, timeout: float | None, devices: Sequence[str] | None) -> RunResult:
    """Run one fold x seed as `torch.distributed.run ... train` in a subprocess, output to train.log."""
    log_path = spec.out_dir / "train.log"
    device = ",".join(devices) if devices else os.environ.get("CUDA_VISIBLE_DEVICES")
    result = RunResult(spec.stage, spec.fold, spec.seed, "failed", str(spec.out_dir), str(log_path), device=device, variant=spec.variant)
    cmd = torchrun_command(spec.stage, spec.fold, spec.seed, spec.overrides, nproc)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    logger.info("%s: %s > %s", _label(spec), " ".join(cmd), log_path)
    start = time.perf_counter()
    try:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        (spec.out_dir / COMPLETE_FILE).unlink(missing_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"exit code {proc.returncode}: {_last_line(log_path.read_text(errors='replace')) or 'no output'}")
    except Exception as error:
        result.seconds = time.perf_counter() - start
        result.error = _error_line(error)
        logger.error("%s FAILED after %.1f s: %s (log: %s)", _label(spec), result.seconds, result.error, log_path)
        return result
    result.seconds = time.perf_counter() - start
    result.status = "done"
    _write_complete(spec, result.seconds, log_path, None, device)
    return result


def _child_main(request_path: str) -> int:
    """Entry of a per-GPU child process: run one notebook described by a JSON request, write the result."""
    request = json.loads(Path(request_path).read_text())
    device = os.environ.get("CUDA_VISIBLE_DEVICES")
    logging.basicConfig(
        level=request["log_level"],
        format=f"%(asctime)s %(levelname)s [gpu {device}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    spec = _RunSpec(
        request["stage"],
        request["fold"],
        request["seed"],
        Path(request["out_dir"]),
        request["parameters"],
        request["overrides"],
        request.get("variant", ""),
    )
    result = _execute_notebook(spec, Path(request["source"]), request["kernel_name"], request["timeout"])
    Path(request["result_path"]).write_text(json.dumps(asdict(result)))
    return 0


def _run_in_child(spec: _RunSpec, source: Path, kernel_name: str, timeout: float | None, device: str) -> RunResult:
    """Run one notebook in a fresh Python process with CUDA_VISIBLE_DEVICES=device (its kernel inherits it).

    A subprocess rather than multiprocessing: it works whatever the caller's __main__ is (a
    script, stdin, a notebook) and each process has its own environment and working directory.
    """
    executed = spec.out_dir / f"{spec.stage}.ipynb"
    with tempfile.TemporaryDirectory(prefix="rsna22-run-") as tmp:
        request_path, result_path = Path(tmp, "request.json"), Path(tmp, "result.json")
        request = {
            "stage": spec.stage,
            "fold": spec.fold,
            "seed": spec.seed,
            "out_dir": str(spec.out_dir),
            "parameters": spec.parameters,
            "overrides": spec.overrides,
            "variant": spec.variant,
            "source": str(source),
            "kernel_name": kernel_name,
            "timeout": timeout,
            "log_level": logging.getLogger().getEffectiveLevel(),
            "result_path": str(result_path),
        }
        request_path.write_text(json.dumps(request, default=str))
        env = {**os.environ, "PYTHONPATH": _pythonpath(), "CUDA_VISIBLE_DEVICES": device}
        code = "import sys; from rsna22_utils.core.runner import _child_main; sys.exit(_child_main(sys.argv[1]))"
        proc = subprocess.run([sys.executable, "-c", code, str(request_path)], env=env, cwd=REPO_ROOT)
        if result_path.exists():
            return RunResult(**json.loads(result_path.read_text()))
    error = f"worker process for GPU {device} exited with code {proc.returncode} before reporting a result"
    logger.error("%s FAILED: %s", _label(spec), error)
    return RunResult(
        spec.stage, spec.fold, spec.seed, "failed", str(spec.out_dir), str(executed), error=error, device=device, variant=spec.variant
    )


# ------------------------------------------------------------------------------------ stage


def plan_runs(
    stage: str,
    folds: Sequence[int] | None,
    seeds: Sequence[int] | None,
    overrides: dict[str, Any] | None,
    work_dir: Path,
    variants: Sequence[str] | None = None,
) -> list[_RunSpec]:
    """One spec per variant x fold x seed, with out_dir / work_dir set.

    With `profile` among the overrides, a per-fold stage runs the profile's sweep: every variant
    (or those named in `variants`), each over its folds and seeds unless `folds` / `seeds` are given.
    Without a profile: one spec per fold x seed, or a single fold-less run when both are None.
    """
    work_dir = Path(work_dir).absolute()
    # plain JSON values (Path -> str, tuple -> list): what papermill injects and _complete.json records
    overrides = json.loads(json.dumps(dict(overrides or {}), default=str))
    profile = overrides.get("profile") or ""
    try:
        per_fold = get_stage(stage).per_fold
    except ConfigError:  # a notebook that is not a registered stage: per fold x seed when folds or seeds are given
        if profile:
            raise
        per_fold = True
    if variants and not (profile and per_fold):
        raise ConfigError(f"variants {list(variants)}: only a per-fold stage run with a profile has variants")
    if not per_fold or (folds is None and seeds is None and not profile):
        out_dir = stage_dir(work_dir, stage)
        over = {**overrides, "out_dir": str(out_dir), "work_dir": str(work_dir)}
        return [_RunSpec(stage, None, None, out_dir, {"overrides": over}, over)]
    sweep = [(v.name, v.folds, v.seeds) for v in load_profile(profile).variants(stage)] if profile else [("", None, None)]
    if variants:
        unknown = sorted(set(variants) - {name for name, _, _ in sweep})
        if unknown:
            raise ConfigError(f"profile {profile!r} has no variant {', '.join(unknown)} of {stage} (variants: {[n for n, _, _ in sweep]})")
        sweep = [entry for entry in sweep if entry[0] in variants]
    specs = []
    for variant, variant_folds, variant_seeds in sweep:
        for fold in folds if folds is not None else variant_folds or [0]:
            for seed in seeds if seeds is not None else variant_seeds or [0]:
                out_dir = stage_dir(work_dir, stage) / run_name(fold, seed, variant)
                over = {**overrides, "out_dir": str(out_dir), "work_dir": str(work_dir)}
                if variant:
                    over["variant"] = variant
                params = {"fold": int(fold), "seed": int(seed), "overrides": over}
                specs.append(_RunSpec(stage, int(fold), int(seed), out_dir, params, over, variant))
    return specs


def _write_runs(summary: RunSummary, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": summary.stage,
        "written_at": _now(),
        "ok": summary.ok,
        "counts": {"done": len(summary.completed), "skipped": len(summary.skipped), "failed": len(summary.failed)},
        "runs": [asdict(r) for r in sorted(summary.runs, key=lambda r: (r.variant, r.fold or 0, r.seed or 0))],
    }
    path.write_text(json.dumps(record, indent=2))


def _log_table(summary: RunSummary, runs_path: Path) -> None:
    rows = sorted(summary.runs, key=lambda r: (r.variant, r.fold if r.fold is not None else -1, r.seed or 0))
    lines = [f"{'status':8} {'variant':>12} {'fold':>4} {'seed':>4} {'seconds':>8}  path"]
    for r in rows:
        fold = "-" if r.fold is None else str(r.fold)
        seed = "-" if r.seed is None else str(r.seed)
        lines.append(f"{r.status:8} {r.variant or '-':>12} {fold:>4} {seed:>4} {r.seconds:8.1f}  {r.notebook}")
    logger.info(
        "%s: %d done, %d skipped, %d failed (summary %s)\n%s",
        summary.stage,
        len(summary.completed),
        len(summary.skipped),
        len(summary.failed),
        runs_path,
        "\n".join(lines),
    )
    for r in summary.failed:
        where = "" if r.fold is None else f"{' ' + r.variant if r.variant else ''} fold {r.fold} seed {r.seed}"
        logger.error("FAILED %s%s: %s -> open %s", r.stage, where, r.error, r.notebook)


def run_stage(
    stage: str,
    folds: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    overrides: dict[str, Any] | None = None,
    work_dir: str | Path = "runs",
    notebooks_dir: str | Path | None = None,
    force: bool = False,
    devices: Sequence[str] | None = None,
    nproc: int = 1,
    kernel_name: str | None = None,
    timeout: float | None = None,
    variants: Sequence[str] | None = None,
) -> RunSummary:
    """Execute `stage` for every fold x seed (skipping finished runs), going on after failures.

    With `overrides["profile"]`, a per-fold stage runs the profile's sweep (see `plan_runs`).

    `timeout` is seconds per notebook cell (papermill) or for the whole torchrun subprocess.
    With `nproc > 1` runs go one after another, each torchrun seeing all of `devices`.
    Returns the summary; check `.ok` (the CLI exits 1 when a run failed).
    """
    work_dir = Path(work_dir).absolute()
    specs = plan_runs(stage, folds, seeds, overrides, work_dir, variants)
    summary = RunSummary(stage)
    runs_path = stage_dir(work_dir, stage) / RUNS_FILE
    pending = []
    for spec in specs:
        complete = spec.out_dir / COMPLETE_FILE
        if complete.exists() and not force:
            logger.info("%s: already complete (%s), skipped; use force to run again", _label(spec), complete)
            executed = spec.out_dir / (f"{stage}.ipynb" if nproc <= 1 else "train.log")
            summary.add(RunResult(stage, spec.fold, spec.seed, "skipped", str(spec.out_dir), str(executed), variant=spec.variant))
        else:
            if force:
                _start_over(spec)
            pending.append(spec)
    devices = [str(d) for d in devices] if devices else None
    logger.info("%s: %d runs to execute, %d already complete (work dir %s)", stage, len(pending), len(summary.skipped), work_dir)

    if pending and nproc > 1:
        for i, spec in enumerate(pending, 1):
            logger.info("run %d/%d", i, len(pending))
            summary.add(_execute_torchrun(spec, nproc, timeout, devices))
            _write_runs(summary, runs_path)
    elif pending:
        source = ensure_ipynb(stage, Path(notebooks_dir) if notebooks_dir else None)
        kernel_name = kernel_name or default_kernel_name()
        if devices:
            _run_on_devices(pending, source, kernel_name, timeout, devices, summary, runs_path)
        else:
            for i, spec in enumerate(pending, 1):
                logger.info("run %d/%d", i, len(pending))
                summary.add(_execute_notebook(spec, source, kernel_name, timeout))
                _write_runs(summary, runs_path)

    _write_runs(summary, runs_path)
    _log_table(summary, runs_path)
    return summary


def _start_over(spec: _RunSpec) -> None:
    """`force`: a run of a per-fold stage starts clean (its folder, checkpoint included, is removed);
    a stage that runs once loses only its completion mark (its folder may hold e.g. the study cache,
    which it reuses or rebuilds itself). A run another process holds is left alone (an error)."""
    if not spec.out_dir.exists():
        return
    with run_lock(spec.out_dir):
        if spec.fold is None:
            (spec.out_dir / COMPLETE_FILE).unlink(missing_ok=True)
            return
        for path in spec.out_dir.iterdir():
            if path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    logger.info("%s: force: removed the earlier outputs and checkpoint of %s", _label(spec), spec.out_dir)


def _run_on_devices(
    pending: list[_RunSpec],
    source: Path,
    kernel_name: str,
    timeout: float | None,
    devices: list[str],
    summary: RunSummary,
    runs_path: Path,
) -> None:
    """Spread runs over GPUs: at most one run per device at a time, each in a process with its CUDA_VISIBLE_DEVICES."""
    free: queue.Queue[str] = queue.Queue()
    for device in devices:
        free.put(device)

    def run_one(spec: _RunSpec) -> RunResult:
        device = free.get()
        try:
            return _run_in_child(spec, source, kernel_name, timeout, device)
        finally:
            free.put(device)

    logger.info("%s: %d runs over GPUs %s", summary.stage, len(pending), ", ".join(devices))
    with ThreadPoolExecutor(min(len(devices), len(pending))) as pool:
        futures = [pool.submit(run_one, spec) for spec in pending]
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"{summary.stage} runs"):
            summary.add(future.result())  # run_one never raises: failures are results
            _write_runs(summary, runs_path)


# -------------------------------------------------------------------------------------- CLI


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        overrides = parse_overrides(args.param)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    if args.profile:
        overrides["profile"] = args.profile
    try:
        summary = run_stage(
            args.stage,
            folds=args.folds,
            seeds=args.seeds,
            overrides=overrides,
            work_dir=args.work_dir,
            notebooks_dir=args.notebooks_dir,
            force=args.force,
            devices=args.devices,
            nproc=args.nproc,
            kernel_name=args.kernel,
            timeout=args.timeout,
            variants=args.variants,
        )
    except (FileNotFoundError, ValueError) as error:  # unknown stage / notebook / profile / variant, a bad setting
        logger.error("%s", error)
        return 2
    return 0 if summary.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.params)
    if args.profile:
        overrides["profile"] = args.profile
    cfg = resolve_config(args.stage, overrides)
    metrics = execute(args.stage, cfg)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank gets here; one line is enough
        logger.info("%s done (%s): %s", args.stage, cfg.out_dir, json.dumps(summary, default=str))
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `run STAGE ...` (notebooks per fold x seed) and `train STAGE ...` (one run in this process) to the CLI."""
    p = subparsers.add_parser("train", help="run one stage with a config (torchrun-compatible): train STAGE -p key=value ...")
    p.add_argument("stage", help="stage name, e.g. 01_train_box (also the infer stages and 00_prepare)")
    p.add_argument("--profile", default=None, help="start from a profile's settings (original, demo); -p values apply on top")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser(
        "run",
        help="execute a stage notebook per fold x seed with papermill (skips finished runs)",
        description="Execute notebooks/STAGE.ipynb per fold x seed into WORK_DIR/STAGE/fold{f}-seed{s}/; exit code 1 when any run failed.",
    )
    p.add_argument("stage", help="notebook stem, e.g. 01_train_box")
    p.add_argument("--profile", default=None, help="settings and sweep of a profile (original, demo); -p values apply on top")
    p.add_argument("--variants", nargs="+", default=None, help="with --profile: run only these variants of the stage")
    p.add_argument(
        "--folds", type=int, nargs="+", default=None, help="folds to run, -1 = full data (default: the profile's, else one fold-less run)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: the profile's, else 0)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--work-dir", type=Path, default=Path("runs"), help="root of all stage outputs (default: runs)")
    p.add_argument("--notebooks-dir", type=Path, default=None, help="default: the repo's notebooks/")
    p.add_argument("--force", action="store_true", help="run again even when _complete.json exists")
    p.add_argument("--devices", nargs="+", default=None, help="GPU ids to spread runs over, one run per GPU at a time")
    p.add_argument("--nproc", type=int, default=1, help="> 1: train each run with torch.distributed.run on N GPUs")
    p.add_argument("--kernel", default=None, help="Jupyter kernel (default: one running this Python)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per cell (papermill) / per run (torchrun)")
    p.set_defaults(func=_cmd_run)
