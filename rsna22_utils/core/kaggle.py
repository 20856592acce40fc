"""Kaggle delivery: build the kit's datasets, generate kernel metadata, push both to Kaggle.

Three datasets carry the kit to Kaggle notebooks (which run without internet at inference), each
mounted at /kaggle/input/<slug> with the slugs of kaggle-settings.json (`mount_path`):
  rsna22-utils   this package's source + notebooks + the kaggle-settings.json it was built with
  rsna22-weights the runs the submission loads (<stage>/fold<f>-seed<s>/model.safetensors + config.json + manifest.json)
  rsna22-wheels  offline wheels of the DICOM decoders that fit the Kaggle image (core.wheels, kaggle-image.txt)
Kernel metadata (`kernel-metadata/<stage>/kernel-metadata.json`) is generated from
`KaggleSettings`, never edited by hand; the notebook is copied next to it at push time.

The `kaggle` client is imported lazily (only by the push functions): importing it authenticates
at import time and prints a long help text when no credentials are configured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsna22_utils import setup_logging
from rsna22_utils.core.paths import KAGGLE_INPUT, REPO_ROOT, kaggle_input_dir
from rsna22_utils.core.registry import (
    CONFIG,
    DEFAULT_COMPETITION,
    MANIFEST,
    WEIGHTS,
    competition,
    finished_runs,
    get_stage,
    parse_run_name,
    run_dir,
    serving_runs,
    stage_dir,
    stages,
)
from rsna22_utils.core.wheels import IMAGE_FILE, PLATFORM, KaggleImage, check_wheels, load_image, wheel_name_version

logger = logging.getLogger(__name__)

SETTINGS_FILE = REPO_ROOT / "kaggle-settings.json"
KERNEL_METADATA_DIR = REPO_ROOT / "kernel-metadata"
PLACEHOLDER_OWNER = "YOUR_KAGGLE_USERNAME"


def _competition_name() -> str:
    return competition().rsplit(".", 1)[-1]


def settings_file() -> Path:
    """The selected competition's settings: kaggle-settings.json, or kaggle-settings.<name>.json for another competition."""
    name = _competition_name()
    return SETTINGS_FILE if name == DEFAULT_COMPETITION else REPO_ROOT / f"kaggle-settings.{name}.json"


def kernel_metadata_dir() -> Path:
    """Where the selected competition's kernel folders are: kernel-metadata/, or kernel-metadata/<name>/ for another one."""
    name = _competition_name()
    return KERNEL_METADATA_DIR if name == DEFAULT_COMPETITION else KERNEL_METADATA_DIR / name


def stage_names() -> list[str]:
    """Every stage of the registry, in order: one notebook and one kernel each."""
    return list(stages())


DEFAULT_WHEEL_PACKAGES: tuple[str, ...] = (
    "dicomsdl",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "python-gdcm",
    "pyjpegls",
)

_SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class KaggleError(RuntimeError):
    """A Kaggle delivery step failed (bad metadata, missing file, missing credentials, API error)."""


