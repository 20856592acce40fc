"""ImageNet weights offline: `pretrained_dir` in every Backbone stage, and `weights fetch` that fills it."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from rsna22_utils.cervical.models import create_backbone, create_model
from rsna22_utils.cli import main
from rsna22_utils.core.resolve import resolve_config
from rsna22_utils.core.runs import save_weights
from rsna22_utils.core.weights import profile_backbones

BACKBONE = "mobilenetv3_small_050"


def _assert_encoder_holds(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the pooled feature extractor equals the weights file's (its classifier is dropped)."""
    ours = encoder.state_dict()
    assert ours and set(ours) <= set(state)
    for name, tensor in ours.items():
        assert torch.equal(tensor, state[name]), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_dir_loads_the_backbones_weights_file(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model(BACKBONE, pretrained=False)  # stands in for the ImageNet weights
    path = tmp_path / f"{BACKBONE}{suffix}"
    if suffix == ".safetensors":
        save_weights(source, path)
    else:
        torch.save(source.state_dict(), path)
    # through the setting: a box run of 3 slices x 1 window (3 input channels, as ImageNet's)
    cfg = resolve_config("01_train_box", {"backbone": BACKBONE, "pretrained": True, "pretrained_dir": str(tmp_path), "box_input_slices": 3})
    _assert_encoder_holds(create_model(cfg).encoder, source.state_dict())
    # a run's own weights replace them: nothing is read when the run is loaded
    path.unlink()
    create_model(cfg, load_pretrained=False)


def test_pretrained_dir_without_the_file_names_backbone_path_and_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        create_backbone(BACKBONE, in_chans=3, pretrained=True, pretrained_dir=tmp_path)
    message = str(error.value)
    assert repr(BACKBONE) in message and str(tmp_path / f"{BACKBONE}.safetensors") in message
    assert f"python -m rsna22_utils weights fetch --out {tmp_path} --backbones {BACKBONE}" in message


def test_weights_fetch_saves_timms_pretrained_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = []

    def fake_download(model: torch.nn.Module, *args: object, **kwargs: object) -> None:  # timm's download, offline
        fetched.append(type(model).__name__)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(0.25)

    monkeypatch.setattr(timm.models._builder, "load_pretrained", fake_download)
    assert main(["weights", "fetch", "--out", str(tmp_path), "--profile", "demo"]) == 0
    assert fetched and sorted(p.name for p in tmp_path.iterdir()) == [f"{BACKBONE}.safetensors"]

    encoder = create_backbone(BACKBONE, in_chans=3, pretrained=True, pretrained_dir=tmp_path)
    assert all(torch.all(p == 0.25) for p in encoder.parameters())


def test_profile_backbones_are_every_backbone_its_stages_build() -> None:
    assert profile_backbones("demo") == [BACKBONE]
    assert "efficientnet_b1" in profile_backbones("original")  # the original's box network
