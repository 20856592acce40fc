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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsna22_utils.core.config import VARIANT_NAME, derived_fields, settable_fields
from rsna22_utils.core.errors import ConfigError
from rsna22_utils.core.registry import competition, get_stage, stages


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
    """`<competition package>/profiles`, of the selected competition."""
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
