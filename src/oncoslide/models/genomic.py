"""Slide models guided by genomics in training only: G-HANet and PathLUPI.

Both read an omics profile as a *privileged* side input (``side_inputs={"omics": "train"}``):
training steps receive the standardised profile of each training patient (``side["omics"]``,
``side["omics_present"]``) and turn it into an auxiliary reconstruction loss; validation, test
and prediction get ``side=None`` and predict from the patches alone. The fold's gene selection
and group positions come as ``side_layout`` (fitted on the training part; see
:mod:`oncoslide.training.side_inputs`), so the reconstruction heads match what the fold kept.

- ``ghanet`` (Wang et al., G-HANet): a cross-modal associating branch (one learned token per gene
  group cross-attends to the patches, two rounds, each token reconstructing its group's genes)
  and a hyper-attention survival branch (hyperedges = the mean of gated attention and each
  token's top-20% cross-attention, gradient stopped there; hyper-attention; fused with the group
  tokens; self-attention over the tokens; the flattened tokens feed the head). One end-to-end
  model, slide-only at inference.
- ``pathlupi`` (PathLUPI): pathway tokens cross-attend to the patches; each token predicts its
  pathway's score (the mean standardised expression of the group's genes), anchoring the slide
  embedding (the mean token) to the transcriptome; the task head reads that embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.models.abmil import GatedAttention
from oncoslide.models.base import (
    MODELS,
    Dropout,
    MILModel,
    MILOutput,
    masked_softmax,
    project_valid,
    unpack,
)
from oncoslide.models.heads import make_head

_GHANET = (
    "Wang et al., Histo-Genomic Knowledge Association for Cancer Prognosis from "
    "Histopathology Whole Slide Images (G-HANet), IEEE TMI 2025"
)
_PATHLUPI = (
    "PathLUPI: learning using privileged (transcriptomic) information for WSI-only "
    "prediction (seed 003)"
)


class GEGLU(nn.Module):
    """Gated feed-forward: Linear(d -> 2h), a * GELU(g), Linear(h -> d)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.inp(x).chunk(2, dim=-1)
        return self.out(self.drop(a * F.gelu(g)))


