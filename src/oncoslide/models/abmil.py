"""Attention-based MIL (Ilse et al. 2018), in the gated form used by CLAM and PathBench."""

from __future__ import annotations

from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.models.base import (
    MODELS,
    Dropout,
    MILModel,
    MILOutput,
    attention_pool,
    bag_index,
    project_valid,
)
from oncoslide.models.heads import make_head

_REFERENCE = "Ilse, Tomczak & Welling, Attention-based Deep Multiple Instance Learning, ICML 2018"


class GatedAttention(nn.Module):
    """Attention logits of packed rows: w^T (tanh(V h) * sigmoid(U h)), or w^T tanh(V h).

    Dropout follows each branch, as in CLAM's gated attention network.
    """

    def __init__(self, dim: int, attn_dim: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), Dropout(dropout))
        self.gate_branch = (
            nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), Dropout(dropout))
            if gated
            else None
        )
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, rows: Tensor) -> Tensor:
        """(M, dim) -> (M,) attention logits."""
        hidden = self.tanh_branch(rows)
        if self.gate_branch is not None:
            hidden = hidden * self.gate_branch(rows)
        return self.score(hidden).squeeze(-1)


class AttentionSlidePath(MILModel):
    """ABMIL's slide path: ``proj`` (Linear + ReLU + Dropout per patch) and ``attention``
    pooling. Models that pool patches as ABMIL does build it here, under ABMIL's parameter
    names, so their slide path can be checked against ``abmil`` with the same weights."""

    def _build_slide_path(self, attn_dim: int, gated: bool = True) -> None:
        if isinstance(attn_dim, bool) or not isinstance(attn_dim, int) or attn_dim < 1:
            raise ConfigError(
                f"{type(self).__name__}: attn_dim must be a positive integer, got {attn_dim!r}"
            )
        self.attn_dim = attn_dim
        self.proj = nn.Sequential(
            nn.Linear(self.in_dim, self.hidden_dim), nn.ReLU(), Dropout(self.dropout)
        )
        self.attention = GatedAttention(self.hidden_dim, attn_dim, self.dropout, gated)

    def slide_embedding(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, hidden_dim) attention-pooled slide embedding and (B, N) attention."""
        rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
        return attention_pool(self.attention(rows), rows, mask, bag_index(mask))


@MODELS.register(
    "abmil",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=False,
    description="gated attention MIL (CLAM / PathBench form)",
)
class ABMIL(AttentionSlidePath):
    """Gated attention MIL.

    Linear(D -> hidden) + ReLU + Dropout per patch; gated attention (attn_dim wide) gives one
    logit per patch; a masked softmax over the bag's patches weights the projected patches; the
    weighted sum (hidden-d, the embedding) goes through Linear(hidden -> n_outputs).

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`.
        attn_dim: width of the attention branches (128 in CLAM; CROPKT uses 384).
        gated: gated attention (True) or the plain tanh attention of Ilse et al. (False).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        attn_dim: int = 128,
        gated: bool = True,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        self.gated = bool(gated)
        self._build_slide_path(attn_dim, self.gated)
        self.head = make_head(hidden_dim, n_outputs)

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        self.check_inputs(features, mask, coords)
        embedding, attention = self.slide_embedding(features, mask)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=attention)


@MODELS.register(
    "abmil_plain",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=False,
    description="attention MIL with plain tanh attention (Ilse et al.)",
)
def abmil_plain(
    in_dim: int,
    n_outputs: int,
    dropout: float = 0.25,
    hidden_dim: int = 512,
    attn_dim: int = 128,
) -> ABMIL:
    """ABMIL with the plain (non-gated) tanh attention of Ilse et al. 2018."""
    return ABMIL(in_dim, n_outputs, dropout, hidden_dim, attn_dim=attn_dim, gated=False)


__all__ = ["ABMIL", "AttentionSlidePath", "GatedAttention", "abmil_plain"]
