"""`bench-backbones`: training and inference images per second of the 3rd place's networks, per AMP dtype."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy, pandas, torch: imported where used, since the CLI imports this module to build its parser
    import pandas as pd

# The 3rd place's networks (darraghdog/RSNA22 configs): box efficientnet_b1 on 3 slices; vertebra
# resnest50d / efficientnetv2_rw_m and fracture resnest50d / seresnext50_32x4d over 32 images x 3 slices.
ORIGINAL_BACKBONES: tuple[tuple[str, str], ...] = (
    ("box", "efficientnet_b1"),
    ("sequence", "resnest50d"),
    ("sequence", "seresnext50_32x4d"),
    ("sequence", "efficientnetv2_rw_m"),
)


def device_sync(device) -> Callable[[], Any]:
    """What waits for queued work on `device` (torch.cuda.synchronize on CUDA, nothing elsewhere)."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def train_and_infer_throughput(model, batch: dict, n_images: int, dtype, device, warmup: int, steps: int) -> tuple[float, float]:
    """Images/s of AdamW training steps and of inference on one batch, under autocast `dtype` (None: fp32)."""
    import torch

    from rsna22_utils.core.timing import throughput

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def train_step() -> None:
        with autocast():
            loss = sum(v.float().mean() for v in model(batch).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def infer_step() -> None:
        with torch.inference_mode(), autocast():
            model(batch)

    model.train()
    train = throughput(train_step, n_images, device_sync(device), warmup, steps)
    model.eval()
    return train, throughput(infer_step, n_images, device_sync(device), warmup, steps)


def _network_and_batch(family: str, name: str, image_size: int, batch_images: int, seq_len: int, lstm_hidden: int | None):
    """The network of `family` ("box" or "sequence") on backbone `name`, and a random batch for it."""
    import torch

    from rsna22_utils.cervical.models import BoxModel, SequenceModel, feature_size

    torch.manual_seed(0)
    if family == "box":
        return BoxModel(name, in_chans=3), {"image": torch.randn(batch_images, 3, image_size, image_size)}
    probe = BoxModel(name, in_chans=3).encoder
    hidden = lstm_hidden or feature_size(probe) + 32
    windows = max(1, batch_images // seq_len)
    model = SequenceModel(name, in_chans=3, n_outputs=14, lstm_hidden=hidden)
    return model, {"image": torch.randn(windows, seq_len, 3, image_size, image_size)}


def bench_backbones(
    backbones: tuple[tuple[str, str], ...] = ORIGINAL_BACKBONES,
    image_size: int = 512,
    batch_images: int = 64,
    seq_len: int = 32,
    device: str = "auto",
    warmup: int = 3,
    steps: int = 10,
    lstm_hidden: int | None = None,
) -> pd.DataFrame:
    """Training (forward + backward + AdamW step) and inference images/s of each network at `image_size`,
    under each AMP dtype the device runs (the kit's own choice first, then the other CUDA dtypes; fp32
    on CPU), with trainable parameters. The figures behind GPU-hour estimates.

    A box network sees `batch_images` single images; a sequence network `batch_images // seq_len`
    windows of `seq_len` 3-slice images (its BiLSTM, `lstm_hidden` = features + 32 as in the 3rd place
    unless given, runs over them).
    """
    import pandas as pd
    import torch

    from rsna22_utils.core.device import amp_dtype, resolve_device

    dev = resolve_device(device)
    dtypes = [amp_dtype(dev)]
    if dev.type == "cuda":
        dtypes += [d for d in (torch.float16, torch.bfloat16) if d not in dtypes]
    rows = []
    for family, name in backbones:
        model, batch = _network_and_batch(family, name, image_size, batch_images, seq_len, lstm_hidden)
        model.to(dev)
        batch = {k: v.to(dev) for k, v in batch.items()}
        n_images = batch["image"].shape[0] * (batch["image"].shape[1] if batch["image"].ndim == 5 else 1)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for dtype in dtypes:
            train, infer = train_and_infer_throughput(model, batch, n_images, dtype, dev, warmup, steps)
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
            rows.append(
                {
                    "network": f"{family} {name}",
                    "params_trainable": params,
                    "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
                    "image_size": image_size,
                    "train_img_s": train,
                    "infer_img_s": infer,
                    "peak_gib": peak,
                }
            )
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
        model.cpu()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    capability = ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else "-"
    print(f"networks at {image_size} px on {name} (compute capability {capability}; the kit's AMP dtype: {dtypes[0]})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return table


def _bench_backbones(args: argparse.Namespace) -> int:
    chosen = tuple(tuple(b.split(":", 1)) for b in args.backbones) if args.backbones else ORIGINAL_BACKBONES
    bench_backbones(chosen, args.image_size, args.batch_images, args.seq_len, args.device, steps=args.steps)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """bench-backbones."""
    p = subparsers.add_parser("bench-backbones", help="training / inference images per second and parameters of the 3rd place's networks")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--batch-images", type=int, default=64, help="images per step (sequence networks: windows of --seq-len)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backbones", nargs="*", default=None, metavar="FAMILY:NAME", help="e.g. box:efficientnet_b1 sequence:resnest50d")
    p.set_defaults(func=_bench_backbones)
