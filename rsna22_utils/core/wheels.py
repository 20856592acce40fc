"""Offline wheels that fit the Kaggle image: its pinned package versions, a check of each wheel's
requirements against them, and an install that takes one wheel at a time.

`kaggle-image.txt` (repo root) pins the image the notebooks run on (`python==3.11`,
`numpy==1.26.4`, ...). The wheels dataset is downloaded against those pins and checked with
`check_wheels`, so a wheel that needs numpy >= 2 is a build error here, not an empty install on
Kaggle. `install_wheels` runs one `pip install` per wheel: pip refuses a whole command when one
of its wheels does not fit, and would then install nothing (not even dicomsdl, which needs nothing).

Standard library only (`packaging` is imported lazily, from pip when not installed on its own):
`python -m rsna22_utils.core.kaggle build-dataset wheels` runs without numpy or torch.
"""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsna22_utils.core.paths import REPO_ROOT

logger = logging.getLogger(__name__)

IMAGE_FILE = REPO_ROOT / "kaggle-image.txt"
PLATFORM = "manylinux2014_x86_64"
INSTALLED = "installed"


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): `Pylibjpeg_LibJPEG` -> `pylibjpeg-libjpeg`."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class KaggleImage:
    """The Kaggle image the notebooks run on: its Python (major.minor) and the versions of its packages."""

    python: str
    packages: dict[str, str] = field(default_factory=dict)  # canonical name -> version
    source: str = ""  # the file it was read from (for messages)

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker values of the image (Linux x86_64 CPython), to evaluate a wheel's conditional requirements."""
        return {
            "python_version": self.python,
            "python_full_version": f"{self.python}.0",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_machine": "x86_64",
            "os_name": "posix",
            "extra": "",
        }


def load_image(path: Path | str = IMAGE_FILE) -> KaggleImage:
    """Read `name==version` lines (# comments); `python==X.Y` names the image's Python. Errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the Kaggle image's package versions ({exc})") from None
    pins: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected `name==version`, got {line!r}")
        pins[canonical_name(name.strip())] = version.strip()
    python = pins.pop("python", "")
    if not re.fullmatch(r"3\.\d+", python):
        raise ValueError(f"{path}: needs a `python==3.X` line (the image's Python, major.minor), got {python or 'none'}")
    return KaggleImage(python, pins, str(path))


def _packaging() -> Any:
    """The `packaging` modules (requirements, version): the package when installed, else pip's vendored copy."""
    try:
        from packaging import requirements, version  # lazy: whichever packaging this Python has
    except ImportError:
        from pip._vendor.packaging import requirements, version
    return requirements, version


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name `name-version-...whl`."""
    parts = Path(wheel).name.split("-")
    if len(parts) < 5 or not wheel.name.endswith(".whl"):
        raise ValueError(f"{wheel}: not a wheel file name (name-version-python-abi-platform.whl)")
    return canonical_name(parts[0]), parts[1]


def wheel_requirements(wheel: Path) -> list[str]:
    """The `Requires-Dist` lines of a wheel's METADATA."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            name = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
            if name is None:
                raise ValueError(f"{wheel}: no *.dist-info/METADATA inside")
            text = archive.read(name).decode("utf-8", "replace")
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{wheel}: not a valid wheel ({exc})") from None
    headers = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in headers.splitlines() if line.startswith("Requires-Dist:")]


def check_wheels(wheels_dir: Path, image: KaggleImage) -> list[str]:
    """Why each wheel of `wheels_dir` would not install on `image` (one line per unmet requirement); empty = all fit.

    A requirement is met by the image's pinned version or by a wheel in the folder; requirements
    whose marker is false on the image (another Python, an extra) do not count.
    """
    requirements, version = _packaging()
    wheels = sorted(Path(wheels_dir).glob("*.whl"))
    available = {**dict(wheel_name_version(w) for w in wheels), **image.packages}
    environment = image.marker_environment()
    problems = []
    for wheel in wheels:
        for line in wheel_requirements(wheel):
            requirement = requirements.Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = canonical_name(requirement.name)
            have = available.get(name)
            if have is None:
                problems.append(f"{wheel.name} needs {line}: neither the image ({image.source}) nor the wheels have {name}")
            elif not requirement.specifier.contains(version.Version(have), prereleases=True):
                holder = f"the image ({image.source}) has" if name in image.packages else "the wheels hold"
                problems.append(f"{wheel.name} needs {line}, but {holder} {name} {have}")
    return problems


def _pip_reason(stderr: str) -> str:
    """The line of pip's output that says why an install failed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors[0] if errors else lines[-1] if lines else "pip failed without a message").removeprefix("ERROR: ")


def install_wheels(wheels_dir: Path | str, target: Path | str | None = None) -> dict[str, str]:
    """`pip install` each wheel of `wheels_dir` on its own, offline; {wheel file name: "installed" or pip's reason}.

    One call per wheel so that a wheel that does not fit the image cannot block the others.
    Failures are logged, not raised: the submission's pre-flight raises when a decoder the test set
    needs is still missing. A missing or empty folder installs nothing (the image may have every decoder).
    `target` installs into that folder instead of the environment (tests).
    """
    wheels_dir = Path(wheels_dir)
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:  # not on Kaggle, or the dataset is not attached: the pre-flight says whether decoders are missing
        logger.info("%s: no wheels to install; the DICOM decoders must come from this environment", wheels_dir)
        return {}
    results: dict[str, str] = {}
    for wheel in wheels:
        where = ["--target", str(target)] if target is not None else []
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels_dir), "--disable-pip-version-check"]
        proc = subprocess.run([*cmd, "--quiet", *where, str(wheel)], capture_output=True, text=True)
        results[wheel.name] = INSTALLED if proc.returncode == 0 else _pip_reason(proc.stderr)
        if proc.returncode != 0:
            logger.warning("wheel %s not installed: %s", wheel.name, results[wheel.name])
    importlib.invalidate_caches()  # packages installed after start-up become importable
    failed = [name for name, result in results.items() if result != INSTALLED]
    logger.info(
        "wheels from %s: %d installed, %d failed%s",
        wheels_dir,
        len(results) - len(failed),
        len(failed),
        f" ({', '.join(failed)})" if failed else "",
    )
    return results
