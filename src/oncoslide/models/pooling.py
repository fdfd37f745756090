"""Attention-free baselines: masked mean and masked max pooling of projected patches."""

from __future__ import annotations

from torch import Tensor, nn

from oncoslide.models.base import (
    MODELS,
    Dropout,
    MILModel,
    MILOutput,
    bag_index,
    project_valid,
    unpack,
)
from oncoslide.models.heads import make_head


class _PoolingMIL(MILModel):
    """Linear(D -> hidden) + ReLU + dropout per patch, a masked pooling, then a linear head."""

    def __init__(
        self, in_dim: int, n_outputs: int, dropout: float = 0.25, hidden_dim: int = 512
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
        self.head = make_head(hidden_dim, n_outputs)

    def pool(self, rows: Tensor, mask: Tensor, index: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        self.check_inputs(features, mask, coords)
        rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
        embedding = self.pool(rows, mask, bag_index(mask))
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=None)


@MODELS.register(
    "mean",
    reference="mean pooling baseline",
    has_attention=False,
    uses_coords=False,
    description="mean of the projected patches (baseline)",
)
class MeanPoolMIL(_PoolingMIL):
    """Masked mean of the projected patches of each bag."""

    def pool(self, rows: Tensor, mask: Tensor, index: Tensor) -> Tensor:
        total = rows.new_zeros(mask.shape[0], rows.shape[-1]).index_add(0, index, rows)
        return total / mask.sum(dim=1, keepdim=True).to(rows.dtype)


@MODELS.register(
    "max",
    reference="max pooling baseline",
    has_attention=False,
    uses_coords=False,
    description="element-wise max of the projected patches (baseline)",
)
class MaxPoolMIL(_PoolingMIL):
    """Masked element-wise max of the projected patches of each bag."""

    def pool(self, rows: Tensor, mask: Tensor, index: Tensor) -> Tensor:
        return unpack(rows, mask, fill=float("-inf")).max(dim=1).values
