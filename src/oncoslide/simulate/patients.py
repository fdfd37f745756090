"""Patients: cohort, site, latent factors, tissue composition, barcodes and slide sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from oncoslide.simulate.config import AGGR, BARCODE_CHARS, IMMUNE, SimulationConfig
from oncoslide.simulate.world import World


@dataclass(frozen=True, kw_only=True)
class Patients:
    patient_id: list[str]
    cohort: np.ndarray  # (P,) cohort index
    site: list[str]
    z: np.ndarray  # (P, L)
    mix_logits: np.ndarray  # (P, K); -inf outside the patient's cohort
    immune_beta: np.ndarray  # (P,) spatial clustering strength of the immune prototype
    slide_patches: list[list[int]]  # per patient, patches per slide
    # v2 latents (drawn from their own streams; used only when their knob is on)
    interface: np.ndarray  # (P,) the tumour-immune interface latent
    interface_attraction: np.ndarray  # (P,) pull of immune patches towards tumour regions
    genomic: np.ndarray  # (P,) the genomic programme
    genomic_visible: np.ndarray  # (P,) what the slides show of it (correlation 1 - omics_hidden)
    omics_nuisance: np.ndarray  # (P, omics_nuisance_latents)
    histology_coarse: np.ndarray  # (P, n_coarse) histology latents
    histology_fine: np.ndarray  # (P, n_fine)
    histology_parent: tuple[int, ...]  # coarse class of each fine class

    @property
    def histology_logits(self) -> np.ndarray:
        """(P, n_fine) a_parent + b_fine: drives the class and the patterns' tissue share."""
        if self.histology_fine.shape[1] == 0:
            return self.histology_fine
        return self.histology_coarse[:, list(self.histology_parent)] + self.histology_fine


def draw_patients(
    cfg: SimulationConfig, world: World, streams: dict[str, np.random.SeedSequence]
) -> Patients:
    rng = np.random.default_rng(streams["patients"])
    n, n_c = cfg.n_patients, cfg.n_cohorts
    cohort = np.repeat(np.arange(n_c), cfg.cohort_sizes)
    z = rng.standard_normal((n, cfg.latent_dim))
    site = _draw_sites(cfg, world, cohort, z, rng)

    k_base = world.n_base_prototypes
    k = len(world.prototypes)
    noise = rng.normal(0.0, cfg.mix_noise, size=(n, k_base))
    mix_logits = np.full((n, k), -np.inf)
    for c, idx in enumerate(world.cohort_protos):
        rows = np.flatnonzero(cohort == c)
        base_idx = idx[idx < k_base]
        lin = (
            world.base_logits[c, base_idx]
            + cfg.morphology_signal * z[rows] @ world.loadings[base_idx].T
        )
        mix_logits[np.ix_(rows, base_idx)] = lin + noise[np.ix_(rows, base_idx)]
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

    spatial = np.random.default_rng(streams["spatial"])
    interface = spatial.standard_normal(n)
    genomic_rng = np.random.default_rng(streams["genomic"])
    genomic = genomic_rng.standard_normal(n)
    r = 1.0 - cfg.omics_hidden
    visible = r * genomic + math.sqrt(max(0.0, 1.0 - r * r)) * genomic_rng.standard_normal(n)
    nuisance = genomic_rng.standard_normal((n, cfg.omics_nuisance_latents))

    coarse_names = [c for c, _ in cfg.hierarchy_tree]
    parent = tuple(coarse_names.index(c) for c, _ in cfg.histology_classes)
    n_fine = len(parent) if cfg.hierarchical_labels else 0
    hier = np.random.default_rng(streams["hierarchy_patients"])
    h_coarse = hier.standard_normal((n, len(coarse_names) if n_fine else 0))
    h_fine = hier.standard_normal((n, n_fine))
    pts = Patients(
        patient_id=patient_id,
        cohort=cohort,
        site=site,
        z=z,
        mix_logits=mix_logits,
        immune_beta=immune_beta,
        slide_patches=slide_patches,
        interface=interface,
        interface_attraction=cfg.interface_coupling * interface,
        genomic=genomic,
        genomic_visible=visible,
        omics_nuisance=nuisance,
        histology_coarse=h_coarse,
        histology_fine=h_fine,
        histology_parent=parent if n_fine else (),
    )
    if n_fine:
        hist = np.flatnonzero([p.role == "histology" for p in world.prototypes])
        lin = world.base_logits[cohort][:, hist] + cfg.hierarchy_signal * pts.histology_logits
        mix_logits[:, hist] = lin + hier.normal(0.0, cfg.mix_noise, size=(n, n_fine))
    return pts


def _draw_sites(
    cfg: SimulationConfig,
    world: World,
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
            tail = "".join(rng.choice(list(BARCODE_CHARS), size=4))
            pid = f"TCGA-{code}-{tail}"
            if pid not in seen:
                break
        seen.add(pid)
        ids.append(pid)
    return ids


def slide_ids(patient_id: str, n_slides: int) -> list[str]:
    return [f"{patient_id}-01Z-00-DX{j + 1}" for j in range(n_slides)]