@dataclass
class KaggleSettings:
    """Everything that names the kit on Kaggle: owner, competition, dataset and kernel slugs.

    Loaded from `kaggle-settings.json` at the repo root (see `load_settings`); kernel slugs
    default to `slugify(f"{title_prefix} {stage}")` so the title resolves to the id, as Kaggle wants.
    """

    owner: str = PLACEHOLDER_OWNER
    competition: str = "rsna-2022-cervical-spine-fracture-detection"
    utils_dataset: str = "rsna22-utils"
    weights_dataset: str = "rsna22-weights"
    wheels_dataset: str = "rsna22-wheels"
    title_prefix: str = "RSNA22 kit"
    is_private: bool = True
    license: str = "MIT"
    kernel_slugs: dict[str, str] = field(default_factory=dict)

    def dataset_ref(self, name: str) -> str:
        """`owner/slug` of dataset `name` (utils, weights or wheels)."""
        return f"{self.owner}/{self.dataset_slug(name)}"

    def dataset_slug(self, name: str) -> str:
        """Slug of dataset `name` (utils, weights or wheels)."""
        slugs = {"utils": self.utils_dataset, "weights": self.weights_dataset, "wheels": self.wheels_dataset}
        if name not in slugs:
            raise KaggleError(f"unknown dataset {name!r}; expected one of {sorted(slugs)}")
        return slugs[name]

    def input_path(self, name: str) -> Path:
        """Where Kaggle mounts `name` (utils, weights, wheels or competition) in a notebook: <input>/<slug>."""
        return kaggle_input_dir() / (self.competition if name == "competition" else self.dataset_slug(name))

    def kernel_title(self, stage: str) -> str:
        """Kernel title of a notebook stage, e.g. 'RSNA22 kit 07 inference'."""
        return f"{self.title_prefix} {stage.replace('_', ' ')}"

    def kernel_slug(self, stage: str) -> str:
        """Kernel slug of a stage (from `kernel_slugs`, else the slug of its title)."""
        return self.kernel_slugs.get(stage) or slugify(self.kernel_title(stage))

    def kernel_ref(self, stage: str) -> str:
        """`owner/slug` of a stage's kernel."""
        return f"{self.owner}/{self.kernel_slug(stage)}"


def slugify(text: str) -> str:
    """Kaggle-style slug: lowercase ASCII letters and digits joined by single hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load_settings(path: Path | str | None = None, **overrides: Any) -> KaggleSettings:
    """Settings from defaults < JSON/TOML file < $KAGGLE_USERNAME (owner) < keyword overrides.

    `path` defaults to `kaggle-settings.json` at the repo root (skipped when absent). Unknown keys
    in the file are an error naming the file, so a typo does not silently fall back to a default.
    """
    values: dict[str, Any] = {}
    file = Path(path) if path is not None else settings_file()
    if file.exists():
        try:
            if file.suffix == ".toml":
                import tomllib  # lazy: Python >= 3.11 only (the kit supports 3.10)

                data = tomllib.loads(file.read_text())
                data = data.get("kaggle", data)
            else:
                data = json.loads(file.read_text())
        except (ValueError, OSError) as exc:
            raise KaggleError(f"{file}: cannot read Kaggle settings: {exc}") from exc
        known = {f.name for f in dataclasses.fields(KaggleSettings)}
        unknown = sorted(set(data) - known - {"$comment", "comment"})
        if unknown:
            raise KaggleError(f"{file}: unknown Kaggle settings {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in data.items() if k in known})
    elif path is not None:
        raise KaggleError(f"{file}: Kaggle settings file not found")
    if os.environ.get("KAGGLE_USERNAME"):
        values["owner"] = os.environ["KAGGLE_USERNAME"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return KaggleSettings(**values)


def mount_path(name: str) -> Path:
    """Where a notebook finds `name` (utils, weights, wheels, competition) on Kaggle, from this kit's settings.

    In the utils dataset the settings file is the one it was built with, so renamed slugs carry through.
    """
    return load_settings().input_path(name)


# --------------------------------------------------------------------------------------------
# Metadata validation
# --------------------------------------------------------------------------------------------


def validate_slug(slug: str, what: str = "slug", min_len: int = 6, max_len: int = 50) -> None:
    """Raise KaggleError unless `slug` is lowercase letters/digits/hyphens of allowed length.

    Kaggle's client rejects dataset slugs outside 6..50 characters when creating a dataset.
    """
    if not (min_len <= len(slug) <= max_len):
        raise KaggleError(f"{what} {slug!r}: must be {min_len}-{max_len} characters (has {len(slug)})")
    if not _SLUG_RE.match(slug):
        raise KaggleError(f"{what} {slug!r}: only lowercase letters, digits and single hyphens are allowed")


def validate_ref(ref: str, what: str = "id") -> None:
    """Raise KaggleError unless `ref` is `owner/slug` with a valid owner and slug."""
    parts = ref.split("/")
    if len(parts) != 2 or not parts[0] or not _OWNER_RE.match(parts[0]):
        raise KaggleError(f"{what} {ref!r}: expected 'owner/slug'")
    validate_slug(parts[1], what=f"{what} slug", min_len=5 if what.startswith("kernel") else 6)


def validate_dataset_metadata(meta: dict[str, Any]) -> None:
    """Check a dataset-metadata.json dict against the rules Kaggle's client enforces."""
    title = meta.get("title", "")
    if not (6 <= len(title) <= 50):
        raise KaggleError(f"dataset title {title!r}: must be 6-50 characters (has {len(title)})")
    validate_ref(meta.get("id", ""), what="dataset id")
    licenses = meta.get("licenses")
    if not isinstance(licenses, list) or len(licenses) != 1 or not licenses[0].get("name"):
        raise KaggleError(f"dataset {meta.get('id')}: licenses must be exactly one {{'name': ...}}")
    subtitle = meta.get("subtitle")
    if subtitle and not (20 <= len(subtitle) <= 80):
        raise KaggleError(f"dataset {meta.get('id')}: subtitle must be 20-80 characters (has {len(subtitle)})")


