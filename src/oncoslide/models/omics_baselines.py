"""Baselines that read omics AT TEST TIME: an omics-only SNN, late fusion, a mixture of experts.

Unlike ``ghanet`` and ``pathlupi`` (omics in training steps only, slide-only predictions), these
models declare ``side_inputs={"omics": "always"}``: validation, test and ``predict`` patients'
omics rows are read too. Their scores therefore answer another question ("how well do slides
plus the patient's own expression profile do?") and are not comparable with slide-only models as
if they were; they are the upper reference a training-only model tries to approach.

Every model gets ``side={"omics": (B, G), "omics_present": (B,)}``, the fold's standardised
profile after gene selection (width ``G`` from ``side_layout``). A patient without omics (no row
in the table, a row hidden by :mod:`oncoslide.training.missing`, or ``side=None``) is handled
explicitly, never by feeding zeros as if they were a profile:

- ``omics_snn``: the prediction comes from a learned "missing" embedding (one vector, so every
  such patient gets the same risk: the model knows nothing else about them).
- ``fusion_late``: the slide head alone.
- ``mome``: the gate keeps the slide expert only (the experts that need omics are masked out of
  its softmax), so the prediction is exactly the slide-only path.

``p_missing_train`` hides each present profile with that probability in training steps
(modality dropout), so the slide-only path (or the missing embedding) is trained on patients
who do have omics; ``mome`` does this by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.models.abmil import AttentionSlidePath
from oncoslide.models.base import (
    MODELS,
    Dropout,
    MILModel,
    MILOutput,
    masked_softmax,
)
from oncoslide.models.heads import make_head

_SNN = (
    "Klambauer et al., Self-Normalizing Neural Networks, NeurIPS 2017; as the genomic "
    "baseline of Chen et al., MCAT (ICCV 2021) and PORPOISE (Cancer Cell 2022)"
)
_LATE = "late fusion of an ABMIL slide head and an SNN omics head (PORPOISE-style baseline)"
_MOME = (
    "MOME: mixture of modality experts robust to missing modalities (seed 003); here slide, "
    "omics and fused experts under a gate over the available ones"
)
_TEST_OMICS = "uses the patients' omics at test time"


# ----------------------------------------------------------------------------- pieces


def _omics_width(side_layout: Mapping[str, Any] | None, who: str) -> int:
    """The width G of the fold's omics vector, from the layout the training path passes."""
    layout = None if side_layout is None else side_layout.get("omics")
    n = None if layout is None else layout.get("n_columns")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(
            f"{who} reads omics: it needs side_layout={{'omics': {{'n_columns': G, ...}}}} with "
            f"G >= 1 (the training path sets it from --omics), got {side_layout!r}"
        )
    return int(n)


