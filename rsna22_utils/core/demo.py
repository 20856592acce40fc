"""What every competition's demo does the same way: `-p [STAGE:]KEY=VALUE` overrides, a synthetic competition
generated once and reused, and each stage run through the runner with the `demo` profile.

A competition's `demo.py` chooses its stages' extra settings and writes its report.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rsna22_utils.core.config import parse_overrides, settable_fields
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.registry import get_stage, stages

logger = logging.getLogger(__name__)

DEMO_PROFILE = "demo"  # <competition>/profiles/demo.json: the CPU settings and sweeps


def _stage_fields(stage: str) -> set[str]:
    return set(settable_fields(get_stage(stage).config))


def parse_demo_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """`-p key=value` (every stage) and `-p STAGE:key=value` (one stage) -> {stage or "*": {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        stage, sep, _ = item.partition("=")[0].partition(":")
        if sep and stage not in stages():
            raise ConfigError(f"demo override {item!r}: unknown stage {stage!r} (stages: {', '.join(stages())})")
        parsed = parse_overrides([item.split(":", 1)[1] if sep else item])
        for key in parsed:  # a misspelt key is an error, not a silent no-op
            if sep and key not in _stage_fields(stage):
                raise ConfigError(f"demo override {item!r}: stage {stage} has no setting {key!r}")
            if not sep and not any(key in _stage_fields(name) for name in stages()):
                raise ConfigError(f"demo override {item!r}: no stage has a setting {key!r}")
        out.setdefault(stage if sep else "*", {}).update(parsed)
    return out


def demo_overrides(stage: str, common: dict[str, Any], extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The overrides of one demo stage: the demo profile, common paths and the user's -p values
    (those given for every stage only where the stage has the setting)."""
    fields = _stage_fields(stage)
    extra = extra or {}
    shared = {k: v for k, v in {**common, **extra.get("*", {})}.items() if k in fields}
    return {"profile": DEMO_PROFILE, **shared, **extra.get(stage, {})}


def synthetic_competition(data_dir: Path, params: dict[str, Any], generate: Callable[[], Any]) -> None:
    """Reuse the synthetic competition in `data_dir` when it was generated with `params`, else `generate()` it;
    a folder generated with other parameters is an error (never overwritten)."""
    marker = data_dir / "_synthetic" / "generator.json"
    if marker.exists():
        written = json.loads(marker.read_text())
        if all(written.get(k) == v for k, v in params.items()):
            logger.info("reusing the synthetic competition in %s", data_dir)
            return
        raise FileExistsError(f"{data_dir} holds a synthetic competition with other parameters ({marker}); use another --out")
    generate()


def run_demo_stage(stage: str, overrides: dict[str, Any], seed: int, work_dir: Path) -> float:
    """Run one stage through the runner (the profile's folds, this demo's seed); returns its seconds, raises on a failed run."""
    from rsna22_utils.core.runner import run_stage  # lazy: papermill

    overrides = {k: v for k, v in overrides.items() if k not in ("fold", "seed")}  # the runner sets them per run
    started = time.perf_counter()
    summary = run_stage(stage, seeds=[seed] if get_stage(stage).per_fold else None, overrides=overrides, work_dir=str(work_dir))
    if not summary.ok:
        failed = summary.failed[0]
        raise RuntimeError(f"demo stage {stage} failed: {failed.error} (executed notebook: {failed.notebook})")
    return time.perf_counter() - started


def add_demo_command(
    subparsers: Any, func: Callable[[argparse.Namespace], int], out: str, image_size: int, image_size_help: str = "", studies: int = 60
) -> None:
    """The `demo` command of a competition: --out, --studies, --image-size, --seed and `-p [STAGE:]KEY=VALUE`."""
    p = subparsers.add_parser("demo", help="synthetic competition -> every stage of the pipeline -> report")
    p.add_argument("--out", type=Path, default=Path(out), help="working folder of the demo")
    p.add_argument("--studies", type=int, default=studies, help="training studies of the synthetic competition")
    p.add_argument("--image-size", type=int, default=image_size, help=image_size_help or None)
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
    p.set_defaults(func=func)


def write_report_markdown(report_dir: Path, lines: list[str], figures: dict[str, Path], work_dir: Path, result: dict[str, Any]) -> None:
    """report.md: the competition's `lines`, then the figures and the run folders; the figures' paths go into `result`."""
    lines = lines + ["## Figures", "", *[f"- {name}: `{path}`" for name, path in figures.items()], ""]
    lines += ["## Where the outputs are", "", *[f"- `{p}`" for p in sorted(work_dir.iterdir()) if p.is_dir()], ""]
    (report_dir / "report.md").write_text("\n".join(lines))
    result["figures"] = {k: str(v) for k, v in figures.items()}
    logger.info("demo report written to %s", report_dir / "report.md")
