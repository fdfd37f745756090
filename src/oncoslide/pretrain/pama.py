"""PAMA: position-aware masked autoencoder for slide pre-training (seed 002, METHODS.md).

One bag is one slide (one coordinate frame). Coordinates are converted to patch units (the
grid step read from the coordinates). Per bag:

- **Anchors** ("kernels"): k-means on the coordinates of all the bag's patches with
  K = min(N // 18 + 1, ``max_anchors``) centres; the patch nearest each centre is an anchor's
  position. Anchor tokens start as one learned token and gather what they know from the patches
  around them (in pre-training the visible ones only: positions are not masked, contents are);
  a CLS token joins the anchors without a position.
- **PACA block**: bidirectional cross-attention with shared QKV: anchors attend to patches,
  patches attend to anchors (both from the block's input tokens), then an MLP on both. The
  attention logits get a bias per head: a learned table over the binned patch-anchor distance
  (``n_distance_bins`` bins of sqrt(distance in patches) x 8, 64 by default) plus a learned
  table over the binned polar angle of the patch seen from the anchor (8 bins). Distance
  tables start as a locality prior (ALiBi-style: head h adds -distance / 2^(h+1)).
- **KRO** (kernel reorientation): after each block, each anchor's main orientation is the angle
  bin with the largest summed |attention| of the anchor over its patches; the next block's
  angles are counted from it (rotation invariance).
- **AD** (anchor dropout): in training each anchor is dropped with probability
  ``anchor_dropout`` (0.2): removed from the patches' keys; the softmax over the kept anchors
  renormalises their weights, which is the 1/(1-p) rescaling of dropout for attention weights.
- **MAE**: 75 % of the patches are masked; the encoder sees the visible ones; the decoder gets
  the encoder's tokens, a learned mask token at every masked patch, the encoder's anchors at
  their positions, and predicts the masked patches. ``target="features"`` (the paper's):
  their features, MSE on masked tokens only. ``target="codes"`` (BEiT / HuBERT-style discrete
  targets, an option added here): their cluster among ``codebook_size`` centres of a k-means
  tokenizer fitted once on the pre-training bags' patches (label-free, :meth:`PAMA.prepare`),
  cross-entropy on masked tokens. Why: when patch features are mostly noise around a few
  morphologies, the raw features of a masked patch are next to unpredictable (the MSE stays
  at the variance), but which morphology it shows is predictable from its neighbours.
  ``masking="regions"`` (option) masks whole anchor regions instead of random patches
  (BEiT / SimMIM block masking).
- **Local mixing** (``local_neighbours`` K > 0, an option added here; 0, the default, is the
  paper's encoder): before each PACA block every patch token attends to itself and its K
  nearest patches by coordinate (K = 8: the 8-neighbourhood of a full grid) with a learned
  per-head bias on the binned distance. Why: PACA only mixes patches through anchors about 4
  patches apart, so no patch token knows its immediate neighbours, the scale at which the
  arrangement signal of the `spatial` world sits. In pre-training the encoder sees the visible
  patches only, so masked patches are never keys. ``positions="off"``: K random patches and no
  distance bias (the same capacity, no position); ``"shuffled"``: neighbours by the shuffled
  coordinates.
- **Embedding**: LayerNorm'd CLS token and mean of the patch tokens, concatenated (``pool``).
  ``pool="cls+mean+pairs"`` (an option added here) appends a second-order spatial readout:
  the LayerNorm'd patch tokens of the whole slide are projected on ``pair_dim`` (8) principal
  axes fitted once, label-free, on the pre-training bags' tokens of the exported weights
  (:meth:`PAMA.fit_readout`), and the slide's mean over its 4-neighbour grid edges of the
  symmetrised outer product z_i z_j^T is appended (upper triangle: 36 numbers). Why: a CLS or
  mean token is a first-order summary, while an arrangement (how often immune patches touch
  tumour) is a second-order statistic of neighbouring tokens; a linear probe can read it from
  this readout. ``positions="off"``: random patch pairs (no position); ``"shuffled"``: edges of
  the shuffled coordinates. ``pair_readout="codes"`` multiplies each token's posterior over
  ``pair_dim`` label-free k-means codes of the tokens instead (a soft tokenizer fitted at the
  same time; 16 codes give 136 numbers): which axes separate the tissues varied between
  pre-training runs, a clustering of the tokens less so (docs/pretrain.md).

Ablations: ``kro=False``, ``anchor_dropout=0``, ``positions="off"`` (no position biases and
anchors drawn at random instead of by k-means: no position reaches the model) and
``positions="shuffled"`` (each bag's coordinates permuted among its patches).

Paper sizes: width 1024, 8 heads, 4 encoder blocks, MLP x4, decoder 2 blocks of width 512, up
to 2048 patches per slide. The defaults here are CPU-small (width 64, 4 heads, 2 encoder
blocks, MLP x2, 1 decoder block of width 32); every size is a keyword.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.features import neighbours
from oncoslide.pretrain.base import PRETRAINERS, SLIDE_ENCODERS, Bag, PretrainMethod, SlideEncoder

Positions = Literal["on", "off", "shuffled"]
Pool = Literal["cls", "mean", "cls+mean", "cls+mean+pairs"]
PairReadout = Literal["axes", "codes"]
Target = Literal["features", "codes"]
Masking = Literal["patches", "regions"]
TOKENIZER_FILE = "tokenizer.pt"  # the codebook of target="codes", in the encoder folder
_TOKENIZER_PATCHES = 65_536  # patches the k-means tokenizer is fitted on, at most
N_ANGLE_BINS = 8
_EMBED_SEED = 20240917  # the fixed draw of embed-time randomness (positions off / shuffled)
_READOUT_PATCHES = 65_536  # patch tokens the pairs readout's axes are fitted on, at most


# ------------------------------------------------------------------------------- geometry
def kmeans_anchors(pos: Tensor, k: int, iters: int = 8) -> Tensor:
    """Indices of ``k`` anchor patches: k-means on ``pos`` (N, 2), then the patch nearest
    each centre (duplicates removed, order of first occurrence). Deterministic: farthest-point
    initialisation from the patch nearest the centroid."""
    n = pos.shape[0]
    k = max(1, min(k, n))
    start = int(torch.argmin(((pos - pos.mean(0)) ** 2).sum(1)))
    chosen = [start]
    nearest = ((pos - pos[start]) ** 2).sum(1)
    for _ in range(k - 1):
        nxt = int(torch.argmax(nearest))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, ((pos - pos[nxt]) ** 2).sum(1))
    centres = pos[chosen].clone()
    for _ in range(iters):
        assign = torch.cdist(pos, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, pos)
        counts = torch.bincount(assign, minlength=k).to(pos.dtype).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    idx = torch.cdist(centres, pos).argmin(1)
    seen: dict[int, None] = {}
    for i in idx.tolist():
        seen.setdefault(int(i), None)
    return torch.tensor(list(seen), dtype=torch.long)


PATCHES_PER_ANCHOR = 18  # the paper's anchor rule: K = N / 18 + 1

#: Named settings of PAMA's pretext and readout (``oncoslide pretrain pama --recipe``); options
#: given explicitly override them. ``paper``: masked-feature MSE on 75 % of the patches, the
#: paper's encoder (no short-range mixing), cls + mean. ``codes``: masked k-means codes on 50 %,
#: 8-neighbour mixing, cls + mean + the pairs readout on token codes: the configuration that
#: beats mean pooling on the `spatial` preset judged over four fresh worlds named in advance
#: (+0.114 AUC, p 0.0005; docs/pretrain.md, measured 2026-12-01), where ``paper`` does not.
PAMA_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"target": "features", "mask_ratio": 0.75, "local_neighbours": 0,
              "pool": "cls+mean", "pair_readout": "axes"},
    "codes": {"target": "codes", "mask_ratio": 0.5, "local_neighbours": 8,
              "pool": "cls+mean+pairs", "pair_readout": "codes"},
}  # fmt: skip


def pama_recipe(name: str, **given: Any) -> dict[str, Any]:
    """The keywords of recipe ``name`` (:data:`PAMA_RECIPES`), with the ``given`` ones that are
    not None in their place."""
    if name not in PAMA_RECIPES:
        raise ConfigError(f"unknown PAMA recipe {name!r}; known: {', '.join(sorted(PAMA_RECIPES))}")
    return {**PAMA_RECIPES[name], **{k: v for k, v in given.items() if v is not None}}


def n_anchors(
    n_patches: int, max_anchors: int, patches_per_anchor: int = PATCHES_PER_ANCHOR
) -> int:
    """Anchors of a bag of ``n_patches``: N // ``patches_per_anchor`` + 1, at most
    ``max_anchors`` and N."""
    return max(1, min(max_anchors, n_patches // patches_per_anchor + 1, n_patches))


def fit_codebook(x: Tensor, k: int, generator: torch.Generator, iters: int = 50) -> Tensor:
    """k-means centres (k, D) of the rows of ``x`` (M, D): k-means++ seeding from
    ``generator``, then Lloyd iterations (an emptied cluster is re-seeded at the row farthest
    from its centre). Deterministic given the generator's state."""
    m = x.shape[0]
    if m < k:
        raise ConfigError(f"a codebook of {k} codes needs at least {k} patches, got {m}")
    x = x.double()
    first = int(torch.randint(m, (1,), generator=generator))
    centres = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(1)
    for _ in range(k - 1):
        probs = nearest / nearest.sum() if float(nearest.sum()) > 0 else None
        nxt = (
            int(torch.multinomial(probs, 1, generator=generator))
            if probs is not None
            else int(torch.randint(m, (1,), generator=generator))
        )
        centres.append(x[nxt])
        nearest = torch.minimum(nearest, ((x - x[nxt]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        assign = dist.argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        new = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if bool(empty.any()):
            far = dist.gather(1, assign.unsqueeze(1)).squeeze(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        if torch.equal(new, c):
            break
        c = new
    return c.float()


def assign_codes(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row for each row of ``x``."""
    return torch.cdist(x.float(), codebook.to(x.device)).argmin(1)


@dataclass
class _Geometry:
    """Distance and angle bins of every (anchor, patch) pair; -1 rows: no position (CLS)."""

    dist_bin: Tensor  # (K, N) long
    angle_bin: Tensor  # (K, N) long, absolute


def _geometry(anchor_pos: Tensor, patch_pos: Tensor, n_dist_bins: int) -> _Geometry:
    delta = patch_pos.unsqueeze(0) - anchor_pos.unsqueeze(1)  # (K, N, 2)
    dist = delta.norm(dim=-1)
    dist_bin = (dist.sqrt() * 8).floor().long().clamp(max=n_dist_bins - 1)
    theta = torch.atan2(delta[..., 1], delta[..., 0])  # (-pi, pi]
    angle_bin = ((theta + math.pi) / (2 * math.pi) * N_ANGLE_BINS).floor().long()
    return _Geometry(dist_bin, angle_bin.clamp(0, N_ANGLE_BINS - 1))


def nearest_patches(pos: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """(N, min(k, N - 1)) indices of each patch's ``k`` nearest other patches by position,
    ordered by distance, ties by index (deterministic).

    Patches on a lattice of unit step (positions in patch units, as PAMA's): a grid lookup in
    the (2r + 1)^2 window around each patch (r from 3 to 8, wider for sparser bags: about 3 k
    expected patches in the window), exact whenever the k-th candidate lies within r patches
    (nothing outside the window is closer); the other rows, and positions off the lattice, by
    ``torch.cdist`` over chunks of ``chunk`` rows (memory chunk x N)."""
    n = pos.shape[0]
    k = min(k, n - 1)
    device = pos.device
    if k <= 0:
        return torch.zeros(n, 0, dtype=torch.long, device=device)
    out = torch.empty(n, k, dtype=torch.long, device=device)
    todo = torch.arange(n, device=device)
    rel = pos.double() - pos.double().min(0).values
    cells = rel.round()
    extent = cells.max(0).values.long() + 1
    lattice = bool((rel - cells).abs().max() < 1e-4)
    if lattice and int(extent[0]) * int(extent[1]) <= 16 * n + 65_536:
        density = n / (int(extent[0]) * int(extent[1]))
        r = min(8, max(3, math.ceil((math.sqrt(3 * (k + 1) / density) - 1) / 2)))
        cx, cy = cells[:, 0].long(), cells[:, 1].long()
        grid = torch.full(
            (int(extent[1]) + 2 * r, int(extent[0]) + 2 * r), -1, dtype=torch.long, device=device
        )
        grid[cy + r, cx + r] = torch.arange(n, device=device)
        if int((grid >= 0).sum()) == n:  # one patch per cell (else: the exact search below)
            span = torch.arange(-r, r + 1, device=device)
            dy, dx = torch.meshgrid(span, span, indexing="ij")
            off = (dx != 0) | (dy != 0)
            dx, dy = dx[off], dy[off]
            cand = grid[cy.unsqueeze(1) + r + dy, cx.unsqueeze(1) + r + dx]  # (N, (2r + 1)^2 - 1)
            # ties by index: sort the candidates by index, then stably by squared distance
            by_index = cand.masked_fill(cand < 0, n).sort(1).indices
            cand = cand.gather(1, by_index)
            d2 = (dx * dx + dy * dy).expand_as(cand).gather(1, by_index).double()
            d2 = d2.masked_fill(cand < 0, math.inf)
            order = d2.sort(dim=1, stable=True).indices[:, :k]
            exact = d2.gather(1, order)[:, -1] <= r * r
            out[exact] = cand.gather(1, order)[exact]
            todo = todo[~exact]
    for start in range(0, todo.numel(), chunk):
        rows = todo[start : start + chunk]
        dist = torch.cdist(
            pos[rows].double(), pos.double(), compute_mode="donot_use_mm_for_euclid_dist"
        )
        dist[torch.arange(rows.numel(), device=device), rows] = math.inf  # not itself
        out[rows] = dist.sort(dim=1, stable=True).indices[:, :k]
    return out


def random_pairs(n: int, generator: torch.Generator, per_patch: int = 2) -> Tensor:
    """(n * per_patch, 2) pairs of distinct patches drawn at random (the pairs readout's
    edges when no position may reach the model: as many as a full grid's 4-neighbour edges)."""
    if n < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    src = torch.arange(n).repeat_interleave(per_patch)
    offs = torch.randint(1, n, (n * per_patch,), generator=generator)  # never itself
    return torch.stack([src, (src + offs) % n], dim=1)


# ------------------------------------------------------------------------------- blocks
class LocalMixing(nn.Module):
    """Patch -> nearby-patch attention: each patch attends to itself and its neighbours
    (``nbr`` (N, K) indices) with a learned per-head bias on the binned distance (the bins of
    the PACA tables; the last row: no position). Residual, pre-norm; the PACA block's MLP
    follows."""

    def __init__(self, width: int, heads: int, n_dist_bins: int) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"PAMA width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dist_table = nn.Parameter(torch.zeros(heads, n_dist_bins + 1))

    def forward(self, x: Tensor, nbr: Tensor, dist_bin: Tensor) -> Tensor:
        """``x`` (N, W); ``nbr`` (N, K); ``dist_bin`` (N, K + 1), itself first."""
        n, w = x.shape
        h = self.heads
        q, k, v = (
            t.reshape(n, h, w // h).transpose(0, 1) for t in self.qkv(self.norm(x)).chunk(3, -1)
        )  # (H, N, d)
        keys = torch.cat([torch.arange(n, device=x.device).unsqueeze(1), nbr], dim=1)  # (N, K+1)
        kg, vg = k[:, keys], v[:, keys]  # (H, N, K + 1, d)
        logits = (q.unsqueeze(2) * kg).sum(-1) * q.shape[-1] ** -0.5
        attn = (logits + self.dist_table[:, dist_bin]).softmax(-1)  # (H, N, K + 1)
        upd = (attn.unsqueeze(-1) * vg).sum(2).transpose(0, 1).reshape(n, w)
        return x + self.proj(upd)


class PACABlock(nn.Module):
    """Bidirectional patch <-> anchor cross-attention with distance and angle biases."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, n_dist_bins: int) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"PAMA width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.n_dist_bins = n_dist_bins
        self.norm_p = nn.LayerNorm(width)
        self.norm_a = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)  # shared by patch and anchor tokens
        self.proj_p = nn.Linear(width, width)
        self.proj_a = nn.Linear(width, width)
        # the last row of each table: "no position" (CLS, positions off). Distance biases start
        # as a locality prior, ALiBi-style: head h adds -distance / 2^(h+1) (distance in
        # patches, at each bin's lower edge); learned from there
        dist = (torch.arange(n_dist_bins + 1, dtype=torch.float32) / 8) ** 2
        slopes = 0.5 ** torch.arange(1, heads + 1, dtype=torch.float32)
        prior = -slopes.unsqueeze(1) * dist.unsqueeze(0)
        prior[:, -1] = 0.0
        self.dist_table = nn.Parameter(prior)
        self.angle_table = nn.Parameter(torch.zeros(heads, N_ANGLE_BINS + 1))
        hidden = int(width * mlp_ratio)
        self.mlp_norm_p = nn.LayerNorm(width)
        self.mlp_norm_a = nn.LayerNorm(width)
        self.mlp_p = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.mlp_a = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.heads
        return tuple(t.reshape(n, h, w // h).transpose(0, 1) for t in (q, k, v))  # type: ignore[return-value]

    def forward(
        self,
        patches: Tensor,  # (N, W)
        anchors: Tensor,  # (K, W), CLS included
        dist_bin: Tensor,  # (K, N)
        angle_bin: Tensor,  # (K, N), relative to each anchor's orientation
        keep: Tensor,  # (K,) bool: anchors not dropped
    ) -> tuple[Tensor, Tensor, Tensor]:
        qp, kp, vp = self._split(self.norm_p(patches))  # (H, N, d)
        qa, ka, va = self._split(self.norm_a(anchors))  # (H, K, d)
        scale = qp.shape[-1] ** -0.5
        bias = self.dist_table[:, dist_bin] + self.angle_table[:, angle_bin]  # (H, K, N)
        # anchors gather from patches
        logits_a = qa @ kp.transpose(1, 2) * scale + bias
        attn_a = logits_a.softmax(-1)
        upd_a = (attn_a @ vp).transpose(0, 1).reshape(anchors.shape)
        # patches gather from the kept anchors
        logits_p = qp @ ka.transpose(1, 2) * scale + bias.transpose(1, 2)
        logits_p = logits_p.masked_fill(~keep.view(1, 1, -1), float("-inf"))
        attn_p = logits_p.softmax(-1)
        upd_p = (attn_p @ va).transpose(0, 1).reshape(patches.shape)
        patches = patches + self.proj_p(upd_p)
        anchors = anchors + self.proj_a(upd_a)
        patches = patches + self.mlp_p(self.mlp_norm_p(patches))
        anchors = anchors + self.mlp_a(self.mlp_norm_a(anchors))
        return patches, anchors, attn_a


def _orientation(attn_a: Tensor, angle_abs: Tensor, positioned: Tensor) -> Tensor:
    """KRO: per anchor, the absolute angle bin with the largest summed |attention|."""
    weight = attn_a.detach().abs().mean(0)  # (K, N)
    sums = torch.zeros(weight.shape[0], N_ANGLE_BINS + 1, dtype=weight.dtype)
    sums = sums.to(weight.device).scatter_add_(1, angle_abs, weight)[:, :N_ANGLE_BINS]
    main = sums.argmax(1)
    return torch.where(positioned, main, torch.zeros_like(main))


# ------------------------------------------------------------------------------- encoder
@dataclass
class Encoded:
    patches: Tensor  # (N, W) final patch tokens (before the output norm)
    anchors: Tensor  # (K + 1, W), CLS last
    anchor_pos: Tensor  # (K, 2) patch units
    patch_pos: Tensor  # (N, 2)
    orientation: Tensor  # (K + 1,) angle bin each anchor's angles are counted from


@SLIDE_ENCODERS.register("pama", description="PAMA slide encoder (PACA blocks)")
class PAMAEncoder(SlideEncoder):
    """The PAMA encoder: patch embedding, anchors, PACA blocks, CLS + mean pooling."""

    name = "pama"
    uses_coords = True
    pair_centre: Tensor  # (W,) buffers of pool="cls+mean+pairs", pair_readout="axes"
    pair_axes: Tensor  # (W, pair_dim)
    pair_codes: Tensor  # (pair_dim, W) buffers of pair_readout="codes"
    pair_log_prior: Tensor  # (pair_dim,)
    pair_precision: Tensor  # () 1 / (2 variance) of the codes' spherical mixture

    def __init__(
        self,
        *,
        in_dim: int,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        n_distance_bins: int = 64,
        max_anchors: int = 128,
        kro: bool = True,
        anchor_dropout: float = 0.2,
        positions: Positions = "on",
        pool: Pool = "cls+mean",
        pair_dim: int = 8,
        pair_readout: PairReadout = "axes",
        patches_per_anchor: int = PATCHES_PER_ANCHOR,
        local_neighbours: int = 0,
    ) -> None:
        super().__init__()
        if local_neighbours < 0:
            raise ConfigError(f"local_neighbours must be >= 0, got {local_neighbours}")
        if patches_per_anchor < 1:
            raise ConfigError(f"patches_per_anchor must be >= 1, got {patches_per_anchor}")
        if max_anchors < 1:
            raise ConfigError(f"max_anchors must be >= 1, got {max_anchors}")
        if positions not in ("on", "off", "shuffled"):
            raise ConfigError(f"positions must be on, off or shuffled, not {positions!r}")
        if pool not in ("cls", "mean", "cls+mean", "cls+mean+pairs"):
            raise ConfigError(f"pool must be cls, mean, cls+mean or cls+mean+pairs, not {pool!r}")
        if pair_readout not in ("axes", "codes"):
            raise ConfigError(f"pair_readout must be axes or codes, not {pair_readout!r}")
        if pair_readout == "axes" and not 1 <= pair_dim <= width:
            raise ConfigError(f"pair_dim must be in [1, width {width}], got {pair_dim}")
        if pair_readout == "codes" and not 2 <= pair_dim <= 64:
            raise ConfigError(f"pair_dim (codes) must be in [2, 64], got {pair_dim}")
        if not 0.0 <= anchor_dropout < 1.0:
            raise ConfigError(f"anchor_dropout must be in [0, 1), got {anchor_dropout}")
        self.in_dim = in_dim
        self.width = width
        self.depth = depth
        self.heads = heads
        self.mlp_ratio = mlp_ratio
        self.n_distance_bins = n_distance_bins
        self.max_anchors = max_anchors
        self.patches_per_anchor = patches_per_anchor
        self.local_neighbours = local_neighbours
        self.kro = kro
        self.anchor_dropout = anchor_dropout
        self.positions: Positions = positions
        self.pool: Pool = pool
        self.pair_dim = pair_dim
        self.pair_readout_kind: PairReadout = pair_readout
        self.pairs = pool == "cls+mean+pairs"
        n_pairs = pair_dim * (pair_dim + 1) // 2 if self.pairs else 0
        self.embed_dim = width * (1 if pool in ("cls", "mean") else 2) + n_pairs
        if self.pairs:
            # the readout's projection (PAMA.fit_readout fits it after pre-training; zeros until
            # then, so the pairs part is 0 during pre-training's RankMe probe); buffers only
            # with the option, so folders written without it load unchanged
            if pair_readout == "axes":
                self.register_buffer("pair_centre", torch.zeros(width))
                self.register_buffer("pair_axes", torch.zeros(width, pair_dim))
            else:  # zeros: every code equally likely until fitted
                self.register_buffer("pair_codes", torch.zeros(pair_dim, width))
                self.register_buffer("pair_log_prior", torch.zeros(pair_dim))
                self.register_buffer("pair_precision", torch.zeros(()))
        self.patch_embed = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        self.anchor_token = nn.Parameter(torch.randn(width) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.blocks = nn.ModuleList(
            PACABlock(width, heads, mlp_ratio, n_distance_bins) for _ in range(depth)
        )
        # local mixing (option): one layer before each PACA block; absent (no parameters) when
        # off, so the paper's encoder and folders written before the option are unchanged
        self.local = nn.ModuleList(
            LocalMixing(width, heads, n_distance_bins)
            for _ in range(depth if local_neighbours else 0)
        )
        self.norm = nn.LayerNorm(width)

    def config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "width": self.width,
            "depth": self.depth,
            "heads": self.heads,
            "mlp_ratio": self.mlp_ratio,
            "n_distance_bins": self.n_distance_bins,
            "max_anchors": self.max_anchors,
            "patches_per_anchor": self.patches_per_anchor,
            "local_neighbours": self.local_neighbours,
            "kro": self.kro,
            "anchor_dropout": self.anchor_dropout,
            "positions": self.positions,
            "pool": self.pool,
            "pair_dim": self.pair_dim,
            "pair_readout": self.pair_readout_kind,
        }

    def positions_of(self, coords: Tensor | None, n: int, generator: torch.Generator) -> Tensor:
        """Patch-unit positions (shuffled among the patches for the shuffled ablation)."""
        if coords is None:
            if self.positions == "on" or self.positions == "shuffled":
                raise ConfigError("PAMA needs patch coordinates (the feature files have none)")
            return torch.zeros(n, 2)
        pos = coords.float() / neighbours.grid_step(coords.detach().cpu().numpy())
        if self.positions == "shuffled":
            perm = torch.randperm(n, generator=generator).to(pos.device)
            pos = pos[perm]
        return pos

    def choose_anchors(self, pos: Tensor, generator: torch.Generator) -> Tensor:
        k = n_anchors(pos.shape[0], self.max_anchors, self.patches_per_anchor)
        if self.positions == "off":  # no position may reach the model: random anchors
            return torch.randperm(pos.shape[0], generator=generator)[:k].sort().values
        return kmeans_anchors(pos.cpu(), k)

    def encode(
        self,
        features: Tensor,
        pos: Tensor,
        anchor_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        drop: bool = False,
    ) -> Encoded:
        """Encode patches at patch-unit positions ``pos`` with anchors at ``anchor_pos``.

        Anchor tokens start as one learned token: what an anchor knows it gathers from the
        patches around it (in pre-training, the visible ones only)."""
        device = features.device
        tokens = self.patch_embed(features)
        k = anchor_pos.shape[0]
        anchors = torch.cat([self.anchor_token.expand(k, -1), self.cls_token.unsqueeze(0)], dim=0)
        geo = _geometry(anchor_pos, pos, self.n_distance_bins)
        n = features.shape[0]
        nodist = torch.full((1, n), self.n_distance_bins, dtype=torch.long, device=device)
        noangle = torch.full((1, n), N_ANGLE_BINS, dtype=torch.long, device=device)
        if self.positions == "off":
            dist_bin = nodist.expand(k + 1, n)
            angle_abs = noangle.expand(k + 1, n)
        else:
            dist_bin = torch.cat([geo.dist_bin, nodist])
            angle_abs = torch.cat([geo.angle_bin, noangle])
        positioned = torch.arange(k + 1, device=device) < k
        if self.positions == "off":
            positioned = torch.zeros_like(positioned)
        keep = torch.ones(k + 1, dtype=torch.bool, device=device)
        if drop and self.anchor_dropout > 0 and k > 1:
            assert generator is not None
            draw = torch.rand(k, generator=generator).to(device)
            keep[:k] = draw >= self.anchor_dropout
        orientation = torch.zeros(k + 1, dtype=torch.long, device=device)
        if self.local_neighbours:
            nbr, nbr_bin = self.neighbours(pos, generator)
        for i, block in enumerate(self.blocks):
            if self.local_neighbours:
                tokens = self.local[i](tokens, nbr, nbr_bin)
            angle = torch.where(
                positioned.unsqueeze(1),
                (angle_abs - orientation.unsqueeze(1)) % N_ANGLE_BINS,
                angle_abs,
            )
            tokens, anchors, attn_a = block(tokens, anchors, dist_bin, angle, keep)
            if self.kro:
                orientation = _orientation(attn_a, angle_abs, positioned)
        return Encoded(tokens, anchors, anchor_pos, pos, orientation)

    def neighbours(
        self, pos: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Local mixing's keys: (N, K) neighbour indices and (N, K + 1) distance bins (itself
        first). ``positions="off"``: K random other patches (drawn from ``generator``, or a fixed
        seed) and the no-position bin, so no position reaches the model."""
        n = pos.shape[0]
        k = min(self.local_neighbours, n - 1)
        if self.positions == "off":
            gen = generator if generator is not None else torch.Generator().manual_seed(_EMBED_SEED)
            # k random other patches (repeats possible): an offset in 1..n-1 is never itself
            offs = torch.randint(1, max(2, n), (n, k), generator=gen)  # k = 0 when n = 1
            nbr = ((torch.arange(n).unsqueeze(1) + offs) % n).to(pos.device)
            bins = torch.full((n, k + 1), self.n_distance_bins, dtype=torch.long, device=pos.device)
            return nbr, bins
        nbr = nearest_patches(pos, k)
        dist = torch.cat(
            [torch.zeros(n, 1, device=pos.device), (pos[nbr] - pos.unsqueeze(1)).norm(dim=-1)], 1
        )
        bins = (dist.sqrt() * 8).floor().long().clamp(max=self.n_distance_bins - 1)
        return nbr, bins

    def pooled(self, enc: Encoded, generator: torch.Generator | None = None) -> Tensor:
        cls = self.norm(enc.anchors[-1])
        tokens = self.norm(enc.patches)
        mean = tokens.mean(0)
        if self.pool == "cls":
            return cls
        if self.pool == "mean":
            return mean
        if not self.pairs:
            return torch.cat([cls, mean])
        return torch.cat([cls, mean, self.pair_readout(tokens, enc.patch_pos, generator)])

    def readout_edges(self, pos: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The pairs readout's patch pairs: 4-neighbour grid edges of ``pos`` (shuffled
        positions give the shuffled edges), random pairs with ``positions="off"``."""
        if self.positions == "off":
            n = pos.shape[0]
            gen = generator if generator is not None else torch.Generator().manual_seed(_EMBED_SEED)
            return random_pairs(n, gen).to(pos.device)
        return torch.from_numpy(neighbours.grid_edges(pos.detach().cpu().numpy())).to(pos.device)

    def pair_readout(
        self, tokens: Tensor, pos: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Mean over the readout's edges of sym(z_i z_j^T), upper triangle; z = the normed
        tokens on the fitted axes, or their posterior over the fitted codes
        (``pair_readout="codes"``). A bag without edges gives zeros."""
        z = self.pair_coordinates(tokens)
        edges = self.readout_edges(pos, generator)
        d = self.pair_dim
        rows, cols = torch.triu_indices(d, d, device=tokens.device)
        if edges.shape[0] == 0:
            return tokens.new_zeros(rows.numel())
        a, b = z[edges[:, 0]], z[edges[:, 1]]
        m = a.T @ b / edges.shape[0]
        return ((m + m.T) / 2)[rows, cols]

    def pair_coordinates(self, tokens: Tensor) -> Tensor:
        """(N, pair_dim) what the pairs readout multiplies: the tokens on the fitted axes, or
        each token's posterior over the fitted codes (a spherical Gaussian mixture with the
        fitted shares and variance: a soft tokenizer of the tokens)."""
        if self.pair_readout_kind == "axes":
            return (tokens - self.pair_centre) @ self.pair_axes
        d2 = torch.cdist(tokens.float(), self.pair_codes.float()) ** 2
        return torch.softmax(self.pair_log_prior - self.pair_precision * d2, dim=-1).to(tokens)

    @torch.no_grad()
    def fit_pair_readout(self, tokens: Tensor, generator: torch.Generator) -> None:
        """Fit the pairs readout on (M, W) normed patch tokens (label-free): the principal
        axes, or (``pair_readout="codes"``) ``pair_dim`` k-means codes (:func:`fit_codebook`,
        seeded by ``generator``) with their shares and the mean squared distance of a token
        to its code per dimension as the mixture's variance."""
        if not self.pairs:
            return
        if self.pair_readout_kind == "axes":
            self.fit_pair_axes(tokens)
            return
        codes = fit_codebook(tokens, self.pair_dim, generator).double()
        t = tokens.double()
        d2 = torch.cdist(t, codes) ** 2
        nearest = d2.argmin(1)
        counts = torch.bincount(nearest, minlength=self.pair_dim).double()
        variance = float(d2.gather(1, nearest.unsqueeze(1)).mean()) / t.shape[1]
        self.pair_codes.copy_(codes.to(self.pair_codes))
        self.pair_log_prior.copy_(torch.log(counts / counts.sum() + 1e-12).to(self.pair_log_prior))
        self.pair_precision.fill_(1.0 / (2.0 * max(variance, 1e-12)))

    @torch.no_grad()
    def fit_pair_axes(self, tokens: Tensor) -> None:
        """Fit the pairs readout's centre and ``pair_dim`` principal axes on (M, W) normed patch
        tokens (label-free). Each axis' sign is fixed (its largest entry positive), so a refit
        on the same tokens gives the same embedding."""
        if not self.pairs or self.pair_readout_kind != "axes":
            return
        t = tokens.double()
        centre = t.mean(0)
        cov = (t - centre).T @ (t - centre) / max(1, t.shape[0] - 1)
        _, vecs = torch.linalg.eigh(cov)  # ascending
        axes = vecs[:, -self.pair_dim :].flip(1)
        sign = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
        axes = axes * torch.where(sign == 0, torch.ones_like(sign), sign)
        self.pair_centre.copy_(centre.to(self.pair_centre))
        self.pair_axes.copy_(axes.to(self.pair_axes))

    @torch.no_grad()
    def patch_tokens(self, features: Tensor, coords: Tensor | None = None) -> Tensor:
        """(N, W) the normed final patch tokens of a whole bag (no masking, no anchor dropout),
        as the embedding reads them."""
        gen = torch.Generator().manual_seed(_EMBED_SEED + features.shape[0])
        pos = self.positions_of(coords, features.shape[0], gen).to(features.device)
        anchors = self.choose_anchors(pos, gen).to(features.device)
        return self.norm(self.encode(features, pos, pos[anchors]).patches)

    def forward(self, features: Tensor, coords: Tensor | None = None) -> Tensor:
        gen = torch.Generator().manual_seed(_EMBED_SEED + features.shape[0])
        pos = self.positions_of(coords, features.shape[0], gen).to(features.device)
        anchors = self.choose_anchors(pos, gen).to(features.device)
        return self.pooled(self.encode(features, pos, pos[anchors]), gen)


# ------------------------------------------------------------------------------- method
@PRETRAINERS.register(
    "pama",
    encoder="pama",
    description="position-aware masked autoencoder (PACA, KRO, anchor dropout, 75% masking)",
    reference="PAMA (seed 002); METHODS.md",
)
class PAMA(PretrainMethod):
    """Masked reconstruction of patch features from visible patches and their positions."""

    name = "pama"
    encoder: PAMAEncoder
    codebook: Tensor  # (codebook_size, in_dim) buffer of target="codes"

    def __init__(
        self,
        *,
        in_dim: int,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        n_distance_bins: int = 64,
        max_anchors: int = 128,
        kro: bool = True,
        anchor_dropout: float = 0.2,
        positions: Positions = "on",
        pool: Pool = "cls+mean",
        pair_dim: int = 8,
        pair_readout: PairReadout = "axes",
        decoder_width: int = 32,
        decoder_depth: int = 1,
        mask_ratio: float = 0.75,
        target: Target = "features",
        codebook_size: int = 16,
        masking: Masking = "patches",
        patches_per_anchor: int = PATCHES_PER_ANCHOR,
        local_neighbours: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_fraction=warmup_fraction)
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if target not in ("features", "codes"):
            raise ConfigError(f"target must be features or codes, not {target!r}")
        if codebook_size < 2:
            raise ConfigError(f"codebook_size must be >= 2, got {codebook_size}")
        if masking not in ("patches", "regions"):
            raise ConfigError(f"masking must be patches or regions, not {masking!r}")
        self.encoder = PAMAEncoder(
            in_dim=in_dim,
            width=width,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            n_distance_bins=n_distance_bins,
            max_anchors=max_anchors,
            kro=kro,
            anchor_dropout=anchor_dropout,
            positions=positions,
            pool=pool,
            pair_dim=pair_dim,
            pair_readout=pair_readout,
            patches_per_anchor=patches_per_anchor,
            local_neighbours=local_neighbours,
        )
        self.decoder_width = decoder_width
        self.decoder_depth = decoder_depth
        self.mask_ratio = mask_ratio
        self.target: Target = target
        self.codebook_size = codebook_size
        self.masking: Masking = masking
        # the k-means tokenizer of target="codes": fitted by prepare() on the pre-training bags
        # (a buffer: it travels in the checkpoints, so a resumed run predicts the same codes)
        self.register_buffer(
            "codebook", torch.zeros(codebook_size if target == "codes" else 0, in_dim)
        )
        self.codebook_ready = False
        self.dec_embed = nn.Linear(width, decoder_width)
        self.dec_anchor = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(decoder_width))
        self.dec_blocks = nn.ModuleList(
            PACABlock(decoder_width, max(1, heads // 2), mlp_ratio, n_distance_bins)
            for _ in range(decoder_depth)
        )
        self.dec_norm = nn.LayerNorm(decoder_width)
        self.dec_out = nn.Linear(decoder_width, in_dim if target == "features" else codebook_size)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "decoder_width": self.decoder_width,
            "decoder_depth": self.decoder_depth,
            "mask_ratio": self.mask_ratio,
            "target": self.target,
            "codebook_size": self.codebook_size,
            "masking": self.masking,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.codebook_ready = self.target == "codes"

    def prepare(self, dataset: Any, seed: int) -> None:
        """``target="codes"``: fit the k-means tokenizer on the pre-training bags' patches (at
        most 65,536, an equal share per bag, drawn with a generator seeded by ``seed``)."""
        if self.target != "codes" or self.codebook_ready:
            return
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 104729)
        per_bag = max(1, -(-_TOKENIZER_PATCHES // max(1, len(dataset))))
        parts = []
        for i in range(len(dataset)):
            feats = dataset.load(i, subsample=True, epoch=0).features
            if feats.shape[0] > per_bag:
                feats = feats[torch.randperm(feats.shape[0], generator=gen)[:per_bag]]
            parts.append(feats)
        x = torch.cat(parts)
        codebook = fit_codebook(x, self.codebook_size, gen)
        self.codebook.copy_(codebook.to(self.codebook.device))
        self.codebook_ready = True
        counts = torch.bincount(assign_codes(x, codebook), minlength=self.codebook_size)
        from oncoslide._log import get_logger

        get_logger("pretrain").info(
            "PAMA tokenizer: k-means with %d codes on %d patches of %d bags; code shares "
            "%.3f to %.3f",
            self.codebook_size,
            x.shape[0],
            len(dataset),
            float(counts.min()) / x.shape[0],
            float(counts.max()) / x.shape[0],
        )

    @torch.no_grad()
    def fit_readout(self, encoder: SlideEncoder, dataset: Any, seed: int) -> None:
        """``pool="cls+mean+pairs"``: fit the pairs readout (axes or codes) on the normed patch
        tokens that ``encoder`` (the exported weights) gives the pre-training bags (at most
        65,536 tokens, an equal share per bag, drawn with a generator seeded by ``seed``, which
        then seeds the codes' k-means). No label."""
        if not isinstance(encoder, PAMAEncoder) or not encoder.pairs:
            return
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 7)
        per_bag = max(1, -(-_READOUT_PATCHES // max(1, len(dataset))))
        was_training = encoder.training
        encoder.eval()
        parts = []
        try:
            for i in range(len(dataset)):
                bag = dataset.load(i, subsample=True, epoch=0)
                tokens = encoder.patch_tokens(bag.features, bag.coords).cpu()
                if tokens.shape[0] > per_bag:
                    tokens = tokens[torch.randperm(tokens.shape[0], generator=gen)[:per_bag]]
                parts.append(tokens)
        finally:
            encoder.train(was_training)
        encoder.fit_pair_readout(torch.cat(parts), gen)

    def folder_files(self) -> dict[str, dict[str, Tensor]]:
        if self.target != "codes":
            return {}
        return {TOKENIZER_FILE: {"codebook": self.codebook}}

    def bag_loss(self, bag: Bag, generator: torch.Generator) -> Tensor:
        enc = self.encoder
        feats = bag.features.to(self.device)
        n = feats.shape[0]
        if n < 2:
            return feats.sum() * 0.0
        pos = enc.positions_of(
            None if bag.coords is None else bag.coords.to(self.device), n, generator
        )
        if self.masking == "regions":
            visible, masked = self._region_mask(pos, generator)
        else:
            n_visible = max(1, round(n * (1 - self.mask_ratio)))
            perm = torch.randperm(n, generator=generator).to(self.device)
            visible, masked = perm[:n_visible].sort().values, perm[n_visible:].sort().values
        # anchors from every patch's position (positions are not masked, contents are)
        anchor_idx = enc.choose_anchors(pos, generator).to(self.device)
        out = enc.encode(
            feats[visible], pos[visible], pos[anchor_idx], generator=generator, drop=True
        )
        # decoder: every patch (visible: encoder tokens, masked: the mask token), the
        # encoder's anchors at their positions
        tokens = self.mask_token.expand(n, -1).clone()
        tokens[visible] = self.dec_embed(out.patches)
        anchors = self.dec_anchor(out.anchors)
        k = anchor_idx.numel()
        geo = _geometry(out.anchor_pos, pos, enc.n_distance_bins)
        nodist = torch.full((1, n), enc.n_distance_bins, dtype=torch.long, device=self.device)
        noangle = torch.full((1, n), N_ANGLE_BINS, dtype=torch.long, device=self.device)
        if enc.positions == "off":
            dist_bin, angle_abs = nodist.expand(k + 1, n), noangle.expand(k + 1, n)
            positioned = torch.zeros(k + 1, dtype=torch.bool, device=self.device)
        else:
            dist_bin = torch.cat([geo.dist_bin, nodist])
            angle_abs = torch.cat([geo.angle_bin, noangle])
            positioned = torch.arange(k + 1, device=self.device) < k
        keep = torch.ones(k + 1, dtype=torch.bool, device=self.device)
        orientation = out.orientation if enc.kro else torch.zeros_like(out.orientation)
        for block in self.dec_blocks:
            angle = torch.where(
                positioned.unsqueeze(1),
                (angle_abs - orientation.unsqueeze(1)) % N_ANGLE_BINS,
                angle_abs,
            )
            tokens, anchors, attn_a = block(tokens, anchors, dist_bin, angle, keep)
            if enc.kro:
                orientation = _orientation(attn_a, angle_abs, positioned)
        pred = self.dec_out(self.dec_norm(tokens[masked]))
        if self.target == "codes":
            if not self.codebook_ready:
                raise ConfigError("PAMA target='codes' needs its tokenizer: call prepare() first")
            return F.cross_entropy(pred, assign_codes(feats[masked], self.codebook))
        return F.mse_loss(pred, feats[masked])

    def _region_mask(self, pos: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Block masking (BEiT, SimMIM): whole regions are masked, a region being the patches
        nearest one of the slide's k-means anchors (on the positions as given: for
        ``positions="off"`` the model never sees them, only what is hidden follows them),
        regions in random order until ``mask_ratio`` of the patches are masked (one region
        always stays visible)."""
        n = pos.shape[0]
        enc = self.encoder
        centres = kmeans_anchors(pos.cpu(), n_anchors(n, enc.max_anchors, enc.patches_per_anchor))
        r = centres.numel()
        if r < 2:  # a bag too small for regions: patches at random
            perm = torch.randperm(n, generator=generator).to(self.device)
            n_visible = max(1, round(n * (1 - self.mask_ratio)))
            return perm[:n_visible].sort().values, perm[n_visible:].sort().values
        region = torch.cdist(pos.cpu(), pos.cpu()[centres]).argmin(1)
        order = torch.randperm(r, generator=generator)
        reached = torch.bincount(region, minlength=r)[order].cumsum(0) >= self.mask_ratio * n
        n_regions = min(r - 1, int(torch.nonzero(reached)[0]) + 1 if bool(reached.any()) else r)
        is_masked = torch.isin(region, order[:n_regions]).to(self.device)
        idx = torch.arange(n, device=self.device)
        return idx[~is_masked], idx[is_masked]

    def loss(self, bags: list[Bag], generator: torch.Generator) -> Tensor:
        losses = [self.bag_loss(bag, generator) for bag in bags]
        return torch.stack(losses).mean()


__all__ = [
    "PAMA",
    "PAMA_RECIPES",
    "PATCHES_PER_ANCHOR",
    "TOKENIZER_FILE",
    "LocalMixing",
    "PACABlock",
    "PAMAEncoder",
    "assign_codes",
    "fit_codebook",
    "kmeans_anchors",
    "n_anchors",
    "nearest_patches",
    "pama_recipe",
    "random_pairs",
]
