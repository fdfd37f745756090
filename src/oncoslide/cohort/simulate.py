"""Simulated pan-cancer cohorts with planted, known signal: oncoslide's default data and test bed.

``simulate_cohort(out_dir, SimulationConfig(...))`` writes a cohort in oncoslide's contracts
(docs/contracts.md) together with its ground truth:

- ``cohort.csv``: one row per slide (patient_id, slide_id, cohort, site, time, event, msi, subtype)
- ``features/<slide_id>.h5``: patch features and level-0 coordinates (``write_feature_file``)
- ``omics.csv`` and ``gene_groups.json``: expression driven by the same latents, six gene groups
- ``truth.json``, ``truth_prototypes.npy``, ``truth_patch_labels.npz``: every parameter, every
  patient's latents, true risk and label probabilities, and the prototype of every patch

Each patient has latent factors z. They reach the slide features ONLY through the patches: the
mix of morphology prototypes, the state of two tumour prototypes and the spatial clustering of
immune patches. Bag size, slide count, coordinates offset and site are drawn independently of z
(site can be confounded on purpose with ``site_confounding``). The generative model, its equations
and every default are documented in docs/simulator.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage, optimize, special, stats

from oncoslide._io import atomic_path, write_json, write_table
from oncoslide.errors import CohortValidationError, ConfigError
from oncoslide.features.schema import PatchGrid, write_feature_file

# The four named latent factors; latents beyond these are nuisance factors (morphology only).
LATENT_NAMES = ("aggressiveness", "immune", "molecular", "stromal")
AGGR, IMMUNE, MOLECULAR, STROMAL = range(4)

# Roles of the shared prototypes (same centre in every cohort) and of the cohort-specific ones,
# assigned in this order; prototypes beyond the named roles are nuisance morphologies.
SHARED_ROLES = ("stroma", "immune", "necrosis", "normal")
SPECIFIC_ROLES = ("tumour_high_grade", "tumour_low_grade", "tumour_mucinous")

# (role, latent, loading): the log-odds of a prototype in the patient's tissue rises by
# loading * z[latent] (times ``morphology_signal``).
ROLE_LOADINGS: dict[str, tuple[int, float]] = {
    "stroma": (STROMAL, 1.0),
    "immune": (IMMUNE, 1.3),
    "necrosis": (AGGR, 1.2),
    "tumour_high_grade": (AGGR, 1.3),
    "tumour_low_grade": (AGGR, -0.9),
    "tumour_mucinous": (MOLECULAR, 1.5),
}
# Baseline log-odds of each role in the tissue (before cohort jitter); nuisance roles get 0.
ROLE_BASE_LOGITS: dict[str, float] = {
    "stroma": 0.8,
    "immune": -0.3,
    "necrosis": -1.2,
    "normal": -0.5,
    "tumour_high_grade": 0.0,
    "tumour_low_grade": 0.6,
    "tumour_mucinous": -0.3,
}
# Tumour prototypes whose patches also shift along a direction with a latent (cell "state").
ROLE_STATE: dict[str, int] = {"tumour_high_grade": AGGR, "tumour_mucinous": MOLECULAR}

# Log hazard ratio per unit of each named latent (times ``survival_signal``).
HAZARD_COEFS = (1.1, -0.6, 0.25, 0.4)
# MSI log-odds per unit latent (times ``label_signal``): mostly molecular, partly immune.
MSI_COEFS = (0.0, 0.7, 2.0, 0.0)
SUBTYPES = ("proliferative", "immune", "mesenchymal")
# Subtype logits: each class driven by one latent (times ``label_signal``).
SUBTYPE_LATENTS = (AGGR, IMMUNE, STROMAL)
SUBTYPE_SLOPE = 1.2

# The six functional gene groups of G-HANet and the latent direction each group follows.
GENE_GROUP_LOADINGS: dict[str, tuple[float, float, float, float]] = {
    "tumour_suppressors": (-1.0, 0.0, 0.3, 0.0),
    "oncogenes": (1.0, 0.0, 0.5, 0.0),
    "protein_kinases": (0.7, 0.0, 0.0, 0.7),
    "cell_differentiation": (-0.8, 0.0, 0.0, 0.4),
    "transcription_factors": (0.0, 0.0, 1.0, 0.0),
    "cytokines_growth_factors": (0.0, 1.0, 0.0, 0.4),
}

# Patch grid: 224-px patches at 0.5 µm/px cut from a 0.25 µm/px level 0 (40x scan, 20x patches).
PATCH_SIZE = 224
TARGET_MPP = 0.5
LEVEL0_MPP = 0.25
PATCH_SIZE_LEVEL0 = 448
ENCODER_NAME = "simulated"

OUTCOME_NAMES = ("time", "event", "msi", "subtype")
_ID_COLUMNS = ("patient_id", "slide_id", "cohort", "site")
_N_CALIBRATION = 20_000  # reference patients used to calibrate censoring and MSI prevalence
_BARCODE_CHARS = string.ascii_uppercase + string.digits


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """Every knob of the simulator; defaults give the default cohort (docs/simulator.md).

    Signal strengths are multipliers of the documented base coefficients (1.0 = default, 0.0 = no
    signal on that route). Feature-space lengths are in units of the isotropic patch noise sd.
    """

    seed: int = 0
    # --- cohort layout
    n_patients: int = 240
    n_cohorts: int = 3
    cohort_names: tuple[str, ...] | None = None  # default "SIM-A", "SIM-B", ...
    sites_per_cohort: int = 3
    two_slide_fraction: float = 0.25  # share of patients with two slides
    # --- patches per slide: log-normal, clipped
    patches_median: int = 160
    patches_sigma: float = 0.5
    patches_min: int = 40
    patches_max: int = 3000
    # --- feature space
    feature_dim: int = 384
    feature_dtype: Literal["float16", "float32"] = "float16"
    n_shared_prototypes: int = 4  # roles: stroma, immune, necrosis, normal, then nuisance
    n_specific_prototypes: int = 4  # per cohort; roles: high grade, low grade, mucinous, nuisance
    prototype_separation: float = 4.0  # expected distance between two centres
    within_prototype_rank: int = 8
    within_prototype_spread: float = 1.5  # sd along each within-prototype direction
    site_effect: float = 0.5  # length of each site's batch shift
    slide_effect: float = 0.3  # length of each slide's own (staining) shift
    # --- latents and morphology
    latent_dim: int = 4  # the 4 named latents, plus nuisance latents beyond them
    morphology_signal: float = 1.0
    mix_noise: float = 0.35  # sd of per-patient prototype log-odds unrelated to any latent
    state_signal: float = 1.0  # shift of tumour-prototype patches per unit latent
    spatial_clustering: float = 2.5  # strength of spatial clustering of prototype regions
    cluster_length: float = 3.0  # correlation length of prototype regions, in patches
    immune_clustering_signal: float = 1.0  # how much the immune latent clusters immune patches
    # --- survival (days)
    survival_signal: float = 1.0
    weibull_shape: float = 1.2
    median_survival_days: tuple[float, float] = (700.0, 1800.0)  # spread over the cohorts
    target_event_rate: float = 0.55
    admin_censoring_days: tuple[float, float] = (1825.0, 4380.0)  # end of follow-up, uniform
    # --- molecular labels
    label_signal: float = 1.0
    msi_prevalence: float = 0.25
    # --- omics
    n_genes: int = 300
    ungrouped_gene_fraction: float = 0.2  # genes in no group: pure noise
    driven_gene_fraction: float = 0.6  # share of each group's genes driven by the latents
    omics_signal: float = 1.0
    gene_noise: float = 1.0
    omics_missing_fraction: float = 0.0  # patients left out of omics.csv, at random
    # --- deliberate confounding (0 = none): site choice depends on the aggressiveness latent
    site_confounding: float = 0.0

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ConfigError(f"simulation config has {len(problems)} problem(s):\n{lines}")

    @property
    def cohorts(self) -> tuple[str, ...]:
        """The cohort (cancer type) names, given or ``SIM-A``, ``SIM-B``, ..."""
        if self.cohort_names is not None:
            return tuple(self.cohort_names)
        return tuple(f"SIM-{string.ascii_uppercase[i]}" for i in range(self.n_cohorts))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _config_problems(cfg: SimulationConfig) -> list[str]:
    """Every problem with a configuration, so they are all reported at once."""
    p: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            p.append(message)

    not_int = [
        f.name
        for f in dataclasses.fields(cfg)
        if f.type == "int"
        and (
            isinstance(getattr(cfg, f.name), bool)
            or not isinstance(getattr(cfg, f.name), int | np.integer)
        )
    ]
    if not_int:
        # the range checks below assume integers; report the type problem alone
        return [f"{name} must be an integer, got {getattr(cfg, name)!r}" for name in not_int]
    need(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    need(cfg.n_cohorts >= 1, f"n_cohorts must be >= 1, got {cfg.n_cohorts}")
    need(cfg.n_cohorts <= 26, f"n_cohorts must be <= 26, got {cfg.n_cohorts}")
    need(
        cfg.n_patients >= 2 * max(cfg.n_cohorts, 1),
        f"n_patients must be >= 2 per cohort, got {cfg.n_patients}",
    )
    need(cfg.n_patients <= 100_000, f"n_patients must be <= 100000, got {cfg.n_patients}")
    if cfg.cohort_names is not None:
        names = list(cfg.cohort_names)
        need(len(names) == cfg.n_cohorts, "cohort_names must have n_cohorts entries")
        need(len(set(names)) == len(names), "cohort_names must be distinct")
        need(all(isinstance(n, str) and n for n in names), "cohort_names must be non-empty")
    need(1 <= cfg.sites_per_cohort <= 20, "sites_per_cohort must be in [1, 20]")
    need(0.0 <= cfg.two_slide_fraction <= 1.0, "two_slide_fraction must be in [0, 1]")
    need(cfg.patches_min >= 4, f"patches_min must be >= 4, got {cfg.patches_min}")
    need(
        cfg.patches_min <= cfg.patches_median <= cfg.patches_max,
        "need patches_min <= patches_median <= patches_max",
    )
    need(cfg.patches_max <= 100_000, "patches_max must be <= 100000")
    need(cfg.patches_sigma >= 0.0, "patches_sigma must be >= 0")
    need(2 <= cfg.feature_dim <= 1536, f"feature_dim must be in [2, 1536], got {cfg.feature_dim}")
    need(cfg.feature_dtype in ("float16", "float32"), "feature_dtype must be float16 or float32")
    need(
        cfg.n_shared_prototypes >= 3, "n_shared_prototypes must be >= 3 (stroma, immune, necrosis)"
    )
    need(cfg.n_specific_prototypes >= 3, "n_specific_prototypes must be >= 3 (the tumour roles)")
    need(cfg.prototype_separation > 0.0, "prototype_separation must be > 0")
    need(cfg.within_prototype_rank >= 0, "within_prototype_rank must be >= 0")
    need(
        cfg.within_prototype_rank <= cfg.feature_dim, "within_prototype_rank must be <= feature_dim"
    )
    for name in (
        "within_prototype_spread",
        "site_effect",
        "slide_effect",
        "mix_noise",
        "spatial_clustering",
        "gene_noise",
    ):
        need(getattr(cfg, name) >= 0.0, f"{name} must be >= 0")
    need(cfg.cluster_length > 0.0, "cluster_length must be > 0")
    need(cfg.latent_dim >= 4, f"latent_dim must be >= 4 (the named latents), got {cfg.latent_dim}")
    need(cfg.weibull_shape > 0.0, "weibull_shape must be > 0")
    lo, hi = cfg.median_survival_days
    need(0.0 < lo <= hi, "median_survival_days must be (low, high) with 0 < low <= high")
    lo, hi = cfg.admin_censoring_days
    need(0.0 < lo <= hi, "admin_censoring_days must be (low, high) with 0 < low <= high")
    need(0.0 < cfg.target_event_rate < 1.0, "target_event_rate must be in (0, 1)")
    need(0.0 < cfg.msi_prevalence < 1.0, "msi_prevalence must be in (0, 1)")
    need(cfg.n_genes >= 12, f"n_genes must be >= 12, got {cfg.n_genes}")
    need(0.0 <= cfg.ungrouped_gene_fraction < 1.0, "ungrouped_gene_fraction must be in [0, 1)")
    need(0.0 <= cfg.driven_gene_fraction <= 1.0, "driven_gene_fraction must be in [0, 1]")
    need(0.0 <= cfg.omics_missing_fraction < 1.0, "omics_missing_fraction must be in [0, 1)")
    n_grouped = cfg.n_genes - round(cfg.n_genes * cfg.ungrouped_gene_fraction)
    need(n_grouped >= len(GENE_GROUP_LOADINGS), "need at least one gene per gene group")
    for name in ("morphology_signal", "state_signal", "immune_clustering_signal"):
        need(math.isfinite(getattr(cfg, name)), f"{name} must be finite")
    for name in ("survival_signal", "label_signal", "omics_signal", "site_confounding"):
        need(math.isfinite(getattr(cfg, name)), f"{name} must be finite")
    return p


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """Where a simulated cohort was written, and a summary of it."""

    out_dir: Path
    cohort_table: Path
    features_dir: Path
    omics_table: Path
    gene_groups: Path
    truth: Path
    truth_prototypes: Path
    truth_patch_labels: Path
    summary: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The world: prototypes, feature-space geometry, sites and model parameters


@dataclass(frozen=True, kw_only=True)
class _Prototype:
    index: int
    name: str
    role: str  # a named role or "nuisance"
    cohort: str | None  # None for shared prototypes


@dataclass(frozen=True, kw_only=True)
class _World:
    prototypes: tuple[_Prototype, ...]
    cohort_protos: tuple[np.ndarray, ...]  # per cohort: global indices of its prototypes
    base_logits: np.ndarray  # (C, K); only the cohort's own prototypes are used
    loadings: np.ndarray  # (K, L) log-odds per unit latent
    state_latent: np.ndarray  # (K,) latent index driving a prototype's state, -1 for none
    site_codes: tuple[tuple[str, ...], ...]  # per cohort
    log_lambda: np.ndarray  # (C,) Weibull log scale per cohort
    censor_rate: np.ndarray  # (C,) rate of the exponential random censoring, per day
    msi_intercept: float
    subtype_intercepts: np.ndarray  # (C, n_subtypes)
    # feature geometry, in units of the isotropic noise sd
    centres: np.ndarray  # (K, D)
    lowrank: np.ndarray  # (K, r, D)
    state_dirs: np.ndarray  # (K, D) unit vectors
    site_shift: dict[str, np.ndarray]  # site code -> (D,)
    offset: np.ndarray  # (D,) global mean of the embedding
    scale: np.ndarray  # (D,) per-dimension scale (includes the variance normalisation)


def _streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent random streams, so that e.g. changing feature_dim leaves outcomes unchanged."""
    names = ("model", "patients", "outcomes", "omics", "calibration", "geometry", "patches")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return dict(zip(names, children, strict=True))