def dataset_metadata(name: str, settings: KaggleSettings, title: str, subtitle: str, description: str) -> dict[str, Any]:
    """A validated dataset-metadata.json dict for dataset `name` (utils, weights, wheels)."""
    meta = {
        "title": title,
        "id": settings.dataset_ref(name),
        "subtitle": subtitle,
        "description": description,
        "licenses": [{"name": settings.license}],
    }
    validate_dataset_metadata(meta)
    return meta


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _fresh_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Dataset builders
# --------------------------------------------------------------------------------------------

UTILS_README = """# {title}

Source of `rsna22_utils` (the rsna22-kit package) and the kit's notebooks, for Kaggle notebooks
that run without internet. Add this dataset to a notebook, then:

```python
import sys
sys.path.insert(0, "{input}/{slug}")
import rsna22_utils
```

Decoders that the Kaggle image lacks (dicomsdl, pylibjpeg plugins, gdcm, pyjpegls) come from the
wheels dataset, one wheel at a time (a wheel that does not fit the image cannot block the others):

```python
from rsna22_utils.core.kaggle import mount_path
from rsna22_utils.core.wheels import install_wheels
install_wheels(mount_path("wheels") / "wheels")
```

Built from the repository with `python -m rsna22_utils kaggle build-dataset utils`.
"""


def build_utils_dataset(out_dir: Path, settings: KaggleSettings, root: Path = REPO_ROOT) -> Path:
    """Write the utils dataset folder: package source, notebooks/*.py, requirements.txt, kaggle-settings.json, README.

    Why: Kaggle inference notebooks run offline, so the kit travels as a dataset added to sys.path;
    the settings it was built with travel too, so its notebooks find the other datasets by their slugs.
    """
    out = _fresh_dir(out_dir)
    package = root / "rsna22_utils"
    if not (package / "__init__.py").exists():
        raise KaggleError(f"{package}: package source not found")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".ipynb_checkpoints")
    shutil.copytree(package, out / "rsna22_utils", ignore=ignore)
    notebooks = sorted((root / "notebooks").glob("*.py"))
    (out / "notebooks").mkdir()
    for nb in notebooks:
        shutil.copy2(nb, out / "notebooks" / nb.name)
    if (root / "requirements.txt").exists():
        shutil.copy2(root / "requirements.txt", out / "requirements.txt")
    _write_json(out / SETTINGS_FILE.name, {"$comment": "the settings this dataset was built with", **dataclasses.asdict(settings)})
    slug = settings.dataset_slug("utils")
    title = f"{settings.title_prefix} utils"
    (out / "README.md").write_text(UTILS_README.format(title=title, slug=slug, input=KAGGLE_INPUT))
    meta = dataset_metadata(
        "utils",
        settings,
        title=title,
        subtitle="rsna22_utils package source and notebooks",
        description=(out / "README.md").read_text(),
    )
    _write_json(out / "dataset-metadata.json", meta)
    n_files = sum(1 for p in out.rglob("*") if p.is_file())
    logger.info("wrote utils dataset %s (%d files, %d notebooks)", out, n_files, len(notebooks))
    return out


RUN_FILES = (WEIGHTS, CONFIG, "metrics.json")