class TokenAttention(nn.Module):
    """Pre-LayerNorm attention of tokens to a padded set (cross) or to themselves (self), then
    a GEGLU feed-forward, both residual. Returns the tokens and the head-averaged weights."""

    def __init__(self, dim: int, heads: int, dropout: float, *, cross: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"hidden_dim {dim} must be a multiple of heads {heads}")
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, 2 * dim, dropout)

    def forward(
        self, tokens: Tensor, keys: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        q = self.norm_q(tokens)
        if (keys is None) != (self.norm_kv is None):
            raise ConfigError("a cross-attention block needs keys; a self-attention one none")
        kv = q if self.norm_kv is None or keys is None else self.norm_kv(keys)
        out, weights = self.attn(
            q,
            kv,
            kv,
            key_padding_mask=None if mask is None else ~mask,
            need_weights=True,
            average_attn_weights=True,
        )
        tokens = tokens + out
        tokens = tokens + self.ff(self.norm_ff(tokens))
        return tokens, weights


def _layout(side_layout: Mapping[str, Any] | None, n_groups: int) -> list[tuple[str, list[int]]]:
    """(group, positions of its genes in the omics vector), sorted by group name, or
    ``n_groups`` unnamed groups without genes when no layout is given (slides only)."""
    if side_layout is None or "omics" not in side_layout:
        return [(f"group{i}", []) for i in range(n_groups)]
    groups = dict(side_layout["omics"].get("groups", {}))
    if not groups:
        raise ConfigError("side_layout['omics'] has no gene group")
    return [(str(g), [int(i) for i in groups[g]]) for g in sorted(groups)]


def _top_share(weights: Tensor, mask: Tensor, share: float) -> Tensor:
    """Each row of (B, G, N) ``weights`` keeps its top ``share`` of valid patches (at least
    one), renormalised to sum 1; every other position is 0."""
    n_valid = mask.sum(dim=1)  # (B,)
    k = torch.clamp(torch.ceil(share * n_valid.to(weights.dtype)).long(), min=1)
    valid = mask[:, None, :].expand_as(weights)
    scored = torch.where(valid, weights, torch.full_like(weights, -1.0))
    ordered = scored.sort(dim=-1, descending=True).values
    index = (k - 1)[:, None, None].expand(weights.shape[0], weights.shape[1], 1)
    threshold = ordered.gather(-1, index)
    kept = torch.where(valid & (scored >= threshold), weights, torch.zeros_like(weights))
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _group_maps(
    groups: list[tuple[str, list[int]]], cross: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    """Each group token's last cross-attention over the valid patches, renormalised (the
    per-group heatmaps); the multi-head attention already gives padding no weight."""
    maps = _over_valid(cross, mask[:, None, :])
    return {name: maps[:, k] for k, (name, _) in enumerate(groups)}


def _over_valid(weights: Tensor, mask: Tensor) -> Tensor:
    """``weights`` zeroed outside ``mask`` and renormalised to sum 1 over the last axis."""
    kept = torch.where(mask, weights, torch.zeros_like(weights))
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _attend(
    tokens: Tensor, blocks: nn.ModuleList, patches: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Learned ``tokens`` (1, G, H) cross-attend to each bag's patches through ``blocks``;
    the tokens (B, G, H) and the last block's head-averaged weights (B, G, N)."""
    batch = mask.shape[0]
    out = tokens.expand(batch, -1, -1)
    cross = patches.new_zeros(batch, tokens.shape[1], mask.shape[1])
    for block in blocks:
        out, cross = block(out, patches, mask)
    return out, cross


def _reconstruction_error(pred: Tensor, target: Tensor) -> Tensor:
    """Per patient: (1 - cosine similarity) + mean squared error."""
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    return (1.0 - cos) + ((pred - target) ** 2).mean(dim=-1)


def _masked_mean(values: Tensor, present: Tensor) -> Tensor:
    """Mean over present patients; a zero that keeps the graph when none is present."""
    if bool(present.any()):
        return values[present].mean()
    return values.sum() * 0.0


@MODELS.register(
    "ghanet",
    reference=_GHANET,
    has_attention=True,
    uses_coords=False,
    side_inputs={"omics": "train"},
    side_layout=True,
    aux_losses={"recon": 0.3},
    omics_selection="welch",
    description="G-HANet: genomics-guided (omics in training only, per-fold gene selection); "
    "slides only at test time",
)
class GHANet(MILModel):
    """G-HANet: genomics-guided slide model, slide-only at inference.

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`
            (``hidden_dim`` is the token width; the embedding is ``groups x hidden_dim``).
        heads: attention heads of every attention block.
        rounds: cross-attention rounds of the associating branch.
        top_share: share of patches each group token keeps for its hyperedge.
        attn_dim: width of the gated attention branches.
        n_groups: group tokens when no ``side_layout`` is given (slides only).
        side_layout: the fold's omics layout (set by the training path).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 256,
        heads: int = 4,
        rounds: int = 2,
        top_share: float = 0.2,
        attn_dim: int = 128,
        n_groups: int = 6,
        side_layout: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        if not 0 < float(top_share) <= 1:
            raise ConfigError(f"GHANet: top_share must be in (0, 1], got {top_share!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"GHANet: rounds must be a positive integer, got {rounds!r}")
        self.groups = _layout(side_layout, n_groups)
        self.top_share = float(top_share)
        g = len(self.groups)
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
        self.group_tokens = nn.Parameter(torch.randn(1, g, hidden_dim) * 0.02)
        self.associate = nn.ModuleList(
            [TokenAttention(hidden_dim, heads, dropout) for _ in range(rounds)]
        )
        self.recon = nn.ModuleList(
            [nn.Linear(hidden_dim, max(1, len(idx))) for _, idx in self.groups]
        )
        self.gated = GatedAttention(hidden_dim, attn_dim, dropout, gated=True)
        self.hyper = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
        )
        self.mix = TokenAttention(hidden_dim, heads, dropout, cross=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = make_head(g * hidden_dim, n_outputs)

    @property
    def embed_dim(self) -> int:
        return len(self.groups) * self.hidden_dim

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        side: dict[str, Tensor] | None = None,
    ) -> MILOutput:
        self.check_inputs(features, mask, coords)
        rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
        patches = unpack(rows, mask)  # (B, N, H), zeros on padding
        tokens, cross = _attend(self.group_tokens, self.associate, patches, mask)
        # hyper-attention survival branch: hyperedges from gated attention (trained through)
        # and each token's strongest cross-attention (gradient stopped, as in the paper)
        gated = masked_softmax(unpack(self.gated(rows), mask), mask, dim=1)  # (B, N)
        edges = 0.5 * (gated[:, None, :] + _top_share(cross.detach(), mask, self.top_share))
        hyper = edges @ patches  # (B, G, H)
        hyper = hyper + self.hyper(hyper)
        fused, _ = self.mix(0.5 * (hyper + tokens))
        embedding = self.norm(fused).flatten(1)
        aux: dict[str, Tensor] = {}
        if side is not None and "omics" in side:
            aux["recon"] = self._reconstruction(tokens, side)
        return MILOutput(
            logits=self.head(embedding),
            embedding=embedding,
            attention=gated,
            aux_losses=aux,
            attention_maps=_group_maps(self.groups, cross, mask),
        )

    def _reconstruction(self, tokens: Tensor, side: dict[str, Tensor]) -> Tensor:
        omics, present = side["omics"], side["omics_present"].bool()
        total = tokens.new_zeros(())
        for k, (_, idx) in enumerate(self.groups):
            if not idx:
                continue
            pred = self.recon[k](tokens[:, k])
            target = omics[:, idx].to(pred.dtype)
            total = total + _masked_mean(_reconstruction_error(pred, target), present)
        return total


@MODELS.register(
    "pathlupi",
    reference=_PATHLUPI,
    has_attention=True,
    uses_coords=False,
    side_inputs={"omics": "train"},
    side_layout=True,
    aux_losses={"anchor": 1.0},
    description="PathLUPI: genome-anchored slide embedding (omics in training only); slides "
    "only at test time",
)
class PathLUPI(MILModel):
    """Genome-anchored slide embedding: pathway tokens that predict pathway scores.

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`.
        heads, rounds: attention heads and cross-attention rounds of the pathway tokens.
        n_groups: pathway tokens when no ``side_layout`` is given (slides only).
        side_layout: the fold's omics layout (set by the training path); each gene group is a
            pathway whose score is the mean of its standardised genes.
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 256,
        heads: int = 4,
        rounds: int = 2,
        n_groups: int = 8,
        side_layout: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        if not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"PathLUPI: rounds must be a positive integer, got {rounds!r}")
        self.groups = _layout(side_layout, n_groups)
        g = len(self.groups)
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
        self.tokens = nn.Parameter(torch.randn(1, g, hidden_dim) * 0.02)
        self.blocks = nn.ModuleList(
            [TokenAttention(hidden_dim, heads, dropout) for _ in range(rounds)]
        )
        self.score = nn.Linear(hidden_dim, 1)  # each token's pathway score (shared readout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = make_head(hidden_dim, n_outputs)

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        side: dict[str, Tensor] | None = None,
    ) -> MILOutput:
        self.check_inputs(features, mask, coords)
        rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
        patches = unpack(rows, mask)
        tokens, cross = _attend(self.tokens, self.blocks, patches, mask)
        embedding = self.norm(tokens.mean(dim=1))
        # the tokens' mean attention: a distribution over each bag's valid patches
        attention = _over_valid(cross.mean(dim=1), mask)
        aux: dict[str, Tensor] = {}
        if side is not None and "omics" in side:
            aux["anchor"] = self._anchor(tokens, side)
        return MILOutput(
            logits=self.head(embedding),
            embedding=embedding,
            attention=attention,
            aux_losses=aux,
            attention_maps=_group_maps(self.groups, cross, mask),
        )

    def pathway_scores(self, tokens: Tensor) -> Tensor:
        """(B, G) predicted pathway scores of the tokens."""
        return self.score(tokens).squeeze(-1)

    def _anchor(self, tokens: Tensor, side: dict[str, Tensor]) -> Tensor:
        omics, present = side["omics"], side["omics_present"].bool()
        usable = [(k, idx) for k, (_, idx) in enumerate(self.groups) if idx]
        if not usable:
            return tokens.sum() * 0.0
        target = torch.stack([omics[:, idx].mean(dim=1) for _, idx in usable], dim=1)
        pred = self.pathway_scores(tokens)[:, [k for k, _ in usable]]
        error = ((pred - target.to(pred.dtype)) ** 2).mean(dim=1)
        return _masked_mean(error, present)
