"""Patch-feature statistics of a model's training part, kept in its model folder.

Test-time adaptation (:mod:`oncoslide.training.adapt`) maps a new site's features onto these
statistics, so they are computed when the model is fitted (training part only, every patch of
every slide of its patients) and written as ``feature_stats.npz`` beside ``weights.pt``: the
mean and sd of each dimension (re-standardisation), the full covariance (CORAL alignment) and,
for classification, the share of training patients the fitted model predicts as each class
(decision matching) and a label-free summary of the tissues (per-tissue alignment,
``--adapt-align tissues``): the training part's patches are clustered into ``K`` tissue
clusters (:func:`tissue_clusters`), and each cluster's mean, its share of the patches, how its
share varies and co-varies over slides and how often its patches touch each other cluster's
on the slide grid are kept (:func:`with_tissues`). Folders written before some of these were stored lack them; the
adaptation steps that need them then refuse with a message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oncoslide._io import atomic_path
from oncoslide.errors import ConfigError
from oncoslide.features.neighbours import coordinate_edges

FEATURE_STATS_FILE = "feature_stats.npz"

# a dimension that never varies keeps its values: it is centred but not rescaled
_MIN_STD = 1e-6


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureStats:
    """Mean, standard deviation and covariance of the feature dimensions over ``n_patches``."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64, at least _MIN_STD
    n_patches: int
    n_slides: int
    cov: np.ndarray | None = None  # (D, D) float64 (population covariance); None: not stored
    # classification: the share of training-part patients the fitted model predicts as each
    # class (argmax of its outputs, full bags); None: not stored (survival, or an older folder)
    decision_rates: np.ndarray | None = None
    # tissue clusters of the training part (see with_tissues); None: not stored
    tissue_centres: np.ndarray | None = None  # (K, D) float64, each cluster's mean feature
    tissue_shares: np.ndarray | None = None  # (K,) share of the patches in each cluster
    tissue_adjacency: np.ndarray | None = None  # (K, K) log enrichment of 4-neighbour pairs
    tissue_share_cov: np.ndarray | None = None  # (K, K) covariance of slides' centred log shares

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def of(cls, arrays: Iterable[np.ndarray]) -> FeatureStats:
        """Pooled statistics of (N_i, D) feature arrays (sums in float64, one pass).

        The cross-products are taken about the first slide's mean, so the covariance does not
        lose precision to large feature means.
        """
        total: np.ndarray | None = None
        cross: np.ndarray | None = None
        ref: np.ndarray | None = None
        count = slides = 0
        for x in arrays:
            x64 = np.asarray(x, dtype=np.float64)
            if x64.ndim != 2 or x64.shape[0] == 0:
                continue
            if ref is None:
                ref = x64.mean(axis=0)
            xc = x64 - ref
            s, q = xc.sum(axis=0), xc.T @ xc
            total = s if total is None else total + s
            cross = q if cross is None else cross + q
            count += x64.shape[0]
            slides += 1
        if total is None or cross is None or ref is None or count == 0:
            raise ConfigError("no patches to compute feature statistics from")
        shift = total / count
        cov = cross / count - np.outer(shift, shift)
        cov = (cov + cov.T) / 2.0
        var = np.maximum(np.diag(cov), 0.0)
        return cls(
            mean=ref + shift,
            std=np.maximum(np.sqrt(var), _MIN_STD),
            n_patches=count,
            n_slides=slides,
            cov=cov,
        )

    def save(self, folder: str | Path) -> Path:
        target = Path(folder) / FEATURE_STATS_FILE
        with atomic_path(target, suffix=".npz.tmp") as tmp, tmp.open("wb") as fh:
            arrays: dict[str, Any] = {
                "mean": self.mean,
                "std": self.std,
                "n_patches": np.int64(self.n_patches),
                "n_slides": np.int64(self.n_slides),
            }
            for key in _OPTIONAL:
                value = getattr(self, key)
                if value is not None:
                    arrays[key] = value
            np.savez(fh, **arrays)
        return target

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        """The statistics stored in a model folder.

        Raises:
            ConfigError: the folder has none (written before they were stored) or they are
                unreadable.
        """
        file = Path(folder) / FEATURE_STATS_FILE
        if not file.is_file():
            raise ConfigError(
                f"the model in {folder} has no training feature statistics ({FEATURE_STATS_FILE}): "
                "it was written before they were stored, so it cannot be adapted to a new site. "
                "Fit it again with this version (e.g. `oncoslide train ... --fit-all --overwrite`)"
            )
        try:
            with np.load(file) as data:
                return cls(
                    mean=np.asarray(data["mean"], dtype=np.float64),
                    std=np.asarray(data["std"], dtype=np.float64),
                    n_patches=int(data["n_patches"]),
                    n_slides=int(data["n_slides"]),
                    **{
                        key: (
                            np.asarray(data[key], dtype=np.float64) if key in data.files else None
                        )
                        for key in _OPTIONAL
                    },
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from None


_OPTIONAL = (
    "cov",
    "decision_rates",
    "tissue_centres",
    "tissue_shares",
    "tissue_adjacency",
    "tissue_share_cov",
)

# ------------------------------------------------------------------ tissue clusters

#: tissue clusters kept per model (the pairing at adaptation time enumerates all K! orders)
TISSUE_CLUSTERS = 8
MAX_TISSUE_CLUSTERS = 8
#: k-means first finds this many clusters, then they are merged down to K by how often their
#: patches touch on the slide: k-means at K alone favours clusters of equal size, so it splits
#: a large elongated tissue and merges two small ones, and merging the closest centroids is
#: unstable where tissues overlap in feature space (both seen on the site-shift world, where
#: merging by adjacency found all 8 tissues in 12 of 12 trials; 16 and 32 did worse)
TISSUE_OVERCLUSTER = 24
#: at most this many patches (an even subsample) fit the k-means; every patch is then assigned
TISSUE_SAMPLE = 20_000


@dataclass(frozen=True, kw_only=True, eq=False)
class TissuePartition:
    """A partition of (standardised) feature space: ``M`` k-means centroids, each in one of ``K``
    merged clusters; a patch belongs to the cluster of its nearest centroid."""

    centroids: np.ndarray  # (M, D)
    groups: np.ndarray  # (M,) int64 in [0, K)
    k: int

    def assign(self, z: np.ndarray) -> np.ndarray:
        """(N,) cluster of each row of ``z`` (N, D), in the partition's units."""
        z64 = np.asarray(z, dtype=np.float64)
        c = self.centroids
        d2 = (c**2).sum(axis=1)[None, :] - 2.0 * z64 @ c.T
        out: np.ndarray = self.groups[np.argmin(d2, axis=1)]
        return out


def neighbour_pairs(
    labels: Sequence[np.ndarray], coords: Sequence[np.ndarray], k: int
) -> np.ndarray:
    """(k, k) symmetric counts of 4-neighbour patch pairs by cluster, over slides.

    ``labels[i]`` and ``coords[i]`` are one slide's clusters and patch coordinates; the edges
    are :func:`oncoslide.features.neighbours.coordinate_edges` (the grid step is the slide's
    smallest coordinate gap), as PAMA's pairs readout reads them.
    """
    pairs = np.zeros((k, k))
    for lab, xy in zip(labels, coords, strict=True):
        lab = np.asarray(lab, dtype=np.int64)
        if len(lab) < 2:
            continue
        edges = coordinate_edges(xy)
        np.add.at(pairs, (lab[edges[:, 0]], lab[edges[:, 1]]), 1.0)
    out: np.ndarray = pairs + pairs.T
    return out


def enrichment(pairs: np.ndarray) -> np.ndarray:
    """log((pairs + 1) / (expected + 1)), expected as if neighbours were drawn at random from
    the clusters' totals of pairs."""
    expected = np.outer(pairs.sum(axis=1), pairs.sum(axis=0)) / max(float(pairs.sum()), 1.0)
    out: np.ndarray = np.log((pairs + 1.0) / (expected + 1.0))
    return out


def tissue_clusters(
    slides: Sequence[tuple[np.ndarray, np.ndarray]],
    mean: np.ndarray,
    std: np.ndarray,
    k: int = TISSUE_CLUSTERS,
    *,
    over: int = TISSUE_OVERCLUSTER,
    sample: int = TISSUE_SAMPLE,
    seed: int = 0,
) -> TissuePartition:
    """Cluster the patches of ``slides`` ((features, coords) per slide), standardised with
    ``mean`` and ``std``, into ``k`` tissue clusters.

    k-means with ``over`` clusters (k-means++, 2 restarts, on an even subsample of at most
    ``sample`` patches); every patch goes to its nearest centroid; then the two groups whose
    patches are 4-neighbours most often relative to chance (highest log enrichment) are merged
    until ``k`` remain: the pieces of one tissue lie in the same regions of the slide, distinct
    tissues do not. Slides are read one at a time after the subsample (memory: the subsample).
    Deterministic for the same slides and ``seed``.

    Raises:
        ConfigError: fewer patches than ``over``, or ``k`` out of range.
    """
    return tissue_partition(slides, mean, std, k, over=over, sample=sample, seed=seed)[0]


def tissue_partition(
    slides: Sequence[tuple[np.ndarray, np.ndarray]],
    mean: np.ndarray,
    std: np.ndarray,
    k: int,
    *,
    over: int = TISSUE_OVERCLUSTER,
    sample: int = TISSUE_SAMPLE,
    seed: int = 0,
) -> tuple[TissuePartition, list[np.ndarray]]:
    """:func:`tissue_clusters` and each slide's cluster labels under it (the assignment the
    merging already made: callers need not assign every patch again)."""
    from sklearn.cluster import KMeans

    if not 2 <= k <= MAX_TISSUE_CLUSTERS:
        raise ConfigError(f"tissue clusters must be in [2, {MAX_TISSUE_CLUSTERS}], got {k}")
    over = max(over, k)
    total = sum(len(x) for x, _ in slides)
    if total < over:
        raise ConfigError(f"need at least {over} patches to find tissue clusters, got {total}")
    step = max(1, -(-total // sample))
    picked, start = [], 0
    for x, _ in slides:
        first = (-start) % step  # the slide's first row whose global index is a multiple of step
        if first < len(x):
            picked.append(_standardise(np.asarray(x)[first::step], mean, std))
        start += len(x)
    # float32: sklearn's Lloyd iterations then run in single precision, 1.6x faster on 20,000
    # x 768 (measured: the same partition, adjusted Rand index 1.0); this runs at every fold's
    # fit, so it is part of every training run's cost
    sample_x = np.concatenate(picked).astype(np.float32)
    km = KMeans(n_clusters=over, n_init=2, random_state=seed).fit(sample_x)
    centroids = np.asarray(km.cluster_centers_, dtype=np.float64)
    fine = TissuePartition(centroids=centroids, groups=np.arange(over), k=over)
    labels = [fine.assign(_standardise(x, mean, std)) for x, _ in slides]
    pairs = neighbour_pairs(labels, [xy for _, xy in slides], over)
    members = [[j] for j in range(over)]
    while len(members) > k:
        member = np.zeros((len(members), over))
        for i, m in enumerate(members):
            member[i, m] = 1.0
        e = enrichment(member @ pairs @ member.T)
        e[np.diag_indices_from(e)] = -np.inf
        first, second = (int(v) for v in np.unravel_index(np.argmax(e), e.shape))
        a, b = min(first, second), max(first, second)
        members[a] += members.pop(b)
    groups = np.zeros(over, dtype=np.int64)
    for g, m in enumerate(members):
        groups[m] = g
    merged = [groups[lab] for lab in labels]
    return TissuePartition(centroids=centroids, groups=groups, k=k), merged


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out: np.ndarray = (np.asarray(x, dtype=np.float64) - mean) / std
    return out


def share_covariance(labels: Sequence[np.ndarray], k: int) -> np.ndarray:
    """(K, K) covariance over slides of log(share + 0.01), each slide's logs centred on their
    mean (a log-ratio transform): how the clusters' shares vary and co-vary from slide to
    slide, which a stain does not change. Zeros with fewer than two slides."""
    if len(labels) < 2:
        return np.zeros((k, k))
    shares = np.stack([np.bincount(lab, minlength=k) / max(len(lab), 1) for lab in labels])
    logs = np.log(shares + 0.01)
    logs -= logs.mean(axis=1, keepdims=True)
    out: np.ndarray = np.cov(logs.T)
    return out


def tissue_summary(
    slides: Sequence[tuple[np.ndarray, np.ndarray]],
    mean: np.ndarray,
    std: np.ndarray,
    part: TissuePartition,
    labels: Sequence[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Per slide the cluster of each patch, the shares and 4-neighbour enrichment of the
    clusters (:func:`tissue_signature`), and each cluster's mean in standardised units (K, D)
    (zero for an empty cluster). :func:`share_covariance` of the labels completes the
    signatures. ``labels`` (per slide, under ``part``) saves assigning the patches again."""
    found: list[np.ndarray] = []
    sums = np.zeros((part.k, len(mean)))
    for i, (x, _) in enumerate(slides):
        z = _standardise(x, mean, std)
        lab = part.assign(z) if labels is None else np.asarray(labels[i], dtype=np.int64)
        # a one-hot product, not np.add.at (which loops per row: a quarter of the summary's
        # time on 70,000 x 768 patches, measured)
        one_hot = np.zeros((part.k, len(lab)))
        one_hot[lab, np.arange(len(lab))] = 1.0
        sums += one_hot @ z
        found.append(lab)
    labels = found
    shares, enriched = tissue_signature(labels, [xy for _, xy in slides], part.k)
    counts = np.zeros(part.k)
    for lab in labels:
        counts += np.bincount(lab, minlength=part.k)
    centres = sums / np.maximum(counts, 1.0)[:, None]
    return labels, shares, enriched, centres


def tissue_signature(
    labels: Sequence[np.ndarray], coords: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shares of the patches per cluster and the (K, K) log enrichment of 4-neighbour pairs.

    ``labels[i]`` and ``coords[i]`` are one slide's clusters and patch coordinates. The
    enrichment (:func:`enrichment`) does not change when the feature space is transformed (a
    site's stain), only when tissues are arranged differently; the simulator arranges tissues
    spatially in the same way at every site.
    """
    counts = np.zeros(k)
    for lab in labels:
        counts += np.bincount(np.asarray(lab, dtype=np.int64), minlength=k)
    return counts / max(counts.sum(), 1.0), enrichment(neighbour_pairs(labels, coords, k))


def with_tissues(
    stats: FeatureStats,
    slides: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int = TISSUE_CLUSTERS,
    seed: int = 0,
) -> FeatureStats:
    """``stats`` plus the tissue summary of the same patches, given as (features, coords) per
    slide: clusters found in the training-standardised features (:func:`tissue_clusters`),
    each cluster's mean, share, 4-neighbour enrichment (:func:`tissue_summary`) and the
    covariance of its share over slides (:func:`share_covariance`).

    Too few patches to cluster (fewer than :data:`TISSUE_OVERCLUSTER`): ``stats`` unchanged
    (no summary; ``--adapt-align tissues`` then refuses with a message).
    """
    # a Sequence is read as it is (it may read slides on demand: cv's cached slides), anything
    # else is gathered once
    kept: Sequence[tuple[np.ndarray, np.ndarray]] = (
        slides if isinstance(slides, Sequence) else [(x, xy) for x, xy in slides if len(x)]
    )
    if sum(len(x) for x, _ in kept) < max(TISSUE_OVERCLUSTER, k):
        return stats
    part, merged = tissue_partition(kept, stats.mean, stats.std, k, seed=seed)
    labels, shares, enriched, centres = tissue_summary(kept, stats.mean, stats.std, part, merged)
    return dataclasses.replace(
        stats,
        tissue_centres=stats.mean + stats.std * centres,
        tissue_shares=shares,
        tissue_adjacency=enriched,
        tissue_share_cov=share_covariance(labels, k),
    )


__all__ = [
    "FEATURE_STATS_FILE",
    "TISSUE_CLUSTERS",
    "FeatureStats",
    "TissuePartition",
    "enrichment",
    "neighbour_pairs",
    "share_covariance",
    "tissue_clusters",
    "tissue_partition",
    "tissue_signature",
    "tissue_summary",
    "with_tissues",
]
