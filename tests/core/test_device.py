"""One AMP choice for training and inference: bf16 only where the GPU has it natively."""

from __future__ import annotations

import pytest
import torch

from rsna22_utils.core import device as kit_device


@pytest.mark.parametrize(
    ("capability", "dtype"), [((6, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_amp_dtype_is_bf16_only_on_compute_capability_8_and_up(monkeypatch: pytest.MonkeyPatch, capability, dtype) -> None:
    """Kaggle's P100 (6.0) and T4 (7.5) get fp16, though `torch.cuda.is_bf16_supported()` says True there (emulation)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert kit_device.amp_dtype(torch.device("cuda", 0)) is dtype


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
