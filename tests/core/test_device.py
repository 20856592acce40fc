"""One AMP choice for training and inference (`amp_dtype`): fp16 unless bf16 is asked for, and only where the GPU has it."""

from __future__ import annotations

import pytest
import torch

from rsna22_utils.core import device as kit_device
from rsna22_utils.core.errors import ConfigError


@pytest.mark.parametrize(
    ("capability", "choice", "dtype"),
    [
        ((6, 0), "auto", torch.float16),
        ((7, 5), "auto", torch.float16),
        ((8, 0), "auto", torch.float16),
        ((9, 0), "auto", torch.float16),
        ((7, 5), "fp16", torch.float16),
        ((9, 0), "fp16", torch.float16),
        ((8, 0), "bf16", torch.bfloat16),
        ((9, 0), "bf16", torch.bfloat16),
    ],
)
def test_amp_dtype_auto_is_fp16_on_every_gpu_and_bf16_when_asked(monkeypatch: pytest.MonkeyPatch, capability, choice, dtype) -> None:
    """auto = fp16 everywhere (faster than bf16 for every network on an H200; Kaggle's P100 6.0 and T4 7.5 have no
    native bf16, though `torch.cuda.is_bf16_supported()` says True there by counting emulation)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert kit_device.amp_dtype(torch.device("cuda", 0), choice) is dtype


@pytest.mark.parametrize("capability", [(6, 0), (7, 5)])
def test_bf16_below_compute_capability_8_is_an_error(monkeypatch: pytest.MonkeyPatch, capability) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with pytest.raises(ConfigError, match=f"compute capability {capability[0]}.{capability[1]}.*has no native bf16"):
        kit_device.amp_dtype(torch.device("cuda", 0), "bf16")
    with pytest.raises(ConfigError, match="amp_dtype must be one of auto, fp16, bf16"):
        kit_device.amp_dtype(torch.device("cuda", 0), "fp8")


def test_no_autocast_off_cuda() -> None:
    cpu = torch.device("cpu")
    assert kit_device.amp_dtype(cpu) is None
    with kit_device.autocast(cpu):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_the_trainer_and_the_submission_use_the_one_choice() -> None:
    from rsna22_utils.cervical import ensemble, study_box
    from rsna22_utils.core import train

    assert train.amp_dtype is kit_device.amp_dtype
    assert study_box.autocast is kit_device.autocast and ensemble.autocast is kit_device.autocast
