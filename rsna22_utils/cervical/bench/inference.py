"""`bench-inference`: what the submission (07_inference) costs per test study, and whether it fits Kaggle's 9 h.

Two forms: with trained runs (`--data-dir`, `--weights`) it times the submission's own per-study path
(`predict_study`) on real or synthetic studies; with `--profile` it measures one model of each family
of a profile's ensemble (random weights) on one synthetic study, scales the parts to the profile's
model counts and a 300-slice study, and projects the whole test set on a T4 and a P100 from FLOPs.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsna22_utils.cervical.bench.cost import (
    GPU_PEAK_FP16,
    INFER_UTILISATION,
    KAGGLE_SLICES,
    TrainingData,
    default_training_data,
    example_batch,
    forward_flops,
    stage_configs,
    study_range,
)
from rsna22_utils.cervical.bench.decode import real_decode_ms
from rsna22_utils.cervical.stages import INFERENCE, TRAIN_BOX
from rsna22_utils.core.registry import stages
from rsna22_utils.core.timing import LapTimer

if TYPE_CHECKING:  # numpy, pandas, torch: imported where used, since the CLI imports this module to build its parser
    import pandas as pd

logger = logging.getLogger(__name__)

KAGGLE_TEST_STUDIES = 1500  # hidden test set: ~1,500 studies


def study_folders(data_dir: Path, n_studies: int) -> list[Path]:
    """The first `n_studies` study folders of test_images/ (or, without test studies, train_images/)."""
    folders = sorted(p for p in (data_dir / "test_images").glob("*") if p.is_dir()) or sorted(
        p for p in (data_dir / "train_images").glob("*") if p.is_dir()
    )
    if not folders:
        raise FileNotFoundError(f"{data_dir}: no study folders in test_images/ or train_images/")
    return folders[:n_studies]


def time_study(ensemble: Any, folder: Path, cfg: Any) -> tuple[Any, LapTimer]:
    """One study through the submission's own code: `decode_study` (decode + encode, timed inside) and
    `predict_study` with a lap timer (box, crops, study models)."""
    import torch

    from rsna22_utils.cervical.ensemble import decode_study, predict_study

    study = decode_study(folder.name, folder, ensemble.specs)
    if study.error:
        raise RuntimeError(f"{folder}: {study.error}")
    device = ensemble.device
    timer = LapTimer(functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None)
    predict_study(ensemble, study, cfg, cfg.tta_flip, timer)
    return study, timer


def bench_inference(data_dir: str | Path, weights_dir: str | Path, n_studies: int = 5, num_workers: int = 2) -> pd.DataFrame:
    """Per-study seconds of 07_inference split into decode / preprocessing / models, on CPU (and CUDA), + a projection.

    Each study runs through the submission's own `decode_study` and `predict_study` (its lap timer):
    decode = read_study; preprocessing = encode (window + resize per input representation) + crops
    and 3-slice stacking; model = box models on every slice + every study model (with flip TTA per
    the 07 config). The first study warms up and is left out. The projection (`inference_projection`)
    is in `.attrs["projection"]`.
    """
    import pandas as pd
    import torch

    from rsna22_utils.cervical.ensemble import load_ensemble
    from rsna22_utils.core.resolve import resolve_config

    data_dir = Path(data_dir)
    folders = study_folders(data_dir, n_studies)
    if len(folders) == 1:
        logger.warning("one study only: its (warm-up) timing is not in the table; give n_studies >= 2")
    cfg = resolve_config(INFERENCE, {"data_dir": str(data_dir), "weights_dir": str(weights_dir), "out": "unused.csv"})
    rows = []
    for device in [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []):
        ensemble = load_ensemble(weights_dir, device)
        for i, folder in enumerate(folders):
            study, timer = time_study(ensemble, folder, cfg)
            if i == 0:  # warms up kernels and allocators
                continue
            seconds = timer.seconds
            rows.append(
                {
                    "device": device.type,
                    "study": folder.name,
                    "slices": len(study.slices),
                    "px": int(study.slices["rows"].iloc[0]),
                    "decode_s": study.decode_s,
                    "encode_s": study.encode_s,
                    "stack_s": seconds["crops"],
                    "model_s": seconds["box"] + seconds["study models"],
                }
            )
    table = pd.DataFrame(rows, columns=["device", "study", "slices", "px", "decode_s", "encode_s", "stack_s", "model_s"])
    table["preprocess_s"] = table["encode_s"] + table["stack_s"]
    table["total_s"] = table["decode_s"] + table["preprocess_s"] + table["model_s"]
    box_spec = ensemble.box.spec
    table.attrs["projection"] = inference_projection(table, box_spec, num_workers)
    _print_inference(table, len(folders) - 1, data_dir, weights_dir, num_workers, box_spec)
    return table


def inference_projection(table: pd.DataFrame, box_spec: Any, num_workers: int) -> pd.DataFrame:
    """Per device, Kaggle's ~1,500 studies x ~300 slices at 512 px: decode by real-file ms/slice
    (../shared/realdata, dicomsdl, one core), window + resize by an encode of a 512 px volume, stacking and
    models by the ms/slice measured (model inputs do not depend on the DICOM size). Decode + encode run in
    `num_workers` workers overlapped with stacking + models: per study max((decode + encode) / workers, stacking + models)."""
    import numpy as np
    import pandas as pd

    from rsna22_utils.core.cache import encode_study

    decode_ms, _ = real_decode_ms()
    fake = np.random.default_rng(0).integers(-1000, 2000, (24, 512, 512)).astype(np.int16)
    t0 = time.perf_counter()
    encode_study(fake, box_spec)
    encode_ms = 1e3 * (time.perf_counter() - t0) / len(fake)
    rows = []
    for device, group in table.groupby("device", sort=False):
        per_slice = {col: 1e3 * group[col].sum() / group["slices"].sum() for col in ("stack_s", "model_s")}
        workers_s = KAGGLE_SLICES * (decode_ms + encode_ms) / 1e3 / max(1, num_workers)
        main_s = KAGGLE_SLICES * (per_slice["stack_s"] + per_slice["model_s"]) / 1e3
        rows.append(
            {
                "device": device,
                "decode_ms_slice": decode_ms,
                "encode_ms_slice_512px": encode_ms,
                "stack_ms_slice": per_slice["stack_s"],
                "model_ms_slice": per_slice["model_s"],
                "study_s": max(workers_s, main_s),
                "bound": "decode" if workers_s > main_s else "models",
                f"hours_{KAGGLE_TEST_STUDIES}": KAGGLE_TEST_STUDIES * max(workers_s, main_s) / 3600,
            }
        )
    return pd.DataFrame(rows)


def _print_inference(table: pd.DataFrame, n: int, data_dir: Path, weights_dir: str | Path, num_workers: int, box_spec: Any) -> None:
    decode_ms, decode_source = real_decode_ms()
    print(f"07_inference per study ({n} studies after a warm-up one; {data_dir}, weights {weights_dir})")
    shown = table[["device", "slices", "px", "decode_s", "preprocess_s", "model_s", "total_s"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"\nprojection to {KAGGLE_TEST_STUDIES} studies x {KAGGLE_SLICES} slices at 512 px, {num_workers} decode workers "
        f"(decode {decode_ms:.1f} ms/slice, {decode_source}); per study = max((decode + encode) / workers, stack + models); "
        f"models as measured above, i.e. at these weights' input sizes (box {box_spec.name}):"
    )
    print(table.attrs["projection"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


KAGGLE_HOURS = 9.0  # Kaggle's limit for a GPU submission notebook
KAGGLE_DECODE_WORKERS = 2  # DataLoader workers that decode + encode test studies beside the models


def serving_count(folds: list[int], seeds: list[int]) -> int:
    """Runs of a variant that predict test studies: its full-data runs (fold -1) x seeds when the sweep has
    them, else every fold x seed (`registry.serving_runs`)."""
    from rsna22_utils.core.config import FULL_DATA_FOLD

    return len(seeds) * (1 if FULL_DATA_FOLD in folds else len(folds))


@dataclass
class SubmissionFamily:
    """One kind of model of the submission (the box models, or one study-model variant)."""

    name: str
    count: int  # serving runs in the profile
    cfg: Any
    network: Any
    fwd_flops_per_image: float


def submission_families(profile: str, overrides: dict[str, Any] | None = None) -> list[SubmissionFamily]:
    """The box family (01) and one family per 06 variant of `profile`, with random-weight networks."""
    from rsna22_utils.cervical.models import create_network

    families = []
    for stage in [name for name, spec in stages().items() if spec.submission]:
        for row, cfg in stage_configs(stage, profile, overrides or {}):
            network = create_network(cfg).eval()
            n = 2
            flops = forward_flops(network, example_batch(network, cfg, n, device="meta")) / n
            name = "box" if stage == TRAIN_BOX else f"study {row['variant'] or cfg.backbone}"
            families.append(SubmissionFamily(name, serving_count(row["folds"], row["seeds"]), cfg, network, flops))
    return families


def study_images_per_model(cfg: Any, range_slices: int, flip: bool) -> int:
    """Images one study model's CNN embeds for a study range: back-to-back windows of seq_len images,
    twice with flip TTA."""
    span = cfg.seq_len * cfg.slices_per_image
    return -(-range_slices // span) * cfg.seq_len * (2 if flip else 1)


def whole_study_box(box_network: Any) -> Any:
    """A copy of a (random-weight) box network whose head says "box on every slice, the whole image": the
    study models then see the whole study, as they see a real study's C1-C7 range (same cost per image)."""
    import copy

    import torch

    network = copy.deepcopy(box_network)
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.copy_(torch.tensor([10.0, -10.0, -10.0, 10.0, 10.0]))  # has_box logit; sigmoid -> x0 y0 x1 y1 = 0 0 1 1
    return network


