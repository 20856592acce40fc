"""`config show` before anything has run: a stage config's derived fields as its stage would fill them.

A stage derives some settings from the outputs of earlier stages (the cache's size and windows from
00, the frozen CNN's settings of 06 from its 05 run); here they come from the same profile's configs
of those stages instead (the `preview` hook of the stage table).
"""

from __future__ import annotations

import dataclasses

from rsna22_utils.cervical.configs import StudyTrainConfig, settings_from_fracture_run
from rsna22_utils.cervical.stages import PREPARE, TRAIN_FRACTURE
from rsna22_utils.core.config import StageConfig, derived_fields
from rsna22_utils.core.resolve import resolve_config


def preview_derived(cfg: StageConfig) -> StageConfig:
    """`cfg` with its derived fields as its stage would fill them when run after the earlier stages of
    its profile: the cache's size and windows from the profile's 00_prepare settings, and for a stage-06
    run the frozen CNN's settings from the stage-05 variant of the same name (`config show`)."""
    hidden = derived_fields(type(cfg))
    if not hidden:
        return cfg
    base = {"profile": cfg.profile} if cfg.profile else {}
    values: dict = {}
    if "image_size" in hidden:
        prepare = resolve_config(PREPARE, base)
        values.update(image_size=prepare.image_size, windows=prepare.windows)
    if isinstance(cfg, StudyTrainConfig):
        fracture = resolve_config(TRAIN_FRACTURE, {**base, "variant": cfg.variant} if cfg.profile else {})
        values.update(settings_from_fracture_run(fracture))
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k in hidden})
