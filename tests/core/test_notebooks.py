"""Notebook pairs: .py (source of truth) and .ipynb agree, sync fixes them, one parameters cell each."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from rsna22_utils.core.notebooks import NOTEBOOKS_DIR, add_commands, check_pairs, check_thin, sync_pairs

STAGE_PY = """# %% [markdown]
# # Tiny stage
# Writes nothing.

# %% tags=["parameters"]
fold = 0
seed = 0
overrides = {}

# %%
print(fold + seed)
"""


@pytest.fixture
def pair_dir(tmp_path: Path) -> Path:
    (tmp_path / "01_stage.py").write_text(STAGE_PY)
    assert sync_pairs(tmp_path) == [tmp_path / "01_stage.ipynb"]
    return tmp_path


def test_synced_pair_has_no_problems_and_ipynb_is_clean(pair_dir: Path) -> None:
    assert check_pairs(pair_dir) == []
    assert check_thin(pair_dir) == []
    nb = json.loads((pair_dir / "01_stage.ipynb").read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code", "code"]
    assert nb["cells"][1]["metadata"]["tags"] == ["parameters"]
    assert all(c.get("outputs", []) == [] for c in nb["cells"])
    # nothing to do a second time: the .ipynb is not rewritten
    before = (pair_dir / "01_stage.ipynb").read_text()
    assert sync_pairs(pair_dir) == []
    assert (pair_dir / "01_stage.ipynb").read_text() == before


def test_edited_py_is_reported_and_sync_fixes_it(pair_dir: Path) -> None:
    py = pair_dir / "01_stage.py"
    py.write_text(STAGE_PY.replace("print(fold + seed)", "print(fold * seed)"))
    problems = check_pairs(pair_dir)
    assert len(problems) == 1
    assert "01_stage.py" in problems[0] and "notebooks sync" in problems[0] and "cell 2" in problems[0]
    assert sync_pairs(pair_dir) == [pair_dir / "01_stage.ipynb"]
    assert check_pairs(pair_dir) == []
    assert "fold * seed" in (pair_dir / "01_stage.ipynb").read_text()


def test_outputs_in_ipynb_are_not_a_difference_but_sync_strips_them(pair_dir: Path) -> None:
    ipynb = pair_dir / "01_stage.ipynb"
    nb = json.loads(ipynb.read_text())
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["0\n"]}]
    nb["cells"][2]["execution_count"] = 3
    ipynb.write_text(json.dumps(nb))
    assert check_pairs(pair_dir) == []
    assert sync_pairs(pair_dir) == [ipynb]
    assert json.loads(ipynb.read_text())["cells"][2]["outputs"] == []


def test_missing_pairs_are_reported(pair_dir: Path) -> None:
    (pair_dir / "02_other.py").write_text(STAGE_PY)
    (pair_dir / "01_stage.py").unlink()
    problems = check_pairs(pair_dir)
    assert len(problems) == 2
    assert any("02_other.py" in p and "no paired 02_other.ipynb" in p for p in problems)
    assert any("01_stage.ipynb" in p and "no paired 01_stage.py" in p for p in problems)
    changed = sync_pairs(pair_dir)
    assert set(changed) >= {pair_dir / "02_other.ipynb", pair_dir / "01_stage.py"}
    assert check_pairs(pair_dir) == []


def test_check_thin_counts_parameters_cells(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(STAGE_PY.replace(' tags=["parameters"]', ""))
    (tmp_path / "b.py").write_text(STAGE_PY + '\n# %% tags=["parameters"]\nx = 1\n')
    (tmp_path / "c.py").write_text(STAGE_PY)
    problems = check_thin(tmp_path)
    assert len(problems) == 2
    assert "a.py: 0 cells tagged" in problems[0] and "b.py: 2 cells tagged" in problems[1]


def test_cli_check_and_sync(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    (tmp_path / "01_stage.py").write_text(STAGE_PY)
    check = parser.parse_args(["notebooks", "check", "--dir", str(tmp_path)])
    assert check.func(check) == 1
    sync = parser.parse_args(["notebooks", "sync", "--dir", str(tmp_path)])
    assert sync.func(sync) == 0
    assert check.func(check) == 0


def test_repo_notebooks_are_in_sync() -> None:
    if not any(NOTEBOOKS_DIR.glob("*.py")) and not any(NOTEBOOKS_DIR.glob("*.ipynb")):
        pytest.skip(f"{NOTEBOOKS_DIR} has no notebooks yet")
    assert check_pairs(NOTEBOOKS_DIR) == []
    assert check_thin(NOTEBOOKS_DIR) == []