def _check_share(value: float, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{who}: p_missing_train must be in [0, 1], got {value!r}")
    return float(value)


def _check_blocks(n_blocks: int, dropout: float, who: str) -> None:
    problems = []
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        problems.append(f"n_blocks must be a positive integer, got {n_blocks!r}")
    if not 0.0 <= float(dropout) < 1.0:
        problems.append(f"omics dropout must be in [0, 1), got {dropout!r}")
    if problems:
        raise ConfigError(f"{who}: " + "; ".join(problems))


class SNN(nn.Module):
    """Self-normalising network: ``n_blocks`` blocks of Linear + SELU + AlphaDropout.

    Weights are LeCun-normal (sd 1/sqrt(fan_in)), biases 0: with SELU this keeps standardised
    inputs near zero mean and unit variance through the blocks (Klambauer et al.), which is what
    lets a plain MLP train on a few hundred patients without batch normalisation. AlphaDropout
    keeps those moments too, where ordinary dropout would not.
    """

    def __init__(self, in_dim: int, width: int, n_blocks: int, dropout: float) -> None:
        super().__init__()
        blocks = []
        for k in range(n_blocks):
            linear = nn.Linear(in_dim if k == 0 else width, width)
            nn.init.normal_(linear.weight, 0.0, 1.0 / math.sqrt(linear.in_features))
            nn.init.zeros_(linear.bias)
            blocks.append(nn.Sequential(linear, nn.SELU(), nn.AlphaDropout(dropout)))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def omics_inputs(
    side: Mapping[str, Tensor] | None,
    batch: int,
    width: int,
    like: Tensor,
    *,
    hide: float = 0.0,
    who: str = "model",
) -> tuple[Tensor, Tensor]:
    """(B, G) omics and (B,) presence from a model's ``side`` keyword.

    ``side=None`` (or no ``omics`` entry) means nobody has omics. Absent rows are set to exactly
    0 whatever the caller put there, so a hidden profile cannot reach any branch. ``hide`` > 0
    (training steps only) hides each present profile with that probability, drawn from torch's
    global generator (seeded per fold by the training path).
    """
    if side is None or "omics" not in side:
        return like.new_zeros(batch, width), torch.zeros(
            batch, dtype=torch.bool, device=like.device
        )
    omics, present = side["omics"], side.get("omics_present")
    problems = []
    if tuple(omics.shape) != (batch, width):
        problems.append(
            f"side['omics'] must be (B, G) = {(batch, width)}, got {tuple(omics.shape)}"
        )
    if present is None:
        problems.append("side['omics_present'] is missing")
    elif tuple(present.shape) != (batch,):
        problems.append(f"side['omics_present'] must be ({batch},), got {tuple(present.shape)}")
    if problems:
        raise ConfigError(f"{who} input: " + "; ".join(problems))
    assert present is not None
    present = present.to(device=like.device, dtype=torch.bool)
    if hide > 0:
        present = present & (torch.rand(batch, device=like.device) >= hide)
    omics = omics.to(device=like.device, dtype=like.dtype)
    return torch.where(present[:, None], omics, torch.zeros_like(omics)), present


# ------------------------------------------------------------------------------ models


@MODELS.register(
    "omics_snn",
    reference=_SNN,
    description=f"omics-only SNN; {_TEST_OMICS}, ignores the slides",
    has_attention=False,
    uses_coords=False,
    uses_patches=False,
    side_inputs={"omics": "always"},
    side_layout=True,
)
class OmicsSNN(MILModel):
    """Omics-only self-normalising network: the patches are accepted and ignored.

    SNN(G -> hidden_dim, ``n_blocks`` blocks) gives the embedding; Linear(hidden_dim ->
    n_outputs) the logits. A patient without omics gets the learned ``missing`` embedding
    instead (trained by the training patients without omics, or by ``p_missing_train``), so all
    such patients share one prediction.

    Args:
        in_dim, n_outputs, hidden_dim: see :class:`~oncoslide.models.base.MILModel`
            (``hidden_dim`` is the SNN width, 256 as in MCAT).
        dropout: AlphaDropout probability of the SNN blocks.
        n_blocks: SNN blocks (2 as in MCAT / PORPOISE).
        p_missing_train: probability of hiding a present profile in training steps.
        side_layout: the fold's omics layout (set by the training path).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 256,
        n_blocks: int = 2,
        p_missing_train: float = 0.0,
        side_layout: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        _check_blocks(n_blocks, dropout, "OmicsSNN")
        self.n_omics = _omics_width(side_layout, "OmicsSNN")
        self.p_missing_train = _check_share(p_missing_train, "OmicsSNN")
        self.snn = SNN(self.n_omics, hidden_dim, n_blocks, self.dropout)
        self.missing = nn.Parameter(torch.zeros(1, hidden_dim))
        self.head = make_head(hidden_dim, n_outputs)

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        side: dict[str, Tensor] | None = None,
    ) -> MILOutput:
        self.check_inputs(features, mask, coords)
        omics, present = omics_inputs(
            side,
            mask.shape[0],
            self.n_omics,
            self.missing,
            hide=self.p_missing_train if self.training else 0.0,
            who="OmicsSNN",
        )
        hidden = self.snn(omics)
        embedding = torch.where(present[:, None], hidden, self.missing.expand_as(hidden))
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=None)


@MODELS.register(
    "fusion_late",
    reference=_LATE,
    description=f"late fusion ABMIL + omics SNN; {_TEST_OMICS}",
    has_attention=True,
    uses_coords=False,
    side_inputs={"omics": "always"},
    side_layout=True,
)
class LateFusion(AttentionSlidePath):
    """Late fusion: a slide head and an omics head, logits averaged where omics are present.

    Slide branch as ``abmil`` (``proj``, gated ``attention``, slide ``head``); omics branch
    SNN(G -> omics_dim) with its own ``omics_head``. Logits are ``(slide + omics) / 2`` for a
    patient with omics and the slide head's alone otherwise. The embedding is the slide
    embedding followed by the omics one (zeros without omics); attention is the slide branch's.

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`.
        attn_dim: width of the gated attention branches.
        omics_dim, n_blocks, omics_dropout: SNN width, blocks and AlphaDropout.
        p_missing_train: probability of hiding a present profile in training steps (0: plain
            late fusion; > 0 also trains the slide head alone on patients with omics).
        side_layout: the fold's omics layout (set by the training path).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        attn_dim: int = 128,
        omics_dim: int = 256,
        n_blocks: int = 2,
        omics_dropout: float = 0.25,
        p_missing_train: float = 0.0,
        side_layout: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        _check_blocks(n_blocks, omics_dropout, "LateFusion")
        if isinstance(omics_dim, bool) or not isinstance(omics_dim, int) or omics_dim < 1:
            raise ConfigError(
                f"LateFusion: omics_dim must be a positive integer, got {omics_dim!r}"
            )
        self.n_omics = _omics_width(side_layout, "LateFusion")
        self.omics_dim = omics_dim
        self.p_missing_train = _check_share(p_missing_train, "LateFusion")
        self._build_slide_path(attn_dim)
        self.head = make_head(hidden_dim, n_outputs)
        self.snn = SNN(self.n_omics, omics_dim, n_blocks, float(omics_dropout))
        self.omics_head = make_head(omics_dim, n_outputs)

    @property
    def embed_dim(self) -> int:
        return self.hidden_dim + self.omics_dim

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        side: dict[str, Tensor] | None = None,
    ) -> MILOutput:
        self.check_inputs(features, mask, coords)
        slide, attention = self.slide_embedding(features, mask)
        omics, present = omics_inputs(
            side,
            mask.shape[0],
            self.n_omics,
            slide,
            hide=self.p_missing_train if self.training else 0.0,
            who="LateFusion",
        )
        hidden = self.snn(omics)
        slide_logits = self.head(slide)
        fused = 0.5 * (slide_logits + self.omics_head(hidden))
        # where, not a presence-weighted mean: without omics the slide logits pass unchanged
        logits = torch.where(present[:, None], fused, slide_logits)
        kept = torch.where(present[:, None], hidden, torch.zeros_like(hidden))
        embedding = torch.cat([slide, kept], dim=1)
        return MILOutput(logits=logits, embedding=embedding, attention=attention)


EXPERTS = ("slide", "omics", "fused")


@MODELS.register(
    "mome",
    reference=_MOME,
    description=f"mixture of slide / omics / fused experts; {_TEST_OMICS} when present",
    has_attention=True,
    uses_coords=False,
    side_inputs={"omics": "always"},
    side_layout=True,
)
class MOME(AttentionSlidePath):
    """Mixture of modality experts with a gate over the experts a patient's data allow.

    Experts, all ``hidden_dim`` wide: ``slide`` (the ABMIL embedding of the patches), ``omics``
    (SNN(G -> omics_dim), then Linear + ReLU to hidden_dim) and ``fused`` (Linear + ReLU of the
    two concatenated). The gate, Linear(hidden_dim + omics_dim -> 3) of the same concatenation,
    is a softmax over the available experts: for a patient without omics only ``slide`` is, so
    the mixed embedding is exactly the slide embedding and the prediction the slide-only path
    ``head(slide)``. One ``head`` reads the mixture. In training steps each present profile is
    hidden with probability ``p_missing_train`` (modality dropout), so that path is trained on
    every patient, not only on those who lack omics.

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`.
        attn_dim: width of the gated attention branches.
        omics_dim, n_blocks, omics_dropout: SNN width, blocks and AlphaDropout.
        p_missing_train: modality-dropout probability in training steps.
        side_layout: the fold's omics layout (set by the training path).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        attn_dim: int = 128,
        omics_dim: int = 256,
        n_blocks: int = 2,
        omics_dropout: float = 0.25,
        p_missing_train: float = 0.5,
        side_layout: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        _check_blocks(n_blocks, omics_dropout, "MOME")
        if isinstance(omics_dim, bool) or not isinstance(omics_dim, int) or omics_dim < 1:
            raise ConfigError(f"MOME: omics_dim must be a positive integer, got {omics_dim!r}")
        self.n_omics = _omics_width(side_layout, "MOME")
        self.omics_dim = omics_dim
        self.p_missing_train = _check_share(p_missing_train, "MOME")
        self._build_slide_path(attn_dim)
        self.snn = SNN(self.n_omics, omics_dim, n_blocks, float(omics_dropout))
        self.omics_expert = nn.Sequential(
            nn.Linear(omics_dim, hidden_dim), nn.ReLU(), Dropout(self.dropout)
        )
        self.fused_expert = nn.Sequential(
            nn.Linear(hidden_dim + omics_dim, hidden_dim), nn.ReLU(), Dropout(self.dropout)
        )
        self.gate = nn.Linear(hidden_dim + omics_dim, len(EXPERTS))
        self.head = make_head(hidden_dim, n_outputs)

    def mixture(
        self, features: Tensor, mask: Tensor, side: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, hidden_dim) mixed embedding, (B, 3) expert weights (order :data:`EXPERTS`, 0
        for an unavailable expert) and (B, N) slide attention."""
        slide, attention = self.slide_embedding(features, mask)
        omics, present = omics_inputs(
            side,
            mask.shape[0],
            self.n_omics,
            slide,
            hide=self.p_missing_train if self.training else 0.0,
            who="MOME",
        )
        hidden = self.snn(omics)
        both = torch.cat([slide, hidden], dim=1)
        experts = torch.stack([slide, self.omics_expert(hidden), self.fused_expert(both)], dim=1)
        available = torch.stack([torch.ones_like(present), present, present], dim=1)
        weights = masked_softmax(self.gate(both), available, dim=1)
        mixed = (weights.unsqueeze(-1) * experts).sum(dim=1)
        # a weight of exactly 1 already gives the slide embedding; `where` makes the slide-only
        # path an identity by construction rather than by floating-point luck
        mixed = torch.where(present[:, None], mixed, slide)
        return mixed, weights, attention

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        side: dict[str, Tensor] | None = None,
    ) -> MILOutput:
        self.check_inputs(features, mask, coords)
        mixed, _, attention = self.mixture(features, mask, side)
        return MILOutput(logits=self.head(mixed), embedding=mixed, attention=attention)


# ------------------------------------------------------------------- tabular use


@dataclass
class SNNFit:
    """An ``omics_snn`` trained on a tabular omics matrix by :func:`fit_omics_snn`.

    Attributes:
        model: the model, in eval mode.
        epochs: epochs of the kept weights (the best validation epoch, or all epochs run).
        val_scores: validation Harrell's C after each epoch (empty without a validation part).
    """

    model: OmicsSNN
    epochs: int
    val_scores: list[float] = field(default_factory=list)

    def risk(self, x: np.ndarray) -> np.ndarray:
        """Cox risks (higher = earlier event) of an (n, G) matrix of standardised profiles."""
        return snn_risk(self.model.eval(), x)


def fit_omics_snn(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    *,
    x_val: np.ndarray | None = None,
    time_val: np.ndarray | None = None,
    event_val: np.ndarray | None = None,
    epochs: int = 200,
    patience: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    **model_kwargs: Any,
) -> SNNFit:
    """Train ``omics_snn`` as a Cox model on a tabular omics matrix (no slides): full-batch
    Adam on the negative partial likelihood (Efron ties), one step per epoch.

    ``x`` must already be standardised with statistics of training patients only. With a
    validation part (``x_val``, ``time_val``, ``event_val``) the weights of the epoch with the
    best validation Harrell's C are kept (ties: the earliest) and training stops ``patience``
    epochs after the last improvement; without one, all ``epochs`` run and the last weights are
    kept (e.g. to refit on training + validation for the chosen number of epochs).
    ``model_kwargs`` go to :class:`OmicsSNN` (``hidden_dim``, ``n_blocks``, ``dropout``).
    """
    from oncoslide.survival.losses import cox_ph_loss
    from oncoslide.survival.metrics import concordance_index_censored

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ConfigError(f"fit_omics_snn: x must be a finite (n, G) matrix, got {x.shape}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"fit_omics_snn: epochs must be a positive integer, got {epochs!r}")
    has_val = x_val is not None
    if has_val and (time_val is None or event_val is None):
        raise ConfigError("fit_omics_snn: x_val needs time_val and event_val")
    torch.manual_seed(seed)
    model = OmicsSNN(1, 1, side_layout={"omics": {"n_columns": x.shape[1]}}, **model_kwargs)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    t = torch.as_tensor(np.asarray(time, dtype=np.float32))
    e = torch.as_tensor(np.asarray(event, dtype=bool))
    scores: list[float] = []
    best, best_epoch, best_state = -math.inf, epochs, None
    for epoch in range(epochs):
        model.train()
        optimiser.zero_grad()
        cox_ph_loss(snn_risk(model, x, grad=True), t, e).backward()
        optimiser.step()
        if not has_val:
            continue
        score = concordance_index_censored(
            np.asarray(event_val, dtype=bool), np.asarray(time_val), snn_risk(model.eval(), x_val)
        ).cindex
        scores.append(float(score))
        if score > best:
            best, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch + 1 - best_epoch >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return SNNFit(model.eval(), best_epoch, scores)


def snn_risk(model: OmicsSNN, x: Any, *, grad: bool = False) -> Any:
    """Cox risks of ``omics_snn`` for an (n, G) matrix of present profiles: a tensor with
    ``grad``, else a float64 numpy array (dropout active or not as the model's mode says)."""
    n = len(x)
    features = torch.zeros(n, 1, model.in_dim)  # one placeholder patch per patient: ignored
    mask = torch.ones(n, 1, dtype=torch.bool)
    side = {"omics": torch.as_tensor(np.asarray(x, dtype=np.float32)), "omics_present": mask[:, 0]}
    if grad:
        return model(features, mask, side=side).logits[:, 0]
    with torch.no_grad():
        return model(features, mask, side=side).logits[:, 0].double().numpy()


__all__ = [
    "EXPERTS",
    "MOME",
    "SNN",
    "LateFusion",
    "OmicsSNN",
    "SNNFit",
    "fit_omics_snn",
    "omics_inputs",
    "snn_risk",
]