def _make_prototypes(
    cfg: SimulationConfig,
) -> tuple[tuple[_Prototype, ...], tuple[np.ndarray, ...]]:
    protos: list[_Prototype] = []
    for i in range(cfg.n_shared_prototypes):
        role = SHARED_ROLES[i] if i < len(SHARED_ROLES) else "nuisance"
        name = role if role != "nuisance" else f"shared_nuisance_{i}"
        protos.append(_Prototype(index=len(protos), name=name, role=role, cohort=None))
    shared = np.arange(cfg.n_shared_prototypes)
    per_cohort: list[np.ndarray] = []
    for cohort in cfg.cohorts:
        own = []
        for j in range(cfg.n_specific_prototypes):
            role = SPECIFIC_ROLES[j] if j < len(SPECIFIC_ROLES) else "nuisance"
            label = role if role != "nuisance" else f"nuisance_{j}"
            own.append(len(protos))
            protos.append(
                _Prototype(index=len(protos), name=f"{cohort}/{label}", role=role, cohort=cohort)
            )
        per_cohort.append(np.concatenate([shared, np.asarray(own, dtype=int)]))
    return tuple(protos), tuple(per_cohort)


def _site_codes(cfg: SimulationConfig, rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
    """Distinct 2-character tissue-source-site codes, as in TCGA barcodes (e.g. "A2", "BH")."""
    pool = np.array([a + b for a in _BARCODE_CHARS for b in _BARCODE_CHARS])
    codes = rng.choice(pool, size=cfg.n_cohorts * cfg.sites_per_cohort, replace=False)
    s = cfg.sites_per_cohort
    return tuple(tuple(sorted(codes[c * s : (c + 1) * s].tolist())) for c in range(cfg.n_cohorts))


def _make_world(cfg: SimulationConfig, streams: dict[str, np.random.SeedSequence]) -> _World:
    rng = np.random.default_rng(streams["model"])
    protos, cohort_protos = _make_prototypes(cfg)
    k, latent_dim, n_c = len(protos), cfg.latent_dim, cfg.n_cohorts

    loadings = np.zeros((k, latent_dim))
    state_latent = np.full(k, -1, dtype=int)
    for p in protos:
        if p.role in ROLE_LOADINGS:
            latent, value = ROLE_LOADINGS[p.role]
            loadings[p.index, latent] = value
        state_latent[p.index] = ROLE_STATE.get(p.role, -1)
    if latent_dim > len(LATENT_NAMES):
        # nuisance latents move the morphology mix (heterogeneity) but no outcome or gene
        loadings[:, len(LATENT_NAMES) :] = rng.normal(0.0, 0.5, size=(k, latent_dim - 4))

    base = np.array([ROLE_BASE_LOGITS.get(p.role, 0.0) for p in protos])
    base_logits = base[None, :] + rng.normal(0.0, 0.3, size=(n_c, k))

    site_codes = _site_codes(cfg, rng)
    lo, hi = cfg.median_survival_days
    medians = np.linspace(lo, hi, n_c) if n_c > 1 else np.array([math.sqrt(lo * hi)])
    medians = rng.permutation(medians)
    # Weibull S(t) = exp(-lambda t^k e^eta): the median at eta = 0 is (ln 2 / lambda)^(1/k)
    log_lambda = np.log(math.log(2.0)) - cfg.weibull_shape * np.log(medians)
    subtype_intercepts = rng.normal(0.0, 0.3, size=(n_c, len(SUBTYPES)))

    censor_rate, msi_intercept = _calibrate(cfg, log_lambda, streams["calibration"])
    geometry = _make_geometry(cfg, k, site_codes, streams["geometry"])
    return _World(
        prototypes=protos,
        cohort_protos=cohort_protos,
        base_logits=base_logits,
        loadings=loadings,
        state_latent=state_latent,
        site_codes=site_codes,
        log_lambda=log_lambda,
        censor_rate=censor_rate,
        msi_intercept=msi_intercept,
        subtype_intercepts=subtype_intercepts,
        **geometry,
    )


def _random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _make_geometry(
    cfg: SimulationConfig,
    k: int,
    site_codes: tuple[tuple[str, ...], ...],
    seq: np.random.SeedSequence,
) -> dict[str, Any]:
    """Prototype centres, within-prototype subspaces, batch shifts and the output scaling."""
    rng = np.random.default_rng(seq)
    d, r = cfg.feature_dim, cfg.within_prototype_rank
    # centres ~ N(0, sep^2 / (2D) I): the expected squared distance of two centres is sep^2
    centres = rng.normal(0.0, cfg.prototype_separation / math.sqrt(2.0 * d), size=(k, d))
    lowrank = np.zeros((k, r, d))
    for i in range(k):
        if r > 0:
            q, _ = np.linalg.qr(rng.standard_normal((d, r)))
            lowrank[i] = cfg.within_prototype_spread * q.T
    state_dirs = _random_unit(rng, k, d)
    codes = [code for cohort in site_codes for code in cohort]
    shifts = cfg.site_effect * _random_unit(rng, len(codes), d)
    site_shift = {code: shifts[i] for i, code in enumerate(codes)}
    # expected per-dimension variance of the raw features; dividing by its root makes the
    # embedding roughly unit-variance per dimension, as foundation-model features are
    raw_var = (
        1.0
        + cfg.prototype_separation**2 / (2.0 * d)
        + r * cfg.within_prototype_spread**2 / d
        + (cfg.site_effect**2 + cfg.slide_effect**2) / d
    )
    offset = rng.normal(0.0, 0.5, size=d)
    scale = np.exp(rng.normal(0.0, 0.2, size=d)) / math.sqrt(raw_var)
    return {
        "centres": centres,
        "lowrank": lowrank,
        "state_dirs": state_dirs,
        "site_shift": site_shift,
        "offset": offset,
        "scale": scale,
    }


def _weibull_times(
    rng: np.random.Generator, eta: np.ndarray, log_lambda: np.ndarray, shape: float
) -> np.ndarray:
    """Event times of the Weibull PH model h(t) = lambda k t^(k-1) exp(eta), by inversion."""
    e = rng.exponential(1.0, size=eta.shape)
    return np.exp((np.log(e) - log_lambda - eta) / shape)


def _calibrate(
    cfg: SimulationConfig, log_lambda: np.ndarray, seq: np.random.SeedSequence
) -> tuple[np.ndarray, float]:
    """Censoring rate per cohort and the MSI intercept, fitted on a large reference population.

    The reference patients are drawn from the same latent distribution but are not the
    simulated patients, so the censoring mechanism stays independent of any one sample.
    """
    rng = np.random.default_rng(seq)
    z = rng.standard_normal((_N_CALIBRATION, 4))
    eta = cfg.survival_signal * z @ np.asarray(HAZARD_COEFS)
    rates = np.zeros(len(log_lambda))
    for c, ll in enumerate(log_lambda):
        t = _weibull_times(rng, eta, np.full_like(eta, ll), cfg.weibull_shape)
        admin = rng.uniform(*cfg.admin_censoring_days, size=t.shape)
        before_admin = t < admin

        # P(event) = E[ P(C > T) 1{T < A} ] = E[ exp(-rate T) 1{T < A} ], decreasing in rate
        def event_rate(rate: float, t: np.ndarray = t, ok: np.ndarray = before_admin) -> float:
            return float(np.mean(np.exp(-rate * t) * ok))

        cohort = cfg.cohorts[c]
        reachable = event_rate(0.0)
        if reachable < cfg.target_event_rate:
            raise ConfigError(
                f"target_event_rate {cfg.target_event_rate} is unreachable in cohort {cohort}: "
                f"administrative censoring alone leaves an event rate of {reachable:.2f}; lower "
                "the target, shorten median_survival_days or lengthen admin_censoring_days"
            )
        hi = 1.0 / float(np.median(t))
        while event_rate(hi) > cfg.target_event_rate:
            hi *= 4.0
        rates[c] = optimize.brentq(lambda r: event_rate(r) - cfg.target_event_rate, 0.0, hi)
    msi_lin = cfg.label_signal * z @ np.asarray(MSI_COEFS)
    intercept = optimize.brentq(
        lambda b: float(np.mean(special.expit(msi_lin + b))) - cfg.msi_prevalence, -50.0, 50.0
    )
    return rates, float(intercept)


# ---------------------------------------------------------------------------------------------
# Patients: cohort, site, latents, barcodes, slides and outcomes


@dataclass(frozen=True, kw_only=True)
class _Patients:
    patient_id: list[str]
    cohort: np.ndarray  # (P,) cohort index
    site: list[str]
    z: np.ndarray  # (P, L)
    mix_logits: np.ndarray  # (P, K); -inf outside the patient's cohort
    immune_beta: np.ndarray  # (P,) spatial clustering strength of the immune prototype
    slide_patches: list[list[int]]  # per patient, patches per slide


def _draw_patients(cfg: SimulationConfig, world: _World, seq: np.random.SeedSequence) -> _Patients:
    rng = np.random.default_rng(seq)
    n, n_c = cfg.n_patients, cfg.n_cohorts
    cohort = np.repeat(np.arange(n_c), [n // n_c + (c < n % n_c) for c in range(n_c)])
    z = rng.standard_normal((n, cfg.latent_dim))
    site = _draw_sites(cfg, world, cohort, z, rng)

    k = len(world.prototypes)
    noise = rng.normal(0.0, cfg.mix_noise, size=(n, k))
    mix_logits = np.full((n, k), -np.inf)
    for c, idx in enumerate(world.cohort_protos):
        rows = np.flatnonzero(cohort == c)
        lin = world.base_logits[c, idx] + cfg.morphology_signal * z[rows] @ world.loadings[idx].T
        mix_logits[np.ix_(rows, idx)] = lin + noise[np.ix_(rows, idx)]
    # immune patches: diffuse when the immune latent is low, clustered (TLS-like) when high;
    # equals spatial_clustering at z = 0
    immune_beta = (
        2.0 * cfg.spatial_clustering * special.expit(cfg.immune_clustering_signal * z[:, IMMUNE])
    )

    # bag size and slide count are drawn independently of every latent (no size leakage)
    two = rng.random(n) < cfg.two_slide_fraction
    slide_patches: list[list[int]] = []
    for i in range(n):
        counts = rng.lognormal(math.log(cfg.patches_median), cfg.patches_sigma, size=1 + two[i])
        slide_patches.append(
            np.clip(np.rint(counts), cfg.patches_min, cfg.patches_max).astype(int).tolist()
        )
    patient_id = _barcodes(site, rng)
    return _Patients(
        patient_id=patient_id,
        cohort=cohort,
        site=site,
        z=z,
        mix_logits=mix_logits,
        immune_beta=immune_beta,
        slide_patches=slide_patches,
    )


def _draw_sites(
    cfg: SimulationConfig,
    world: _World,
    cohort: np.ndarray,
    z: np.ndarray,
    rng: np.random.Generator,
) -> list[str]:
    """Tissue source site per patient: uniform, or tilted by aggressiveness when confounded."""
    s = cfg.sites_per_cohort
    tilt = np.linspace(-1.0, 1.0, s) if s > 1 else np.zeros(1)
    logits = cfg.site_confounding * z[:, [AGGR]] * tilt[None, :]
    probs = special.softmax(logits, axis=1)
    u = rng.random(len(cohort))
    choice = np.minimum((np.cumsum(probs, axis=1) < u[:, None]).sum(axis=1), s - 1)
    return [world.site_codes[c][j] for c, j in zip(cohort, choice, strict=True)]


def _barcodes(site: list[str], rng: np.random.Generator) -> list[str]:
    """TCGA-like patient barcodes "TCGA-<site>-<4 alnum>", unique across the cohort."""
    seen: set[str] = set()
    ids: list[str] = []
    for code in site:
        while True:
            tail = "".join(rng.choice(list(_BARCODE_CHARS), size=4))
            pid = f"TCGA-{code}-{tail}"
            if pid not in seen:
                break
        seen.add(pid)
        ids.append(pid)
    return ids


def _slide_ids(patient_id: str, n_slides: int) -> list[str]:
    return [f"{patient_id}-01Z-00-DX{j + 1}" for j in range(n_slides)]


@dataclass(frozen=True, kw_only=True)
class _Outcomes:
    eta: np.ndarray  # within-cohort linear predictor
    risk: np.ndarray  # eta + log lambda_cohort: the log hazard ratio across the whole cohort
    event_time: np.ndarray
    censor_time: np.ndarray  # min(random censoring, administrative censoring)
    time: np.ndarray
    event: np.ndarray
    p_msi: np.ndarray
    msi: np.ndarray
    p_subtype: np.ndarray  # (P, n_subtypes)
    subtype: np.ndarray  # (P,) index


def _draw_outcomes(
    cfg: SimulationConfig, world: _World, pts: _Patients, seq: np.random.SeedSequence
) -> _Outcomes:
    rng = np.random.default_rng(seq)
    z4 = pts.z[:, :4]
    eta = cfg.survival_signal * z4 @ np.asarray(HAZARD_COEFS)
    log_lambda = world.log_lambda[pts.cohort]
    t_event = _weibull_times(rng, eta, log_lambda, cfg.weibull_shape)
    rate = world.censor_rate[pts.cohort]
    # independent censoring: exponential dropout plus a uniform end of follow-up
    with np.errstate(divide="ignore"):
        t_random = rng.exponential(1.0, size=eta.shape) / rate
    t_admin = rng.uniform(*cfg.admin_censoring_days, size=eta.shape)
    t_censor = np.minimum(t_random, t_admin)
    observed = np.minimum(t_event, t_censor)
    event = (t_event <= t_censor).astype(int)
    # days to 0.1, at least one day, as in clinical tables
    obs_time = np.maximum(np.round(observed, 1), 1.0)

    p_msi = special.expit(cfg.label_signal * z4 @ np.asarray(MSI_COEFS) + world.msi_intercept)
    msi = (rng.random(len(p_msi)) < p_msi).astype(int)
    sub_logits = cfg.label_signal * SUBTYPE_SLOPE * z4[:, list(SUBTYPE_LATENTS)]
    sub_logits = sub_logits + world.subtype_intercepts[pts.cohort]
    p_sub = special.softmax(sub_logits, axis=1)
    u = rng.random(len(p_sub))
    subtype = np.minimum((np.cumsum(p_sub, axis=1) < u[:, None]).sum(axis=1), len(SUBTYPES) - 1)
    return _Outcomes(
        eta=eta,
        risk=eta + log_lambda,
        event_time=t_event,
        censor_time=t_censor,
        time=obs_time,
        event=event,
        p_msi=p_msi,
        msi=msi,
        p_subtype=p_sub,
        subtype=subtype,
    )


# ---------------------------------------------------------------------------------------------
# Slides: tissue layout, prototype regions and patch features


def _tissue_layout(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Grid cells (row, col) of n tissue patches forming one to three blobs; grid height, width."""
    area = n * rng.uniform(2.5, 4.0)
    aspect = rng.uniform(0.6, 1.6)  # width / height
    h = max(4, math.ceil(math.sqrt(area / aspect)))
    w = max(4, math.ceil(area / h))
    n_blobs = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    weights = rng.dirichlet(np.full(n_blobs, 3.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    field = np.zeros((h, w))
    for b in range(n_blobs):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        radius = max(1.0, math.sqrt(n * weights[b] / math.pi)) * rng.uniform(0.8, 1.2)
        sx = radius * math.sqrt(rng.uniform(0.6, 1.6))  # a little elongated
        sy = radius * radius / sx
        field += weights[b] * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    # an irregular boundary: add smooth noise before thresholding
    rough = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=1.5)
    field = field / field.max() + 0.15 * rough / (rough.std() + 1e-12)
    order = np.argsort(-field.ravel(), kind="stable")[:n]
    cells = np.sort(order)  # raster order: by row (y), then column (x)
    return cells // w, cells % w, h, w


def _assign_prototypes(
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    mix: np.ndarray,
    beta: np.ndarray,
    cluster_length: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Local prototype index per patch: multinomial counts placed in spatially clustered regions.

    The counts per prototype are Multinomial(n, mix), so the spatial arrangement never changes
    how much of each prototype a slide holds. Each prototype gets a smooth unit-variance Gaussian
    random field; a patch's score for prototype k is beta_k * field_k + Gumbel noise, and patches
    are filled greedily from the highest scores while the prototype's quota lasts. beta_k = 0
    places prototype k at random (diffuse); a large beta_k packs it into its field's peaks.
    """
    n, k = len(rows), len(mix)
    quota = rng.multinomial(n, mix)
    scores = np.empty((n, k))
    for j in range(k):
        g = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=cluster_length)
        scores[:, j] = beta[j] * g[rows, cols] / (g.std() + 1e-12)
    scores += rng.gumbel(size=scores.shape)
    return _fill_quotas(scores, quota)


def _fill_quotas(scores: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Give each row a column, each column exactly ``quota`` rows, favouring high scores.

    In each round every unassigned row proposes its best column that still has room; a column
    keeps its highest-scoring proposers up to its quota and is closed when full. A round either
    assigns every row or closes a column, so there are at most (columns + 1) rounds.
    """
    quota = quota.copy()
    labels = np.full(scores.shape[0], -1)
    while (open_rows := np.flatnonzero(labels < 0)).size:
        masked = np.where(quota[None, :] > 0, scores[open_rows], -np.inf)
        proposal = np.argmax(masked, axis=1)
        for j in np.unique(proposal):
            rows = open_rows[proposal == j]
            best = rows[np.argsort(-scores[rows, j], kind="stable")[: quota[j]]]
            labels[best] = j
            quota[j] -= len(best)
    return labels


def _patch_features(
    world: _World,
    labels: np.ndarray,
    z: np.ndarray,
    site: str,
    cfg: SimulationConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Features of one slide's patches from their global prototype labels (float32)."""
    n, d = len(labels), cfg.feature_dim
    # per-prototype mean: centre, plus the tumour cell state (a shift along the prototype's
    # state direction that grows with its latent)
    state = np.where(world.state_latent >= 0, z[np.maximum(world.state_latent, 0)], 0.0)
    means = world.centres + cfg.state_signal * state[:, None] * world.state_dirs
    shift = world.site_shift[site] + cfg.slide_effect * _random_unit(rng, 1, d)[0]
    x = rng.standard_normal((n, d), dtype=np.float32)  # isotropic patch noise (unit sd)
    x += (means + shift[None, :]).astype(np.float32)[labels]
    r = world.lowrank.shape[1]
    if r > 0:
        u = rng.standard_normal((n, r), dtype=np.float32)
        for k in np.unique(labels):
            sel = np.flatnonzero(labels == k)
            x[sel] += u[sel] @ world.lowrank[k].astype(np.float32)
    x *= world.scale.astype(np.float32)
    x += world.offset.astype(np.float32)
    return x


@dataclass(frozen=True, kw_only=True)
class _SlideOut:
    slide_id: str
    n_patches: int
    labels: np.ndarray  # global prototype index per patch, in file order


def _simulate_patient_slides(
    i: int,
    cfg: SimulationConfig,
    world: _World,
    pts: _Patients,
    seq: np.random.SeedSequence,
    features_dir: Path,
    fingerprint: str,
) -> list[_SlideOut]:
    rng = np.random.default_rng(seq)
    c = int(pts.cohort[i])
    idx = world.cohort_protos[c]
    mix = special.softmax(pts.mix_logits[i, idx])
    beta = np.full(len(idx), cfg.spatial_clustering)
    beta[[world.prototypes[g].role == "immune" for g in idx]] = pts.immune_beta[i]
    out = []
    slide_ids = _slide_ids(pts.patient_id[i], len(pts.slide_patches[i]))
    for slide_id, n in zip(slide_ids, pts.slide_patches[i], strict=True):
        rows, cols, h, w = _tissue_layout(n, rng)
        local = _assign_prototypes(rows, cols, (h, w), mix, beta, cfg.cluster_length, rng)
        labels = idx[local]
        feats = _patch_features(world, labels, pts.z[i], pts.site[i], cfg, rng)
        # tissue sits somewhere on a larger glass slide: margins carry no information
        left, top, right, bottom = rng.integers(2, 16, size=4)
        coords = np.stack(
            [(left + cols) * PATCH_SIZE_LEVEL0, (top + rows) * PATCH_SIZE_LEVEL0], axis=1
        ).astype(np.int64)
        grid = PatchGrid(
            patch_size=PATCH_SIZE,
            patch_size_level0=PATCH_SIZE_LEVEL0,
            target_mpp=TARGET_MPP,
            level0_mpp=LEVEL0_MPP,
            level0_width=int((left + w + right) * PATCH_SIZE_LEVEL0),
            level0_height=int((top + h + bottom) * PATCH_SIZE_LEVEL0),
            overlap=0,
        )
        write_feature_file(
            features_dir / f"{slide_id}.h5",
            feats,
            coords,
            grid=grid,
            encoder=ENCODER_NAME,
            weights_fingerprint=fingerprint,
            dtype=cfg.feature_dtype,
        )
        out.append(_SlideOut(slide_id=slide_id, n_patches=n, labels=labels))
    return out


# ---------------------------------------------------------------------------------------------
# Omics


@dataclass(frozen=True, kw_only=True)
class _Omics:
    table: pd.DataFrame
    groups: dict[str, list[str]]
    genes: dict[str, dict[str, Any]]  # gene -> group, driven, loadings


def _draw_omics(cfg: SimulationConfig, pts: _Patients, seq: np.random.SeedSequence) -> _Omics:
    """log2-scale expression: baseline + cohort offset + loadings . z + gene noise."""
    rng = np.random.default_rng(seq)
    n_ungrouped = round(cfg.n_genes * cfg.ungrouped_gene_fraction)
    n_grouped = cfg.n_genes - n_ungrouped
    group_names = list(GENE_GROUP_LOADINGS)
    sizes = [n_grouped // 6 + (g < n_grouped % 6) for g in range(6)]
    names = [f"SIMG{j:05d}" for j in rng.permutation(cfg.n_genes) + 1]

    loadings = np.zeros((cfg.n_genes, 4))
    info: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    start = 0
    for g, size in enumerate(sizes):
        direction = np.asarray(GENE_GROUP_LOADINGS[group_names[g]])
        direction = direction / np.linalg.norm(direction)
        n_driven = round(size * cfg.driven_gene_fraction)
        members = names[start : start + size]
        for j, gene in enumerate(members):
            driven = j < n_driven
            if driven:
                # most genes follow the group direction, some are anti-correlated with it
                sign = -1.0 if rng.random() < 0.2 else 1.0
                loadings[start + j] = cfg.omics_signal * sign * rng.uniform(0.5, 1.0) * direction
            info[gene] = {
                "group": group_names[g],
                "driven": driven,
                "loadings": loadings[start + j].round(6).tolist(),
            }
        groups[group_names[g]] = sorted(members)
        start += size
    for gene in names[start:]:
        info[gene] = {"group": None, "driven": False, "loadings": [0.0] * 4}

    n = len(pts.patient_id)
    baseline = rng.normal(6.0, 1.5, size=cfg.n_genes)
    cohort_offset = rng.normal(0.0, 0.5, size=(cfg.n_cohorts, cfg.n_genes))
    expr = baseline[None, :] + cohort_offset[pts.cohort] + pts.z[:, :4] @ loadings.T
    expr += rng.normal(0.0, cfg.gene_noise, size=(n, cfg.n_genes))
    keep = rng.random(n) >= cfg.omics_missing_fraction  # missing at random, independent of z
    order = sorted(names)
    table = pd.DataFrame(np.round(expr, 3), columns=names)[order]
    table.insert(0, "patient_id", pts.patient_id)
    table = table[keep].sort_values("patient_id", kind="stable").reset_index(drop=True)
    return _Omics(table=table, groups=groups, genes={g: info[g] for g in order})


# ---------------------------------------------------------------------------------------------
# Public entry points


def simulate_cohort(
    out_dir: str | os.PathLike[str],
    config: SimulationConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Simulate a cohort into ``out_dir``; deterministic given ``config.seed``.

    Raises ``ConfigError`` when ``out_dir`` already holds a cohort and ``overwrite`` is False.
    ``progress(done, total)`` is called after each patient's slides are written.
    """
    cfg = config or SimulationConfig()
    started = time.perf_counter()
    out = Path(out_dir)
    if (out / "cohort.csv").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a cohort (cohort.csv); pass overwrite=True")
    features_dir = out / "features"
    features_dir.mkdir(parents=True, exist_ok=True)

    streams = _streams(cfg.seed)
    world = _make_world(cfg, streams)
    pts = _draw_patients(cfg, world, streams["patients"])
    outcomes = _draw_outcomes(cfg, world, pts, streams["outcomes"])
    omics = _draw_omics(cfg, pts, streams["omics"])
    fingerprint = _fingerprint(cfg)

    patch_seqs = streams["patches"].spawn(cfg.n_patients)
    slides: list[list[_SlideOut]] = []
    for i in range(cfg.n_patients):
        slides.append(
            _simulate_patient_slides(i, cfg, world, pts, patch_seqs[i], features_dir, fingerprint)
        )
        if progress is not None:
            progress(i + 1, cfg.n_patients)
    _remove_stale_features(features_dir, {s.slide_id for ss in slides for s in ss})

    table = _cohort_table(cfg, pts, outcomes, slides)
    paths = _result_paths(out)
    write_table(paths["cohort_table"], table)
    write_table(paths["omics_table"], omics.table)
    write_json(paths["gene_groups"], omics.groups)
    _write_npy(paths["truth_prototypes"], _output_centres(world).astype(np.float32))
    _write_patch_labels(paths["truth_patch_labels"], slides)
    summary = _summary(cfg, pts, outcomes, slides)
    truth = _truth(cfg, world, pts, outcomes, omics, slides, summary, fingerprint)
    write_json(paths["truth"], truth)

    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {**summary, "disk_mb": round(disk / 2**20, 2)}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return SimulationResult(out_dir=out, features_dir=features_dir, summary=summary, **paths)


def _result_paths(out: Path) -> dict[str, Path]:
    return {
        "cohort_table": out / "cohort.csv",
        "omics_table": out / "omics.csv",
        "gene_groups": out / "gene_groups.json",
        "truth": out / "truth.json",
        "truth_prototypes": out / "truth_prototypes.npy",
        "truth_patch_labels": out / "truth_patch_labels.npz",
    }


def _fingerprint(cfg: SimulationConfig) -> str:
    """Identifies the feature space: equal for simulations that share the geometry."""
    keys = (
        "seed",
        "feature_dim",
        "n_cohorts",
        "cohort_names",
        "sites_per_cohort",
        "n_shared_prototypes",
        "n_specific_prototypes",
        "prototype_separation",
        "within_prototype_rank",
        "within_prototype_spread",
        "site_effect",
    )
    blob = json.dumps({key: getattr(cfg, key) for key in keys}, sort_keys=True)
    return "sim-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _remove_stale_features(features_dir: Path, keep: set[str]) -> None:
    """On overwrite, drop feature files of an earlier simulation that this one does not have."""
    for f in features_dir.glob("*.h5"):
        if f.stem not in keep:
            f.unlink()


def _write_npy(target: Path, array: np.ndarray) -> None:
    with atomic_path(target, suffix=".npy.tmp") as tmp, tmp.open("wb") as fh:
        np.save(fh, array)


def _write_patch_labels(target: Path, slides: list[list[_SlideOut]]) -> None:
    arrays: dict[str, Any] = {s.slide_id: s.labels.astype(np.int16) for ss in slides for s in ss}
    with atomic_path(target, suffix=".npz.tmp") as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, **arrays)


def _output_centres(world: _World) -> np.ndarray:
    """Prototype centres in the space of the written features (offset and scale applied)."""
    return world.offset[None, :] + world.centres * world.scale[None, :]


def _cohort_table(
    cfg: SimulationConfig, pts: _Patients, out: _Outcomes, slides: list[list[_SlideOut]]
) -> pd.DataFrame:
    rows = []
    for i, pid in enumerate(pts.patient_id):
        for s in slides[i]:
            rows.append(
                {
                    "patient_id": pid,
                    "slide_id": s.slide_id,
                    "cohort": cfg.cohorts[int(pts.cohort[i])],
                    "site": pts.site[i],
                    "time": float(out.time[i]),
                    "event": int(out.event[i]),
                    "msi": int(out.msi[i]),
                    "subtype": SUBTYPES[int(out.subtype[i])],
                }
            )
    table = pd.DataFrame(rows)
    return table.sort_values(["cohort", "patient_id", "slide_id"], kind="stable").reset_index(
        drop=True
    )


def _summary(
    cfg: SimulationConfig, pts: _Patients, out: _Outcomes, slides: list[list[_SlideOut]]
) -> dict[str, Any]:
    n_patches = [s.n_patches for ss in slides for s in ss]
    within = [
        _harrell_c_index(out.time[m], out.event[m], out.eta[m])
        for m in (pts.cohort == c for c in range(cfg.n_cohorts))
    ]
    auc_sub = [_binary_auc(out.subtype == j, out.p_subtype[:, j]) for j in range(len(SUBTYPES))]
    return {
        "n_patients": cfg.n_patients,
        "n_cohorts": cfg.n_cohorts,
        "n_slides": len(n_patches),
        "n_patches": int(np.sum(n_patches)),
        "patches_per_slide_median": float(np.median(n_patches)),
        "event_rate": round(float(out.event.mean()), 4),
        "msi_prevalence": round(float(out.msi.mean()), 4),
        "oracle_c_index": _round(_harrell_c_index(out.time, out.event, out.risk)),
        "oracle_c_index_within_cohort": _round(float(np.nanmean(within))),
        "oracle_auc_msi": _round(_binary_auc(out.msi, out.p_msi)),
        "oracle_auc_subtype": _round(float(np.nanmean(auc_sub))),
    }


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 4)


def _harrell_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: among pairs where the earlier time is an event, the share ordered by risk.

    Higher risk should mean shorter time. Ties in risk count 1/2; an event tied in time with a
    censored time counts as earlier (the censored patient was known alive then); two events tied
    in time are not comparable. NaN when no pair is comparable.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=float)
    concordant = comparable = 0.0
    idx = np.flatnonzero(event)
    for start in range(0, len(idx), 512):  # chunks keep memory at 512 x n
        i = idx[start : start + 512]
        later = (time[None, :] > time[i, None]) | (
            (time[None, :] == time[i, None]) & ~event[None, :]
        )
        diff = risk[i, None] - risk[None, :]
        comparable += later.sum()
        concordant += (later & (diff > 0)).sum() + 0.5 * (later & (diff == 0)).sum()
    return float(concordant / comparable) if comparable else float("nan")


def _binary_auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney probability (ties 1/2); NaN when one class is absent."""
    label = np.asarray(label).astype(bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(score, dtype=float))
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _truth(
    cfg: SimulationConfig,
    world: _World,
    pts: _Patients,
    out: _Outcomes,
    omics: _Omics,
    slides: list[list[_SlideOut]],
    summary: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    """Everything needed to score a model against the truth; deterministic given the seed."""
    return {
        "format": "oncoslide-simulation-truth",
        "version": 1,
        "config": cfg.to_dict(),
        "weights_fingerprint": fingerprint,
        "summary": summary,
        "parameters": _truth_parameters(cfg, world),
        "prototypes": _truth_prototypes(cfg, world),
        "genes": omics.genes,
        "patients": _truth_patients(cfg, world, pts, out, omics, slides),
    }


def _truth_patients(
    cfg: SimulationConfig,
    world: _World,
    pts: _Patients,
    out: _Outcomes,
    omics: _Omics,
    slides: list[list[_SlideOut]],
) -> list[dict[str, Any]]:
    names = [p.name for p in world.prototypes]
    in_omics = set(omics.table["patient_id"])
    patients = []
    for i, pid in enumerate(pts.patient_id):
        idx = world.cohort_protos[int(pts.cohort[i])]
        probs = special.softmax(pts.mix_logits[i, idx])
        labels = np.concatenate([s.labels for s in slides[i]])
        counts = np.bincount(labels, minlength=len(names))
        patients.append(
            {
                "patient_id": pid,
                "cohort": cfg.cohorts[int(pts.cohort[i])],
                "site": pts.site[i],
                "slides": [s.slide_id for s in slides[i]],
                "n_patches": len(labels),
                "z": np.round(pts.z[i], 6).tolist(),
                "linear_predictor": round(float(out.eta[i]), 6),
                "risk": round(float(out.risk[i]), 6),
                "event_time": round(float(out.event_time[i]), 3),
                "censor_time": round(float(out.censor_time[i]), 3),
                "p_msi": round(float(out.p_msi[i]), 6),
                "p_subtype": dict(
                    zip(SUBTYPES, np.round(out.p_subtype[i], 6).tolist(), strict=True)
                ),
                "mix_expected": {
                    names[g]: round(float(p), 6) for g, p in zip(idx, probs, strict=True)
                },
                "mix_realised": {names[g]: round(float(counts[g] / len(labels)), 6) for g in idx},
                "immune_clustering": round(float(pts.immune_beta[i]), 6),
                "has_omics": pid in in_omics,
            }
        )
    return patients


def _truth_prototypes(cfg: SimulationConfig, world: _World) -> list[dict[str, Any]]:
    """Which prototype carries which signal (mix loading and cell-state latent)."""
    prototypes = []
    for p in world.prototypes:
        latent, _ = ROLE_LOADINGS.get(p.role, (None, 0.0))
        state = int(world.state_latent[p.index])
        prototypes.append(
            {
                "index": p.index,
                "name": p.name,
                "role": p.role,
                "cohort": p.cohort,
                "signal_latent": None if latent is None else LATENT_NAMES[latent],
                "loadings": np.round(world.loadings[p.index] * cfg.morphology_signal, 6).tolist(),
                "state_latent": None if state < 0 else LATENT_NAMES[state],
            }
        )
    return prototypes


def _truth_parameters(cfg: SimulationConfig, world: _World) -> dict[str, Any]:
    names = [p.name for p in world.prototypes]

    def per_latent(coefs: Sequence[float], factor: float) -> dict[str, float]:
        return dict(zip(LATENT_NAMES, np.multiply(coefs, factor).tolist(), strict=True))

    return {
        "latent_names": list(LATENT_NAMES)
        + [f"nuisance_{j}" for j in range(cfg.latent_dim - len(LATENT_NAMES))],
        "hazard_coefs": per_latent(HAZARD_COEFS, cfg.survival_signal),
        "weibull_shape": cfg.weibull_shape,
        "log_lambda": dict(zip(cfg.cohorts, np.round(world.log_lambda, 6).tolist(), strict=True)),
        "censor_rate_per_day": dict(zip(cfg.cohorts, world.censor_rate.tolist(), strict=True)),
        "msi_coefs": per_latent(MSI_COEFS, cfg.label_signal),
        "msi_intercept": world.msi_intercept,
        "subtypes": list(SUBTYPES),
        "subtype_latents": [LATENT_NAMES[j] for j in SUBTYPE_LATENTS],
        "subtype_slope": SUBTYPE_SLOPE * cfg.label_signal,
        "subtype_intercepts": {
            c: np.round(world.subtype_intercepts[i], 6).tolist() for i, c in enumerate(cfg.cohorts)
        },
        "base_logits": {
            c: {names[g]: round(float(world.base_logits[i, g]), 6) for g in world.cohort_protos[i]}
            for i, c in enumerate(cfg.cohorts)
        },
        "sites": {c: list(world.site_codes[i]) for i, c in enumerate(cfg.cohorts)},
        "gene_group_loadings": {g: list(v) for g, v in GENE_GROUP_LOADINGS.items()},
        "patch_grid": {
            "patch_size": PATCH_SIZE,
            "patch_size_level0": PATCH_SIZE_LEVEL0,
            "target_mpp": TARGET_MPP,
            "level0_mpp": LEVEL0_MPP,
        },
    }


def oracle_predictions(truth_path: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-patient oracle scores from ``truth.json``: the ceiling any model can reach.

    Columns: ``patient_id, cohort, risk, linear_predictor, p_msi, prob_<subtype>...``, where
    ``risk`` is the true log hazard ratio across the whole cohort (higher = shorter survival).
    """
    truth = json.loads(Path(truth_path).read_text())
    rows = []
    for p in truth["patients"]:
        row = {k: p[k] for k in ("patient_id", "cohort", "risk", "linear_predictor", "p_msi")}
        row.update({f"prob_{name}": v for name, v in p["p_subtype"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Negative control: outcomes permuted across patients


def permute_outcomes(
    table: pd.DataFrame,
    seed: int,
    columns: Sequence[str] | None = None,
    *,
    within: str | None = None,
) -> pd.DataFrame:
    """Return a copy of a cohort table with outcome columns permuted ACROSS PATIENTS.

    The columns are permuted jointly (time stays paired with its event) at patient level, so all
    slides of a patient keep one consistent value. ``columns`` defaults to every column except
    patient_id, slide_id, cohort and site. ``within`` (e.g. ``"cohort"``) permutes inside each
    group of that patient-level column only. Raises ``CohortValidationError`` listing every problem.
    """
    cols = [c for c in table.columns if c not in _ID_COLUMNS] if columns is None else list(columns)
    problems = _permute_problems(table, cols, within)
    if problems:
        raise CohortValidationError(problems)
    keys = [*cols, within] if within is not None else cols
    per_patient = table.groupby("patient_id", sort=True)[keys].first()
    rng = np.random.default_rng(seed)
    if within is None:
        order = rng.permutation(len(per_patient))
    else:
        order = np.arange(len(per_patient))
        codes, _ = pd.factorize(per_patient[within], use_na_sentinel=False)
        for g in np.unique(codes):
            members = np.flatnonzero(codes == g)
            order[members] = members[rng.permutation(len(members))]
    permuted = per_patient[cols].iloc[order]
    permuted.index = per_patient.index
    result = table.copy()
    for c in cols:
        result[c] = table["patient_id"].map(permuted[c]).astype(table[c].dtype)
    return result


def _permute_problems(table: pd.DataFrame, cols: list[str], within: str | None) -> list[str]:
    problems: list[str] = []
    if "patient_id" not in table.columns:
        return ["missing column 'patient_id'"]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        problems.append(f"columns to permute not in the table: {', '.join(missing)}")
    if not cols:
        problems.append("no outcome columns to permute")
    for c in ("patient_id", "slide_id"):
        if c in cols:
            problems.append(f"{c!r} is an identifier and cannot be permuted")
    if within is not None and within not in table.columns:
        problems.append(f"'within' column {within!r} not in the table")
    if within is not None and within in cols:
        problems.append(f"'within' column {within!r} cannot also be permuted")
    present = [c for c in [*cols, within] if c is not None and c in table.columns]
    if present:
        counts = table.groupby("patient_id")[present].nunique(dropna=False)
        for c in present:
            bad = counts.index[counts[c] > 1].tolist()
            if bad:
                shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
                problems.append(f"column {c!r} differs between slides of patients {shown}")
    return problems


def write_permuted_cohort(
    table_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    seed: int,
    columns: Sequence[str] | None = None,
    *,
    within: str | None = None,
) -> Path:
    """Read a cohort table (CSV or Parquet, or a simulation folder), write a permuted copy.

    The copy (CSV or Parquet by the suffix of ``out_path``) names the same slides, so it reads
    the same feature files: only the patient-outcome pairing is broken.
    """
    src = Path(table_path)
    if src.is_dir():
        src = src / "cohort.csv"
    if not src.is_file():
        raise CohortValidationError([f"cohort table not found: {src}"])
    table = pd.read_parquet(src) if src.suffix == ".parquet" else pd.read_csv(src)
    permuted = permute_outcomes(table, seed, columns, within=within)
    write_table(out_path, permuted)
    return Path(out_path)