def _time_one_study(
    folder: Path, box: SubmissionFamily, study_net: Any, run_cfg: Any, submission_cfg: Any, dev: Any
) -> tuple[dict, int, int]:
    """Seconds of each part of predicting one study with one box and one study model, through the submission's
    own `decode_study` and `predict_study` (its lap timer; on CUDA a first untimed pass warms kernels):
    (times, slices, images the study CNN embedded)."""
    from rsna22_utils.cervical.data import InputNorm
    from rsna22_utils.cervical.ensemble import BoxEnsemble, Ensemble, StudyRun
    from rsna22_utils.core.cache import CacheSpec

    box_ensemble = BoxEnsemble(
        [whole_study_box(box.network).to(dev)], CacheSpec.of(box.cfg), box.cfg.box_input_slices, InputNorm.of(box.cfg)
    )
    ensemble = Ensemble(box_ensemble, [StudyRun("measured", study_net.to(dev), run_cfg)], dev)
    for _ in range(2 if dev.type == "cuda" else 1):
        study, timer = time_study(ensemble, folder, submission_cfg)
    study_net.cpu()
    seconds = timer.seconds
    times = {
        "decode": study.decode_s,
        "encode": study.encode_s,
        "box": seconds["box"],
        "stack": seconds["crops"],
        "study": seconds["study models"],
    }
    return times, len(study.slices), timer.items["study models"]