def submission_stages() -> list[str]:
    """The stages whose runs the submission loads (registry entries with `submission=True`)."""
    return [name for name, stage in stages().items() if stage.submission]


def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~"))


def portable_config(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """A run's config.json dict without the machine it was trained on: absolute paths become the stage's defaults.

    Why: the submission rebuilds each network from its config alone, and `/home/me/runs/...` means
    nothing on Kaggle (it only leaks the trainer's folders).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(get_stage(stage).config) if f.default is not dataclasses.MISSING}
    return {key: (defaults.get(key, "") if _is_local_path(value) else value) for key, value in config.items()}


def _ship_run(run: Path, stage: str, out: Path) -> dict[str, Any]:
    """Copy one run's weights and portable config to `out/<stage>/<run>/`; its manifest entry."""
    missing = [f for f in RUN_FILES if not (run / f).is_file()]
    if missing:
        raise KaggleError(f"run folder {run}: missing {', '.join(missing)}")
    key = parse_run_name(run.name)
    if key is None:
        raise KaggleError(f"run folder {run}: name must be [<variant>-]fold<f>-seed<s>")
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / CONFIG).read_text())
    except ValueError as exc:
        raise KaggleError(f"{run}: metrics.json or {CONFIG} is not valid JSON: {exc}") from exc
    dest = run_dir(out, stage, key.fold, key.seed, key.variant)
    dest.mkdir(parents=True)
    shutil.copy2(run / WEIGHTS, dest / WEIGHTS)
    _write_json(dest / CONFIG, portable_config(config, stage))
    entry = {"stage": stage, "variant": key.variant, "fold": key.fold, "seed": key.seed}
    return {**entry, "path": dest.relative_to(out).as_posix(), "metrics": metrics}


def build_weights_dataset(work_dir: Path, out_dir: Path, settings: KaggleSettings, stages: Sequence[str] | None = None) -> Path:
    """Write the weights dataset from a runs folder: `<stage>/fold<f>-seed<s>/{model.safetensors,config.json}` + manifest.json.

    Ships the finished runs of the stages the submission loads (`submission_stages()`, or
    `stages`) that serve test studies (`registry.serving_runs`: the full-data runs when there are
    any), nothing else: the notebook reads no other run, and each costs upload and mount time.
    Configs lose their local paths (`portable_config`); the manifest lists each run with its
    metrics, so the notebook (and a reader) knows what it loads.
    """
    stages = list(stages) if stages is not None else submission_stages()
    if not stages:
        raise KaggleError("build_weights_dataset: no stage of the registry is marked submission=True")
    found = {}
    for stage in stages:
        try:
            found[stage] = serving_runs(finished_runs(work_dir, stage))
        except FileNotFoundError as exc:
            raise KaggleError(f"weights dataset: {exc}") from None
    files = [Path(stage_dir(work_dir, name)) / file for name in stage_names() for file in get_stage(name).submission_files]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise KaggleError(f"weights dataset: the submission reads {', '.join(missing)}; run its stage first")
    out = _fresh_dir(out_dir)
    runs = [_ship_run(run, stage, out) for stage, stage_runs in found.items() for run in stage_runs]
    for path in files:  # e.g. a fitted post-processing's coefficients
        (out / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / path.parent.name / path.name)
    _write_json(out / MANIFEST, {"runs": runs, "files": [f"{path.parent.name}/{path.name}" for path in files]})
    meta = dataset_metadata(
        "weights",
        settings,
        title=f"{settings.title_prefix} weights",
        subtitle=f"{len(runs)} trained runs of the rsna22-kit pipeline",
        description="Trained runs (safetensors + config) for stages: " + ", ".join(stages) + ". See manifest.json.",
    )
    _write_json(out / "dataset-metadata.json", meta)
    counts = ", ".join(f"{stage} {len(stage_runs)}" for stage, stage_runs in found.items())
    logger.info("wrote weights dataset %s from %s: %d runs (%s)", out, work_dir, len(runs), counts)
    return out


Downloader = Callable[[list[str]], None]


