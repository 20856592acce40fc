"""The kit's networks, built from a config by one factory, timm-style.

Every network wraps a timm backbone whose name goes straight to `timm.create_model`;
`pretrained` is a switch that works offline: False builds random weights, True loads ImageNet
weights from `pretrained_dir` (a folder written by `python -m rsna22_utils weights fetch`: the way
to get them on an offline Kaggle kernel, attached as a dataset), from `pretrained_path` (one file),
or else from timm's download (needs internet or timm's cache).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.nn import functional as F

from rsna22_utils.cervical.anatomy import VERTEBRAE
from rsna22_utils.core.runs import load_run as load_run_with

logger = logging.getLogger(__name__)


def create_backbone(
    name: str,
    in_chans: int,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    pretrained_dir: str | Path | None = None,
) -> nn.Module:
    """timm feature extractor (num_classes=0, global pooled) with offline-safe weight loading.

    ImageNet weights come from, in order: `pretrained_path` (one file), `{pretrained_dir}/{name}.safetensors`
    (or .pth) when `pretrained`, else timm's download. A missing local file is an error, never a random init.
    """
    kwargs: dict[str, Any] = {"in_chans": in_chans, "num_classes": 0}
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_path {path}: no such weights file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    elif pretrained and pretrained_dir:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_weights_file(name, pretrained_dir))}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        if pretrained and not (pretrained_path or pretrained_dir):
            raise RuntimeError(
                f"could not load pretrained weights for timm model {name!r} ({error}); offline, set "
                "pretrained=False, pretrained_dir=<folder of weights fetch> or pretrained_path=<local weights file>"
            ) from error
        raise


PRETRAINED_SUFFIXES = (".safetensors", ".pth")


def pretrained_weights_file(backbone: str, pretrained_dir: str | Path) -> Path:
    """`{pretrained_dir}/{backbone}.safetensors` (or .pth): where `weights fetch` saved the backbone's ImageNet weights."""
    folder = Path(pretrained_dir)
    for suffix in PRETRAINED_SUFFIXES:
        path = folder / f"{backbone}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"pretrained_dir {folder}: no ImageNet weights for backbone {backbone!r} ({folder / (backbone + '.safetensors')} "
        f"or .pth); on a machine with internet run `python -m rsna22_utils weights fetch --out {folder} --backbones {backbone}` "
        "and copy the folder here (on Kaggle: attach it as a dataset)"
    )


def feature_size(encoder: nn.Module) -> int:
    """Width of a pooled timm backbone's output (`head_hidden_size` when a conv head follows pooling, e.g. MobileNetV3)."""
    return int(getattr(encoder, "head_hidden_size", None) or encoder.num_features)


class BoxModel(nn.Module):
    """Single slice -> has-box logit + C1-C7 box (x0, y0, x1, y1 as fractions of the image)."""

    def __init__(
        self,
        backbone: str,
        in_chans: int = 1,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        pretrained_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = create_backbone(backbone, in_chans, pretrained, pretrained_path, pretrained_dir)
        self.head = nn.Linear(feature_size(self.encoder), 5)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.head(self.encoder(batch["image"]))
        return {"has_box": out[:, 0], "box": torch.sigmoid(out[:, 1:])}


def box_loss(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], box_weight: float = 5.0, has_box_weight: float = 1.0
) -> torch.Tensor:
    """has_box_weight x BCE on has-box for every slice + box_weight x L1 on the coordinates only where a box exists."""
    has_box = batch["has_box"].float()
    loss = has_box_weight * F.binary_cross_entropy_with_logits(outputs["has_box"].float(), has_box)
    mask = has_box > 0.5
    if mask.any():
        loss = loss + box_weight * F.l1_loss(outputs["box"].float()[mask], batch["box"].float()[mask])
    return loss


class SequenceModel(nn.Module):
    """2.5D CNN + bidirectional LSTM: a sequence of images -> per-image outputs (stages 03 and 05).

    Each image is `slices_per_image` adjacent slices stacked as channels; the CNN embeds every
    image on its own, the BiLSTM lets each image see its neighbours along the neck. The number of
    outputs is a parameter: 7 vertebra ratios (stage 03) or 7 vertebra + 7 fracture (stage 05).
    """

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        n_outputs: int,
        lstm_hidden: int = 128,
        dropout: float = 0.1,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        pretrained_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = create_backbone(backbone, in_chans, pretrained, pretrained_path, pretrained_dir)
        self.lstm = nn.LSTM(feature_size(self.encoder), lstm_hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * lstm_hidden, n_outputs)

    @property
    def embedding_size(self) -> int:
        return feature_size(self.encoder)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, steps, C, H, W) -> CNN embeddings (batch, steps, features)."""
        batch, steps = images.shape[:2]
        return self.encoder(images.flatten(0, 1)).view(batch, steps, -1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sequence, _ = self.lstm(self.embed(batch["image"]))
        return {"logits": self.head(self.dropout(sequence))}


def sequence_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    target_weights: torch.Tensor | None = None,
    positive_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE (soft targets) over every image of the sequence that lies inside the study (`mask`).

    `target_weights` (n_targets,) weighs the targets in the per-image mean (default: equal), e.g.
    to make the fracture targets of stage 05 count more than the vertebra ones.
    `positive_weights` (n_targets,) is BCE's `pos_weight`: how much a positive counts against a
    negative of the same target. Fracture images are ~1% of a target's images; without it the
    fracture outputs settle at that rate and never learn what a break looks like.
    """
    logits, target, mask = outputs["logits"].float(), batch["target"].float(), batch["mask"].float()
    pos_weight = None if positive_weights is None else positive_weights.to(logits)
    per_target = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    if target_weights is None:
        per_image = per_target.mean(-1)
    else:
        weights = target_weights.to(per_target)
        per_image = (per_target * weights).sum(-1) / weights.sum()
    return (per_image * mask).sum() / mask.sum().clamp(min=1.0)


