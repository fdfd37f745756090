"""TransMIL (Shao et al. 2021) with masked Nyström attention that is exact under padding.

Layout of one bag of n valid patches (whatever the padding around it):

* its n projected patches, in their order in the bag, fill a square grid of side
  ``s = ceil(sqrt(n))`` row by row; the ``s*s - n`` leftover cells repeat the bag's first
  patches (as in the paper's code);
* the token sequence is ``[CLS, cell 0, ..., cell s*s-1]``, i.e. ``1 + s*s`` tokens.

A padded batch stores bag b's sequence at positions ``0 .. s_b*s_b`` of a (B, L, C) tensor, the
rest masked out. Everything that mixes tokens is restricted to each bag's own tokens:

* Nyström attention: each bag's valid tokens are split, in order, into ``m = min(landmarks, n)``
  contiguous segments of near-equal size whose means are the landmarks; softmaxes only run over
  valid keys and valid landmarks, the landmark kernel of a bag with fewer landmarks than the batch
  is padded block-diagonally with an identity (its pseudo-inverse stays block-diagonal), and the
  pseudo-inverse's scaling uses each bag's own matrix;
* the residual depthwise convolution over the sequence sees zeros past the bag's tokens, exactly
  like the zero padding of a lone bag;
* PPEG convolves each bag's grid placed at the top-left of a common canvas with zeros outside
  it, which is what zero padding at the grid's border gives for a lone bag.

So a bag's outputs do not depend on the padding or on the other bags in the batch (up to float
rounding). Coordinates are not used (the grid follows the order of the patches).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.models.base import (
    MODELS,
    Dropout,
    MILModel,
    MILOutput,
    masked_softmax,
    project_valid,
)
from oncoslide.models.heads import make_head

_REFERENCE = (
    "Shao et al., TransMIL: Transformer based Correlated Multiple Instance Learning for "
    "Whole Slide Image Classification, NeurIPS 2021; Xiong et al., Nyströmformer, AAAI 2021"
)


def iterative_pinv(matrix: Tensor, valid_rows: Tensor, valid_cols: Tensor, iters: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of a batch of square matrices by the iterative method.

    The initial guess is ``A^T / (max column sum * max row sum)`` (absolute values, valid part
    of each matrix only, so identity padding never changes the scaling); each step is
    ``Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z)))`` (Razavi et al. 2014, as in Nyströmformer).

    Args:
        matrix: (..., M, M).
        valid_rows, valid_cols: (..., M) masks of the rows/columns that belong to the matrix.
    """
    absolute = matrix.abs()
    col_sums = torch.where(valid_cols, absolute.sum(dim=-2), 0.0)
    row_sums = torch.where(valid_rows, absolute.sum(dim=-1), 0.0)
    scale = col_sums.amax(dim=-1) * row_sums.amax(dim=-1)
    z = matrix.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iters):
        az = matrix @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _landmark_segments(mask: Tensor, n_landmarks: int) -> tuple[Tensor, Tensor, int]:
    """Segment id of each token, (B, L), the landmark mask (B, M) and M.

    Bag b with n_b valid tokens gets m_b = min(n_landmarks, n_b) landmarks; its r-th valid token
    goes to segment floor(r * m_b / n_b). Padding goes to the extra slot M (discarded later).
    """
    n_valid = mask.sum(dim=1)
    m_bag = n_valid.clamp(max=n_landmarks)
    m_max = int(m_bag.max())
    rank = mask.cumsum(dim=1) - 1
    segment = torch.div(rank * m_bag[:, None], n_valid[:, None], rounding_mode="floor")
    segment = torch.where(mask, segment, torch.full_like(segment, m_max))
    landmark_mask = torch.arange(m_max, device=mask.device)[None, :] < m_bag[:, None]
    return segment, landmark_mask, m_max


def _segment_means(values: Tensor, segment: Tensor, m_max: int) -> Tensor:
    """Mean of (B, H, L, d) values over each segment: (B, H, M, d); empty segments give 0."""
    batch, heads, _, dim = values.shape
    index = segment[:, None, :, None].expand(-1, heads, -1, dim)
    sums = values.new_zeros(batch, heads, m_max + 1, dim).scatter_add(2, index, values)
    counts = values.new_zeros(batch, m_max + 1).scatter_add(
        1, segment, torch.ones_like(segment, dtype=values.dtype)
    )
    return (sums / counts.clamp(min=1)[:, None, :, None])[:, :, :m_max]


