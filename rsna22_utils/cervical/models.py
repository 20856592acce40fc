"""The kit's networks, built from a config by one factory, timm-style.

Every network wraps a timm backbone whose name goes straight to `timm.create_model`;
`pretrained` is a switch that works offline: False builds random weights, True loads ImageNet
weights from `pretrained_dir` (a folder written by `python -m rsna22_utils weights fetch`: the way
to get them on an offline Kaggle kernel, attached as a dataset), from `pretrained_path` (one file),
or else from timm's download (needs internet or timm's cache).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rsna22_utils.cervical.anatomy import VERTEBRAE
from rsna22_utils.cervical.configs import BoxTrainConfig, FractureTrainConfig, StudyTrainConfig, VertebraTrainConfig
from rsna22_utils.core.backbones import create_backbone, feature_size
from rsna22_utils.core.runs import load_run as load_run_with

logger = logging.getLogger(__name__)


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


def sinusoid_table(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embeddings of integer `rows` (any shape) -> (..., dim): half sines, then half cosines.

    The tensor2tensor layout the 3rd place used (fairseq / FSMT): frequencies 10000^(-i / (dim/2 - 1)).
    Fixed features, no weights: they add nothing to train and nothing to a state dict.
    """
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=rows.device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = rows.float().unsqueeze(-1) * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


POSITION_STEPS = 200  # a relative slice position becomes one of 0..200, as the 3rd place's `slice_stats`
# a fairseq-style embedding with padding index p numbers the steps of its input p+1, p+2, ... whatever
# the input's values: the 3rd place's position (p = 201) and channel (p = 3) embeddings, in effect
_WINDOW_POSITION_FIRST_ROW, _WINDOW_CHANNEL_FIRST_ROW = 202, 4


