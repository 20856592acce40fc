"""rsna22_utils: the RSNA 2022 Cervical Spine Fracture Detection kit (3rd-place design)."""

__version__ = "0.1.0"