class MaskedNystromAttention(nn.Module):
    """Multi-head Nyström self-attention over the valid tokens of each sequence.

    Args:
        dim: token width (a multiple of ``heads``).
        heads: number of heads.
        n_landmarks: landmarks per sequence (fewer when a sequence has fewer valid tokens).
        pinv_iterations: steps of the iterative pseudo-inverse.
        residual_kernel: length of the depthwise convolution over the values added to the
            output (0 to disable).
        dropout: dropout on the output projection.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim // heads
        self.n_landmarks = n_landmarks
        self.pinv_iterations = pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), Dropout(dropout))
        self.residual = (
            nn.Conv2d(
                heads,
                heads,
                kernel_size=(residual_kernel, 1),
                padding=(residual_kernel // 2, 0),
                groups=heads,
                bias=False,
            )
            if residual_kernel > 0
            else None
        )

    def forward(
        self, x: Tensor, mask: Tensor, return_cls_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(B, L, C) tokens and their (B, L) mask -> (B, L, C) output and, if asked, (B, L).

        The optional second output is the exact softmax attention of token 0 (CLS) over the
        valid tokens, averaged over heads: what the Nyström approximation approximates.
        """
        batch, length, _ = x.shape
        qkv = self.to_qkv(x).reshape(batch, length, 3, self.heads, self.dim_head)
        token_mask = mask[:, None, :, None]
        zero = x.new_zeros(())
        q, k, v = (torch.where(token_mask, t, zero) for t in qkv.permute(2, 0, 3, 1, 4))
        q = q * self.dim_head**-0.5

        out = self._attend(q, k, v, mask)
        if self.residual is not None:
            out = out + self.residual(v)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)
        cls_attention = None
        if return_cls_attention:
            scores = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2)
            cls_attention = masked_softmax(scores, mask[:, None, :]).mean(dim=1)
        return self.to_out(out), cls_attention

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Exact attention for bags with at most ``n_landmarks`` tokens, Nyström otherwise.

        With every token its own landmark Nyström attention *is* softmax attention, only
        computed through an approximate pseudo-inverse at a much higher cost; so small bags take
        the exact path. The choice is per bag, so a bag's output never depends on its batch.
        """
        n_valid = mask.sum(dim=1)
        small = n_valid <= self.n_landmarks
        if bool(small.all()):
            return _exact_attention(q, k, v, mask)
        if not bool(small.any()):
            return self._nystrom(q, k, v, mask)
        out = torch.zeros_like(v)
        # valid tokens sit at the start of each sequence: trim the small bags' padding
        length = int(n_valid[small].max())
        out[small, :, :length] = _exact_attention(
            q[small, :, :length], k[small, :, :length], v[small, :, :length], mask[small, :length]
        )
        out[~small] = self._nystrom(q[~small], k[~small], v[~small], mask[~small])
        return out

    def _nystrom(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        segment, landmark_mask, m_max = _landmark_segments(mask, self.n_landmarks)
        q_land, k_land = _segment_means(q, segment, m_max), _segment_means(k, segment, m_max)

        lm_cols = landmark_mask[:, None, None, :]
        attn1 = masked_softmax(q @ k_land.transpose(-1, -2), lm_cols)
        attn2 = masked_softmax(q_land @ k_land.transpose(-1, -2), lm_cols)
        # Rows of missing landmarks become identity rows: the kernel is block-diagonal.
        eye = torch.eye(m_max, dtype=q.dtype, device=q.device)
        attn2 = torch.where(landmark_mask[:, None, :, None], attn2, eye)
        attn3 = masked_softmax(q_land @ k.transpose(-1, -2), mask[:, None, None, :])
        lm_valid = landmark_mask[:, None, :].expand(-1, self.heads, -1)
        kernel_inv = iterative_pinv(attn2, lm_valid, lm_valid, self.pinv_iterations)
        # attn1 @ (pinv @ (attn3 @ v)): cheaper than (attn1 @ pinv) @ (attn3 @ v) for L > M.
        return attn1 @ (kernel_inv @ (attn3 @ v))


def _exact_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention over each sequence's valid keys; (B, H, L, d) in and out."""
    probs = masked_softmax(q @ k.transpose(-1, -2), mask[:, None, None, :])
    return probs @ v


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention block: x + attn(LayerNorm(x))."""

    def __init__(self, dim: int, **attention_kw: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MaskedNystromAttention(dim, **attention_kw)  # type: ignore[arg-type]

    def forward(
        self, x: Tensor, mask: Tensor, return_cls_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        out, cls_attention = self.attn(self.norm(x), mask, return_cls_attention)
        return _zero_padding(x + out, mask), cls_attention


class PPEG(nn.Module):
    """Pyramid position encoding: grid + depthwise conv 7x7 + 5x5 + 3x3 of the grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, kernel_size=k, padding=k // 2, groups=dim) for k in (7, 5, 3)
        )

    def forward(self, canvas: Tensor) -> Tensor:
        """(B, C, S, S) canvas, zero outside each bag's grid -> same shape."""
        out = canvas
        for conv in self.convs:
            out = out + conv(canvas)
        return out


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask[..., None], x, x.new_zeros(()))


