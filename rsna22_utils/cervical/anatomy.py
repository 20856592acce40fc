"""The names this competition predicts and locates: one home for them."""

from __future__ import annotations

CERVICAL: tuple[int, ...] = tuple(range(1, 8))  # label values of C1..C7 in the segmentations
VERTEBRAE: tuple[str, ...] = tuple(f"C{k}" for k in CERVICAL)
#: The 8 targets of a study, in the order of every prediction array of the kit.
TARGETS: tuple[str, ...] = ("patient_overall", *VERTEBRAE)
#: A box in pixels of the original slice: left, top, right, bottom.
BOX_COLUMNS: list[str] = ["x0", "y0", "x1", "y1"]
