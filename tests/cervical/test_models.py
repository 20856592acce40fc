"""Shapes and behaviour of the kit's networks (random weights, tiny inputs, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rsna22_utils.cervical.models import (
    BoxModel,
    SequenceModel,
    SliceEvidence,
    StudyHead,
    StudyModel,
    box_loss,
    create_backbone,
    feature_size,
    fit_length,
    sequence_loss,
)

BACKBONE = "mobilenetv3_small_050"


@pytest.mark.slow
def test_box_model_outputs_and_loss_ignores_coordinates_without_box() -> None:
    model = BoxModel(BACKBONE, in_chans=1)
    batch = {"image": torch.randn(4, 1, 32, 32), "has_box": torch.tensor([1.0, 0.0, 1.0, 0.0]), "box": torch.rand(4, 4)}
    out = model(batch)
    assert out["has_box"].shape == (4,) and out["box"].shape == (4, 4)
    assert ((out["box"] >= 0) & (out["box"] <= 1)).all()
    changed = dict(batch, box=batch["box"].clone())
    changed["box"][[1, 3]] = 0.5  # coordinates of slices without a box must not matter
    assert torch.allclose(box_loss(out, batch), box_loss(out, changed))


@pytest.mark.slow
def test_sequence_model_gives_one_output_per_image_and_masked_loss() -> None:
    model = SequenceModel(BACKBONE, in_chans=3, n_outputs=14, lstm_hidden=16)
    batch = {"image": torch.randn(2, 5, 3, 32, 32)}
    logits = model(batch)["logits"]
    assert logits.shape == (2, 5, 14)
    target = torch.rand(2, 5, 14)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    other = target.clone()
    other[0, 3:] = 1 - other[0, 3:]  # padded images must not change the loss
    assert torch.allclose(
        sequence_loss({"logits": logits}, {"target": target, "mask": mask}),
        sequence_loss({"logits": logits}, {"target": other, "mask": mask}),
    )


def test_sequence_loss_target_weights() -> None:
    logits, mask = torch.zeros(1, 2, 4), torch.ones(1, 2)
    target = torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * 2])  # log(2) per target either way
    equal = sequence_loss({"logits": logits}, {"target": target, "mask": mask})
    assert torch.allclose(equal, torch.tensor(0.6931), atol=1e-4)
    logits = torch.tensor([[[-9.0, -9.0, 0.0, 0.0]] * 2])  # the first two nearly right, the last two log(2)
    weighted = sequence_loss({"logits": logits}, {"target": target, "mask": mask}, torch.tensor([1.0, 1.0, 3.0, 3.0]))
    assert torch.allclose(weighted, torch.tensor(0.6931 * 6 / 8), atol=1e-3)  # (3 + 3) of 8 weight units at log(2)


def test_sequence_loss_positive_weights_scale_only_the_positive_term() -> None:
    # all logits 0: each target costs log(2) whatever its label; pos_weight w multiplies the positive part
    logits, mask = torch.zeros(1, 1, 2), torch.ones(1, 1)
    target = torch.tensor([[[1.0, 0.0]]])  # target 0 positive, target 1 negative
    plain = sequence_loss({"logits": logits}, {"target": target, "mask": mask})
    weighted = sequence_loss({"logits": logits}, {"target": target, "mask": mask}, positive_weights=torch.tensor([5.0, 5.0]))
    assert torch.allclose(plain, torch.tensor(0.6931), atol=1e-4)
    assert torch.allclose(weighted, torch.tensor(0.6931 * (5 + 1) / 2), atol=1e-3)  # the negative target is unchanged


def test_fit_length_interpolates_only_long_sequences() -> None:
    embeddings = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(2, 1, 3)
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0
    short, short_mask = fit_length(embeddings, mask, 12)
    assert short is embeddings and short_mask is mask
    out, out_mask = fit_length(embeddings, mask, 4)
    assert out.shape == (2, 4, 3)
    assert out[0, :, 0].tolist() == pytest.approx([0, 3, 6, 9])  # ends kept, linear in between
    assert out_mask[1].tolist() == [1, 1, 1, 1]  # 6 real steps > 4 -> interpolated to 4
    assert out[1, -1, 0].item() == pytest.approx(5.0)


@pytest.mark.slow
def test_study_model_freezes_the_cnn_and_ignores_padding() -> None:
    encoder = create_backbone(BACKBONE, in_chans=3)
    model = StudyModel(encoder, StudyHead(feature_size(encoder), lstm_hidden=8), max_len=6)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert not model.encoder.training and model.head.training
    model.eval()
    embeddings = torch.randn(1, 5, feature_size(encoder))
    padded = torch.cat([embeddings, torch.randn(1, 3, feature_size(encoder))], dim=1)
    short = model({"embeddings": embeddings, "mask": torch.ones(1, 5)})["logits"]
    long = model({"embeddings": padded, "mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)})["logits"]
    assert short.shape == (1, 8)
    # the BiLSTM's backward direction starts at the padding, so outputs differ slightly; attention/max ignore pads
    images = torch.randn(1, 9, 3, 32, 32)
    from_images = model({"image": images, "mask": torch.ones(1, 9)})["logits"]
    assert from_images.shape == (1, 8) and torch.isfinite(long).all()


def test_offline_pretrained_path_must_exist(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        create_backbone(BACKBONE, in_chans=1, pretrained_path=tmp_path / "missing.safetensors")


def test_study_head_starts_from_the_prior() -> None:
    head = StudyHead(12, lstm_hidden=8)
    prevalence = torch.tensor([0.48, 0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2])
    head.start_from_prior(prevalence)
    nn.init.zeros_(head.head.weight)  # isolate the bias: any input then gives exactly the prior
    probs = torch.sigmoid(head(torch.randn(3, 10, 12), torch.ones(3, 10)))
    assert torch.allclose(probs, prevalence.expand(3, 8), atol=1e-6)


def test_slice_evidence_is_the_largest_fracture_logit_of_the_real_steps() -> None:
    sequence_model = SequenceModel(BACKBONE, in_chans=3, n_outputs=14, lstm_hidden=8)
    evidence = SliceEvidence(sequence_model.lstm, sequence_model.head)
    assert not any(p.requires_grad for p in evidence.parameters())
    embeddings = torch.randn(2, 6, sequence_model.embedding_size)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    out = evidence(embeddings, mask)
    per_step = sequence_model.head(sequence_model.lstm(embeddings)[0])[..., 7:]
    assert out.shape == (2, 8)
    assert torch.allclose(out[0, 1:], per_step[0].amax(0))
    assert torch.allclose(out[1, 1:], per_step[1, :3].amax(0))  # padded steps never count
    assert torch.allclose(out[:, 0], out[:, 1:].amax(1))  # patient_overall: the most fractured vertebra


def test_study_head_starts_from_logistic_fits_of_the_evidence() -> None:
    sequence_model = SequenceModel(BACKBONE, in_chans=3, n_outputs=14, lstm_hidden=8)
    head = StudyHead(sequence_model.embedding_size, lstm_hidden=8, evidence=SliceEvidence(sequence_model.lstm, sequence_model.head))
    generator = torch.Generator().manual_seed(0)
    evidence = torch.randn(4000, 8, generator=generator)
    targets = (torch.rand(4000, 8, generator=generator) < torch.sigmoid(2.0 * evidence - 1.0)).float()  # true slope 2, bias -1
    head.start_from_evidence(evidence, targets, l2=0.0)
    assert head.evidence_weight.detach().numpy() == pytest.approx([2.0] * 8, abs=0.3)
    assert head.head.bias.detach().numpy() == pytest.approx([-1.0] * 8, abs=0.2)
    assert torch.count_nonzero(head.head.weight) == 0  # the untrained head predicts exactly the fits
    head.train()
    assert not head.evidence.training and head.lstm.training
    # evidence given with the batch (06 trains on out-of-fold evidence) replaces what the frozen layers compute
    head.eval()
    embeddings, mask = torch.randn(3, 5, sequence_model.embedding_size), torch.ones(3, 5)
    given = torch.randn(3, 8, generator=generator)
    with torch.no_grad():
        assert torch.allclose(head(embeddings, mask), head.head.bias + head.evidence_weight * head.evidence(embeddings, mask), atol=1e-5)
        assert torch.allclose(head(embeddings, mask, given), head.head.bias + head.evidence_weight * given, atol=1e-5)


def test_create_model_builds_each_stage_network_from_its_config() -> None:
    from rsna22_utils.cervical.models import StudyModel, create_model
    from rsna22_utils.core.config import with_derived
    from rsna22_utils.core.resolve import resolve_config

    windows = [[400.0, 1800.0], [40.0, 400.0]]  # from the study cache

    def config(stage: str, settings: dict):
        return with_derived(resolve_config(stage, settings), windows=windows)

    box = create_model(config("01_train_box", {"backbone": BACKBONE}))
    vertebra = create_model(config("03_train_vertebra", {"backbone": BACKBONE, "lstm_hidden": 16}))
    fracture = create_model(
        config("05_train_fracture", {"backbone": BACKBONE, "lstm_hidden": 16, "slices_per_image": 5, "infer_stride": 32})
    )
    assert isinstance(box, BoxModel) and box.encoder.conv_stem.in_channels == 2
    assert vertebra.head.out_features == 7 and vertebra.encoder.conv_stem.in_channels == 3 * 2
    assert fracture.head.out_features == 14 and fracture.encoder.conv_stem.in_channels == 5 * 2
    assert (
        vertebra.dropout.p == 0.1 and create_model(config("05_train_fracture", {"backbone": BACKBONE, "head_dropout": 0.0})).dropout.p == 0
    )
    study_cfg = with_derived(
        resolve_config("06_train_study", {"lstm_hidden": 16}),
        windows=windows,
        backbone=BACKBONE,
        slices_per_image=5,
        fracture_lstm_hidden=16,
    )
    study = create_model(study_cfg)  # the frozen stage-05 CNN's architecture + the study head, from the 06 config alone
    assert isinstance(study, StudyModel) and study.encoder.conv_stem.in_channels == 5 * 2
    assert study.head.evidence.head.out_features == 14 and study.head.lstm.hidden_size == 16
    assert not any(p.requires_grad for p in study.encoder.parameters())
    with pytest.raises(ValueError, match="07_inference"):
        create_model(resolve_config("07_inference"))


def test_loading_a_run_never_fetches_pretrained_weights(tmp_path) -> None:
    """A run trained from ImageNet weights is rebuilt offline: its own weights are loaded next."""
    from rsna22_utils.cervical.models import create_model
    from rsna22_utils.core.resolve import resolve_config

    cfg = resolve_config("01_train_box", {"backbone": BACKBONE, "pretrained": True, "pretrained_path": str(tmp_path / "gone.safetensors")})
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        create_model(cfg)
    assert isinstance(create_model(cfg, load_pretrained=False), BoxModel)


# ----------------------------------------------------------------------------- the 3rd place's variants


def test_sinusoid_table_is_sines_then_cosines_of_the_row() -> None:
    from rsna22_utils.cervical.models import sinusoid_table

    table = sinusoid_table(torch.tensor([0, 3]), 16)
    assert table.shape == (2, 16)
    assert torch.allclose(table[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    frequency = 10000 ** (-torch.arange(8) / 7)  # tensor2tensor: log(10000) / (half - 1)
    assert torch.allclose(table[1], torch.cat([torch.sin(3 * frequency), torch.cos(3 * frequency)]), atol=1e-6)


@pytest.mark.slow
def test_per_slice_steps_with_position_and_channel_embeddings() -> None:
    model = SequenceModel(
        BACKBONE, in_chans=3, n_outputs=7, lstm_hidden=0, outputs_per_slice=True, position_dim=16, channel_dim=16, dropout=0.0
    ).eval()
    assert model.lstm.input_size == model.embedding_size + 32 and model.lstm.hidden_size == model.lstm.input_size  # 0 = auto
    images = torch.randn(2, 4, 3, 32, 32)
    position = torch.linspace(0.1, 0.4, 12).expand(2, 12)
    inputs = model.step_inputs(model.embed(images), position)
    assert inputs.shape == (2, 12, model.embedding_size + 32)
    assert torch.equal(inputs[:, 0, : model.embedding_size], inputs[:, 2, : model.embedding_size])  # one image, three slices
    assert not torch.equal(inputs[:, 0, -16:], inputs[:, 1, -16:])  # ... told apart by the channel embedding
    logits = model({"image": images, "slice_position": position})["logits"]
    assert logits.shape == (2, 12, 7)
    moved = model({"image": images, "slice_position": position + 0.3})["logits"]
    assert not torch.allclose(logits, moved)  # the study position is an input
    with pytest.raises(ValueError, match="slice_position"):
        model({"image": images})


def test_per_image_position_is_the_middle_slice_and_window_position_ignores_the_study() -> None:
    from rsna22_utils.cervical.models import sinusoid_table

    model = SequenceModel(BACKBONE, in_chans=3, n_outputs=15, lstm_hidden=0, position_dim=16)
    embeddings = torch.zeros(1, 4, model.embedding_size)
    position = torch.arange(12, dtype=torch.float32).view(1, 12) / 200
    features = model.step_inputs(embeddings, position)[..., -16:]
    assert torch.allclose(features[0], sinusoid_table(torch.tensor([1, 4, 7, 10]), 16))  # middle slice of each image
    window = SequenceModel(BACKBONE, in_chans=3, n_outputs=7, lstm_hidden=0, position_dim=16, position_of="window")
    features = window.step_inputs(embeddings)[..., -16:]  # no slice_position needed
    assert torch.allclose(features[0], sinusoid_table(torch.arange(202, 206), 16))  # fairseq's numbering after padding index 201


def test_mse_loss_weights_nonzero_targets_and_sums_the_groups_means() -> None:
    logits = torch.zeros(1, 2, 3)
    target = torch.tensor([[[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    mask = torch.ones(1, 2)
    batch = {"target": target, "mask": mask}
    one = sequence_loss({"logits": logits}, batch, loss="mse", positive_weight=2.0)
    assert torch.allclose(one, torch.tensor((2 * 0.25 + 2 * 1.0) / 6))  # x2 where target != 0, mean over steps x targets
    groups = [slice(0, 2), slice(2, 3)]
    summed = sequence_loss({"logits": logits}, batch, loss="mse", positive_weight=2.0, groups=groups)
    assert torch.allclose(summed, torch.tensor(2 * 0.25 / 4 + 2 * 1.0 / 2))  # each head's mean, added (3rd place's 05)
    masked = sequence_loss({"logits": logits}, {"target": target, "mask": torch.tensor([[1.0, 0.0]])}, loss="mse")
    assert torch.allclose(masked, torch.tensor((0.25 + 1.0) / 3))


@pytest.mark.slow
def test_any_fracture_target_is_the_largest_fracture_target_and_oof_keeps_working(tmp_path) -> None:
    from rsna22_utils.cervical.anatomy import VERTEBRAE
    from rsna22_utils.cervical.sequence import ANY_FRACTURE, FRACTURE, SequenceTask

    names = list(VERTEBRAE) + FRACTURE + [ANY_FRACTURE]

    class Dataset:
        uids = ["a"]

    task = SequenceTask(Dataset(), names, loss="mse", positive_weight=2.0)
    assert [(g.start, g.stop) for g in task.groups] == [(0, 7), (7, 14), (14, 15)]
    target = torch.rand(1, 4, 14)
    batch = {"target": target, "mask": torch.ones(1, 4), "study": torch.tensor([0]), "start": torch.tensor([0])}
    assert torch.equal(task.targets(batch)["target"][..., 14], target[..., 7:].amax(-1))
    model = SequenceModel(BACKBONE, in_chans=3, n_outputs=15, lstm_hidden=8, output_activation="clip")
    batch["image"] = torch.randn(1, 4, 3, 32, 32)
    assert torch.isfinite(task.loss(model, batch))
    with torch.no_grad():  # as the trainer predicts
        frame = task.predict(model, batch)
    assert frame[f"{ANY_FRACTURE}_pred"].between(0, 1).all() and len(frame) == 4
    assert frame[f"{ANY_FRACTURE}_true"].to_numpy() == pytest.approx(target[0, :, 7:].amax(-1).numpy())


def test_study_head_auto_size_and_the_original_attention_ignore_padding() -> None:
    head = StudyHead(12, lstm_hidden=0, attention="linear", max_len=10, dropout=0.0).eval()
    assert head.lstm.hidden_size == 12 and head.head.in_features == 48
    embeddings = torch.randn(1, 6, 12)
    short = head(embeddings[:, :4], torch.ones(1, 4))
    padded = head(embeddings, torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.float32))
    assert short.shape == (1, 8) and torch.isfinite(padded).all()
    with pytest.raises(ValueError, match="max_len"):
        head(torch.randn(1, 11, 12), torch.ones(1, 11))


def test_slice_evidence_refuses_a_stage05_model_with_position_features() -> None:
    from rsna22_utils.cervical.models import study_model
    from rsna22_utils.core.resolve import resolve_config

    sequence_model = SequenceModel(BACKBONE, in_chans=3, n_outputs=14, lstm_hidden=8, position_dim=16)
    with pytest.raises(ValueError, match="slice_evidence=false"):
        study_model(resolve_config("06_train_study", {"lstm_hidden": 8}), sequence_model)
    assert study_model(resolve_config("06_train_study", {"lstm_hidden": 8, "slice_evidence": False}), sequence_model).head.evidence is None


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "settings", "original"),
    [
        # models/mdl_dh_seg_2C.py / 2F.py: per-slice steps, 16 + 16 embedding features, hidden = input size
        (
            "03_train_vertebra",
            {"backbone": "resnest50d", "outputs_per_slice": True, "position_embedding": 16, "channel_embedding": 16},
            94_719_047,
        ),
        (
            "03_train_vertebra",
            {"backbone": "efficientnetv2_rw_m", "outputs_per_slice": True, "position_embedding": 16, "channel_embedding": 16},
            127_466_665,
        ),
        # models/mdl_dh_seg_3R.py: per-image steps, 16 position features, 7 + 7 + 1 outputs
        ("05_train_fracture", {"backbone": "resnest50d", "position_embedding": 16, "any_fracture_head": True}, 93_690_735),
        ("05_train_fracture", {"backbone": "seresnext50_32x4d", "position_embedding": 16, "any_fracture_head": True}, 93_767_391),
    ],
)
def test_sequence_models_have_the_originals_parameter_counts(stage: str, settings: dict, original: int) -> None:
    from rsna22_utils.cervical.models import create_model
    from rsna22_utils.core.resolve import resolve_config

    cfg = resolve_config(stage, {**settings, "lstm_hidden": 0, "pretrained": False, "loss": "mse", "positive_weight": 2.0})
    count = _trainable(create_model(cfg))
    assert abs(count - original) <= 0.01 * original, f"{settings['backbone']}: {count:,} vs the original's {original:,}"


@pytest.mark.slow
def test_study_head_has_the_originals_parameter_count() -> None:
    """models/mdl_dh_seg_3G_gx1.py on resnest50d: BiLSTM hidden = features, linear attention over 192 steps, 8 logits."""
    from rsna22_utils.cervical.models import create_model
    from rsna22_utils.core.config import with_derived
    from rsna22_utils.core.resolve import resolve_config

    cfg = with_derived(
        resolve_config("06_train_study", {"lstm_hidden": 0, "attention": "linear", "slice_evidence": False, "dropout": 0.0}),
        backbone="resnest50d",
        fracture_lstm_hidden=0,
        position_embedding=16,
        any_fracture_head=True,
    )
    count = _trainable(create_model(cfg))
    assert abs(count - 67_211_464) <= 0.01 * 67_211_464, f"{count:,}"