class SequenceModel(nn.Module):
    """2.5D CNN + bidirectional LSTM: a sequence of images -> per-step outputs (stages 03 and 05).

    Each image is `slices_per_image` adjacent slices stacked as channels; the CNN embeds every
    image on its own, the BiLSTM lets each step see its neighbours along the neck. A step is an
    image, or with `outputs_per_slice` one slice (the image's embedding repeated for its slices, as
    the 3rd place's vertebra model did). `position_dim` / `channel_dim` append sinusoidal features
    of the step's slice position and of its slice within the image (`position_of`: "study" = the
    slice's relative position in the study, from `batch["slice_position"]`; "window" = its step in
    the window). The number of outputs is a parameter: 7 vertebra ratios (stage 03), 7 vertebra +
    7 fracture (+ 1 any-fracture) (stage 05). `output_activation` turns outputs into probabilities:
    sigmoid (BCE-trained logits) or clip to [0, 1] (MSE-trained values).
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
        *,
        slices_per_image: int = 3,
        outputs_per_slice: bool = False,
        position_dim: int = 0,
        channel_dim: int = 0,
        position_of: str = "study",
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if output_activation not in ("sigmoid", "clip"):
            raise ValueError(f"output_activation must be 'sigmoid' or 'clip', got {output_activation!r}")
        if position_of not in ("study", "window"):
            raise ValueError(f"position_of must be 'study' or 'window', got {position_of!r}")
        self.slices_per_image, self.outputs_per_slice = slices_per_image, outputs_per_slice
        self.position_dim, self.channel_dim, self.position_of = position_dim, channel_dim, position_of
        self.output_activation = output_activation
        self.encoder = create_backbone(backbone, in_chans, pretrained, pretrained_path, pretrained_dir)
        inputs = feature_size(self.encoder) + position_dim + channel_dim
        hidden = lstm_hidden or inputs
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, n_outputs)

    @property
    def embedding_size(self) -> int:
        return feature_size(self.encoder)

    @property
    def steps_per_image(self) -> int:
        return self.slices_per_image if self.outputs_per_slice else 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, steps, C, H, W) -> CNN embeddings (batch, steps, features)."""
        batch, steps = images.shape[:2]
        return self.encoder(images.flatten(0, 1)).view(batch, steps, -1)

    def step_inputs(self, embeddings: torch.Tensor, slice_position: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image CNN embeddings (batch, images, features) -> the BiLSTM's inputs (batch, steps, ...).

        `slice_position` (batch, images * slices_per_image): each slice's relative position in its
        study, 0 (first) .. 1 (last); needed only for `position_of="study"` embeddings.
        """
        if self.outputs_per_slice:
            embeddings = embeddings.repeat_interleave(self.slices_per_image, dim=1)
        batch, steps = embeddings.shape[:2]
        step = torch.arange(steps, device=embeddings.device).expand(batch, steps)
        parts = [embeddings]
        if self.position_dim:
            if self.position_of == "window":
                rows = step + _WINDOW_POSITION_FIRST_ROW
            else:
                if slice_position is None:
                    raise ValueError("this sequence model embeds slice positions: the batch needs 'slice_position'")
                position = slice_position.to(embeddings.device).float()
                if not self.outputs_per_slice:  # an image's position is that of its middle slice
                    position = position[:, self.slices_per_image // 2 :: self.slices_per_image]
                rows = (position.clamp(0.0, 1.0) * POSITION_STEPS).round()
            parts.append(sinusoid_table(rows, self.position_dim).to(embeddings.dtype))
        if self.channel_dim:
            rows = step + _WINDOW_CHANNEL_FIRST_ROW if self.position_of == "window" else step % self.slices_per_image
            parts.append(sinusoid_table(rows, self.channel_dim).to(embeddings.dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else embeddings

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = self.step_inputs(self.embed(batch["image"]), batch.get("slice_position"))
        sequence, _ = self.lstm(inputs)
        return {"logits": self.head(self.dropout(sequence))}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The outputs as per-step probabilities / ratios in [0, 1]."""
        return torch.sigmoid(logits) if self.output_activation == "sigmoid" else logits.clamp(0.0, 1.0)


def sequence_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    target_weights: torch.Tensor | None = None,
    positive_weights: torch.Tensor | None = None,
    loss: str = "bce",
    positive_weight: float = 1.0,
    groups: list[slice] | None = None,
) -> torch.Tensor:
    """Loss over every step of the sequence that lies inside the study (`mask`).

    bce (soft targets): per step, the mean over targets weighted by `target_weights` (n_targets,)
    (default: equal), e.g. to make the fracture targets of stage 05 count more than the vertebra
    ones; `positive_weights` (n_targets,) is BCE's `pos_weight`: how much a positive counts against a
    negative of the same target. Fracture images are ~1% of a target's images; without it the
    fracture outputs settle at that rate and never learn what a break looks like.
    mse (the 3rd place's): squared error of the raw outputs, x `positive_weight` where the target is
    not 0, averaged over the steps and targets of each group of outputs (`groups`, default one:
    all), and the groups' means summed, each x its first target's `target_weights`.
    """
    logits, target, mask = outputs["logits"].float(), batch["target"].float(), batch["mask"].float()
    if loss == "mse":
        error = (logits - target) ** 2
        error = torch.where(target != 0, error * positive_weight, error) * mask.unsqueeze(-1)
        steps = mask.sum().clamp(min=1.0)
        total = logits.new_zeros(())
        for group in groups or [slice(0, target.shape[-1])]:
            weight = 1.0 if target_weights is None else float(target_weights[group][0])
            total = total + weight * error[..., group].sum() / (steps * error[..., group].shape[-1])
        return total
    if loss != "bce":
        raise ValueError(f"loss must be 'bce' or 'mse', got {loss!r}")
    pos_weight = None if positive_weights is None else positive_weights.to(logits)
    per_target = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    if target_weights is None:
        per_image = per_target.mean(-1)
    else:
        weights = target_weights.to(per_target)
        per_image = (per_target * weights).sum(-1) / weights.sum()
    return (per_image * mask).sum() / mask.sum().clamp(min=1.0)


class SliceEvidence(nn.Module):
    """The stage-05 model's BiLSTM + per-step head, frozen: CNN embeddings -> per-study fracture evidence.

    Evidence = the largest fracture logit over the study's steps, per vertebra (C1..C7, outputs
    `fracture_columns` of the head), and their maximum for patient_overall: 8 numbers in `TARGETS`
    order. The stage-05 model already learned where along the neck a break is and which vertebra
    it is in; a head trained on a few hundred studies' embeddings alone does not relearn that
    (figures: README, "The demo"). The stage-05 BiLSTM must read the CNN embeddings alone (no
    position features): a study's resampled sequence has no window positions to give it.
    """

    def __init__(self, lstm: nn.LSTM, head: nn.Linear, fracture_columns: slice = slice(7, 14)) -> None:
        super().__init__()
        self.lstm, self.head, self.fracture_columns = lstm, head, fracture_columns
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.lstm(embeddings)
        fracture = self.head(sequence)[..., self.fracture_columns]
        fracture = fracture.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
        return torch.cat([fracture.amax(1, keepdim=True), fracture], dim=1)


