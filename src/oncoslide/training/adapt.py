"""Test-time adaptation of a trained model to an unseen site's unlabelled slides (``predict --adapt``).

The idea of Smart-CCS (seed 003): a model trained on some scanners and stains meets a site it has
never seen; before predicting, it adapts to that site's slides without any of its labels. Each
site of the cohort (its ``site`` column; the whole cohort when there is none) is adapted on its
own, starting from the trained model every time:

The default (``align="auto"``, ``steps=0``, ``match="none"``) is the per-tissue alignment
alone: it won back 60 % of the balanced accuracy lost on the unseen site of the simulator's
``site-shift`` world over five fresh seeds (docs/training.md), where entropy steps and decision
matching won back 29 %. ``auto`` is ``tissues`` for a model folder that stores its training
part's tissue clusters (fitted with this version) and ``standardise`` for older ones; a site
with too few patches to cluster is re-standardised only (recorded).

1. **Alignment** (``align``). ``standardise``: the site's patch features are mapped
   onto the training part's statistics, dimension by dimension:
   ``x -> m_train + s_train * (x - m_site) / s_site``, with ``m_site, s_site`` the mean and sd
   over every patch of the site's slides and ``m_train, s_train`` those stored in the model
   folder at fit time (``feature_stats.npz``). ``coral``: the centred features are whitened
   with the site's covariance and re-coloured with training's (both shrunk towards the scaled
   identity). ``tissues``: re-standardisation, then a shift per tissue: the site's patches
   are clustered into the training part's number of tissue clusters (:func:`tissue_clusters`),
   each site cluster is paired with a training cluster by label-free signatures that a stain
   does not change (their shares of the patches, how the shares vary and co-vary over slides
   and how often they touch each other on the slide grid; every order is tried,
   :func:`pair_tissues`), and each patch is moved by the
   difference between its partner's training mean and its cluster's site mean. It targets a
   stain that changes each tissue's appearance differently. ``none``: the features as they are.
2. **Entropy minimisation (Tent).** ``steps`` full-batch Adam updates of normalisation
   parameters only, minimising the mean entropy of the model's predictive distributions over
   the site's bags. ABMIL (and the other pooling models) have no normalisation layer, so every
   model gets a per-feature affine on the aligned input, ``z -> gamma * z + beta``
   (identity at the start, in units of the training sd); models with LayerNorm or BatchNorm
   layers also adapt those layers' affine parameters. Nothing else moves.

   The distribution whose entropy is minimised: the class probabilities (classification); the
   distribution of the event-time bin (K bins and "after the last bin") of a discrete-time
   survival model (``--loss nll``). A Cox model outputs one risk, not a distribution, so it
   gets the alignment only (recorded as such). ``diversity`` (default 1) subtracts
   that weight times the entropy of the site's mean prediction (SHOT's information
   maximisation): entropy alone (``diversity`` 0, plain Tent) collapsed every bag of the
   shifted site onto one class in the site-shift world (balanced accuracy 0.5), while the
   diversity term keeps the site's predictions spread over the classes, as the balanced class
   weights of training expect. ``prior="training"`` aims the mean prediction at the training
   class frequencies instead (minus a KL divergence).
3. **Decision matching** (classification, ``match="decisions"``): one offset per class
   is added to the adapted logits so that the site's patients are predicted as each class in
   the shares the fitted model predicted its own training part (stored at fit time). It
   assumes the site has training's class mix.

Only features and the site column are read; the cohort's labels are never touched while
adapting (a test plants helpful labels and checks that the adapted predictions do not change).
When the cohort has targets, ``adaptation.json`` and ``adaptation.csv`` report the metrics
before and after adaptation, computed afterwards, for evaluation only.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oncoslide._io import write_json, write_table
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.evaluation.classification import classification_metrics
from oncoslide.features.cache import FeatureCache
from oncoslide.models import MODELS, MILModel, MILOutput
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training.data import BagDataset, BagTargets, collate_bags, length_sorted_order
from oncoslide.training.feature_stats import (
    FEATURE_STATS_FILE,
    TISSUE_OVERCLUSTER,
    FeatureStats,
    TissuePartition,
    share_covariance,
    tissue_partition,
    tissue_summary,
)
from oncoslide.training.model_folder import TrainedModel
from oncoslide.training.module import model_inputs

ADAPTATION_FILE = "adaptation.json"
ADAPTATION_TABLE = "adaptation.csv"
UNADAPTED_FILE = "predictions_unadapted.parquet"
ALL_SITES = "(all)"  # the site name when the cohort has no site column

_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


ALIGNMENTS = ("auto", "standardise", "coral", "tissues", "none")
PRIORS = ("uniform", "training")
MATCHES = ("decisions", "none")


@dataclass(frozen=True, kw_only=True)
class AdaptConfig:
    """Settings of test-time adaptation (see the module docstring).

    Attributes:
        align: how each site's features are mapped onto the training part's before the
            entropy steps: ``auto`` (default: ``tissues`` when the model folder stores tissue
            clusters, else ``standardise``), ``standardise`` (per-dimension mean and sd), ``coral`` (mean and
            full covariance, which can undo a mixing of the dimensions), ``tissues``
            (standardise, then a shift per tissue cluster, paired without labels) or ``none``.
        shrinkage: CORAL only: weight of the scaled identity mixed into both covariances
            (``(1 - a) C + a tr(C) / D I``), which keeps the whitening stable when a site has
            few patches per dimension.
        steps: entropy-minimisation updates per site (0, default: alignment only).
        lr: Adam learning rate of the adapted parameters (the input affine is in training-sd
            units, so 0.01 moves a feature by at most about 0.01 sd per step).
        diversity: weight of the diversity term (0: plain Tent, which may collapse onto one
            class).
        prior: the diversity term's target for the site's mean class prediction: ``uniform``
            (the entropy of the mean prediction, SHOT's information maximisation) or
            ``training`` (minus its KL divergence from the training part's class frequencies,
            read from the class weights stored at fit time; classification only).
        match: classification only: ``decisions`` ends with one bias per class added to the
            adapted model's logits so that the site's patients are predicted as each class in
            the shares the fitted model predicted its own training part (stored at fit
            time); ``none`` leaves the logits as adapted.
        batch_size: bags per forward pass (gradients of all bags are summed before a step).
        site_col: the cohort column naming each patient's site.
    """

    align: str = "auto"
    shrinkage: float = 0.1
    steps: int = 0
    lr: float = 0.01
    diversity: float = 1.0
    prior: str = "uniform"
    match: str = "none"
    batch_size: int = 16
    site_col: str = "site"

    def __post_init__(self) -> None:
        problems = []
        if self.align not in ALIGNMENTS:
            problems.append(f"align must be one of {', '.join(ALIGNMENTS)}, got {self.align!r}")
        if not (math.isfinite(self.shrinkage) and 0.0 <= self.shrinkage <= 1.0):
            problems.append(f"shrinkage must be in [0, 1], got {self.shrinkage!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            problems.append(f"steps must be a non-negative integer, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be positive, got {self.lr!r}")
        if not (math.isfinite(self.diversity) and self.diversity >= 0):
            problems.append(f"diversity must be >= 0, got {self.diversity!r}")
        if self.prior not in PRIORS:
            problems.append(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.match not in MATCHES:
            problems.append(f"match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size!r}")
        if problems:
            raise ConfigError("adaptation settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "align": self.align,
            "shrinkage": self.shrinkage,
            "steps": self.steps,
            "lr": self.lr,
            "diversity": self.diversity,
            "prior": self.prior,
            "match": self.match,
            "batch_size": self.batch_size,
            "site_col": self.site_col,
        }


class SiteAdaptedModel(MILModel):
    """A trained model behind a per-site input map: alignment, then ``gamma z + beta``.

    ``z`` is the site's centred features mapped into training-sd units: divided by the site's
    sd (re-standardisation) or multiplied by ``site_map`` (CORAL, already in those units).
    ``gamma`` and ``beta`` (and the wrapped model's normalisation affines) are what adaptation
    trains; everything else is frozen.
    """

    train_mean: Tensor
    train_std: Tensor
    site_mean: Tensor
    site_std: Tensor
    site_map: Tensor | None
    logit_bias: Tensor
    tissue_centroids: Tensor | None
    tissue_shift: Tensor | None

    def __init__(
        self,
        base: MILModel,
        train: FeatureStats,
        site_mean: np.ndarray,
        site_std: np.ndarray,
        site_map: np.ndarray | None = None,
        tissues: tuple[TissuePartition, np.ndarray] | None = None,
    ) -> None:
        super().__init__(base.in_dim, base.n_outputs, base.dropout, base.hidden_dim)
        self.base = base
        self.register_buffer("train_mean", torch.as_tensor(train.mean, dtype=torch.float32))
        self.register_buffer("train_std", torch.as_tensor(train.std, dtype=torch.float32))
        self.register_buffer("site_mean", torch.as_tensor(site_mean, dtype=torch.float32))
        self.register_buffer("site_std", torch.as_tensor(site_std, dtype=torch.float32))
        self.register_buffer(
            "site_map",
            None if site_map is None else torch.as_tensor(site_map, dtype=torch.float32),
        )
        # per-tissue alignment: the site's k-means centroids (site-standardised units) and the
        # shift of each (that of its merged cluster, in training-sd units)
        centroids = shift = None
        if tissues is not None:
            part, cluster_shift = tissues
            centroids = torch.as_tensor(part.centroids, dtype=torch.float32)
            shift = torch.as_tensor(cluster_shift[part.groups], dtype=torch.float32)
        self.register_buffer("tissue_centroids", centroids)
        self.register_buffer("tissue_shift", shift)
        self.gamma = nn.Parameter(torch.ones(base.in_dim))
        self.beta = nn.Parameter(torch.zeros(base.in_dim))
        # decision matching's per-class logit offsets (zero until set; not trained)
        self.register_buffer("logit_bias", torch.zeros(base.n_outputs))

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    def adapted_parameters(self) -> list[nn.Parameter]:
        """The input affine and the affine parameters of the model's normalisation layers."""
        params = [self.gamma, self.beta]
        for module in self.base.modules():
            if isinstance(module, _NORM_LAYERS):
                params += [p for p in (module.weight, module.bias) if p is not None]
        return params

    def forward(
        self, features: Tensor, mask: Tensor, coords: Tensor | None = None, **kwargs: Any
    ) -> MILOutput:
        centred = features.float() - self.site_mean
        z = centred / self.site_std if self.site_map is None else centred @ self.site_map
        if self.tissue_centroids is not None and self.tissue_shift is not None:
            c = self.tissue_centroids
            d2 = (c * c).sum(dim=-1) - 2.0 * z @ c.T  # + |z|^2, the same for every centroid
            z = z + self.tissue_shift[d2.argmin(dim=-1)]
        x = self.train_mean + self.train_std * (z * self.gamma + self.beta)
        out: MILOutput = self.base(x, mask, coords, **kwargs)
        if bool(self.logit_bias.any()):
            out = dataclasses.replace(out, logits=out.logits + self.logit_bias.to(out.logits))
        return out


def decision_bias(logits: np.ndarray, rates: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Per-class offsets (the first class's 0) after which the shares of rows whose argmax is
    each class are as close as possible to ``rates``.

    Two classes: the exact threshold, midway between the scores around the target count. More:
    multiplicative updates of the offsets, keeping the closest shares met (ties broken by the
    first found), deterministic.
    """
    n, c = logits.shape
    rates = np.asarray(rates, dtype=np.float64)
    if c == 2:
        margin = np.sort(logits[:, 1] - logits[:, 0])  # positive where class 1 wins
        k = round(float(rates[1]) * n)  # rows to predict as class 1
        if k <= 0:
            cut = margin[-1] + 1.0
        elif k >= n:
            cut = margin[0] - 1.0
        else:
            cut = (margin[n - k - 1] + margin[n - k]) / 2.0
        return np.array([0.0, -cut])
    bias = np.zeros(c)
    best, best_gap = bias.copy(), np.inf
    eps = 0.5 / n
    for _ in range(iterations):
        shares = np.bincount(np.argmax(logits + bias, axis=1), minlength=c) / n
        gap = float(np.abs(shares - rates).sum())
        if gap < best_gap - 1e-12:
            best, best_gap = bias.copy(), gap
        if gap <= 1.0 / n:
            break
        bias = bias + 0.5 * (np.log(rates + eps) - np.log(shares + eps))
        bias -= bias[0]
    return best


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    d = cov.shape[0]
    return (1.0 - shrinkage) * cov + shrinkage * float(np.trace(cov)) / d * np.eye(d)


def _sym_power(cov: np.ndarray, power: float) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
    out: np.ndarray = (v * w**power) @ v.T
    return out


def coral_map(site_cov: np.ndarray, train: FeatureStats, shrinkage: float) -> np.ndarray:
    """``C_site^(-1/2) C_train^(1/2) / s_train`` (CORAL, Sun et al. 2016): centred site
    features times this have the training part's covariance, in training-sd units."""
    colour = _sym_power(_shrunk(_stored_covariance(train), shrinkage), 0.5)
    whiten = _sym_power(_shrunk(site_cov, shrinkage), -0.5)
    out: np.ndarray = (whiten @ colour) / train.std[None, :]
    return out


def pair_tissues(
    site_shares: np.ndarray,
    site_adjacency: np.ndarray,
    train_shares: np.ndarray,
    train_adjacency: np.ndarray,
    site_share_cov: np.ndarray | None = None,
    train_share_cov: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float]:
    """The training cluster of each site cluster, from label-free signatures only.

    Tries every order (K! for K clusters, at most 8) and keeps the one minimising
    ``sum_j (log share_site[j] - log share_train[p[j]])^2 + sum_(j,l) (E_site[j, l] -
    E_train[p[j], p[l]])^2 + sum_(j,l) (V_site[j, l] - V_train[p[j], p[l]])^2``, E the
    4-neighbour log enrichment and V the covariance of the slides' log shares (when both are
    given): a quadratic assignment, equal weights. Returns the order, its cost and the
    second-best cost (how clear the choice was).
    """
    import itertools

    k = len(site_shares)
    perms = np.array(list(itertools.permutations(range(k))), dtype=np.int64)
    ls = np.log(np.maximum(site_shares, 1e-6))
    lt = np.log(np.maximum(train_shares, 1e-6))
    cost = ((ls[None, :] - lt[perms]) ** 2).sum(axis=1)
    for chunk in np.array_split(np.arange(len(perms)), max(1, len(perms) // 5000)):
        p = perms[chunk]
        moved = train_adjacency[p[:, :, None], p[:, None, :]]
        cost[chunk] += ((site_adjacency[None] - moved) ** 2).sum(axis=(1, 2))
        if site_share_cov is not None and train_share_cov is not None:
            moved = train_share_cov[p[:, :, None], p[:, None, :]]
            cost[chunk] += ((site_share_cov[None] - moved) ** 2).sum(axis=(1, 2))
    order = np.argsort(cost, kind="stable")
    second = float(cost[order[1]]) if len(order) > 1 else float("nan")
    return perms[order[0]], float(cost[order[0]]), second


def _stored_covariance(train: FeatureStats) -> np.ndarray:
    """The training part's feature covariance, or the message for a model folder written
    before it was stored (ConfigError)."""
    if train.cov is None:
        raise ConfigError(
            "the model folder stores no training feature covariance (feature_stats.npz written "
            "before it was stored), which --adapt-align coral needs: fit the model again with "
            "this version (e.g. `oncoslide train ... --fit-all --overwrite`) or use "
            "--adapt-align standardise"
        )
    return train.cov


def _stored_tissues(train: FeatureStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training part's tissue centres, shares and adjacency, or the message for a model
    folder written before they were stored (ConfigError)."""
    centres, shares, adjacency = train.tissue_centres, train.tissue_shares, train.tissue_adjacency
    if centres is None or shares is None or adjacency is None:
        raise ConfigError(
            "the model folder stores no tissue clusters of its training part "
            f"({FEATURE_STATS_FILE} written before they were stored), which --adapt-align "
            "tissues needs: fit the model again with this version (e.g. `oncoslide train ... "
            "--fit-all --overwrite`) or use --adapt-align standardise"
        )
    return centres, shares, adjacency


def tissue_alignment(
    slides: Sequence[tuple[np.ndarray, np.ndarray]],
    site: FeatureStats,
    train: FeatureStats,
) -> tuple[TissuePartition, np.ndarray, dict[str, Any]]:
    """The site's tissue clusters and the shift of each onto its paired training cluster.

    ``slides`` are the site's (features, coords); ``site`` their pooled statistics. The shift
    is in training-sd units, applied after re-standardisation by the site's own mean and sd.
    """
    train_centres, train_shares, train_adjacency = _stored_tissues(train)
    k = len(train_shares)
    part, found = tissue_partition(slides, site.mean, site.std, k)
    labels, shares, adjacency, site_centres = tissue_summary(
        slides, site.mean, site.std, part, found
    )
    # folders written before the share covariance was stored pair on shares and adjacency
    site_cov = None if train.tissue_share_cov is None else share_covariance(labels, k)
    order, cost, second = pair_tissues(
        shares, adjacency, train_shares, train_adjacency, site_cov, train.tissue_share_cov
    )
    shift = (train_centres[order] - train.mean) / train.std - site_centres
    info = {
        "site_shares": [float(v) for v in shares],
        "paired_training_cluster": [int(v) for v in order],
        "training_shares": [float(v) for v in train_shares[order]],
        "pairing_cost": cost,
        "second_best_cost": second,
        "mean_shift_sd": float(np.sqrt((shift**2).sum(axis=1)).mean()),
    }
    return part, shift, info


def training_prior(trained: TrainedModel) -> np.ndarray | None:
    """Class frequencies of the training part, from the balanced class weights stored at fit
    time (``w_c = n / (C n_c)``, so ``n_c`` is proportional to ``1 / w_c``); None without them."""
    weight = getattr(trained.fold_task, "class_weight", None)
    if weight is None:
        return None
    inv = 1.0 / np.asarray(weight, dtype=np.float64)
    out: np.ndarray = inv / inv.sum()
    return out


def _entropy(logp: Tensor) -> Tensor:
    """Entropy of each row of log-probabilities, (B,)."""
    return -(logp.exp() * logp).sum(dim=-1)


def _log_distribution(logits: Tensor, kind: str) -> Tensor:
    """Log-probabilities of the predicted outcome: classes, or event-time bins plus "later"."""
    if kind == "classes":
        return F.log_softmax(logits, dim=-1)
    # discrete-time hazards: P(bin k) = h_k S_{k-1}, P(after the last bin) = S_K
    log_h = F.logsigmoid(logits)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=-1)
    before = F.pad(log_s[:, :-1], (1, 0))
    return torch.cat([log_h + before, log_s[:, -1:]], dim=-1)


def adaptation_objective(trained: TrainedModel) -> str:
    """``classes``, ``time_bins`` or ``none`` (Cox: one risk, no distribution to sharpen)."""
    if not trained.task.is_survival:
        return "classes"
    if trained.config.survival_loss == "nll":
        return "time_bins"
    return "none"


@dataclass
class SiteRecord:
    site: str
    patients: list[str]
    n_slides: int
    n_patches: int
    shift: dict[str, float]
    objective: list[float] = field(default_factory=list)
    seconds: float = 0.0
    n_adapted: int = 0
    decisions: dict[str, list[float]] = field(default_factory=dict)
    tissues: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "patients": len(self.patients),
            "slides": self.n_slides,
            "patches": self.n_patches,
            "shift": self.shift,
            "objective": self.objective,
            "adapted_parameters": self.n_adapted,
            "decisions": self.decisions,
            "tissues": self.tissues,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class AdaptResult:
    """Adapted and unadapted outputs of every patient (in the order given), per-site models."""

    config: AdaptConfig
    objective: str
    logits: Tensor
    embeddings: Tensor
    before_logits: Tensor
    site_of: dict[str, str]
    models: dict[str, TrainedModel]
    records: list[SiteRecord]


def site_groups(cohort: Cohort, patients: Sequence[str], site_col: str) -> dict[str, list[str]]:
    """Patients per site (in the given order); one group when the cohort has no site column."""
    if site_col not in cohort.patients.columns:
        return {ALL_SITES: list(patients)}
    values = cohort.patients.loc[list(patients), site_col]
    if values.isna().any():
        missing = [p for p, v in zip(patients, values, strict=True) if pd.isna(v)]
        raise ConfigError(
            f"{len(missing)} patient(s) have no {site_col!r} value to adapt by, e.g. "
            f"{', '.join(missing[:5])}"
        )
    groups: dict[str, list[str]] = {}
    for pid, site in zip(patients, values, strict=True):
        groups.setdefault(str(site), []).append(pid)
    return dict(sorted(groups.items()))


def adapt_and_predict(
    trained: TrainedModel,
    cohort: Cohort,
    patients: Sequence[str],
    cache: FeatureCache,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]],
    batch_size: int,
    config: AdaptConfig,
) -> AdaptResult:
    """Adapt ``trained`` to each site of ``patients`` and predict them; labels are not read."""
    from oncoslide.training.predict import predict_logits

    train_stats = FeatureStats.load(trained.path)
    if train_stats.dim != trained.model.in_dim:
        raise ConfigError(
            f"{trained.path}: feature statistics of dimension {train_stats.dim} for a model "
            f"of input dimension {trained.model.in_dim}"
        )
    auto = config.align == "auto"
    if auto:  # tissues where the folder stores them (fitted with this version), else standardise
        config = replace(
            config, align="tissues" if train_stats.tissue_centres is not None else "standardise"
        )
    # refuse a folder without what the alignment needs before any slide is read
    if config.align == "coral":
        _stored_covariance(train_stats)
    if config.align == "tissues":
        _stored_tissues(train_stats)
    objective = adaptation_objective(trained)
    rates = train_stats.decision_rates
    matching = config.match == "decisions" and objective == "classes"
    if matching and (rates is None or len(rates) != trained.model.n_outputs):
        raise ConfigError(
            f"the model in {trained.path} stores no decision rates of its training part "
            f"({FEATURE_STATS_FILE} written before they were stored), which decision matching "
            "needs: fit it again with this version (e.g. `oncoslide train ... --fit-all "
            "--overwrite`) or use --adapt-match none"
        )
    prior = None
    if config.prior == "training" and objective == "classes":
        prior = training_prior(trained)
        if prior is None:
            raise ConfigError(
                f"{trained.path}: --adapt-prior training needs the class weights stored at "
                "fit time (class_weights balanced); this model has none"
            )
    patients = list(patients)
    row = {pid: i for i, pid in enumerate(patients)}
    before, _ = predict_logits(trained, cohort, patients, cache, side, batch_size)
    logits = torch.empty_like(before)
    embeddings = torch.empty(len(patients), trained.model.embed_dim)
    site_of: dict[str, str] = {}
    models: dict[str, TrainedModel] = {}
    records = []
    for site, ids in site_groups(cohort, patients, config.site_col).items():
        started = time.perf_counter()
        loaded = [cache.get(p) for pid in ids for p in cohort.slide_paths(pid)]
        arrays = [s.features for s in loaded]
        stats = FeatureStats.of(arrays)
        mean, std, site_map = train_stats.mean, train_stats.std, None
        tissues: tuple[TissuePartition, np.ndarray] | None = None
        tissue_info: dict[str, Any] = {}
        if config.align in ("standardise", "tissues"):
            mean, std = stats.mean, stats.std
        n_tissues = 0 if train_stats.tissue_shares is None else len(train_stats.tissue_shares)
        few = stats.n_patches < max(TISSUE_OVERCLUSTER, n_tissues)
        if config.align == "tissues" and auto and few:
            # too few patches to find the tissues: this site is re-standardised only
            tissue_info = {"skipped": f"{stats.n_patches} patches are too few to cluster"}
        elif config.align == "tissues":
            part, shift, tissue_info = tissue_alignment(
                [(s.features, s.coords) for s in loaded], stats, train_stats
            )
            tissues = (part, shift)
        elif config.align == "coral":
            assert stats.cov is not None  # FeatureStats.of always computes it
            mean, site_map = stats.mean, coral_map(stats.cov, train_stats, config.shrinkage)
        model = SiteAdaptedModel(
            copy.deepcopy(trained.model), train_stats, mean, std, site_map, tissues
        )
        rows = [row[p] for p in ids]
        site_side = {k: (v[rows], present[rows]) for k, (v, present) in side.items()}
        record = SiteRecord(
            site=site,
            patients=ids,
            n_slides=len(arrays),
            n_patches=stats.n_patches,
            shift={
                # how far the site sits from training, in training sd: what step 1 removes
                "mean_abs_offset_sd": float(
                    np.mean(np.abs(stats.mean - train_stats.mean) / train_stats.std)
                ),
                "mean_abs_log_sd_ratio": float(
                    np.mean(np.abs(np.log(stats.std / train_stats.std)))
                ),
            },
            tissues=tissue_info,
        )
        if objective != "none" and config.steps > 0:
            record.objective, record.n_adapted = _minimise_entropy(
                model, trained, cohort, ids, cache, site_side, config, objective, prior
            )
        model.eval()
        site_model = replace(trained, model=model)
        site_logits, site_emb = predict_logits(
            site_model, cohort, ids, cache, site_side, batch_size
        )
        if matching and rates is not None:
            bias = decision_bias(site_logits.double().numpy(), rates)
            model.logit_bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
            site_logits = site_logits + model.logit_bias.to(site_logits)
            chosen = site_logits.argmax(dim=-1).numpy()
            record.decisions = {
                "training_rates": [float(r) for r in rates],
                "site_rates": [
                    float(r) for r in np.bincount(chosen, minlength=len(rates)) / len(ids)
                ],
                "logit_bias": [float(b) for b in bias],
            }
        logits[rows] = site_logits
        embeddings[rows] = site_emb
        site_of.update(dict.fromkeys(ids, site))
        models[site] = site_model
        record.seconds = time.perf_counter() - started
        records.append(record)
    return AdaptResult(config, objective, logits, embeddings, before, site_of, models, records)


def _minimise_entropy(
    model: SiteAdaptedModel,
    trained: TrainedModel,
    cohort: Cohort,
    ids: list[str],
    cache: FeatureCache,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]],
    config: AdaptConfig,
    kind: str,
    prior: np.ndarray | None = None,
) -> tuple[list[float], int]:
    """Full-batch Adam steps on the adapted parameters; the objective before each step and after.

    With a ``prior`` the diversity term is minus KL(mean prediction || prior) instead of the
    entropy of the mean prediction (the same up to a constant when the prior is uniform).

    Eval mode throughout (no dropout, stored normalisation statistics), whole bags in a fixed
    order: the same slides give the same adapted model.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.adapted_parameters()
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=config.lr)
    ds = BagDataset(cohort, ids, cache, BagTargets(), max_patches=None, side=dict(side))
    order = length_sorted_order(ds)
    chunks = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    uses_slide_index = bool(MODELS.metadata(trained.name).get("uses_slide_index", False))
    n = len(ids)
    model.eval()

    def forward(chunk: Sequence[int]) -> Tensor:
        batch = collate_bags([ds[i] for i in chunk])
        out = model(
            batch["features"],
            batch["mask"],
            batch["coords"],
            **model_inputs(batch, uses_slide_index),
        )
        return _log_distribution(out.logits.float(), kind)

    def mean_prediction() -> Tensor:
        with torch.no_grad():
            return torch.cat([forward(c).exp() for c in chunks]).mean(dim=0)

    log_prior = None if prior is None else torch.log(torch.as_tensor(prior, dtype=torch.float32))
    history = []
    for step in range(config.steps + 1):
        # the diversity term's gradient is linear in each bag's prediction once the mean is known
        p_bar = mean_prediction() if config.diversity > 0 else None
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in chunks:
            with torch.set_grad_enabled(step < config.steps):
                logp = forward(chunk)
            loss = _entropy(logp).sum() / n
            if p_bar is not None:
                # d/dp_bar of the diversity: H(p_bar) [+ sum p_bar log prior, i.e. -KL]
                grad_h = -(torch.log(p_bar.clamp_min(1e-12)) + 1.0)
                if log_prior is not None:
                    grad_h = grad_h + log_prior
                loss = loss - config.diversity * (logp.exp() * grad_h).sum() / n
            total += float(_entropy(logp.detach()).sum()) / n
            if step < config.steps:
                loss.backward()
        if p_bar is not None:
            diversity = float(_entropy(torch.log(p_bar.clamp_min(1e-12))[None])[0])
            if log_prior is not None:
                diversity += float((p_bar * log_prior).sum())
            total -= config.diversity * diversity
        history.append(total)
        if step < config.steps:
            optimiser.step()
    for p in params:
        p.requires_grad_(False)
    return history, sum(p.numel() for p in params)


def adapted_slide_embeddings(
    result: AdaptResult,
    slides: Sequence[tuple[str, str, Path]],
    cache: FeatureCache,
    batch_size: int,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]],
    rows: Mapping[str, int],
) -> Tensor:
    """Each slide alone as a bag, through its site's adapted model."""
    from oncoslide.training.predict import _slide_embeddings

    first = next(iter(result.models.values()))
    out = torch.empty(len(slides), first.model.embed_dim)
    for site, model in result.models.items():
        idx = [k for k, (pid, _, _) in enumerate(slides) if result.site_of[pid] == site]
        if idx:
            out[idx] = _slide_embeddings(
                model, [slides[k] for k in idx], cache, batch_size, side, rows
            )
    return out


# ------------------------------------------------------------------ evaluation (after adapting)


def _scores(frame: pd.DataFrame, trained: TrainedModel) -> dict[str, float]:
    """Metrics of one predictions frame that holds targets (NaN where undefined)."""
    task = trained.task
    if task.is_survival:
        if "time" not in frame or "event" not in frame:
            return {}
        ok = frame["time"].notna() & frame["event"].notna()
        f = frame[ok]
        if not len(f) or not f["event"].astype(bool).any():
            return {"c_index": float("nan")}
        c = concordance_index_censored(
            f["event"].astype(bool).to_numpy(), f["time"].to_numpy(float), f["risk"].to_numpy()
        )
        return {"c_index": float(c.cindex)}
    if "label" not in frame:
        return {}
    f = frame[frame["label"].notna()]
    classes = list(task.classes)
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([lookup[v] for v in f["label"]], dtype=np.int64)
    probs = f[[f"prob_{c}" for c in classes]].to_numpy(float)
    if len(np.unique(labels)) < 2:
        return {"auc": float("nan"), "balanced_accuracy": float("nan")}
    out = classification_metrics(labels, probs, classes=list(range(len(classes))))
    return {k: float(v) for k, v in out.items()}


def adaptation_table(
    before: pd.DataFrame, after: pd.DataFrame, result: AdaptResult, trained: TrainedModel
) -> pd.DataFrame:
    """Rows (site, metric, before, after, change, patients): every site and all patients."""
    rows = []
    sites = pd.Series(result.site_of)
    scopes = [("all", list(before["patient_id"]))]
    if len(result.records) > 1:
        scopes += [(r.site, r.patients) for r in result.records]
    b, a = before.set_index("patient_id"), after.set_index("patient_id")
    for scope, ids in scopes:
        ids = [p for p in ids if p in sites.index]
        mb = _scores(b.loc[ids].reset_index(), trained)
        ma = _scores(a.loc[ids].reset_index(), trained)
        for metric in mb:
            rows.append(
                {
                    "site": scope,
                    "metric": metric,
                    "before": mb[metric],
                    "after": ma[metric],
                    "change": ma[metric] - mb[metric],
                    "patients": len(ids),
                }
            )
    return pd.DataFrame(rows, columns=["site", "metric", "before", "after", "change", "patients"])


def _objective_note(result: AdaptResult) -> str:
    if result.objective == "none":
        return f"Cox model: one risk per patient, no distribution; {result.config.align} only"
    what = {
        "classes": "the class probabilities",
        "time_bins": "the predicted event-time bin (K bins + after the last)",
    }[result.objective]
    align = {
        "standardise": "per-dimension re-standardisation",
        "coral": f"CORAL alignment (shrinkage {result.config.shrinkage:g})",
        "tissues": "re-standardisation and a shift per tissue cluster (paired without labels)",
        "none": "no alignment",
    }[result.config.align]
    matched = (
        "; then per-class logit offsets matching the training part's decision rates"
        if result.config.match == "decisions" and result.objective == "classes"
        else ""
    )
    if result.config.steps == 0:
        return f"{align} only (0 steps){matched}"
    note = f"{align}, then the mean entropy of {what}"
    if result.config.diversity > 0:
        if result.config.prior == "training" and result.objective == "classes":
            note += (
                f" plus {result.config.diversity:g} x the KL divergence of the site's mean "
                "prediction from the training class frequencies"
            )
        else:
            note += (
                f" minus {result.config.diversity:g} x the entropy of the site's mean prediction"
            )
    return note + matched


def write_adaptation(
    out: Path,
    result: AdaptResult,
    before: pd.DataFrame,
    after: pd.DataFrame,
    trained: TrainedModel,
) -> pd.DataFrame:
    """``predictions_unadapted.parquet``, ``adaptation.json`` and, with targets, ``adaptation.csv``."""
    write_table(out / UNADAPTED_FILE, before)
    table = adaptation_table(before, after, result, trained)
    if len(table):
        write_table(out / ADAPTATION_TABLE, table)
    write_json(
        out / ADAPTATION_FILE,
        {
            "settings": result.config.to_dict(),
            "objective": result.objective,
            "objective_note": _objective_note(result),
            "labels_read": False,
            "sites": [r.to_dict() for r in result.records],
            "metrics": table.to_dict(orient="records"),
        },
    )
    return table


__all__ = [
    "ADAPTATION_FILE",
    "ADAPTATION_TABLE",
    "ALIGNMENTS",
    "MATCHES",
    "PRIORS",
    "UNADAPTED_FILE",
    "AdaptConfig",
    "AdaptResult",
    "SiteAdaptedModel",
    "adapt_and_predict",
    "adaptation_objective",
    "adapted_slide_embeddings",
    "coral_map",
    "decision_bias",
    "pair_tissues",
    "site_groups",
    "tissue_alignment",
    "training_prior",
    "write_adaptation",
]