def _pip_download(cmd: list[str]) -> None:
    """Run a `pip download` command line, raising KaggleError with pip's output on failure."""
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KaggleError(f"pip download failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def build_wheels_dataset(
    out_dir: Path,
    settings: KaggleSettings,
    packages: Sequence[str] = DEFAULT_WHEEL_PACKAGES,
    image: KaggleImage | None = None,
    platform: str = PLATFORM,
    downloader: Downloader | None = _pip_download,
) -> Path:
    """Write the wheels dataset: `wheels/*.whl` that install on the Kaggle image, + an install.sh.

    Why: the inference kernel has no internet, so decoders missing from the Kaggle image are
    installed offline, and a wheel built for numpy 2 does not install next to the image's numpy
    1.26. pip resolves `packages` and their dependencies for the image's Python under its pinned
    versions (`image`, default `kaggle-image.txt`); wheels of packages the image already has are
    dropped, and every remaining wheel's requirements are checked against the pins (`check_wheels`).
    `downloader` receives the `pip download` argv (inject a fake in tests; None skips downloading
    and only writes metadata + install.sh).
    """
    image = image or load_image()
    out = _fresh_dir(out_dir)
    wheels = out / "wheels"
    wheels.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "kaggle-image-constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(image.packages.items())))
        cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", image.python]
        cmd += ["--platform", platform, "--implementation", "cp", "--disable-pip-version-check", "-d", str(wheels)]
        cmd += ["--constraint", str(constraints), *packages]
        if downloader is not None:
            downloader(cmd)
    for wheel in sorted(wheels.glob("*.whl")):  # dependencies the image has (numpy): its own build stays
        if wheel_name_version(wheel)[0] in image.packages:
            wheel.unlink()
            logger.info("dropped %s: the Kaggle image has %s", wheel.name, wheel_name_version(wheel)[0])
    found = sorted(p.name for p in wheels.glob("*.whl"))
    if downloader is not None and not found:
        raise KaggleError(f"{wheels}: no wheels were downloaded for {list(packages)}")
    problems = check_wheels(wheels, image)
    if problems:
        raise KaggleError(f"{wheels}: wheels that would not install on the Kaggle image:\n  " + "\n  ".join(problems))
    (out / "install.sh").write_text(INSTALL_SH.format(slug=settings.dataset_slug("wheels")))
    (out / "install.sh").chmod(0o755)
    meta = dataset_metadata(
        "wheels",
        settings,
        title=f"{settings.title_prefix} wheels",
        subtitle=f"Offline wheels (Python {image.python}) for DICOM decoding",
        description=(
            f"Wheels for {platform}, Python {image.python}, resolved against {', '.join(f'{n} {v}' for n, v in image.packages.items())}:"
            f" {', '.join(found) or '(none)'}.\n\nIn a notebook: `!bash {KAGGLE_INPUT}/{settings.dataset_slug('wheels')}/install.sh`"
        ),
    )
    _write_json(out / "dataset-metadata.json", meta)
    logger.info("wrote wheels dataset %s (%d wheels for Python %s, checked against %s)", out, len(found), image.python, image.source)
    return out


INSTALL_SH = """#!/usr/bin/env bash
# Offline install on Kaggle (add the {slug} dataset first): each wheel on its own, so a wheel that
# does not fit the image cannot block the others (what rsna22_utils.core.wheels.install_wheels does).
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
status=0
for wheel in "$here"/wheels/*.whl; do
  pip install --no-index --find-links "$here/wheels" "$wheel" || {{ echo "not installed: $wheel" >&2; status=1; }}
done
exit $status
"""


# --------------------------------------------------------------------------------------------
# Kernel metadata
# --------------------------------------------------------------------------------------------