def synthetic_test_study(work_dir: Path, image_size: int, n_slices: int) -> Path:
    """The folder of one synthetic test study of `n_slices` slices at `image_size` px under `work_dir` (made once)."""
    from rsna22_utils.cervical.synth import generate_competition

    data_dir = work_dir / "competition"
    if not (data_dir / "test.csv").exists():
        generate_competition(data_dir, n_studies=1, n_test_studies=1, image_size=image_size, median_slices=n_slices, seed=0, workers=1)
    return next(p for p in sorted((data_dir / "test_images").iterdir()) if p.is_dir())


def stacking_passes(studies: list[SubmissionFamily]) -> int:
    """How often a test study's images are cropped and stacked: once per distinct input (`ensemble.study_input_key`),
    shared by every study model that takes it."""
    from rsna22_utils.cervical.ensemble import study_input_key

    return len({study_input_key(f.cfg) for f in studies})


def _measured_table(times: dict[str, float], n: int, computed: int, box: SubmissionFamily, measured: SubmissionFamily) -> pd.DataFrame:
    """The measured parts of one study: seconds, and per slice (per image for the study model)."""
    import pandas as pd

    def row(part: str, key: str, per: str) -> dict[str, Any]:
        return {"part": part, "models": 1, "measured_s": times[key], "per": per}

    ms = {k: 1e3 * times[k] / n for k in ("decode", "encode", "stack", "box")}
    return pd.DataFrame(
        [
            row("decode", "decode", f"{ms['decode']:.1f} ms/slice"),
            row("preprocess (encode)", "encode", f"{ms['encode']:.1f} ms/slice"),
            row("preprocess (crops, stacking)", "stack", f"{ms['stack']:.1f} ms/slice"),
            row(f"box ({box.cfg.backbone})", "box", f"{ms['box']:.1f} ms/slice"),
            row(
                f"{measured.name} ({measured.cfg.backbone})", "study", f"{1e3 * times['study'] / computed:.1f} ms/image ({computed} images)"
            ),
        ]
    )


