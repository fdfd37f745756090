"""Tissue composition models: a slide as the shares of its patches among tissue clusters.

The clusters are k-means centroids of the fold's training patches (standardised features),
fitted once before training (:meth:`CompositionMIL.fit_to_training`, training patients only,
no outcome); each patch goes to its nearest centroid, and a bag is the share of its patches
per cluster, standardised over the training patients (a composition vector, as in
histomorphological phenotype studies that regress survival on cluster compositions).

Two ways to learn the clusters' effects, ``effects``:

- ``"joint"``: one linear model of all K standardised shares (each cluster's effect adjusted
  for the others: a multivariable Cox model when the task is Cox survival).
- ``"marginal"`` (default): K one-cluster models, each fitted on its own share alone (its
  unadjusted effect: K univariable models), and the prediction is the mean of their outputs.
  Each training step applies the task loss to each one-cluster model's output and averages
  (:attr:`~oncoslide.models.base.MILOutput.loss_views`). Why marginal: a model applied to
  slides that lack some of the tissues it was trained on (another cancer's slides, as in the
  transfer matrix) keeps, for the tissues they do share, effects that do not lean on the
  absent ones; an adjusted effect is only right beside the covariates it was adjusted for.
  On the `pan-cancer` world, perfect readers of the morphologies transfer better with
  marginal than with joint effects (docs/transfer.md, "Which zoo model for the matrix").

The clusters' effects start at 0 (every patient at the same risk). The model has few
parameters (K x n_outputs effects and intercepts) and no per-patch projection: training is
fast and its learning rate is the run's ``lr`` times ``effect_lr`` (default 20).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.models.base import MODELS, MILModel, MILOutput, pack_valid

_REFERENCE = (
    "tissue composition Cox (k-means clusters of patch features, bag = cluster shares; "
    "cf. histomorphological phenotype learning), with marginal (univariable) or joint effects"
)

#: Patches kept (uniformly at random over the training part) to fit the centroids on.
SAMPLE_PATCHES = 20_000


def reservoir_update(
    sample: np.ndarray, seen: int, rows: np.ndarray, rng: np.random.Generator
) -> None:
    """Algorithm R over a stream of rows: after every call, ``sample[:min(n, S)]`` is a uniform
    sample without replacement of the ``n`` rows streamed so far (S = ``len(sample)``).
    ``seen`` counts the rows of earlier calls; ``sample`` is updated in place."""
    size = len(sample)
    fill = min(max(size - seen, 0), len(rows))
    sample[seen : seen + fill] = rows[:fill]
    if fill == len(rows):
        return
    g = seen + np.arange(fill, len(rows))  # global index of each remaining row
    slot = (rng.random(len(g)) * (g + 1)).astype(np.int64)  # row g replaces slot j < S
    keep = slot < size
    for j, row in zip(slot[keep], rows[fill:][keep], strict=True):  # in stream order
        sample[j] = row


def _nearest(rows: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of each row (squared Euclidean distance)."""
    dist = (
        (rows * rows).sum(dim=1, keepdim=True)
        - 2.0 * rows @ centroids.T
        + (centroids * centroids).sum(dim=1)[None, :]
    )
    return dist.argmin(dim=1)


