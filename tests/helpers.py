"""Helpers shared by the tests of every package: paths, offline environments, tiny wheels, tiny stage settings."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"
NO_NETWORK = Path(__file__).resolve().parent / "no_network"  # its sitecustomize refuses and logs connections


def offline_env(tmp_path: Path, pythonpath: list[Path] | None = None) -> tuple[dict[str, str], Path]:
    """Environment for a subprocess whose Python processes refuse (and log to the returned file) any network call.

    `pythonpath` replaces the repo on PYTHONPATH (default: the repo); the guard folder always comes first.
    """
    log = tmp_path / "network-attempts.log"
    paths = [NO_NETWORK, *(pythonpath if pythonpath is not None else [REPO_ROOT])]
    env = {**os.environ, "RSNA22_NETWORK_LOG": str(log), "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    env.pop("NO_ALBUMENTATIONS_UPDATE", None)  # what the kit does about albumentations is under test
    return env, log


def make_wheel(folder: Path, name: str, version: str = "1.0", requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel (module `name` with `VERSION`) that pip installs offline; `requires` -> Requires-Dist."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": "".join(
            [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
        ),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: rsna22-kit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def network_namespace() -> list[str]:
    """A command prefix that runs in a new network namespace with only loopback up (`unshare -rn`); [] where not allowed.

    The socket guard of `offline_env` works everywhere; this also cuts what does not go through Python sockets.
    """
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode != 0:
        return []
    # loopback starts down in a new namespace; papermill reaches its kernel through it
    return [unshare, "-rn", "sh", "-c", 'ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null; exec "$@"', "offline"]


# Tiny settings for every training stage: enough to produce real weights and outputs in seconds.
TINY_COMMON = {"n_folds": 2, "num_workers": 0, "pretrained": False, "device": "cpu"}
TINY_SEQUENCE = {"backbone": "mobilenetv3_small_050", "seq_len": 8, "slices_per_image": 3, "lstm_hidden": 16, "infer_stride": 24}
TINY_STAGES = {
    "00_prepare": {"image_size": 48, "workers": 1},
    "01_train_box": {"backbone": "mobilenetv3_small_050", "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 8},
    "02_infer_box": {"infer_batch_size": 64},
    # 2 windows per study: a fold may have a single segmented training study
    "03_train_vertebra": {**TINY_SEQUENCE, "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 2, "samples_per_study": 2},
    "04_infer_vertebra": {"infer_stride": 24, "infer_batch_size": 4},
    "05_train_fracture": {**TINY_SEQUENCE, "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 2, "samples_per_study": 1, "crop_size": 32},
    "06_train_study": {"epochs": 1, "batch_size": 4, "lstm_hidden": 16, "max_len": 32},
}


TINY_FOLDS = {"01_train_box": [0, 1], "03_train_vertebra": [0, 1]}  # every fold: out-of-fold boxes and pseudo-labels


def tiny_settings(stage: str, values: dict) -> dict:
    """`values` restricted to the settings `stage` has (the shared ones apply only where they exist)."""
    from rsna22_utils.core.config import settable_fields
    from rsna22_utils.core.registry import get_stage

    fields = set(settable_fields(get_stage(stage).config))
    return {k: v for k, v in values.items() if k in fields}
