"""Omics: expression driven by the latents (and by a genomic programme the slides barely show),
gene groups, and a DNA mutation table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import special

from oncoslide.simulate.config import (
    AGGR,
    GENE_GROUP_LOADINGS,
    GENOMIC_GROUP_LOADINGS,
    MOLECULAR,
    OMICS_NUISANCE_SHARE,
    STROMAL,
    SimulationConfig,
)
from oncoslide.simulate.outcomes import Outcomes
from oncoslide.simulate.patients import Patients


@dataclass(frozen=True, kw_only=True)
class Omics:
    table: pd.DataFrame
    groups: dict[str, list[str]]
    genes: dict[str, dict[str, Any]]  # gene -> group, driven, loadings
    observed: np.ndarray  # (P,) bool: the patient has omics (and mutations)
    # the oracle's view: loadings on every latent that moves genes, the centred expression
    latent_loadings: np.ndarray  # (G, 4 + genomic + nuisance) in the order of ``latent_names``
    latent_names: tuple[str, ...]
    centred: np.ndarray  # (P, G) expression minus baseline and cohort offset
    mutations: pd.DataFrame | None
    mutation_genes: dict[str, dict[str, Any]]


def draw_omics(
    cfg: SimulationConfig,
    pts: Patients,
    outcomes: Outcomes,
    streams: dict[str, np.random.SeedSequence],
) -> Omics:
    """log2-scale expression: baseline + cohort offset + loadings . latents + gene noise."""
    rng = np.random.default_rng(streams["omics"])
    n_ungrouped = round(cfg.n_genes * cfg.ungrouped_gene_fraction)
    n_grouped = cfg.n_genes - n_ungrouped
    group_names = list(GENE_GROUP_LOADINGS)
    sizes = [n_grouped // 6 + (g < n_grouped % 6) for g in range(6)]
    names = [f"SIMG{j:05d}" for j in rng.permutation(cfg.n_genes) + 1]

    loadings = np.zeros((cfg.n_genes, 4))
    genomic = np.zeros(cfg.n_genes)
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
                magnitude = rng.uniform(0.5, 1.0)
                loadings[start + j] = cfg.omics_signal * sign * magnitude * direction
                if cfg.has_genomic:
                    weight = GENOMIC_GROUP_LOADINGS[group_names[g]]
                    genomic[start + j] = cfg.omics_signal * sign * magnitude * weight
            info[gene] = {
                "group": group_names[g],
                "driven": driven,
                "loadings": loadings[start + j].round(6).tolist(),
            }
            if cfg.has_genomic:
                info[gene]["genomic_loading"] = round(float(genomic[start + j]), 6)
        groups[group_names[g]] = sorted(members)
        start += size
    for gene in names[start:]:
        info[gene] = {"group": None, "driven": False, "loadings": [0.0] * 4}
        if cfg.has_genomic:
            info[gene]["genomic_loading"] = 0.0

    n = len(pts.patient_id)
    baseline = rng.normal(6.0, 1.5, size=cfg.n_genes)
    cohort_offset = rng.normal(0.0, 0.5, size=(cfg.n_cohorts, cfg.n_genes))
    expr = baseline[None, :] + cohort_offset[pts.cohort] + pts.z[:, :4] @ loadings.T
    extra_loadings, extra_names = [], []
    if cfg.has_genomic:
        expr += pts.genomic[:, None] * genomic[None, :]
        extra_loadings.append(genomic[:, None])
        extra_names.append("genomic")
    if cfg.omics_nuisance_latents:
        nuisance = _nuisance_loadings(cfg, np.random.default_rng(streams["omics_nuisance"]))
        expr += pts.omics_nuisance @ nuisance.T
        extra_loadings.append(nuisance)
        extra_names += [f"omics_nuisance_{j}" for j in range(cfg.omics_nuisance_latents)]
        for j, gene in enumerate(names):
            info[gene]["nuisance_loadings"] = nuisance[j].round(6).tolist()
    expr += rng.normal(0.0, cfg.gene_noise, size=(n, cfg.n_genes))
    keep = rng.random(n) >= cfg.omics_missing_fraction  # missing at random, independent of z
    order = sorted(names)
    table = pd.DataFrame(np.round(expr, 3), columns=names)[order]
    table.insert(0, "patient_id", pts.patient_id)
    table = table[keep].sort_values("patient_id", kind="stable").reset_index(drop=True)

    latent_loadings = np.concatenate([loadings, *extra_loadings], axis=1)
    centred = expr - baseline[None, :] - cohort_offset[pts.cohort]
    mutations: pd.DataFrame | None = None
    mutation_genes: dict[str, dict[str, Any]] = {}
    if cfg.n_mutation_genes:
        mutations, mutation_genes = _draw_mutations(cfg, pts, outcomes, keep, streams)
    return Omics(
        table=table,
        groups=groups,
        genes={g: info[g] for g in order},
        observed=keep,
        latent_loadings=latent_loadings,
        latent_names=("aggressiveness", "immune", "molecular", "stromal", *extra_names),
        centred=centred,
        mutations=mutations,
        mutation_genes=mutation_genes,
    )


def _nuisance_loadings(cfg: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Each omics nuisance latent moves a random half of the genes (structured, non-prognostic)."""
    n_lat = cfg.omics_nuisance_latents
    values = rng.normal(0.0, 0.7, size=(cfg.n_genes, n_lat)) * cfg.omics_signal
    mask = rng.random((cfg.n_genes, n_lat)) < OMICS_NUISANCE_SHARE
    return values * mask