class _GridLayout:
    """Index maps between packed patches, per-bag token sequences and the PPEG canvas."""

    def __init__(self, mask: Tensor) -> None:
        device = mask.device
        n_valid = mask.sum(dim=1)
        side = torch.sqrt(n_valid.double()).floor().long()
        side = side + (side * side < n_valid).long()  # exact integer ceil(sqrt(n))
        cells = side * side
        self.side_max = int(side.max())
        n_cells = int(cells.max())
        offsets = torch.cumsum(n_valid, dim=0) - n_valid

        cell = torch.arange(n_cells, device=device)[None, :]
        self.cell_valid = cell < cells[:, None]  # (B, n_cells)
        # cell j of bag b holds the bag's patch j mod n_b: leftovers repeat the first patches
        self.patch_of_cell = torch.remainder(cell, n_valid[:, None])
        self.source = torch.where(self.cell_valid, offsets[:, None] + self.patch_of_cell, 0)
        self.seq_mask = torch.cat([torch.ones_like(mask[:, :1]), self.cell_valid], dim=1)

        # canvas position (r, c) < (s_b, s_b) holds cell r * s_b + c of bag b
        s_max = self.side_max
        rows = torch.arange(s_max, device=device)[:, None]
        cols = torch.arange(s_max, device=device)[None, :]
        in_grid = (rows[None] < side[:, None, None]) & (cols[None] < side[:, None, None])
        cell_at = rows[None] * side[:, None, None] + cols[None]
        self.canvas_valid = in_grid.reshape(-1, s_max * s_max)
        self.canvas_cell = torch.where(in_grid, cell_at, 0).reshape(-1, s_max * s_max)
        # and back: cell j of bag b sits at canvas position (j // s_b) * S + j % s_b
        self.cell_canvas = torch.where(
            self.cell_valid,
            torch.div(cell, side[:, None], rounding_mode="floor") * s_max
            + torch.remainder(cell, side[:, None]),
            0,
        )

    def tokens(self, rows: Tensor) -> Tensor:
        """Packed (M, C) patches -> (B, n_cells, C) grid cells (zeros past each bag's grid)."""
        return _zero_padding(rows[self.source], self.cell_valid)

    def to_canvas(self, cells: Tensor) -> Tensor:
        """(B, n_cells, C) -> (B, C, S, S) canvas with zeros outside each bag's grid."""
        batch, _, dim = cells.shape
        gathered = cells.gather(1, self.canvas_cell[..., None].expand(-1, -1, dim))
        gathered = _zero_padding(gathered, self.canvas_valid)
        return gathered.transpose(1, 2).reshape(batch, dim, self.side_max, self.side_max)

    def from_canvas(self, canvas: Tensor) -> Tensor:
        """(B, C, S, S) canvas -> (B, n_cells, C) cells (zeros past each bag's grid)."""
        batch, dim = canvas.shape[:2]
        flat = canvas.reshape(batch, dim, -1).transpose(1, 2)
        cells = flat.gather(1, self.cell_canvas[..., None].expand(-1, -1, dim))
        return _zero_padding(cells, self.cell_valid)

    def patch_attention(self, cls_attention: Tensor, mask: Tensor) -> Tensor:
        """(B, 1 + n_cells) CLS attention -> (B, N) per patch, summed over a patch's cells.

        The CLS token's weight on itself is dropped and the rest renormalised to sum to 1.
        """
        cell_weights = torch.where(self.cell_valid, cls_attention[:, 1:], 0.0)
        n_max = int(mask.sum(dim=1).max())
        per_rank = cell_weights.new_zeros(mask.shape[0], n_max).scatter_add(
            1, self.patch_of_cell.clamp(max=n_max - 1), cell_weights
        )
        per_rank = per_rank / per_rank.sum(dim=1, keepdim=True)
        rank = (mask.cumsum(dim=1) - 1).clamp(min=0, max=n_max - 1)
        return torch.where(mask, per_rank.gather(1, rank), 0.0)


