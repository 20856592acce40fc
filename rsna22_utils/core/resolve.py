"""Resolving a stage's config: profile settings, then the user's overrides, checked, with derived paths.

The same call serves the CLI, notebooks and the runner:

    cfg = resolve_config("01_train_box", {"epochs": 1, "fold": 0})           # notebooks / runner
    cfg = resolve_config("01_train_box", parse_overrides(["epochs=1"]))     # CLI `-p epochs=1`

`load_config` reads a run's config.json back; `show_configs` (`config show STAGE`) resolves every
variant of a stage under a profile. This module sits above the config groups (`core.config`), the
stage registry and the profiles, which it combines.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rsna22_utils.core.config import coerce_value, derived_fields, field_types, parse_overrides, settable_fields
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.profiles import Variant, available_profiles, load_profile, profile_settings
from rsna22_utils.core.registry import get_stage, prepare_stage, run_dir, stages

logger = logging.getLogger(__name__)


def _unknown_key_error(key: str, cls: type, stage: str) -> ConfigError:
    elsewhere = [name for name, entry in stages().items() if key in settable_fields(entry.config)]
    if elsewhere:
        return ConfigError(f"setting {key!r} does not apply to stage {stage!r}; it applies to {', '.join(elsewhere)}")
    valid = settable_fields(cls)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} for stage {stage!r} ({cls.__name__}).{hint} Valid keys: {', '.join(sorted(valid))}")


def resolve_config(stage: str, overrides: Mapping[str, Any] | None = None, *, saved: bool = False) -> Any:
    """Stage name + overrides -> the stage's typed, validated config (out_dir / prepared_dir derived when empty).

    With `profile=NAME` among the overrides, the profile's settings for the stage (and for
    `variant`, when given) come first and the other overrides on top. `saved=True` reads back a
    run's config.json: every value is already there (the profile is not applied again) and
    derived fields are accepted.
    """
    entry = get_stage(stage)
    cls = entry.config
    types = field_types(cls)
    hidden = derived_fields(cls)
    values = dict(overrides or {})
    given_stage = values.pop("stage", stage)
    if given_stage != stage:
        raise ConfigError(f"override stage={given_stage!r} contradicts the requested stage {stage!r}")
    if values.get("profile") and not saved:
        values = {**profile_settings(str(values["profile"]), stage, str(values.get("variant", ""))), **values}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise _unknown_key_error(key, cls, stage)
        if key in hidden and not saved:
            raise ConfigError(f"{key!r} of stage {stage!r} is not a setting: the stage takes it from {hidden[key]}")
        kwargs[key] = coerce_value(value, types[key], key)
    cfg = cls(stage=stage, **kwargs)
    if not cfg.out_dir:
        cfg.out_dir = str(run_dir(cfg.work_dir, stage, getattr(cfg, "fold", None), getattr(cfg, "seed", None), getattr(cfg, "variant", "")))
    if hasattr(cfg, "prepared_dir") and not cfg.prepared_dir:
        cfg.prepared_dir = str(Path(cfg.work_dir) / prepare_stage().name)
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> Any:
    """Read a config written by save_config (re-validated; keys unknown to this version are an error)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read config JSON ({exc})") from None
    if not isinstance(payload, dict) or "stage" not in payload:
        raise ConfigError(f"{path}: not a config file (no 'stage' key)")
    class_name = payload.pop("_class", None)
    stage = payload["stage"]
    try:
        entry = get_stage(stage)
        for key, value in entry.older_run_defaults.items():
            payload.setdefault(key, value)
        if class_name and class_name != entry.config.__name__:
            logger.warning("%s: written by class %s, stage %s now uses %s", path, class_name, stage, entry.config.__name__)
        return resolve_config(stage, payload, saved=True)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------- config show


def show_configs(
    stage: str, profile: str = "", overrides: dict[str, Any] | None = None, count_params: bool = False
) -> list[dict[str, Any]]:
    """The resolved configuration of each variant of `stage` under `profile` (+ `overrides`), one dict each:
    every config field (derived ones as the profile's earlier stages would fill them), `variant`, the sweep's
    `folds` / `seeds`, and with `count_params` the trainable parameters of the network it builds."""
    entry = get_stage(stage)
    variants = (
        load_profile(profile).variants(stage)
        if profile
        else [Variant("", {}, [0] if entry.per_fold else None, [0] if entry.per_fold else None)]
    )
    out = []
    for variant in variants:
        values = {**(overrides or {})}
        if profile:
            values["profile"] = profile
        if entry.per_fold:
            values.setdefault("fold", variant.folds[0])
            values.setdefault("seed", variant.seeds[0])
            if variant.name:
                values["variant"] = variant.name
        cfg = resolve_config(stage, values)
        if entry.preview:
            cfg = entry.call("preview", cfg)
        fields = cfg.to_dict()
        first = {key: fields.pop(key) for key in ("stage", "profile")}
        row = {**first, "variant": variant.name, "folds": variant.folds, "seeds": variant.seeds, **fields}
        if count_params:
            if not entry.network:
                raise ValueError(f"stage {stage!r} builds no network: nothing to count")
            network = entry.call("network", cfg)
            row["params_trainable"] = int(sum(p.numel() for p in network.parameters() if p.requires_grad))
        for key in ("fold", "seed", "out_dir"):  # one run's values; the sweep is folds x seeds
            row.pop(key, None)
        out.append(row)
    return out


def _cmd_show(args: Any) -> int:
    try:
        rows = show_configs(args.stage, args.profile or "", parse_overrides(args.param), args.count_params)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        title = (
            f"{args.stage}"
            + (f" · variant {row['variant']}" if row["variant"] else "")
            + (f" · profile {args.profile}" if args.profile else "")
        )
        print(f"# {title}")
        if row["folds"] is not None:
            print(f"  runs: folds {row['folds']} x seeds {row['seeds']}")
        width = max(len(k) for k in row)
        for key, value in row.items():
            if key not in ("stage", "profile", "variant", "folds", "seeds"):
                print(f"  {key:<{width}} {value}")
        print()
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `config show STAGE [--profile P] [--json] [--count-params]` to the CLI."""
    p = subparsers.add_parser("config", help="show the resolved configuration of a stage under a profile")
    sub = p.add_subparsers(dest="config_command", required=True)
    s = sub.add_parser("show", help="every variant of STAGE: its settings, sweep and (with --count-params) trainable parameters")
    s.add_argument("stage", help="e.g. 05_train_fracture")
    s.add_argument("--profile", default=None, help=f"a shipped profile ({', '.join(available_profiles()) or 'none'}) or a .json path")
    s.add_argument("--json", action="store_true", help="one JSON list, one object per variant")
    s.add_argument(
        "--count-params", action="store_true", help="build each variant's network (random weights) and count its trainable parameters"
    )
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="override on top of the profile (repeatable)")
    s.set_defaults(func=_cmd_show)
