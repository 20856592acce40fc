"""rsna22_utils: the RSNA 2022 Cervical Spine Fracture Detection kit (3rd-place design)."""

from __future__ import annotations

import logging

__version__ = "0.1.0"


def setup_logging(verbose: bool = False) -> None:
    """Show the kit's log lines (what was written where, fallbacks, time budget) on stderr.

    The CLI calls it; so does every notebook, whose kernel would otherwise drop INFO lines.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
