"""No network at import: the whole kit imports with the network cut (tests/no_network/sitecustomize.py)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import rsna22_utils
from tests.helpers import REPO_ROOT, offline_env


def _run(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_the_network_guard_refuses_and_logs_a_lookup(tmp_path: Path) -> None:
    env, log = offline_env(tmp_path)
    proc = _run("import socket\ntry:\n    socket.getaddrinfo('pypi.org', 443)\nexcept OSError as e:\n    print(e)", env)
    assert "network cut by the test" in proc.stdout, proc.stderr
    assert "pypi.org" in log.read_text()


@pytest.mark.slow
def test_importing_every_module_makes_no_network_attempt(tmp_path: Path) -> None:
    """albumentations' update check (a DNS lookup for pypi.org at import) is off; nothing else calls out."""
    modules = sorted(m.name for m in pkgutil.walk_packages(rsna22_utils.__path__, "rsna22_utils.") if not m.name.endswith("__main__"))
    assert "rsna22_utils.cervical.data" in modules and "rsna22_utils.cervical.submission" in modules
    env, log = offline_env(tmp_path)
    proc = _run("import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)", env, *modules)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not log.exists(), log.read_text()
    assert "Error fetching version info" not in proc.stderr