@MODELS.register(
    "composition",
    reference=_REFERENCE,
    has_attention=False,
    uses_coords=False,
    description="tissue-cluster shares of the bag, marginal or joint linear effects",
)
class CompositionMIL(MILModel):
    """Tissue composition model (see the module docstring).

    Args:
        in_dim, n_outputs: see :class:`~oncoslide.models.base.MILModel`.
        dropout: unused (kept for the common signature); must be in [0, 1).
        hidden_dim: unused; the embedding is the K standardised shares.
        clusters: number K of tissue clusters (k-means on the training patches).
        effects: ``"marginal"`` (K one-cluster models, averaged) or ``"joint"``.
        effect_lr: learning-rate multiplier of the effects and intercepts.
        seed: k-means seed (its two k-means++ starts and the patch sample).
    """

    centroids: Tensor  # (K, D) in standardised feature units
    feature_mean: Tensor  # (D,)
    feature_std: Tensor  # (D,)
    share_mean: Tensor  # (K,)
    share_std: Tensor  # (K,)
    fitted: Tensor  # () number of training patients fitted on (0: not fitted)

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.0,
        hidden_dim: int = 512,
        clusters: int = 16,
        effects: Literal["marginal", "joint"] = "marginal",
        effect_lr: float = 20.0,
        seed: int = 0,
    ) -> None:
        problems = []
        if not isinstance(clusters, int) or isinstance(clusters, bool) or clusters < 2:
            problems.append(f"clusters must be an integer >= 2, got {clusters!r}")
        if effects not in ("marginal", "joint"):
            problems.append(f"effects must be 'marginal' or 'joint', got {effects!r}")
        if not float(effect_lr) > 0:
            problems.append(f"effect_lr must be > 0, got {effect_lr!r}")
        if problems:
            raise ConfigError("composition: " + "; ".join(problems))
        super().__init__(in_dim, n_outputs, dropout, clusters)
        self.clusters = clusters
        self.effects = effects
        self.effect_lr = float(effect_lr)
        self.seed = int(seed)
        self.register_buffer("centroids", torch.zeros(clusters, in_dim))
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("share_mean", torch.zeros(clusters))
        self.register_buffer("share_std", torch.ones(clusters))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.long))
        self.head = nn.ParameterDict(
            {
                "effect": nn.Parameter(torch.zeros(clusters, n_outputs)),
                # one intercept per one-cluster model (marginal), one in all (joint)
                "bias": nn.Parameter(
                    torch.zeros(clusters if effects == "marginal" else 1, n_outputs)
                ),
            }
        )

    def lr_scales(self) -> dict[str, float]:
        return {} if self.effect_lr == 1.0 else {"head": self.effect_lr}

    # -- fitting the clusters -----------------------------------------------------------------
    def _valid_rows(self, bag: Mapping[str, Any]) -> Tensor:
        features, mask = bag["features"], bag["mask"]
        self.check_inputs(features, mask)
        rows, _ = pack_valid(features, mask)
        return rows.double()

    def fit_to_training(self, bags: Iterable[Mapping[str, Any]]) -> None:
        """The centroids and the standardisations, from the training part's bags (two passes:
        the feature moments and a uniform sample of at most :data:`SAMPLE_PATCHES` patches,
        k-means on the sample, then each training patient's shares). A model that is already
        fitted (initialised from a trained one, ``--init``) keeps its clusters and
        standardisation: they are what its effects refer to."""
        from sklearn.cluster import KMeans

        if int(self.fitted) > 0:
            return

        rng = np.random.default_rng(self.seed)
        total, sums, squares = 0, None, None
        sample: np.ndarray | None = None
        n_bags = 0
        for bag in bags:  # pass 1: moments and a uniform sample of the patches
            rows = self._valid_rows(bag).cpu().numpy()
            n_bags += 1
            sums = rows.sum(axis=0) if sums is None else sums + rows.sum(axis=0)
            sq = (rows * rows).sum(axis=0)
            squares = sq if squares is None else squares + sq
            if sample is None:
                sample = np.empty((SAMPLE_PATCHES, rows.shape[1]), dtype=np.float32)
            reservoir_update(sample, total, rows, rng)
            total += len(rows)
        if sample is None or sums is None or squares is None or total < self.clusters:
            raise ConfigError(
                f"composition: need at least {self.clusters} training patches to find "
                f"{self.clusters} tissue clusters, got {total}"
            )
        mean = sums / total
        std = np.sqrt(np.maximum(squares / total - mean * mean, 0.0))
        std = np.where(std < 1e-6, 1.0, std)
        picked = ((sample[: min(total, SAMPLE_PATCHES)] - mean) / std).astype(np.float32)
        km = KMeans(n_clusters=self.clusters, n_init=2, random_state=self.seed).fit(picked)
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=self.feature_mean.dtype))
        self.feature_std.copy_(torch.as_tensor(std, dtype=self.feature_std.dtype))
        self.centroids.copy_(torch.as_tensor(km.cluster_centers_, dtype=self.centroids.dtype))
        with torch.no_grad():  # pass 2: each training patient's shares
            found = [self.shares(bag["features"], bag["mask"]).double() for bag in bags]
        if len(found) != n_bags:
            raise ConfigError(
                f"composition: the training bags gave {n_bags} patients on the first pass and "
                f"{len(found)} on the second: fit_to_training needs bags it can read twice "
                "(a sequence, not a one-shot iterator)"
            )
        shares = torch.cat(found)
        share_std = shares.std(dim=0, unbiased=False)
        self.share_mean.copy_(shares.mean(dim=0).to(self.share_mean.dtype))
        self.share_std.copy_(
            torch.where(share_std < 1e-6, torch.ones_like(share_std), share_std).to(
                self.share_std.dtype
            )
        )
        self.fitted.fill_(n_bags)

    # -- prediction ---------------------------------------------------------------------------
    def shares(self, features: Tensor, mask: Tensor) -> Tensor:
        """(B, K) share of each bag's valid patches per tissue cluster."""
        rows, index = pack_valid(features, mask)
        z = (rows.to(self.centroids.dtype) - self.feature_mean) / self.feature_std
        nearest = _nearest(z, self.centroids)
        counts = torch.zeros(mask.shape[0], self.clusters, dtype=z.dtype, device=z.device)
        counts.index_put_(
            (index, nearest), torch.ones_like(nearest, dtype=z.dtype), accumulate=True
        )
        return counts / mask.sum(dim=1, keepdim=True).to(z.dtype)

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        self.check_inputs(features, mask, coords)
        if int(self.fitted) == 0:
            raise ConfigError(
                "composition: the tissue clusters are not fitted: call fit_to_training on the "
                "training part first (the training path does)"
            )
        with torch.no_grad():
            z = (self.shares(features, mask) - self.share_mean) / self.share_std  # (B, K)
        effect, bias = self.head["effect"], self.head["bias"]
        if self.effects == "joint":
            return MILOutput(logits=z @ effect + bias[0], embedding=z)
        views = z[:, :, None] * effect[None] + bias[None]  # (B, K, n_outputs)
        return MILOutput(logits=views.mean(dim=1), embedding=z, loss_views=views)


__all__ = ["SAMPLE_PATCHES", "CompositionMIL", "reservoir_update"]
