"""The package's import graph: no circles (function-level imports included), and a core that names no competition.

Every `import` / `from ... import` anywhere in a module (top level, functions, TYPE_CHECKING blocks) is
an edge of the graph, so a circle cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "rsna22_utils"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The rsna22_utils modules (or packages) one import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """Module -> every rsna22_utils module it imports anywhere in its source."""
    files = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {module: set() for module in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            graph[module] |= {name for name in _imported(node, module, is_package) if name in files and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]], prefix: str) -> list[str]:
    """One import circle among the modules whose name starts with `prefix` ([] when there is none)."""
    inside = {m: {t for t in targets if t.startswith(prefix)} for m, targets in graph.items() if m.startswith(prefix)}
    try:
        graphlib.TopologicalSorter(inside).prepare()
    except graphlib.CycleError as error:
        return list(error.args[1])
    return []


def _competition_packages(graph: dict[str, set[str]]) -> set[str]:
    """rsna22_utils.<name> packages other than core."""
    return {m.split(".")[1] for m in graph if m.count(".") == 1 and m != "rsna22_utils.core" and (PACKAGE_ROOT / m.split(".")[1]).is_dir()}


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "rsna22_utils.cervical.submission" in graph["rsna22_utils.cervical.commands"]  # imported inside a function
    assert "rsna22_utils.core.registry" in graph["rsna22_utils.core.resolve"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b": {"a.x"}}, "a.") != []


def test_the_package_has_no_import_circle() -> None:
    assert find_cycle(import_graph(), "rsna22_utils") == []


def test_the_core_imports_no_competition_and_the_cli_names_none() -> None:
    graph = import_graph()
    competitions = _competition_packages(graph)
    assert "cervical" in competitions
    core = [m for m in graph if m.startswith("rsna22_utils.core")]
    reaching = {(m, target) for m in core for target in graph[m] if target.count(".") and target.split(".")[1] in competitions}
    assert reaching == set()
    sources = [PACKAGE_ROOT / "cli.py", *(PACKAGE_ROOT / "core").rglob("*.py")]
    for path in sources:
        text = path.read_text()
        named = [f"rsna22_utils.{name}" for name in competitions if f"rsna22_utils.{name}" in text]
        assert named == [], f"{path.name} names {named}"


@pytest.mark.slow
def test_importing_every_core_module_loads_no_competition() -> None:
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import rsna22_utils.core as core
        for module in pkgutil.iter_modules(core.__path__):
            importlib.import_module(f"rsna22_utils.core.{module.name}")
        print(sorted(m for m in sys.modules if m.startswith("rsna22_utils.") and not m.startswith("rsna22_utils.core")))
    """)
    root = PACKAGE_ROOT.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)}
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_submission_does_not_import_the_trainer() -> None:
    assert "rsna22_utils.core.train" not in import_graph()["rsna22_utils.cervical.submission"]
    code = "import sys, rsna22_utils.cervical.submission; print('rsna22_utils.core.train' in sys.modules)"
    root = PACKAGE_ROOT.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)}
    )
    assert out.stdout.strip() == "False"


def test_each_stage_name_is_spelt_in_its_stage_table_only() -> None:
    """A stage's name ("05_train_fracture") is a string literal in its competition's stages.py and nowhere else in
    the package: every other module names a stage through the stage table's constants."""
    import re

    spelt: dict[str, set[str]] = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"\d\d_[a-z][a-z_]*", node.value):
                spelt.setdefault(node.value, set()).add(str(path.relative_to(PACKAGE_ROOT)))
    assert "01_train_box" in spelt  # the scan sees the stage tables
    elsewhere = {name: sorted(p for p in paths if not p.endswith("/stages.py")) for name, paths in spelt.items()}
    assert {name: paths for name, paths in elsewhere.items() if paths} == {}