class SliceEvidence(nn.Module):
    """The stage-05 model's BiLSTM + per-image head, frozen: CNN embeddings -> per-study fracture evidence.

    Evidence = the largest fracture logit over the study's images, per vertebra (C1..C7), and their
    maximum for patient_overall: 8 numbers in `TARGETS` order. The stage-05 model already learned
    where along the neck a break is and which vertebra it is in; a head trained on a few hundred
    studies' embeddings alone does not relearn that (figures: README, "The demo").
    """

    def __init__(self, lstm: nn.LSTM, head: nn.Linear, n_vertebrae: int = 7) -> None:
        super().__init__()
        self.lstm, self.head, self.n_vertebrae = lstm, head, n_vertebrae
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.lstm(embeddings)
        fracture = self.head(sequence)[..., -self.n_vertebrae :]  # the model's outputs end with C1..C7 fracture
        fracture = fracture.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
        return torch.cat([fracture.amax(1, keepdim=True), fracture], dim=1)


class StudyHead(nn.Module):
    """Study level (stage 06): per-image embeddings -> BiLSTM -> attention + max pooling -> 8 logits.

    Output order is `rsna22_utils.cervical.metric.TARGETS`: patient_overall, C1..C7. `mask` marks real
    (not padded) steps of each sequence. With `evidence` (a frozen `SliceEvidence`), each logit
    also gets a learned multiple of its target's evidence (see `start_from_evidence`).
    """

    def __init__(
        self, in_features: int, lstm_hidden: int = 128, n_outputs: int = 8, dropout: float = 0.2, evidence: SliceEvidence | None = None
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_features, lstm_hidden, batch_first=True, bidirectional=True)
        self.attention = nn.Sequential(nn.Linear(2 * lstm_hidden, lstm_hidden), nn.Tanh(), nn.Linear(lstm_hidden, 1))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * lstm_hidden, n_outputs)
        self.evidence = evidence
        self.evidence_weight = nn.Parameter(torch.zeros(n_outputs)) if evidence is not None else None

    def train(self, mode: bool = True) -> StudyHead:
        super().train(mode)
        if self.evidence is not None:
            self.evidence.eval()  # frozen stage-05 layers
        return self

    def start_from_prior(self, prevalence: torch.Tensor) -> None:
        """Output biases = logit(train prevalence): the untrained head predicts the prior baseline,
        so training starts from the prior's metric instead of from 0.5 everywhere."""
        p = prevalence.float().clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.head.bias.copy_(torch.log(p / (1 - p)))

    def start_from_evidence(self, evidence: torch.Tensor, targets: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> None:
        """Fit each target's logistic regression on its evidence (training studies: (n, 8) and (n, 8));
        the untrained head then predicts exactly those, and training refines from there."""
        self.start_from_prior(targets.float().mean(0))
        weight = torch.zeros(evidence.shape[1], requires_grad=True)
        bias = self.head.bias.detach().clone().requires_grad_(True)
        evidence, targets = evidence.float().clamp(-30, 30), targets.float()
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(weight * evidence + bias, targets) + l2 * (weight**2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            self.head.bias.copy_(bias)
            self.head.weight.zero_()
            self.evidence_weight.copy_(weight)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.lstm(embeddings)
        valid = mask.bool().unsqueeze(-1)
        scores = self.attention(sequence).masked_fill(~valid, float("-inf"))
        attended = (torch.softmax(scores, dim=1) * sequence).sum(1)
        maxed = sequence.masked_fill(~valid, float("-inf")).amax(1)
        logits = self.head(self.dropout(torch.cat([attended, maxed], dim=-1)))
        if self.evidence is not None:
            logits = logits + self.evidence_weight * self.evidence(embeddings, mask).clamp(-30, 30)
        return logits


class StudyModel(nn.Module):
    """The stage-05 CNN (frozen) + a new StudyHead: a whole study -> patient_overall + C1..C7 logits.

    Training feeds precomputed `embeddings` (the CNN is frozen, so they never change); inference
    feeds `image` chunks and the same CNN embeds them.
    """

    def __init__(self, encoder: nn.Module, head: StudyHead, max_len: int = 192) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.max_len = max_len
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> StudyModel:
        super().train(mode)
        self.encoder.eval()  # frozen: batch-norm statistics stay those of stage 05
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "embeddings" in batch:
            embeddings, mask = batch["embeddings"], batch["mask"]
        else:
            images = batch["image"]
            with torch.no_grad():
                embeddings = self.encoder(images.flatten(0, 1)).view(*images.shape[:2], -1)
            embeddings, mask = fit_length(embeddings, batch["mask"], self.max_len)
        return {"logits": self.head(embeddings.float(), mask)}


def fit_length(embeddings: torch.Tensor, mask: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly interpolate sequences longer than `max_len` down to `max_len` steps (one study at a time).

    (batch, steps, features) with a (batch, steps) mask -> same with steps <= max_len.
    """
    if embeddings.shape[1] <= max_len:
        return embeddings, mask
    out = embeddings.new_zeros(embeddings.shape[0], max_len, embeddings.shape[2])
    out_mask = mask.new_zeros(mask.shape[0], max_len)
    for i in range(embeddings.shape[0]):
        length = int(mask[i].sum())
        steps = embeddings[i, :length].T.unsqueeze(0)
        if length > max_len:
            steps = F.interpolate(steps, size=max_len, mode="linear", align_corners=True)
        n = steps.shape[-1]
        out[i, :n] = steps[0].T
        out_mask[i, :n] = 1
    return out, out_mask


def study_model(cfg: Any, sequence_model: SequenceModel) -> StudyModel:
    """A stage-06 config's StudyModel on a stage-05 SequenceModel: its CNN frozen, a new StudyHead
    (with the frozen stage-05 BiLSTM + head as evidence when `slice_evidence`)."""
    evidence = SliceEvidence(sequence_model.lstm, sequence_model.head) if cfg.slice_evidence else None
    head = StudyHead(sequence_model.embedding_size, lstm_hidden=cfg.lstm_hidden, dropout=cfg.dropout, evidence=evidence)
    return StudyModel(sequence_model.encoder, head, max_len=cfg.max_len)


def _sequence_model(
    cfg: Any, n_outputs: int, lstm_hidden: int, pretrained: bool, pretrained_path: str | None, pretrained_dir: str | None = None
) -> SequenceModel:
    return SequenceModel(
        cfg.backbone,
        in_chans=cfg.slices_per_image * len(cfg.windows),
        n_outputs=n_outputs,
        lstm_hidden=lstm_hidden,
        pretrained=pretrained,
        pretrained_path=pretrained_path,
        pretrained_dir=pretrained_dir,
    )


def create_model(cfg: Any, load_pretrained: bool = True) -> nn.Module:
    """The network a stage config describes, built the same way wherever a run is trained or loaded.

    `load_pretrained=False` ignores `pretrained` / `pretrained_path` / `pretrained_dir`: for a run whose own trained
    weights are loaded next, so nothing is fetched (offline on Kaggle) or read for nothing.

    01 -> BoxModel (`box_input_slices` consecutive slices x windows as input channels); 03 ->
    SequenceModel with 7 outputs, 05 with 7 vertebra + 7 fracture outputs (`slices_per_image`
    slices x windows as input channels); 06 -> StudyModel on the architecture of its stage-05 run
    (recorded in its config).
    """
    from rsna22_utils.cervical.configs import BoxTrainConfig, FractureTrainConfig, StudyTrainConfig, VertebraTrainConfig

    pretrained = bool(getattr(cfg, "pretrained", False)) and load_pretrained
    pretrained_path = (getattr(cfg, "pretrained_path", "") or None) if load_pretrained else None
    pretrained_dir = getattr(cfg, "pretrained_dir", "") or None
    if isinstance(cfg, BoxTrainConfig):
        in_chans = cfg.box_input_slices * len(cfg.windows)
        return BoxModel(cfg.backbone, in_chans, pretrained=pretrained, pretrained_path=pretrained_path, pretrained_dir=pretrained_dir)
    if isinstance(cfg, VertebraTrainConfig):
        return _sequence_model(cfg, len(VERTEBRAE), cfg.lstm_hidden, pretrained, pretrained_path, pretrained_dir)
    if isinstance(cfg, FractureTrainConfig):
        return _sequence_model(cfg, 2 * len(VERTEBRAE), cfg.lstm_hidden, pretrained, pretrained_path, pretrained_dir)
    if isinstance(cfg, StudyTrainConfig):
        return study_model(cfg, _sequence_model(cfg, 2 * len(VERTEBRAE), cfg.fracture_lstm_hidden, False, None))
    raise ValueError(f"stage {getattr(cfg, 'stage', '?')!r}: its config ({type(cfg).__name__}) describes no network of the kit")


def create_network(cfg: Any) -> nn.Module:
    """The network of a stage config with random weights (nothing downloaded or read): `config show --count-params`."""
    return create_model(cfg, load_pretrained=False)


def load_run(run_dir: str | Path, device: torch.device) -> tuple[nn.Module, Any]:
    """A finished run's network (rebuilt from its config.json, no pretrained download) with its weights, in eval mode."""
    return load_run_with(run_dir, device, lambda cfg: create_model(cfg, load_pretrained=False))
