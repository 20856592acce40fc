"""Profiles: named, versioned sets of per-stage settings and sweeps, stored as JSON data.

A competition package ships its profiles as `<package>/profiles/<name>.json`:

    {
      "profile": "original", "version": 1, "description": "...", "sources": {"01_train_box": "cfg_loc_dh_01B.py"},
      "every_stage": {"pretrained": true},              # applied to each stage that has the setting
      "stages": {
        "01_train_box": {"settings": {...}, "folds": [0, 1, 2, 3, 4, -1], "seeds": [0, 1, 2]},
        "05_train_fracture": {
          "settings": {...},                              # shared by the stage's variants
          "variants": {"resnest50d": {"settings": {...}, "folds": [-1], "seeds": [0, 1, 2, 3, 4, 5]}, ...}
        }
      }
    }

A stage without `variants` has one unnamed variant (""). A variant's `folds` / `seeds` default to the
stage's. Settings are layered: the stage config's defaults < `every_stage` < the stage's `settings` <
the variant's `settings` < the user's overrides (`-p`). Every key is checked against the stage's
config when the profile loads, so a profile cannot hold a setting that does not apply.
"""

from __future__ import annotations

import importlib.resources
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsna22_utils.core.config import ConfigError


@dataclass(frozen=True)
class Variant:
    """One named model of a stage in a profile: its settings and the fold x seed runs of its sweep."""

    name: str
    settings: dict[str, Any]
    folds: list[int] | None  # None: a stage that runs once
    seeds: list[int] | None


@dataclass(frozen=True)
class Profile:
    name: str
    version: int
    description: str
    every_stage: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str = ""

    def variants(self, stage: str) -> list[Variant]:
        """The variants of `stage` in this profile (one unnamed variant when the profile names none)."""
        from rsna22_utils.core.config import settable_fields
        from rsna22_utils.core.registry import get_stage

        entry = get_stage(stage)
        fields = set(settable_fields(entry.config))
        spec = self.stages.get(stage, {})
        shared = {k: v for k, v in self.every_stage.items() if k in fields}
        shared.update(spec.get("settings", {}))
        named = spec.get("variants") or {"": {}}
        out = []
        for name, variant in named.items():
            folds = variant.get("folds", spec.get("folds")) if entry.per_fold else None
            seeds = variant.get("seeds", spec.get("seeds")) if entry.per_fold else None
            if entry.per_fold:
                folds = [0] if folds is None else folds
                seeds = [0] if seeds is None else seeds
            out.append(Variant(name, {**shared, **variant.get("settings", {})}, folds, seeds))
        return out

    def variant(self, stage: str, name: str = "") -> Variant:
        """One variant of `stage`; an error naming the choices when `name` is not one of them."""
        found = {v.name: v for v in self.variants(stage)}
        if name in found:
            return found[name]
        choices = ", ".join(repr(v) for v in found)
        if name == "":
            raise ConfigError(f"profile {self.name!r} has several variants of {stage} ({choices}): choose one with variant=NAME")
        raise ConfigError(f"profile {self.name!r} has no variant {name!r} of {stage} (variants: {choices})")


def _profiles_folder() -> Path:
    from rsna22_utils.core.registry import competition

    return Path(str(importlib.resources.files(competition()) / "profiles"))


def available_profiles() -> list[str]:
    """Names of the profiles the competition package ships."""
    return sorted(p.stem for p in _profiles_folder().glob("*.json"))


def load_profile(name: str) -> Profile:
    """The profile `name` (a shipped profile's name or a path to a .json), checked against the stage configs."""
    path = Path(name) if name.endswith(".json") else _profiles_folder() / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown profile {name!r} (profiles: {', '.join(available_profiles())})")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    profile = Profile(
        name=str(data.get("profile", path.stem)),
        version=int(data.get("version", 0)),
        description=str(data.get("description", "")),
        every_stage=dict(data.get("every_stage", {})),
        stages=dict(data.get("stages", {})),
        path=str(path),
    )
    problems = _check(profile, data)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return profile


def _check(profile: Profile, data: dict[str, Any]) -> list[str]:
    from rsna22_utils.core.config import derived_fields, settable_fields
    from rsna22_utils.core.registry import VARIANT_NAME, stages

    known = stages()
    allowed = {"profile", "version", "description", "sources", "every_stage", "stages"}  # sources: where the values come from
    problems = [f"unknown top-level key {k!r}" for k in data if k not in allowed]
    fields = {name: set(settable_fields(entry.config)) - {"fold", "seed", "variant", "profile"} for name, entry in known.items()}
    for key in profile.every_stage:
        if not any(key in f for f in fields.values()):
            problems.append(f"every_stage setting {key!r} applies to no stage")
    for stage, spec in profile.stages.items():
        if stage not in known:
            problems.append(f"unknown stage {stage!r}")
            continue
        problems += [f"{stage}: unknown key {k!r}" for k in spec if k not in {"settings", "folds", "seeds", "variants"}]
        blocks = [("", spec)] + [(name, v) for name, v in (spec.get("variants") or {}).items()]
        for name, block in blocks:
            where = f"{stage} variant {name!r}" if name else stage
            if name and not (VARIANT_NAME.match(name)):
                problems.append(f"{where}: variant names use letters, digits and _ only")
            for key in block.get("settings", {}):
                if key not in fields[stage]:
                    hidden = derived_fields(known[stage].config)
                    why = f"the stage takes it from {hidden[key]}" if key in hidden else "no such setting of this stage"
                    problems.append(f"{where}: setting {key!r} ({why})")
            for key in ("folds", "seeds"):
                values = block.get(key)
                if values is None:
                    continue
                if not known[stage].per_fold:
                    problems.append(f"{where}: {key} given, but the stage runs once")
                elif not isinstance(values, list) or not values or not all(isinstance(v, int) for v in values):
                    problems.append(f"{where}: {key} must be a non-empty list of integers")
        if spec.get("variants") and not known[stage].per_fold:
            problems.append(f"{stage}: variants given, but the stage runs once")
    return problems


def profile_settings(name: str, stage: str, variant: str = "") -> dict[str, Any]:
    """The settings profile `name` gives one variant of `stage` (before the user's overrides)."""
    return dict(load_profile(name).variant(stage, variant).settings)


# ----------------------------------------------------------------------------- config show


def show_configs(
    stage: str, profile: str = "", overrides: dict[str, Any] | None = None, count_params: bool = False
) -> list[dict[str, Any]]:
    """The resolved configuration of each variant of `stage` under `profile` (+ `overrides`), one dict each:
    every config field (derived ones as the profile's earlier stages would fill them), `variant`, the sweep's
    `folds` / `seeds`, and with `count_params` the trainable parameters of the network it builds."""
    from rsna22_utils.core.config import resolve_config
    from rsna22_utils.core.registry import get_stage

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
    from rsna22_utils.core.config import parse_overrides

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
