"""Whether this Python can decode given DICOM transfer syntaxes, asked before any study is read.

`read_study` (core.dicom) decodes with dicomsdl, or with pydicom and its plugins (pylibjpeg-*,
pyjpegls, python-gdcm, pillow); a missing plugin shows up only as a decode error per file. A run
that must not learn that from its thousandth study asks here first: `transfer_syntax` reads one
file's meta header, `decoder_problems` says which syntaxes no decoder of a backend can read.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

from rsna22_utils.core.dicom import BACKENDS


def transfer_syntax(path: str | Path) -> str:
    """The Transfer Syntax UID of one DICOM file (its meta header only; nothing else is read)."""
    from pydicom.filereader import read_file_meta_info  # lazy: as below, a broken pydicom must not stop the module

    return str(read_file_meta_info(str(path)).get("TransferSyntaxUID", ""))


def dicomsdl_problem() -> str | None:
    """Why dicomsdl cannot be used here (None when it imports)."""
    try:
        importlib.import_module("dicomsdl")
    except Exception as error:  # ImportError, or a broken build failing on load
        return f"dicomsdl does not import ({type(error).__name__}: {error})"
    return None


def pydicom_problem(syntax: str) -> str | None:
    """Why pydicom cannot decode `syntax` here: the plugins it lacks (None when one of them is installed)."""
    try:
        from pydicom.pixels import get_decoder  # lazy: a pydicom that fails to import is reported, not raised
        from pydicom.uid import UID
    except Exception as error:
        return f"pydicom does not import ({type(error).__name__}: {error})"
    try:
        decoder = get_decoder(UID(syntax))
    except NotImplementedError:
        return f"pydicom has no decoder for {syntax}"
    if decoder.is_available:
        return None
    return "pydicom lacks a plugin: " + " or ".join(decoder.missing_dependencies)


def decoder_problems(syntaxes: Iterable[str], backend: str = "auto") -> dict[str, str]:
    """syntax -> why no decoder of `backend` can read it here; empty when every syntax is decodable.

    `auto` reads with dicomsdl and falls back to pydicom per file, so it needs either of them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dicomsdl = dicomsdl_problem() if backend != "pydicom" else None
    problems = {}
    for syntax in sorted(set(syntaxes)):
        if backend == "dicomsdl":
            problem = dicomsdl
        elif backend == "pydicom" or dicomsdl is not None:
            problem = pydicom_problem(syntax)
            if problem and dicomsdl:
                problem = f"{dicomsdl}; {problem}"
        else:
            problem = None
        if problem:
            problems[syntax] = problem
    return problems