def bench_submission(
    profile: str = "original",
    n_slices: int = 24,
    image_size: int = 512,
    work_dir: str | Path | None = None,
    device: str = "auto",
    measure_seq_len: int | None = 4,
    overrides: dict[str, Any] | None = None,
    test_studies: int = KAGGLE_TEST_STUDIES,
    test_slices: int = KAGGLE_SLICES,
    data: TrainingData | None = None,
    out: str | Path | None = None,
) -> dict[str, pd.DataFrame]:
    """Per-study cost of the submission `profile` ensembles: measured here on one synthetic study of
    `n_slices` slices at `image_size` px with one model per family (random weights), then scaled to the
    profile's model counts and a `test_slices`-slice study; FLOPs per study and family from the FLOP
    counter; a projection to `test_studies` studies on a T4 and a P100 (`GPU_PEAK_FP16` x
    `INFER_UTILISATION`) against Kaggle's 9 h, and how many study models fit when all do not.

    decode = read_study; preprocessing = encode_study (window + resize, every cache spec) + study_images
    (crops, 3-slice stacking); box = every slice through one box model; study = one study model over its
    range (flip TTA per `tta_flip`; `measure_seq_len` shortens its windows for the CPU measurement, the
    time per image is what scales). A study's range on the test set = the C1-C7 extent (+2 slices a side)
    of the real segmented studies. Decode + encode run in `KAGGLE_DECODE_WORKERS` workers beside the
    models, so a study takes max(CPU side / workers, stacking + models).
    """
    import dataclasses
    import json
    import tempfile

    import numpy as np

    from rsna22_utils.cervical.configs import SubmissionConfig
    from rsna22_utils.core.config import settable_fields
    from rsna22_utils.core.device import resolve_device
    from rsna22_utils.core.resolve import resolve_config

    data = data or default_training_data()
    dev = resolve_device(device)
    own = {k: v for k, v in (overrides or {}).items() if k in settable_fields(SubmissionConfig)}  # the rest go to 01 / 06
    submission_cfg = resolve_config(INFERENCE, {"profile": profile, "out": "unused.csv", **own})
    families = submission_families(profile, overrides)
    box, studies = families[0], families[1:]
    folder = synthetic_test_study(Path(work_dir or tempfile.mkdtemp(prefix="rsna22-bench-")), image_size, n_slices)

    measured = studies[0]
    run_cfg = dataclasses.replace(measured.cfg, seq_len=measure_seq_len) if measure_seq_len else measured.cfg
    times, n, computed = _time_one_study(folder, box, measured.network, run_cfg, submission_cfg, dev)

    spine = round(float(np.mean(data.sample_spine)))
    range_slices = study_range(test_slices, spine, measured.cfg.slice_margin)
    per_slice = {k: times[k] / n for k in ("decode", "encode", "box")}
    study_s_per_image = times["study"] / computed
    stack_s_per_slice = times["stack"] / n
    measured_table = _measured_table(times, n, computed, box, measured)

    decode_ms, decode_source = real_decode_ms()
    per_image = {family.name: per_slice["box"] if family is box else study_s_per_image for family in families}
    family_table = _family_table(families, per_image, dev.type, test_slices, spine, submission_cfg.tta_flip)
    cpu_side_s = test_slices * (decode_ms / 1e3 + per_slice["encode"]) / KAGGLE_DECODE_WORKERS
    stack_s = stack_s_per_slice * range_slices * stacking_passes(studies)
    projection = _projection(family_table, [dev.type, *INFER_UTILISATION], cpu_side_s, stack_s, test_studies)
    _print_submission(
        measured_table,
        family_table,
        projection,
        dev,
        n,
        image_size,
        measure_seq_len,
        (decode_ms, decode_source),
        range_slices,
        submission_cfg,
    )
    result = {"measured": measured_table, "families": family_table, "projection": projection}
    if out:
        Path(out).write_text(json.dumps({k: v.to_dict(orient="records") for k, v in result.items()}, indent=2, default=str))
        logger.info("wrote %s", out)
    return result


