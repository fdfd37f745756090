"""Outcomes: Weibull survival with independent censoring, and the molecular and histology labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

from oncoslide.simulate.config import (
    HAZARD_COEFS,
    HISTOLOGY_SLOPE,
    MSI_COEFS,
    SUBTYPE_LATENTS,
    SUBTYPE_SLOPE,
    SimulationConfig,
)
from oncoslide.simulate.patients import Patients
from oncoslide.simulate.world import World, weibull_times


@dataclass(frozen=True, kw_only=True)
class Outcomes:
    eta: np.ndarray  # within-cohort linear predictor (all terms)
    eta_parts: dict[str, np.ndarray]  # composition (named latents), interface, genomic
    risk: np.ndarray  # eta + log lambda_cohort: the log hazard ratio across the whole cohort
    event_time: np.ndarray
    censor_time: np.ndarray  # min(random censoring, administrative censoring)
    time: np.ndarray
    event: np.ndarray
    p_msi: np.ndarray
    msi: np.ndarray
    p_subtype: np.ndarray  # (P, n_subtypes)
    subtype: np.ndarray  # (P,) index
    p_inflamed: np.ndarray | None  # when the interface exists
    inflamed: np.ndarray | None
    p_fine: np.ndarray | None  # (P, n_fine) when hierarchical labels exist
    fine: np.ndarray | None  # (P,) fine class index


def linear_predictor(
    cfg: SimulationConfig, world: World, pts: Patients
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """eta = survival_signal * beta_cancer . z[:4] + interface_hazard * u + genomic_signal * g."""
    z4 = pts.z[:, :4]
    if cfg.prognosis_families == 0:
        composition = cfg.survival_signal * z4 @ np.asarray(HAZARD_COEFS)
    else:
        composition = np.zeros(len(z4))
        for c in range(cfg.n_cohorts):
            rows = pts.cohort == c
            composition[rows] = cfg.survival_signal * z4[rows] @ world.hazard_coefs[c]
    parts = {
        "composition": composition,
        "interface": cfg.interface_hazard * pts.interface,
        "genomic": cfg.genomic_signal * pts.genomic,
    }
    eta = composition
    if cfg.interface_hazard != 0.0:
        eta = eta + parts["interface"]
    if cfg.has_genomic:
        eta = eta + parts["genomic"]
    return eta, parts


def draw_outcomes(
    cfg: SimulationConfig,
    world: World,
    pts: Patients,
    streams: dict[str, np.random.SeedSequence],
) -> Outcomes:
    rng = np.random.default_rng(streams["outcomes"])
    z4 = pts.z[:, :4]
    eta, parts = linear_predictor(cfg, world, pts)
    log_lambda = world.log_lambda[pts.cohort]
    t_event = weibull_times(rng, eta, log_lambda, cfg.weibull_shape)
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
    subtype = _categorical(p_sub, rng.random(len(p_sub)))

    p_inflamed = inflamed = None
    if cfg.has_interface:
        # inflamed (immune cells in contact with tumour) vs excluded: read off the arrangement
        spatial = np.random.default_rng(streams["spatial_labels"])
        p_inflamed = special.expit(cfg.interface_label_signal * pts.interface)
        inflamed = (spatial.random(len(p_inflamed)) < p_inflamed).astype(int)
    p_fine = fine = None
    if cfg.hierarchical_labels:
        hier = np.random.default_rng(streams["hierarchy_labels"])
        logits = cfg.hierarchy_signal * HISTOLOGY_SLOPE * pts.histology_logits
        p_fine = special.softmax(logits + world.histology_intercepts[None, :], axis=1)
        fine = _categorical(p_fine, hier.random(len(p_fine)))
    return Outcomes(
        eta=eta,
        eta_parts=parts,
        risk=eta + log_lambda,
        event_time=t_event,
        censor_time=t_censor,
        time=obs_time,
        event=event,
        p_msi=p_msi,
        msi=msi,
        p_subtype=p_sub,
        subtype=subtype,
        p_inflamed=p_inflamed,
        inflamed=inflamed,
        p_fine=p_fine,
        fine=fine,
    )


def _categorical(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One draw per row of a (P, C) probability table, by inversion with uniforms ``u``."""
    return np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), p.shape[1] - 1)
