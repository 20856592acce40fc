"""A stage's output folder as a small class: the files it writes, named once, read with one error.

A competition gives each stage whose outputs later stages read a subclass (`stage`, `files`), so
that no reader builds a path by hand and none can ask for a file the stage never writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import pandas as pd

from rsna22_utils.core.registry import stage_dir


@dataclass(frozen=True)
class StageOutputs:
    """The folder one stage writes: `files` maps each output's name to its file name under `root`."""

    root: Path
    stage: ClassVar[str]
    files: ClassVar[dict[str, str]]

    @classmethod
    def of(cls, work_dir: str | Path) -> Self:
        """The stage's folder under `work_dir` (where the runner puts it)."""
        return cls(stage_dir(work_dir, cls.stage))

    def path(self, name: str) -> Path:
        """Where output `name` is; an error for a name the stage does not write."""
        if name not in self.files:
            raise KeyError(f"{self.stage} writes no {name!r}; its outputs: {', '.join(self.files)}")
        return Path(self.root) / self.files[name]

    def read(self, name: str) -> Any:
        """Output `name`: a table (.parquet, .csv) as a DataFrame, a .json file as its value."""
        path = self.path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run {self.stage} first ({self.root})")
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