def _family_table(
    families: list[SubmissionFamily], seconds_per_image: dict[str, float], here: str, test_slices: int, spine: int, flip: bool
) -> pd.DataFrame:
    """Per family: models, images each model sees per test study, FLOPs per study, and seconds per study
    on this device (measured s/image x images x models) and on each GPU of `INFER_UTILISATION`."""
    import pandas as pd

    rows = []
    for i, family in enumerate(families):
        if i == 0:  # the box family: every slice
            images = test_slices
        else:
            images = study_images_per_model(family.cfg, study_range(test_slices, spine, family.cfg.slice_margin), flip)
        tflops = family.count * images * family.fwd_flops_per_image / 1e12
        row = {
            "family": f"{family.name} ({family.cfg.backbone})",
            "models": family.count,
            "images_per_model": images,
            "fwd_gflops_per_image": family.fwd_flops_per_image / 1e9,
            "tflops_per_study": tflops,
            f"{here}_s_per_study": family.count * images * seconds_per_image[family.name],
        }
        for gpu, utilisation in INFER_UTILISATION.items():
            row[f"{gpu}_s_per_study"] = tflops * 1e12 / (GPU_PEAK_FP16[gpu] * utilisation)
        rows.append(row)
    return pd.DataFrame(rows)


def _projection(families: pd.DataFrame, devices: list[str], cpu_side_s: float, stack_s: float, test_studies: int) -> pd.DataFrame:
    """Hours for `test_studies` on each device, whether they fit Kaggle's limit, and how many study models
    (all box models kept) would: a study takes max(CPU side, stacking + box + study models)."""
    import pandas as pd

    budget = KAGGLE_HOURS * 3600 / test_studies
    n_study = int(families.loc[1:, "models"].sum())
    rows = []
    for where in devices:
        box_s = float(families.loc[0, f"{where}_s_per_study"])
        study_s = float(families.loc[1:, f"{where}_s_per_study"].sum())
        per_model = study_s / max(1, n_study)  # the crops are cut once per study, however many models take them
        wall = max(cpu_side_s, stack_s + box_s + study_s)
        fit = n_study if wall <= budget else int(max(0, (budget - box_s - stack_s) // per_model)) if cpu_side_s <= budget else 0
        rows.append(
            {
                "device": where,
                "decode_encode_s": cpu_side_s,
                "stack_s": stack_s,
                "box_s": box_s,
                "study_s": study_s,
                "study_wall_s": wall,
                f"hours_{test_studies}": test_studies * wall / 3600,
                "hours_models_only": test_studies * (box_s + study_s) / 3600,
                "fits_9h": wall <= budget,
                "study_models_that_fit": min(fit, n_study),
            }
        )
    return pd.DataFrame(rows)


def _print_submission(
    measured: pd.DataFrame,
    families: pd.DataFrame,
    projection: pd.DataFrame,
    dev: Any,
    n: int,
    image_size: int,
    seq_len: int | None,
    decode: tuple[float, str],
    range_slices: int,
    submission_cfg: Any,
) -> None:
    decode_ms, decode_source = decode
    test_studies = int(projection.filter(like="hours_").columns[0].removeprefix("hours_"))
    fmt = {"float_format": lambda v: f"{v:,.2f}", "index": False}
    print(
        f"submission, measured on {dev}: one synthetic study of {n} slices at {image_size} px, one model per family "
        f"(random weights; study windows of {seq_len or 'the config'} images, flip TTA {submission_cfg.tta_flip})"
    )
    print(measured.to_string(**fmt))
    print(
        f"\nper test study of {KAGGLE_SLICES} slices (study models over {range_slices} slices: the real segmented studies' mean C1-C7 "
        f"extent + slice_margin a side); {dev.type}_s scales the measured ms per slice / image by images x models; GPU s = "
        "FLOPs / (peak x utilisation) with "
        + ", ".join(f"{g} {GPU_PEAK_FP16[g] / 1e12:g} TFLOPS fp16 x {u:.0%}" for g, u in INFER_UTILISATION.items())
    )
    print(families.to_string(**fmt))
    print(
        f"\nprojection to {test_studies} studies: per study = max(decode + encode on {KAGGLE_DECODE_WORKERS} workers "
        f"(decode {decode_ms:.1f} ms/slice, {decode_source}), stacking + box + study models); Kaggle limit {KAGGLE_HOURS:g} h "
        f"(the kit's time_budget_hours {submission_cfg.time_budget_hours:g}); "
        "study_models_that_fit: the most study models (all box models kept) "
        "within the limit (SubmissionConfig.max_study_models); hours_models_only: box + study models alone (stacking is "
        "CPU time of this machine, once per study and distinct input)"
    )
    print(projection.to_string(**fmt))


def _bench_inference(args: argparse.Namespace) -> int:
    from rsna22_utils.core.config import parse_overrides

    if args.profile:
        bench_submission(args.profile, n_slices=args.slices, device=args.device, overrides=parse_overrides(args.params), out=args.out)
        return 0
    if args.data_dir is None or args.weights is None:
        print("error: bench-inference needs --data-dir and --weights (trained runs), or --profile NAME", file=sys.stderr)
        return 2
    bench_inference(args.data_dir, args.weights, n_studies=args.studies)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """bench-inference."""
    p = subparsers.add_parser(
        "bench-inference",
        help="per-study seconds of decode / preprocessing / models + projection to the test set (trained runs, or a profile's ensemble)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="competition folder with test_images/ (or train_images/)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder <stage>/fold<f>-seed<s>/, e.g. runs")
    p.add_argument("--studies", type=int, default=5)
    p.add_argument(
        "--profile", default=None, help="instead of --data-dir / --weights: a profile's ensemble (random weights) on a synthetic study"
    )
    p.add_argument("--slices", type=int, default=24, help="--profile: slices of the synthetic study measured")
    p.add_argument("--device", default="auto", help="--profile: where to measure (auto: cuda when present, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="--profile: also write the tables as JSON")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help="--profile: setting overrides")
    p.set_defaults(func=_bench_inference)
