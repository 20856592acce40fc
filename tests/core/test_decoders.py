"""Which transfer syntaxes this Python can decode, per backend (the submission asks before its first study)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rsna22_utils.core.decoders import decoder_problems
from tests.helpers import REPO_ROOT

EXPLICIT_LE, JPEG_LOSSLESS = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70"


@pytest.mark.parametrize("backend", ["auto", "dicomsdl", "pydicom"])
def test_every_syntax_decodable_here(backend: str) -> None:
    assert decoder_problems([EXPLICIT_LE, JPEG_LOSSLESS, JPEG_LOSSLESS], backend) == {}


def test_unknown_syntax_and_backend() -> None:
    assert decoder_problems(["1.2.3.4"], "pydicom") == {"1.2.3.4": "pydicom has no decoder for 1.2.3.4"}
    with pytest.raises(ValueError, match="backend must be one of"):
        decoder_problems([EXPLICIT_LE], "gdcm")


def test_missing_packages_are_named_per_backend() -> None:
    """Without dicomsdl and pydicom's JPEG plugins: native data still decodes with auto / pydicom, JPEG Lossless with nothing."""
    code = (
        "import sys\n"
        "for name in ('dicomsdl', 'pylibjpeg', 'libjpeg', 'gdcm'):\n"
        "    sys.modules[name] = None\n"
        "from rsna22_utils.core.decoders import decoder_problems\n"
        f"for backend in ('auto', 'dicomsdl', 'pydicom'):\n"
        f"    print(backend, decoder_problems([{EXPLICIT_LE!r}, {JPEG_LOSSLESS!r}], backend))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    auto, dicomsdl, pydicom = proc.stdout.splitlines()
    assert EXPLICIT_LE not in auto and "dicomsdl does not import" in auto and "pydicom lacks a plugin: gdcm" in auto
    assert EXPLICIT_LE in dicomsdl and JPEG_LOSSLESS in dicomsdl
    assert EXPLICIT_LE not in pydicom and "pylibjpeg - requires pylibjpeg" in pydicom and "dicomsdl" not in pydicom