def posterior_latents(omics: Omics, gene_noise: float) -> np.ndarray:
    """E[latents | expression] under the true linear-Gaussian model (prior N(0, I)).

    The oracle's reading of the omics: it knows every loading, baseline and cohort offset, and
    only the gene noise stands between it and the latents. Rows of patients without omics are
    computed too (the caller masks them).
    """
    lam = omics.latent_loadings
    noise_var = max(gene_noise**2, 1e-9)
    precision = lam.T @ lam + noise_var * np.eye(lam.shape[1])
    return np.linalg.solve(precision, lam.T @ omics.centred.T).T


def _draw_mutations(
    cfg: SimulationConfig,
    pts: Patients,
    outcomes: Outcomes,
    keep: np.ndarray,
    streams: dict[str, np.random.SeedSequence],
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """0/1 mutations: a few latent-driven drivers, many rare passengers, hypermutated MSI tumours.

    Drivers (5 % of the genes, at least 3) have base prevalences 8-35 % and raise their log-odds
    with one latent (aggressiveness, molecular, the genomic programme when it exists, stromal,
    in turn); passengers have base prevalences log-uniform in 0.5-5 % and no latent. MSI tumours
    carry more passenger mutations (log-odds + 1.5), as mismatch-repair-deficient tumours do.
    """
    rng = np.random.default_rng(streams["mutations"])
    n, m = len(pts.patient_id), cfg.n_mutation_genes
    n_drivers = min(m, max(3, round(0.05 * m)))
    prevalence = np.concatenate(
        [
            rng.uniform(0.08, 0.35, n_drivers),
            np.exp(rng.uniform(np.log(0.005), np.log(0.05), m - n_drivers)),
        ]
    )
    latents = [("aggressiveness", pts.z[:, AGGR]), ("molecular", pts.z[:, MOLECULAR])]
    if cfg.has_genomic:
        latents.append(("genomic", pts.genomic))
    latents.append(("stromal", pts.z[:, STROMAL]))
    logits = np.tile(special.logit(prevalence), (n, 1))
    genes: dict[str, dict[str, Any]] = {}
    names = [f"SIMM{j + 1:05d}" for j in range(m)]
    for j, gene in enumerate(names):
        entry: dict[str, Any] = {
            "driver": j < n_drivers,
            "base_prevalence": round(float(prevalence[j]), 6),
        }
        if j < n_drivers:
            latent, values = latents[j % len(latents)]
            slope = float(rng.uniform(0.8, 1.5))
            logits[:, j] += slope * values
            entry.update(latent=latent, slope=round(slope, 6))
        else:
            logits[:, j] += 1.5 * outcomes.msi
        genes[gene] = entry
    calls = (rng.random((n, m)) < special.expit(logits)).astype(np.int8)
    table = pd.DataFrame(calls, columns=names)
    table.insert(0, "patient_id", pts.patient_id)
    table = table[keep].sort_values("patient_id", kind="stable").reset_index(drop=True)
    for j, gene in enumerate(names):
        genes[gene]["prevalence"] = round(float(calls[keep, j].mean()) if keep.any() else 0.0, 6)
    return table, genes
