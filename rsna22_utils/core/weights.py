"""ImageNet weights for machines without internet (Kaggle): `python -m rsna22_utils weights fetch`.

On a machine with internet, each backbone is built by timm with `pretrained=True` and its state
dict saved as `{out}/{backbone}.safetensors`; a run then sets `pretrained_dir={out}` (e.g. the
folder attached as a Kaggle dataset) and `create_backbone` loads the file instead of downloading.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from rsna22_utils.core.config import settable_fields
from rsna22_utils.core.profiles import load_profile
from rsna22_utils.core.registry import stages

logger = logging.getLogger(__name__)


def profile_backbones(profile: str) -> list[str]:
    """Every backbone a profile's stages and variants build (the stage's default where the profile sets none)."""
    loaded = load_profile(profile)
    names = set()
    for stage, entry in stages().items():
        if "backbone" not in settable_fields(entry.config):
            continue
        default = next(f.default for f in dataclasses.fields(entry.config) if f.name == "backbone")
        names.update(str(variant.settings.get("backbone", default)) for variant in loaded.variants(stage))
    return sorted(names)


def fetch_weights(backbones: list[str], out: str | Path, force: bool = False) -> list[Path]:
    """timm's ImageNet weights of each backbone -> `{out}/{backbone}.safetensors` (kept when present unless `force`)."""
    import timm  # lazy: CLI start-up (timm loads torch)

    from rsna22_utils.core.runs import save_weights  # lazy: CLI start-up (torch)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in backbones:
        path = out / f"{name}.safetensors"
        if path.exists() and not force:
            logger.info("%s: already there (--force fetches it again)", path)
            written.append(path)
            continue
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as error:  # re-raised with the backbone's name
            raise RuntimeError(f"backbone {name!r}: could not fetch timm's ImageNet weights ({type(error).__name__}: {error})") from error
        save_weights(model, path)
        logger.info("wrote %s (%d tensors)", path, len(model.state_dict()))
        written.append(path)
    return written


def _cmd_fetch(args: argparse.Namespace) -> int:
    backbones = list(args.backbones or [])
    if args.profile:
        backbones += profile_backbones(args.profile)
    if not backbones:
        raise SystemExit("weights fetch: name the backbones (--backbones A B ...) or a profile (--profile original)")
    fetch_weights(sorted(set(backbones)), args.out, force=args.force)
    logger.info("use them offline with -p pretrained=true -p pretrained_dir=%s", args.out)
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `weights fetch` to the CLI."""
    p = subparsers.add_parser("weights", help="ImageNet weights of the backbones, for offline machines (Kaggle)")
    sub = p.add_subparsers(dest="weights_command", required=True)
    f = sub.add_parser("fetch", help="download each backbone's timm weights to DIR/<backbone>.safetensors (needs internet)")
    f.add_argument("--out", type=Path, required=True, help="folder to write (then pretrained_dir=DIR)")
    f.add_argument("--profile", default=None, help="every backbone of this profile's stages (e.g. original)")
    f.add_argument("--backbones", nargs="+", default=None, metavar="NAME", help="timm model names")
    f.add_argument("--force", action="store_true", help="fetch again the files already there")
    f.set_defaults(func=_cmd_fetch)
