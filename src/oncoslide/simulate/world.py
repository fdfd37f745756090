"""The world a simulation draws patients from: morphologies, feature-space geometry, sites,
per-cancer prognosis, site transforms and calibrated censoring.

Everything here is fixed by the seed before any patient exists. Random numbers come from
independent streams (``streams``), so switching a v2 knob on leaves the rest of the world as it
was: e.g. the hierarchical patterns draw their geometry from their own stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import linalg, optimize, special

from oncoslide.errors import ConfigError
from oncoslide.simulate.config import (
    BARCODE_CHARS,
    FAMILY_PATTERNS,
    GENOMIC_STATE_ROLE,
    HAZARD_COEFS,
    MSI_COEFS,
    N_CALIBRATION,
    ROLE_BASE_LOGITS,
    ROLE_LOADINGS,
    ROLE_STATE,
    SHARED_ROLES,
    SPECIFIC_ROLES,
    SUBTYPES,
    TUMOUR_ROLES,
    SimulationConfig,
)

# The first seven streams are those of the first simulator, in its order: its outputs are kept.
STREAM_NAMES = (
    "model",
    "patients",
    "outcomes",
    "omics",
    "calibration",
    "geometry",
    "patches",
    "families",
    "spatial",
    "genomic",
    "mutations",
    "site_shift",
    "hierarchy",
    "hierarchy_patients",
    "hierarchy_labels",
    "spatial_labels",
    "shuffle",
    "omics_nuisance",
    "calibration_v2",
)


def make_streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent random streams, so that e.g. changing feature_dim leaves outcomes unchanged."""
    children = np.random.SeedSequence(seed).spawn(len(STREAM_NAMES))
    return dict(zip(STREAM_NAMES, children, strict=True))


@dataclass(frozen=True, kw_only=True)
class Prototype:
    index: int
    name: str
    role: str  # a named role, "histology" or "nuisance"
    cohort: str | None  # None for prototypes seen in several cohorts
    family: int | None = None  # prognostic family whose cancers share this tumour morphology
    histology_class: int = -1  # fine class of a histology pattern, -1 otherwise

    @property
    def is_tumour(self) -> bool:
        return self.role in TUMOUR_ROLES