@MODELS.register(
    "transmil",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=False,
    description="TransMIL: Nystrom self-attention over the patches with PPEG",
)
class TransMIL(MILModel):
    """TransMIL: projected patches on a square grid, CLS token, 2 Nyström layers with PPEG.

    Linear(D -> hidden) + ReLU + Dropout; [CLS, grid]; TransLayer; PPEG; TransLayer;
    LayerNorm; the CLS token (the embedding) -> Linear(hidden -> n_outputs).

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`
            (``dropout`` follows the projection).
        heads: attention heads (``hidden_dim`` must be a multiple).
        n_landmarks: Nyström landmarks (256 in the paper; fewer for bags with fewer tokens).
        pinv_iterations: iterations of the pseudo-inverse (6 in the paper).
        attn_dropout: dropout on each attention output (0.1 in the paper).

    The returned attention is the last layer's exact softmax attention of the CLS query over
    the bag's tokens, averaged over heads, summed over the grid cells of each patch, the CLS
    self-weight removed and renormalised to sum to 1 over the valid patches.
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        heads: int = 8,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        attn_dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        problems = []
        if not isinstance(heads, int) or heads < 1 or hidden_dim % heads:
            problems.append(f"heads must be a positive divisor of hidden_dim, got {heads!r}")
        if not isinstance(n_landmarks, int) or n_landmarks < 1:
            problems.append(f"n_landmarks must be a positive integer, got {n_landmarks!r}")
        if not isinstance(pinv_iterations, int) or pinv_iterations < 1:
            problems.append(f"pinv_iterations must be a positive integer, got {pinv_iterations!r}")
        if not 0.0 <= float(attn_dropout) < 1.0:
            problems.append(f"attn_dropout must be in [0, 1), got {attn_dropout!r}")
        if problems:
            raise ConfigError("TransMIL: " + "; ".join(problems))
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        attention_kw = {
            "heads": heads,
            "n_landmarks": n_landmarks,
            "pinv_iterations": pinv_iterations,
            "dropout": attn_dropout,
        }
        self.layer1 = TransLayer(hidden_dim, **attention_kw)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, **attention_kw)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = make_head(hidden_dim, n_outputs)

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        self.check_inputs(features, mask, coords)
        rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
        layout = _GridLayout(mask)
        cls = self.cls_token.expand(mask.shape[0], -1, -1).to(rows.dtype)
        x = torch.cat([cls, layout.tokens(rows)], dim=1)
        x, _ = self.layer1(x, layout.seq_mask)
        cells = layout.from_canvas(self.ppeg(layout.to_canvas(x[:, 1:])))
        x = torch.cat([x[:, :1], cells], dim=1)
        x, cls_attention = self.layer2(x, layout.seq_mask, return_cls_attention=True)
        embedding = self.norm(x[:, 0])
        assert cls_attention is not None
        attention = layout.patch_attention(cls_attention, mask)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=attention)