def kernel_metadata(stage: str, settings: KaggleSettings, gpu: bool = True, internet: bool | None = None) -> dict[str, Any]:
    """kernel-metadata.json for a notebook stage (read by `kaggle kernels push -p FOLDER`).

    `code_file` is relative to the kernel folder: the notebook `<stage>.ipynb` is copied there at
    push time. Internet defaults to on for training stages (pip, timm weights) and off for
    07_inference (competition rule for code submissions).
    """
    if internet is None:
        internet = get_stage(stage).kaggle_internet
    meta = {
        "id": settings.kernel_ref(stage),
        "title": settings.kernel_title(stage),
        "code_file": f"{stage}.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": bool(settings.is_private),
        "enable_gpu": bool(gpu),
        "enable_tpu": False,
        "enable_internet": bool(internet),
        "dataset_sources": [settings.dataset_ref(n) for n in ("utils", "weights", "wheels")],
        "competition_sources": [settings.competition],
        "kernel_sources": [],
        "model_sources": [],
    }
    validate_ref(meta["id"], what="kernel id")
    if len(meta["title"]) < 5:
        raise KaggleError(f"kernel {meta['id']}: title {meta['title']!r} shorter than 5 characters")
    return meta


def write_kernel_folders(settings: KaggleSettings, stages: Iterable[str] | None = None, out_dir: Path | None = None) -> list[Path]:
    """Write `out_dir/<stage>/kernel-metadata.json` for each stage (default: the competition's kernel_metadata_dir); return the folders.

    Also writes `out_dir/.gitignore` so notebooks copied in at push time are not committed.
    """
    out_dir = Path(out_dir or kernel_metadata_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".gitignore").write_text(
        "# notebooks are copied here by `kaggle push-kernel`; the .ipynb in notebooks/ is the source\n*.ipynb\n"
    )
    folders = []
    for stage in stage_names() if stages is None else stages:
        folder = out_dir / stage
        _write_json(folder / "kernel-metadata.json", kernel_metadata(stage, settings))
        logger.info("wrote %s", folder / "kernel-metadata.json")
        folders.append(folder)
    return folders


def prepare_kernel_folder(stage: str, settings: KaggleSettings, out_dir: Path | None = None, notebooks_dir: Path | None = None) -> Path:
    """Regenerate a stage's kernel metadata from the settings and copy its notebook (default: the stage's) in."""
    notebook = Path(notebooks_dir or get_stage(stage).notebook.parent) / f"{stage}.ipynb"
    if not notebook.is_file():
        raise KaggleError(f"{notebook}: notebook not found; build it from the .py with `python -m rsna22_utils notebooks sync`")
    (folder,) = write_kernel_folders(settings, [stage], out_dir)
    shutil.copy2(notebook, folder / notebook.name)
    return folder


# --------------------------------------------------------------------------------------------
# Pushing (the only part that imports the kaggle client)
# --------------------------------------------------------------------------------------------