@dataclass(frozen=True, kw_only=True)
class SiteTransform:
    """A shifted site's stain/scanner transform of the raw features of patches with labels k:

    x -> (x M) * gain + offset + content_k. Stain and scanner change each tissue's appearance
    differently, hence the per-prototype (content) shift next to the global ones.
    """

    mixing: np.ndarray  # (D, D) rotation expm(strength * A), A random skew-symmetric
    gain: np.ndarray  # (D,)
    offset: np.ndarray  # (D,)
    content: np.ndarray  # (K, D) per-prototype shift

    def apply(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        y = x @ self.mixing.astype(np.float32)
        y *= self.gain.astype(np.float32)
        y += self.offset.astype(np.float32)
        y += self.content.astype(np.float32)[labels]
        return y


@dataclass(frozen=True, kw_only=True)
class World:
    prototypes: tuple[Prototype, ...]
    cohort_protos: tuple[np.ndarray, ...]  # per cohort: global indices of its prototypes
    base_logits: np.ndarray  # (C, K); only the cohort's own prototypes are used
    loadings: np.ndarray  # (K, L) log-odds per unit latent
    state_latent: np.ndarray  # (K,) latent index driving a prototype's state, -1 for none
    genomic_state: np.ndarray  # (K,) True where the cell state shows the genomic programme
    site_codes: tuple[tuple[str, ...], ...]  # per cohort
    shifted_sites: frozenset[str]
    hazard_coefs: np.ndarray  # (C, 4) log hazard ratio per named latent (before survival_signal)
    log_lambda: np.ndarray  # (C,) Weibull log scale per cohort
    censor_rate: np.ndarray  # (C,) rate of the exponential random censoring, per day
    msi_intercept: float
    subtype_intercepts: np.ndarray  # (C, n_subtypes)
    histology_intercepts: np.ndarray  # (n_fine,)
    # feature geometry, in units of the isotropic noise sd
    centres: np.ndarray  # (K, D)
    lowrank: np.ndarray  # (K, r, D)
    state_dirs: np.ndarray  # (K, D) unit vectors
    site_shift: dict[str, np.ndarray]  # site code -> (D,)
    site_transform: dict[str, SiteTransform]  # shifted site code -> its transform
    offset: np.ndarray  # (D,) global mean of the embedding
    scale: np.ndarray  # (D,) per-dimension scale (includes the variance normalisation)

    def output_centres(self) -> np.ndarray:
        """Prototype centres in the space of the written features (offset and scale applied)."""
        return self.offset[None, :] + self.centres * self.scale[None, :]

    @property
    def n_base_prototypes(self) -> int:
        return sum(p.role != "histology" for p in self.prototypes)


def make_prototypes(
    cfg: SimulationConfig,
) -> tuple[tuple[Prototype, ...], tuple[np.ndarray, ...]]:
    """Shared, family or cohort-specific tumour, cohort nuisance, then histology prototypes."""
    protos: list[Prototype] = []

    def add(name: str, role: str, **kw: Any) -> int:
        protos.append(Prototype(index=len(protos), name=name, role=role, **kw))
        return len(protos) - 1

    shared = [
        add(
            SHARED_ROLES[i] if i < len(SHARED_ROLES) else f"shared_nuisance_{i}",
            SHARED_ROLES[i] if i < len(SHARED_ROLES) else "nuisance",
            cohort=None,
        )
        for i in range(cfg.n_shared_prototypes)
    ]
    per_cohort: list[list[int]] = [list(shared) for _ in cfg.cohorts]
    if cfg.prognosis_families == 0:
        for c, cohort in enumerate(cfg.cohorts):
            for j in range(cfg.n_specific_prototypes):
                role = SPECIFIC_ROLES[j] if j < len(SPECIFIC_ROLES) else "nuisance"
                label = role if role != "nuisance" else f"nuisance_{j}"
                per_cohort[c].append(add(f"{cohort}/{label}", role, cohort=cohort))
    else:
        # cancers of a family share their tumour morphologies; each keeps its own nuisance ones
        for f in range(cfg.prognosis_families):
            own = [
                add(f"FAM{f + 1}/{role}", role, cohort=None, family=f) for role in SPECIFIC_ROLES
            ]
            for c, family in enumerate(cfg.families):
                if family == f:
                    per_cohort[c].extend(own)
        for c, cohort in enumerate(cfg.cohorts):
            for j in range(len(SPECIFIC_ROLES), cfg.n_specific_prototypes):
                per_cohort[c].append(add(f"{cohort}/nuisance_{j}", "nuisance", cohort=cohort))
    if cfg.hierarchical_labels:
        patterns = [
            add(f"histology/{coarse}/{fine}", "histology", cohort=None, histology_class=j)
            for j, (coarse, fine) in enumerate(cfg.histology_classes)
        ]
        for members in per_cohort:
            members.extend(patterns)
    return tuple(protos), tuple(np.asarray(m, dtype=int) for m in per_cohort)


def _site_codes(cfg: SimulationConfig, rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
    """Distinct 2-character tissue-source-site codes, as in TCGA barcodes (e.g. "A2", "BH")."""
    pool = np.array([a + b for a in BARCODE_CHARS for b in BARCODE_CHARS])
    codes = rng.choice(pool, size=cfg.n_cohorts * cfg.sites_per_cohort, replace=False)
    s = cfg.sites_per_cohort
    return tuple(tuple(sorted(codes[c * s : (c + 1) * s].tolist())) for c in range(cfg.n_cohorts))


def make_world(cfg: SimulationConfig, streams: dict[str, np.random.SeedSequence]) -> World:
    rng = np.random.default_rng(streams["model"])
    protos, cohort_protos = make_prototypes(cfg)
    k, latent_dim, n_c = len(protos), cfg.latent_dim, cfg.n_cohorts
    k_base = sum(p.role != "histology" for p in protos)

    loadings = np.zeros((k, latent_dim))
    state_latent = np.full(k, -1, dtype=int)
    for p in protos:
        if p.role in ROLE_LOADINGS:
            latent, value = ROLE_LOADINGS[p.role]
            loadings[p.index, latent] = value
        state_latent[p.index] = ROLE_STATE.get(p.role, -1)
    if latent_dim > 4:
        # nuisance latents move the morphology mix (heterogeneity) but no outcome or gene
        loadings[:k_base, 4:] = rng.normal(0.0, 0.5, size=(k_base, latent_dim - 4))
    genomic_state = np.array([cfg.has_genomic and p.role == GENOMIC_STATE_ROLE for p in protos])

    base = np.array([ROLE_BASE_LOGITS.get(p.role, 0.0) for p in protos[:k_base]])
    base_logits = base[None, :] + rng.normal(0.0, 0.3, size=(n_c, k_base))

    site_codes = _site_codes(cfg, rng)
    lo, hi = cfg.median_survival_days
    medians = np.linspace(lo, hi, n_c) if n_c > 1 else np.array([math.sqrt(lo * hi)])
    medians = rng.permutation(medians)
    # Weibull S(t) = exp(-lambda t^k e^eta): the median at eta = 0 is (ln 2 / lambda)^(1/k)
    log_lambda = np.log(math.log(2.0)) - cfg.weibull_shape * np.log(medians)
    subtype_intercepts = rng.normal(0.0, 0.3, size=(n_c, len(SUBTYPES)))

    hazard_coefs = _hazard_coefs(cfg, streams["families"])
    censor_rate, msi_intercept = calibrate(cfg, log_lambda, hazard_coefs, streams)
    geometry = _make_geometry(cfg, k_base, site_codes, streams["geometry"])
    hierarchy_rng = np.random.default_rng(streams["hierarchy"])
    histology_intercepts = np.zeros(len(cfg.histology_classes))
    if cfg.hierarchical_labels:
        base_logits, histology_intercepts = _add_histology(
            cfg, base_logits, geometry, hierarchy_rng
        )
    n_shift = cfg.site_shift_sites
    shifted = frozenset(code for codes in site_codes for code in codes[len(codes) - n_shift :])
    return World(
        prototypes=protos,
        cohort_protos=cohort_protos,
        base_logits=base_logits,
        loadings=loadings,
        state_latent=state_latent,
        genomic_state=genomic_state,
        site_codes=site_codes,
        shifted_sites=shifted,
        hazard_coefs=hazard_coefs,
        log_lambda=log_lambda,
        censor_rate=censor_rate,
        msi_intercept=msi_intercept,
        subtype_intercepts=subtype_intercepts,
        histology_intercepts=histology_intercepts,
        site_transform=_site_transforms(cfg, sorted(shifted), k, streams["site_shift"]),
        **geometry,
    )


def _hazard_coefs(cfg: SimulationConfig, seq: np.random.SeedSequence) -> np.ndarray:
    """Per-cancer log hazard ratios of the named latents: one vector, or families with jitter."""
    base = np.asarray(HAZARD_COEFS)
    if cfg.prognosis_families == 0:
        return np.tile(base, (cfg.n_cohorts, 1))
    rng = np.random.default_rng(seq)
    patterns = np.asarray(FAMILY_PATTERNS)[list(cfg.families)]
    return patterns * base[None, :] + rng.normal(0.0, cfg.family_jitter, size=patterns.shape)


def random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
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
    lowrank = _lowrank(cfg, k, rng)
    state_dirs = random_unit(rng, k, d)
    codes = [code for cohort in site_codes for code in cohort]
    shifts = cfg.site_effect * random_unit(rng, len(codes), d)
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


def _lowrank(cfg: SimulationConfig, k: int, rng: np.random.Generator) -> np.ndarray:
    d, r = cfg.feature_dim, cfg.within_prototype_rank
    lowrank = np.zeros((k, r, d))
    for i in range(k):
        if r > 0:
            q, _ = np.linalg.qr(rng.standard_normal((d, r)))
            lowrank[i] = cfg.within_prototype_spread * q.T
    return lowrank


def _add_histology(
    cfg: SimulationConfig,
    base_logits: np.ndarray,
    geometry: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Histology patterns: siblings sit close to their family's anchor, families far apart."""
    d = cfg.feature_dim
    n_fine = len(cfg.histology_classes)
    coarse_names = [c for c, _ in cfg.hierarchy_tree]
    parent = [coarse_names.index(c) for c, _ in cfg.histology_classes]
    sd = cfg.prototype_separation / math.sqrt(2.0 * d)
    anchors = rng.normal(0.0, sd, size=(len(coarse_names), d))
    offsets = rng.normal(0.0, sd * cfg.fine_separation, size=(n_fine, d))
    geometry["centres"] = np.concatenate([geometry["centres"], anchors[parent] + offsets])
    geometry["lowrank"] = np.concatenate([geometry["lowrank"], _lowrank(cfg, n_fine, rng)])
    geometry["state_dirs"] = np.concatenate([geometry["state_dirs"], random_unit(rng, n_fine, d)])
    n_c = base_logits.shape[0]
    extra = ROLE_BASE_LOGITS["histology"] + rng.normal(0.0, 0.3, size=(n_c, n_fine))
    intercepts = rng.normal(0.0, 0.3, size=n_fine)
    return np.concatenate([base_logits, extra], axis=1), intercepts


def _site_transforms(
    cfg: SimulationConfig, codes: list[str], k: int, seq: np.random.SeedSequence
) -> dict[str, SiteTransform]:
    rng = np.random.default_rng(seq)
    d, s = cfg.feature_dim, cfg.site_shift_strength
    out = {}
    for code in codes:
        # a rotation of the feature space whose angles grow with the strength (eigenvalues of
        # the skew-symmetric generator are spread over [-2i, 2i]): invertible, norm-preserving
        g = rng.standard_normal((d, d))
        out[code] = SiteTransform(
            mixing=linalg.expm(s * (g - g.T) / math.sqrt(2.0 * d)),
            gain=np.exp(rng.normal(0.0, cfg.site_shift_gain, size=d)),
            offset=cfg.site_shift_offset * random_unit(rng, 1, d)[0],
            content=cfg.site_shift_content * random_unit(rng, k, d),
        )
    return out


def weibull_times(
    rng: np.random.Generator, eta: np.ndarray, log_lambda: np.ndarray, shape: float
) -> np.ndarray:
    """Event times of the Weibull PH model h(t) = lambda k t^(k-1) exp(eta), by inversion."""
    e = rng.exponential(1.0, size=eta.shape)
    return np.exp((np.log(e) - log_lambda - eta) / shape)


def calibrate(
    cfg: SimulationConfig,
    log_lambda: np.ndarray,
    hazard_coefs: np.ndarray,
    streams: dict[str, np.random.SeedSequence],
) -> tuple[np.ndarray, float]:
    """Censoring rate per cohort and the MSI intercept, fitted on a large reference population.

    The reference patients are drawn from the same latent distribution but are not the
    simulated patients, so the censoring mechanism stays independent of any one sample.
    """
    rng = np.random.default_rng(streams["calibration"])
    z = rng.standard_normal((N_CALIBRATION, 4))
    extra = np.zeros(N_CALIBRATION)
    if cfg.interface_hazard != 0.0 or cfg.has_genomic:
        more = np.random.default_rng(streams["calibration_v2"]).standard_normal((N_CALIBRATION, 2))
        extra = cfg.interface_hazard * more[:, 0] + cfg.genomic_signal * more[:, 1]
    shared = cfg.prognosis_families == 0
    eta_shared = cfg.survival_signal * z @ np.asarray(HAZARD_COEFS)
    rates = np.zeros(len(log_lambda))
    for c, ll in enumerate(log_lambda):
        eta = eta_shared if shared else cfg.survival_signal * z @ hazard_coefs[c]
        if cfg.interface_hazard != 0.0 or cfg.has_genomic:
            eta = eta + extra
        t = weibull_times(rng, eta, np.full_like(eta, ll), cfg.weibull_shape)
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