class LinearAttentionScore(nn.Module):
    """Attention score of each step: tanh(one projection + a learned bias per step position), the 3rd
    place's study attention (its softmax of these scores = its exp / sum)."""

    def __init__(self, features: int, max_len: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(features, 1)))
        self.bias = nn.Parameter(torch.zeros(max_len))

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        steps = sequence.shape[1]
        if steps > self.bias.shape[0]:
            raise ValueError(f"{steps} steps > max_len {self.bias.shape[0]} of the attention's per-step bias")
        return torch.tanh(sequence @ self.weight + self.bias[:steps].unsqueeze(-1))


def logistic_fit(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic regression per column, started from the prior: (n, k) scores and (n, k) 0/1 targets
    -> weights (k,) and biases (k,), with an L2 penalty `l2` on the weights."""
    prevalence = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.log(prevalence / (1 - prevalence)).requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(weight * x + bias, y.float()) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


class StudyHead(nn.Module):
    """Study level (stage 06): per-image embeddings -> BiLSTM -> attention + max pooling -> 8 logits.

    Output order is `rsna22_utils.cervical.metric.TARGETS`: patient_overall, C1..C7. `mask` marks real
    (not padded) steps of each sequence. `lstm_hidden` 0 = `in_features` (the 3rd place's size);
    `attention` "mlp" scores each step with Linear-Tanh-Linear, "linear" as the 3rd place did
    (`LinearAttentionScore`). With `evidence` (a frozen `SliceEvidence`), each logit
    also gets a learned multiple of its target's evidence (see `start_from_evidence`).
    """

    def __init__(
        self,
        in_features: int,
        lstm_hidden: int = 128,
        n_outputs: int = 8,
        dropout: float = 0.2,
        evidence: SliceEvidence | None = None,
        attention: str = "mlp",
        max_len: int = 192,
    ) -> None:
        super().__init__()
        hidden = lstm_hidden or in_features
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True, bidirectional=True)
        if attention == "mlp":
            self.attention: nn.Module = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        elif attention == "linear":
            self.attention = LinearAttentionScore(2 * hidden, max_len)
        else:
            raise ValueError(f"attention must be 'mlp' or 'linear', got {attention!r}")
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * hidden, n_outputs)
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
        weight, bias = logistic_fit(evidence.float().clamp(-30, 30), targets.float(), l2, steps)
        with torch.no_grad():
            self.head.bias.copy_(bias)
            self.head.weight.zero_()
            self.evidence_weight.copy_(weight)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor, evidence: torch.Tensor | None = None) -> torch.Tensor:
        """`evidence` (studies, 8): given instead of computed from `embeddings` (06 trains on out-of-fold evidence)."""
        sequence, _ = self.lstm(embeddings)
        valid = mask.bool().unsqueeze(-1)
        scores = self.attention(sequence).masked_fill(~valid, float("-inf"))
        attended = (torch.softmax(scores, dim=1) * sequence).sum(1)
        maxed = sequence.masked_fill(~valid, float("-inf")).amax(1)
        logits = self.head(self.dropout(torch.cat([attended, maxed], dim=-1)))
        if self.evidence is not None:
            evidence = self.evidence(embeddings, mask) if evidence is None else evidence.to(logits)
            logits = logits + self.evidence_weight * evidence.clamp(-30, 30)
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
        return {"logits": self.head(embeddings.float(), mask, batch.get("evidence"))}


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
    evidence = None
    if cfg.slice_evidence:
        if sequence_model.position_dim or sequence_model.channel_dim or sequence_model.outputs_per_slice:
            raise ValueError(
                "slice_evidence=true needs a stage-05 model whose BiLSTM reads one CNN embedding per step and nothing else; "
                f"this one has position_embedding={sequence_model.position_dim}, channel_embedding={sequence_model.channel_dim}, "
                f"outputs_per_slice={sequence_model.outputs_per_slice}: set slice_evidence=false"
            )
        evidence = SliceEvidence(sequence_model.lstm, sequence_model.head, slice(len(VERTEBRAE), 2 * len(VERTEBRAE)))
    head = StudyHead(
        sequence_model.embedding_size,
        lstm_hidden=cfg.lstm_hidden,
        dropout=cfg.dropout,
        evidence=evidence,
        attention=cfg.attention,
        max_len=cfg.max_len,
    )
    return StudyModel(sequence_model.encoder, head, max_len=cfg.max_len)


def sequence_outputs(cfg: Any) -> int:
    """Outputs per step of a sequence config's network: 7 vertebra (03); + 7 fracture (+ 1 any-fracture) (05, and 06's stage-05 run)."""
    if isinstance(cfg, VertebraTrainConfig):
        return len(VERTEBRAE)
    return 2 * len(VERTEBRAE) + int(bool(getattr(cfg, "any_fracture_head", False)))


def _sequence_model(
    cfg: Any, lstm_hidden: int, pretrained: bool, pretrained_path: str | None, pretrained_dir: str | None = None
) -> SequenceModel:
    return SequenceModel(
        cfg.backbone,
        in_chans=cfg.slices_per_image * len(cfg.windows),
        n_outputs=sequence_outputs(cfg),
        lstm_hidden=lstm_hidden,
        dropout=float(getattr(cfg, "head_dropout", 0.1)),
        pretrained=pretrained,
        pretrained_path=pretrained_path,
        pretrained_dir=pretrained_dir,
        slices_per_image=cfg.slices_per_image,
        outputs_per_slice=bool(getattr(cfg, "outputs_per_slice", False)),
        position_dim=int(getattr(cfg, "position_embedding", 0)),
        channel_dim=int(getattr(cfg, "channel_embedding", 0)),
        position_of=str(getattr(cfg, "position_of", "study")),
        output_activation="clip" if getattr(cfg, "loss", "bce") == "mse" else "sigmoid",
    )


def create_model(cfg: Any, load_pretrained: bool = True) -> nn.Module:
    """The network a stage config describes, built the same way wherever a run is trained or loaded.

    `load_pretrained=False` ignores `pretrained` / `pretrained_path` / `pretrained_dir`: for a run whose own trained
    weights are loaded next, so nothing is fetched (offline on Kaggle) or read for nothing.

    01 -> BoxModel (`box_input_slices` consecutive slices x windows as input channels); 03 ->
    SequenceModel with 7 outputs, 05 with 7 vertebra + 7 fracture (+ 1 any-fracture) outputs
    (`slices_per_image` slices x windows as input channels); 06 -> StudyModel on the architecture
    of its stage-05 run (recorded in its config).
    """
    pretrained = bool(getattr(cfg, "pretrained", False)) and load_pretrained
    pretrained_path = (getattr(cfg, "pretrained_path", "") or None) if load_pretrained else None
    pretrained_dir = getattr(cfg, "pretrained_dir", "") or None
    if isinstance(cfg, BoxTrainConfig):
        in_chans = cfg.box_input_slices * len(cfg.windows)
        return BoxModel(cfg.backbone, in_chans, pretrained=pretrained, pretrained_path=pretrained_path, pretrained_dir=pretrained_dir)
    if isinstance(cfg, (VertebraTrainConfig, FractureTrainConfig)):
        return _sequence_model(cfg, cfg.lstm_hidden, pretrained, pretrained_path, pretrained_dir)
    if isinstance(cfg, StudyTrainConfig):
        return study_model(cfg, _sequence_model(cfg, cfg.fracture_lstm_hidden, False, None))
    raise ValueError(f"stage {getattr(cfg, 'stage', '?')!r}: its config ({type(cfg).__name__}) describes no network of the kit")


def create_network(cfg: Any) -> nn.Module:
    """The network of a stage config with random weights (nothing downloaded or read): `config show --count-params`."""
    return create_model(cfg, load_pretrained=False)


def load_run(run_dir: str | Path, device: torch.device) -> tuple[nn.Module, Any]:
    """A finished run's network (rebuilt from its config.json, no pretrained download) with its weights, in eval mode."""
    return load_run_with(run_dir, device, lambda cfg: create_model(cfg, load_pretrained=False))