def kaggle_api() -> Any:
    """An authenticated `kaggle.KaggleApi`, imported lazily with a clear error on missing credentials.

    Credentials: KAGGLE_API_TOKEN, or KAGGLE_USERNAME + KAGGLE_KEY, or ~/.kaggle/kaggle.json.
    `KAGGLE_API_ENVIRONMENT=TEST` (kagglesdk's localhost:7777 environment, which kaggle 2.x
    itself ignores) points every call at a local recorder, as the tests do.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            from kaggle.api.kaggle_api_extended import KaggleApi  # lazy: optional client, needed only to push
    except ImportError as exc:
        raise KaggleError(f"cannot import the kaggle client ({exc}); install it with `pip install kaggle six`") from exc
    api = KaggleApi()
    if os.environ.get("KAGGLE_API_ENVIRONMENT") == "TEST":
        from kagglesdk import KaggleClient, KaggleEnv  # lazy: optional, comes with the kaggle client

        def build_test_client() -> Any:
            return KaggleClient(
                env=KaggleEnv.TEST,
                username=api.config_values.get(api.CONFIG_NAME_USER),
                password=api.config_values.get(api.CONFIG_NAME_KEY),
                api_token=api.config_values.get(api.CONFIG_NAME_TOKEN),
                response_processor=api.get_response_processor(),
            )

        api.build_kaggle_client = build_test_client
    try:
        with contextlib.redirect_stdout(captured):
            api.authenticate()
    except SystemExit:
        raise KaggleError(
            "no Kaggle credentials: set KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY), "
            "or save ~/.kaggle/kaggle.json (https://www.kaggle.com/settings -> API)"
        ) from None
    return api


def _check_owner(ref: str) -> None:
    if ref.startswith(PLACEHOLDER_OWNER + "/"):
        raise KaggleError(f"{ref}: owner is still the placeholder; set 'owner' in {SETTINGS_FILE.name} or export KAGGLE_USERNAME")


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def push_dataset(folder: Path, message: str, settings: KaggleSettings | None = None, api: Any = None) -> str:
    """Create the dataset in `folder` on Kaggle, or add a new version when it already exists.

    Sub-folders are zipped (dir_mode "zip"; Kaggle unpacks them). Returns the dataset ref.
    """
    folder = Path(folder)
    meta_file = folder / "dataset-metadata.json"
    if not meta_file.is_file():
        raise KaggleError(f"{meta_file}: not found; build the dataset first (kaggle build-dataset)")
    meta = json.loads(meta_file.read_text())
    validate_dataset_metadata(meta)
    ref = meta["id"]
    _check_owner(ref)
    public = not (settings.is_private if settings is not None else True)
    api = api or kaggle_api()
    try:
        api.dataset_status(ref)
        exists = True
    except Exception as exc:  # requests.HTTPError; 404 means "not created yet"
        if _http_status(exc) != 404:
            raise KaggleError(f"{ref}: cannot read dataset status: {exc}") from exc
        exists = False
    if exists:
        logger.info("dataset %s exists: uploading a new version from %s", ref, folder)
        result = api.dataset_create_version(str(folder), message, quiet=True, dir_mode="zip")
    else:
        logger.info("dataset %s not found: creating it from %s (private=%s)", ref, folder, not public)
        result = api.dataset_create_new(str(folder), public=public, quiet=True, dir_mode="zip")
    error = getattr(result, "error", None)
    if error:
        raise KaggleError(f"{ref}: Kaggle refused the upload: {error}")
    logger.info("pushed dataset %s (%s)", ref, getattr(result, "url", "") or getattr(result, "status", ""))
    return ref


def push_kernel(folder: Path, api: Any = None) -> str:
    """Push the kernel in `folder` (kernel-metadata.json + its code_file); return the kernel url/ref."""
    folder = Path(folder)
    meta_file = folder / "kernel-metadata.json"
    if not meta_file.is_file():
        raise KaggleError(f"{meta_file}: not found; run `kaggle write-kernel-metadata`")
    meta = json.loads(meta_file.read_text())
    _check_owner(meta.get("id", ""))
    code = folder / meta.get("code_file", "")
    if not code.is_file():
        raise KaggleError(f"{meta_file}: code_file {code.name!r} not found in {folder}")
    api = api or kaggle_api()
    result = api.kernels_push(str(folder))
    error = getattr(result, "error", None)
    if error:
        raise KaggleError(f"{meta['id']}: Kaggle refused the kernel: {error}")
    for kind in ("dataset", "competition", "kernel"):
        invalid = list(getattr(result, f"invalid_{kind}_sources", None) or [])
        if invalid:
            logger.warning("kernel %s: Kaggle did not attach %s sources %s (not created yet, or no access)", meta["id"], kind, invalid)
    url = getattr(result, "url", "") or meta["id"]
    logger.info("pushed kernel %s (version %s): %s", meta["id"], getattr(result, "version_number", None), url)
    return url


# --------------------------------------------------------------------------------------------
# Command line: python -m rsna22_utils kaggle ...
# --------------------------------------------------------------------------------------------

DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "kaggle"


def _settings_from_args(args: argparse.Namespace) -> KaggleSettings:
    return load_settings(args.settings, owner=args.owner)


def _cmd_build_dataset(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    out = args.out or DEFAULT_BUILD_DIR / args.name
    if args.name == "utils":
        build_utils_dataset(out, settings)
    elif args.name == "weights":
        build_weights_dataset(args.runs, out, settings)
    else:
        try:
            image = load_image(args.image)
        except ValueError as exc:
            raise KaggleError(str(exc)) from None
        build_wheels_dataset(out, settings, packages=args.packages or DEFAULT_WHEEL_PACKAGES, image=image, platform=args.platform)
    print(out)
    return 0


def _cmd_push_dataset(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    folder = args.folder or DEFAULT_BUILD_DIR / args.name
    if not (folder / "dataset-metadata.json").exists():
        if args.name != "utils":
            raise SystemExit(f"{folder}: not built; run `kaggle build-dataset {args.name} --out {folder}` first")
        build_utils_dataset(folder, settings)
    print(push_dataset(folder, args.message, settings))
    return 0


def _cmd_push_kernel(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    folder = prepare_kernel_folder(args.stage, settings)
    print(push_kernel(folder))
    return 0


def _cmd_write_kernel_metadata(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    for folder in write_kernel_folders(settings, args.stages or None, args.out):
        print(folder / "kernel-metadata.json")
    return 0


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn KaggleError into a one-line message and exit status 2 (no deep traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except KaggleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def add_commands(subparsers: Any) -> None:
    """Register `kaggle` (build-dataset, push-dataset, push-kernel, write-kernel-metadata)."""
    kaggle = subparsers.add_parser("kaggle", help="build / push the kit's Kaggle datasets and kernels")
    sub = kaggle.add_subparsers(dest="kaggle_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--settings",
            type=Path,
            default=None,
            help=f"settings file (default: {SETTINGS_FILE.name} at the repo root, kaggle-settings.<competition>.json for another)",
        )
        p.add_argument("--owner", default=None, help="Kaggle username (default: settings file, then $KAGGLE_USERNAME)")

    p = sub.add_parser("build-dataset", help="write a dataset folder with dataset-metadata.json")
    p.add_argument("name", choices=("utils", "weights", "wheels"))
    p.add_argument("--out", type=Path, default=None, help="folder to (re)create (default: build/kaggle/NAME)")
    p.add_argument(
        "--runs", type=Path, default=Path("runs"), help="weights: the runs folder (work_dir); ships the runs the submission loads"
    )
    p.add_argument("--packages", nargs="*", default=None, help="wheels: packages to download")
    p.add_argument(
        "--image", type=Path, default=IMAGE_FILE, help=f"wheels: the Kaggle image's Python and package versions ({IMAGE_FILE.name})"
    )
    p.add_argument("--platform", default=PLATFORM, help="wheels: pip platform tag")
    common(p)
    p.set_defaults(func=_guard(_cmd_build_dataset))

    p = sub.add_parser("push-dataset", help="create the dataset on Kaggle, or upload a new version")
    p.add_argument("name", choices=("utils", "weights", "wheels"))
    p.add_argument("--folder", type=Path, default=None, help="built folder (default: build/kaggle/NAME; utils is built when absent)")
    p.add_argument("--message", default="update from rsna22-kit", help="version notes")
    common(p)
    p.set_defaults(func=_guard(_cmd_push_dataset))

    p = sub.add_parser("push-kernel", help="regenerate a stage's kernel metadata, copy its notebook, push it")
    p.add_argument("stage", choices=stage_names())
    common(p)
    p.set_defaults(func=_guard(_cmd_push_kernel))

    p = sub.add_parser("write-kernel-metadata", help="write kernel-metadata/<stage>/kernel-metadata.json from the settings")
    p.add_argument("--stages", nargs="*", default=None, help=f"default: all ({', '.join(stage_names())})")
    p.add_argument("--out", type=Path, default=None, help="folder (default: kernel-metadata/, kernel-metadata/<competition>/ for another)")
    common(p)
    p.set_defaults(func=_guard(_cmd_write_kernel_metadata))


def main(argv: list[str] | None = None) -> int:
    """`python -m rsna22_utils.core.kaggle COMMAND`: the kaggle commands alone, needing only the stdlib
    (+ the kaggle client for pushes), so CI can publish without installing torch."""
    parser = argparse.ArgumentParser(prog="python -m rsna22_utils.core.kaggle", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept both `kaggle build-dataset ...` and `build-dataset ...`.
    if not argv or argv[0] != "kaggle":
        argv = [a for a in argv if a in ("-v", "--verbose")] + ["kaggle"] + [a for a in argv if a not in ("-v", "--verbose")]
    args = parser.parse_args(argv)

    setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
