"""The ground truth of a simulation: every planted quantity, per-patient oracles and their scores.

Oracles here know the truth (latents, coefficients, patch labels) and never look at a trained
model; they are the yardsticks that a method's result is compared with.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from oncoslide.evaluation.classification import roc_auc
from oncoslide.simulate.config import (
    FAMILY_PATTERNS,
    GENE_GROUP_LOADINGS,
    GENOMIC_GROUP_LOADINGS,
    HAZARD_COEFS,
    HISTOLOGY_SLOPE,
    LATENT_NAMES,
    LEVEL0_MPP,
    MSI_COEFS,
    PATCH_SIZE,
    PATCH_SIZE_LEVEL0,
    ROLE_LOADINGS,
    SUBTYPE_LATENTS,
    SUBTYPE_SLOPE,
    SUBTYPES,
    TARGET_MPP,
    SimulationConfig,
)
from oncoslide.simulate.omics import Omics, posterior_latents
from oncoslide.simulate.outcomes import Outcomes
from oncoslide.simulate.patients import Patients
from oncoslide.simulate.slides import SlideOut
from oncoslide.simulate.world import World
from oncoslide.survival.metrics import concordance_index_censored

TRUTH_VERSION = 2


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C (ties in risk count 1/2); NaN when no pair is comparable."""
    if len(time) == 0:
        return float("nan")
    return float(concordance_index_censored(event, time, risk).cindex)


def binary_auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC; NaN when one class is absent."""
    return roc_auc(np.asarray(label).astype(int), np.asarray(score, dtype=float), classes=[0, 1])


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 4)


# ---------------------------------------------------------------------------------------------
# Per-patient oracle quantities


def interface_ratio(slides: Sequence[SlideOut], n_patches: int) -> float:
    """Tumour share among immune patches' in-slide neighbours, over the tumour share of the tissue.

    1 is random mixing; above 1 immune cells sit at tumour (inflamed), below 1 away from it
    (excluded). NaN without immune neighbours or tumour. Composition alone does not move it.
    """
    neighbours = sum(s.immune_neighbours for s in slides)
    at_tumour = sum(s.immune_tumour_neighbours for s in slides)
    tumour_share = sum(s.n_tumour for s in slides) / max(n_patches, 1)
    if neighbours == 0 or tumour_share == 0:
        return float("nan")
    return (at_tumour / neighbours) / tumour_share


def similarity_matrix(coefs: np.ndarray) -> np.ndarray:
    """Cosine similarity of the cancers' prognostic coefficient vectors (C, C)."""
    norms = np.linalg.norm(coefs, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = coefs / safe[:, None]
    sim = unit @ unit.T
    sim[norms == 0, :] = 0.0
    sim[:, norms == 0] = 0.0
    return sim


def prognostic_coefs(cfg: SimulationConfig, world: World) -> tuple[np.ndarray, list[str]]:
    """Each cancer's full vector of log hazard ratios and the latents they apply to."""
    names = list(LATENT_NAMES)
    coefs = cfg.survival_signal * world.hazard_coefs
    extra = []
    if cfg.interface_hazard != 0.0:
        names.append("interface")
        extra.append(cfg.interface_hazard)
    if cfg.has_genomic:
        names.append("genomic")
        extra.append(cfg.genomic_signal)
    if extra:
        coefs = np.concatenate([coefs, np.tile(extra, (len(coefs), 1))], axis=1)
    return coefs, names


def _latent_matrix(pts: Patients, names: list[str]) -> np.ndarray:
    cols = [pts.z[:, :4]]
    if "interface" in names:
        cols.append(pts.interface[:, None])
    if "genomic" in names:
        cols.append(pts.genomic[:, None])
    return np.concatenate(cols, axis=1)


def transfer_oracle(
    cfg: SimulationConfig, world: World, pts: Patients, out: Outcomes
) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, C) matrices: C[a, b] = Harrell's C of cancer a's true risk on cancer b."""
    coefs, names = prognostic_coefs(cfg, world)
    latents = _latent_matrix(pts, names)
    n_c = cfg.n_cohorts
    c_matrix = np.full((n_c, n_c), np.nan)
    for b in range(n_c):
        rows = pts.cohort == b
        for a in range(n_c):
            risk = latents[rows] @ coefs[a]
            c_matrix[a, b] = harrell_c(out.time[rows], out.event[rows], risk)
    return similarity_matrix(coefs), c_matrix


def modality_oracles(
    cfg: SimulationConfig, world: World, pts: Patients, out: Outcomes, omics: Omics
) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: the best risk the slides can carry, and the omics oracle's risk.

    WSI: the composition and interface terms exactly, and of the genomic programme only what the
    slides show: E[g | visible] = (1 - omics_hidden) * visible. An upper bound of any slide model
    (the slides show the named latents only through noisy tissue composition).
    Omics: E[risk | expression] with every loading, baseline and cohort offset known.
    """
    coefs = cfg.survival_signal * world.hazard_coefs[pts.cohort]
    wsi = out.eta_parts["composition"] + (
        out.eta_parts["interface"] if cfg.interface_hazard != 0.0 else 0.0
    )
    if cfg.has_genomic:
        wsi = wsi + cfg.genomic_signal * (1.0 - cfg.omics_hidden) * pts.genomic_visible
    latents = posterior_latents(omics, cfg.gene_noise)
    omics_risk = np.sum(coefs * latents[:, :4], axis=1)
    if cfg.has_genomic:
        omics_risk = (
            omics_risk + cfg.genomic_signal * latents[:, omics.latent_names.index("genomic")]
        )
    return wsi, omics_risk


# ---------------------------------------------------------------------------------------------
# Summary and truth.json


def summary(
    cfg: SimulationConfig,
    world: World,
    pts: Patients,
    out: Outcomes,
    omics: Omics,
    slides: list[list[SlideOut]],
) -> dict[str, Any]:
    n_patches = [s.n_patches for ss in slides for s in ss]
    within = [
        harrell_c(out.time[m], out.event[m], out.eta[m])
        for m in (pts.cohort == c for c in range(cfg.n_cohorts))
    ]
    auc_sub = [binary_auc(out.subtype == j, out.p_subtype[:, j]) for j in range(len(SUBTYPES))]
    result: dict[str, Any] = {
        "n_patients": cfg.n_patients,
        "n_cohorts": cfg.n_cohorts,
        "n_slides": len(n_patches),
        "n_patches": int(np.sum(n_patches)),
        "patches_per_slide_median": float(np.median(n_patches)),
        "event_rate": round(float(out.event.mean()), 4),
        "msi_prevalence": round(float(out.msi.mean()), 4),
        "oracle_c_index": _round(harrell_c(out.time, out.event, out.risk)),
        "oracle_c_index_within_cohort": _round(float(np.nanmean(within))),
        "oracle_auc_msi": _round(binary_auc(out.msi, out.p_msi)),
        "oracle_auc_subtype": _round(float(np.nanmean(auc_sub))),
    }
    if cfg.cohort_size_ratio != 1.0:
        result["cohort_sizes"] = dict(zip(cfg.cohorts, cfg.cohort_sizes, strict=True))
    if cfg.prognosis_families:
        sim, c_matrix = transfer_oracle(cfg, world, pts, out)
        off = ~np.eye(cfg.n_cohorts, dtype=bool)
        rho = stats.spearmanr(sim[off], c_matrix[off]).statistic
        result["oracle_transfer_spearman"] = _round(float(rho))
    if cfg.has_interface or cfg.interface_hazard != 0.0:
        ratio = _interface_ratios(pts, slides)
        ok = np.isfinite(ratio)
        result["oracle_c_index_interface"] = _round(
            harrell_c(out.time, out.event, out.eta_parts["interface"])
        )
        result["oracle_c_index_composition"] = _round(
            harrell_c(out.time, out.event, out.eta_parts["composition"])
        )
        if cfg.interface_hazard != 0.0:
            # the readout counts adjacencies: its risk has the sign of the hazard coefficient
            sign = math.copysign(1.0, cfg.interface_hazard)
            result["oracle_c_index_interface_readout"] = _round(
                harrell_c(out.time[ok], out.event[ok], sign * ratio[ok])
            )
        if out.inflamed is not None and out.p_inflamed is not None:
            result["inflamed_prevalence"] = round(float(out.inflamed.mean()), 4)
            result["oracle_auc_inflamed"] = _round(binary_auc(out.inflamed, out.p_inflamed))
    if cfg.has_genomic:
        wsi, omics_risk = modality_oracles(cfg, world, pts, out, omics)
        m = omics.observed
        result["oracle_c_index_wsi"] = _round(harrell_c(out.time[m], out.event[m], wsi[m]))
        result["oracle_c_index_omics"] = _round(harrell_c(out.time[m], out.event[m], omics_risk[m]))
    if cfg.n_mutation_genes and omics.mutations is not None:
        calls = omics.mutations.drop(columns="patient_id").to_numpy()
        result["mutations_per_patient_median"] = (
            float(np.median(calls.sum(axis=1))) if len(calls) else 0.0
        )
    if world.shifted_sites:
        result["site_shift"] = _site_accuracy(cfg, world, pts, out, slides)
    if out.p_fine is not None and out.fine is not None:
        coarse_p, coarse = _coarse_probabilities(cfg, out.p_fine), _parents(cfg)[out.fine]
        fine_auc = [binary_auc(out.fine == j, out.p_fine[:, j]) for j in range(out.p_fine.shape[1])]
        coarse_auc = [binary_auc(coarse == j, coarse_p[:, j]) for j in range(coarse_p.shape[1])]
        result["oracle_auc_histology_coarse"] = _round(float(np.nanmean(coarse_auc)))
        result["oracle_auc_histology_fine"] = _round(float(np.nanmean(fine_auc)))
    return result


def _interface_ratios(pts: Patients, slides: list[list[SlideOut]]) -> np.ndarray:
    return np.array(
        [interface_ratio(ss, sum(s.n_patches for s in ss)) for ss in slides], dtype=float
    )


def composition_reader(
    cfg: SimulationConfig, world: World, pts: Patients, labels: list[np.ndarray]
) -> np.ndarray:
    """The oracle reader of tissue composition: the risk implied by a patient's patch labels.

    It knows the true model of the mix (log-odds b_c + A z + noise): from the label counts
    (plus 0.5) it estimates z by ridge regression of the centred log-shares on the centred
    loadings (ridge = mix_noise^2), then applies the cancer's hazard coefficients. Given the
    true labels it is the best a composition reader does; given the labels of the nearest true
    centres it is what such a reader sees through the features.
    """
    risk = np.zeros(len(labels))
    k = len(world.prototypes)
    for c, idx in enumerate(world.cohort_protos):
        rows = np.flatnonzero(pts.cohort == c)
        counts = np.stack([np.bincount(labels[i], minlength=k)[idx] for i in rows]) + 0.5
        y = np.log(counts / counts.sum(axis=1, keepdims=True)) - world.base_logits[c, idx]
        y -= y.mean(axis=1, keepdims=True)
        a = cfg.morphology_signal * world.loadings[idx]
        a = a - a.mean(axis=0, keepdims=True)
        gram = a.T @ a + max(cfg.mix_noise**2, 1e-6) * np.eye(a.shape[1])
        z_hat = np.linalg.solve(gram, a.T @ y.T).T
        risk[rows] = cfg.survival_signal * z_hat[:, :4] @ world.hazard_coefs[c]
    return risk


def _site_accuracy(
    cfg: SimulationConfig,
    world: World,
    pts: Patients,
    out: Outcomes,
    slides: list[list[SlideOut]],
) -> dict[str, Any]:
    """Per site: share of patches whose nearest true centre is their own prototype; and the
    composition reader's C-index from the true labels and from the labels as seen."""
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for i, ss in enumerate(slides):
        site = pts.site[i]
        correct[site] = correct.get(site, 0) + sum(s.nearest_correct for s in ss)
        total[site] = total.get(site, 0) + sum(s.n_patches for s in ss)
    per_site = {s: round(correct[s] / total[s], 4) for s in sorted(total)}
    true_risk = composition_reader(
        cfg, world, pts, [np.concatenate([s.labels for s in ss]) for ss in slides]
    )
    seen = [np.concatenate([s.nearest for s in ss if s.nearest is not None]) for ss in slides]
    seen_risk = composition_reader(cfg, world, pts, seen)
    shifted = np.array([s in world.shifted_sites for s in pts.site])
    result: dict[str, Any] = {"nearest_centre_accuracy": per_site}
    for name, m in (("source_sites", ~shifted), ("shifted_sites", shifted)):
        sites = sorted(set(np.asarray(pts.site)[m]))
        result[name] = {
            "nearest_centre_accuracy": round(
                sum(correct[s] for s in sites) / max(1, sum(total[s] for s in sites)), 4
            ),
            "reader_c_index_true_labels": _round(
                harrell_c(out.time[m], out.event[m], true_risk[m])
            ),
            "reader_c_index_as_seen": _round(harrell_c(out.time[m], out.event[m], seen_risk[m])),
        }
    return result


def _parents(cfg: SimulationConfig) -> np.ndarray:
    coarse_names = [c for c, _ in cfg.hierarchy_tree]
    return np.array([coarse_names.index(c) for c, _ in cfg.histology_classes])


def _coarse_probabilities(cfg: SimulationConfig, p_fine: np.ndarray) -> np.ndarray:
    """P(coarse) = sum of its fine classes' probabilities: the two levels never disagree."""
    p_coarse = np.zeros((len(p_fine), len(cfg.hierarchy_tree)))
    for j, k in enumerate(_parents(cfg)):
        p_coarse[:, k] += p_fine[:, j]
    return p_coarse


def truth_document(
    cfg: SimulationConfig,
    world: World,
    pts: Patients,
    out: Outcomes,
    omics: Omics,
    slides: list[list[SlideOut]],
    summary_: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    """Everything needed to score a model against the truth; deterministic given the seed."""
    doc: dict[str, Any] = {
        "format": "oncoslide-simulation-truth",
        "version": TRUTH_VERSION,
        "config": cfg.to_dict(),
        "weights_fingerprint": fingerprint,
        "summary": summary_,
        "parameters": _parameters(cfg, world),
        "prognosis": _prognosis(cfg, world, pts, out),
        "prototypes": _prototypes(cfg, world),
        "genes": omics.genes,
        "patients": _patients(cfg, world, pts, out, omics, slides),
    }
    if cfg.has_interface or cfg.interface_hazard != 0.0:
        doc["spatial"] = {
            "interface_coupling": cfg.interface_coupling,
            "interface_hazard": cfg.interface_hazard,
            "interface_label_signal": cfg.interface_label_signal,
            "shuffle_positions": cfg.shuffle_positions,
            "immune_prototypes": [p.name for p in world.prototypes if p.role == "immune"],
            "tumour_prototypes": [p.name for p in world.prototypes if p.is_tumour],
            "attraction": "interface_coupling * interface_latent",
        }
    if cfg.has_genomic:
        doc["genomic_programme"] = {
            "hazard": cfg.genomic_signal,
            "omics_hidden": cfg.omics_hidden,
            "visible_correlation": 1.0 - cfg.omics_hidden,
            "visible_through": [p.name for p in world.prototypes if world.genomic_state[p.index]],
            "group_loadings": dict(GENOMIC_GROUP_LOADINGS),
        }
    if omics.mutation_genes:
        doc["mutations"] = omics.mutation_genes
    if world.shifted_sites:
        doc["site_shift"] = {
            "shifted_sites": sorted(world.shifted_sites),
            "strength": cfg.site_shift_strength,
            "gain_sd": cfg.site_shift_gain,
            "offset_length": cfg.site_shift_offset,
            "content_length": cfg.site_shift_content,
            "transform": "raw patch features x of prototype k -> (x M) * gain + offset + "
            "content_k (noise units, before the output scale and offset), M = expm(strength * "
            "(G - G^T) / sqrt(2 D)) a rotation, G Gaussian; arrays in truth_site_transforms.npz",
        }
    if cfg.hierarchical_labels:
        doc["hierarchy"] = {
            "tree": {coarse: list(fines) for coarse, fines in cfg.hierarchy_tree},
            "slope": HISTOLOGY_SLOPE * cfg.hierarchy_signal,
            "intercepts": dict(
                zip(
                    [f for _, f in cfg.histology_classes],
                    np.round(world.histology_intercepts, 6).tolist(),
                    strict=True,
                )
            ),
            "fine_separation": cfg.fine_separation,
        }
    return doc


def _prognosis(cfg: SimulationConfig, world: World, pts: Patients, out: Outcomes) -> dict[str, Any]:
    coefs, names = prognostic_coefs(cfg, world)
    sim = similarity_matrix(coefs)
    doc: dict[str, Any] = {
        "families": dict(zip(cfg.cohorts, [int(f) for f in cfg.families], strict=True)),
        "family_patterns": [list(p) for p in FAMILY_PATTERNS] if cfg.prognosis_families else None,
        "latents": names,
        "hazard_coefs": {
            c: dict(zip(names, np.round(coefs[i], 6).tolist(), strict=True))
            for i, c in enumerate(cfg.cohorts)
        },
        "similarity": {
            a: dict(zip(cfg.cohorts, np.round(sim[i], 6).tolist(), strict=True))
            for i, a in enumerate(cfg.cohorts)
        },
        "cohort_sizes": dict(zip(cfg.cohorts, cfg.cohort_sizes, strict=True)),
    }
    if cfg.prognosis_families:
        _, c_matrix = transfer_oracle(cfg, world, pts, out)
        doc["oracle_transfer_c_index"] = {
            a: dict(zip(cfg.cohorts, [_round(v) for v in c_matrix[i]], strict=True))
            for i, a in enumerate(cfg.cohorts)
        }
    return doc


def _patients(
    cfg: SimulationConfig,
    world: World,
    pts: Patients,
    out: Outcomes,
    omics: Omics,
    slides: list[list[SlideOut]],
) -> list[dict[str, Any]]:
    names = [p.name for p in world.prototypes]
    in_omics = set(omics.table["patient_id"])
    ratios = _interface_ratios(pts, slides) if cfg.has_interface or cfg.interface_hazard else None
    modality = modality_oracles(cfg, world, pts, out, omics) if cfg.has_genomic else None
    fine_names = [f for _, f in cfg.histology_classes]
    patients = []
    for i, pid in enumerate(pts.patient_id):
        idx = world.cohort_protos[int(pts.cohort[i])]
        probs = special.softmax(pts.mix_logits[i, idx])
        labels = np.concatenate([s.labels for s in slides[i]])
        counts = np.bincount(labels, minlength=len(names))
        row: dict[str, Any] = {
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
            "p_subtype": dict(zip(SUBTYPES, np.round(out.p_subtype[i], 6).tolist(), strict=True)),
            "mix_expected": {names[g]: round(float(p), 6) for g, p in zip(idx, probs, strict=True)},
            "mix_realised": {names[g]: round(float(counts[g] / len(labels)), 6) for g in idx},
            "immune_clustering": round(float(pts.immune_beta[i]), 6),
            "has_omics": pid in in_omics,
        }
        if ratios is not None:
            row["interface_latent"] = round(float(pts.interface[i]), 6)
            row["interface_attraction"] = round(float(pts.interface_attraction[i]), 6)
            row["interface_ratio"] = (
                round(float(ratios[i]), 6) if math.isfinite(ratios[i]) else None
            )
            row["linear_predictor_parts"] = {
                k: round(float(v[i]), 6) for k, v in out.eta_parts.items()
            }
        if out.p_inflamed is not None:
            row["p_inflamed"] = round(float(out.p_inflamed[i]), 6)
        if modality is not None:
            row["genomic_latent"] = round(float(pts.genomic[i]), 6)
            row["genomic_visible"] = round(float(pts.genomic_visible[i]), 6)
            row["linear_predictor_parts"] = {
                k: round(float(v[i]), 6) for k, v in out.eta_parts.items()
            }
            row["risk_wsi_oracle"] = round(float(modality[0][i]), 6)
            row["risk_omics_oracle"] = (
                round(float(modality[1][i]), 6) if omics.observed[i] else None
            )
        if cfg.omics_nuisance_latents:
            row["omics_nuisance_latents"] = np.round(pts.omics_nuisance[i], 6).tolist()
        if out.p_fine is not None:
            row["p_histology_fine"] = dict(
                zip(fine_names, np.round(out.p_fine[i], 6).tolist(), strict=True)
            )
            coarse_p = _coarse_probabilities(cfg, out.p_fine[i : i + 1])
            row["p_histology_coarse"] = dict(
                zip(
                    [c for c, _ in cfg.hierarchy_tree],
                    np.round(coarse_p[0], 6).tolist(),
                    strict=True,
                )
            )
        patients.append(row)
    return patients


def _prototypes(cfg: SimulationConfig, world: World) -> list[dict[str, Any]]:
    """Which prototype carries which signal (mix loading and cell-state latent)."""
    prototypes = []
    for p in world.prototypes:
        latent, _ = ROLE_LOADINGS.get(p.role, (None, 0.0))
        state = int(world.state_latent[p.index])
        entry: dict[str, Any] = {
            "index": p.index,
            "name": p.name,
            "role": p.role,
            "cohort": p.cohort,
            "signal_latent": None if latent is None else LATENT_NAMES[latent],
            "loadings": np.round(world.loadings[p.index] * cfg.morphology_signal, 6).tolist(),
            "state_latent": None if state < 0 else LATENT_NAMES[state],
        }
        if world.genomic_state[p.index]:
            entry["state_latent"] = "genomic_visible"
        if p.family is not None:
            entry["family"] = p.family
        if p.histology_class >= 0:
            coarse, fine = cfg.histology_classes[p.histology_class]
            entry.update(signal_latent=f"histology:{fine}", coarse=coarse, fine=fine)
        prototypes.append(entry)
    return prototypes


def _parameters(cfg: SimulationConfig, world: World) -> dict[str, Any]:
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
    ``risk`` is the true log hazard ratio across the whole cohort (higher = shorter survival);
    plus, when the world has them, ``p_inflamed``, ``risk_wsi_oracle``, ``risk_omics_oracle``,
    ``prob_<histology class>`` (fine and coarse) and ``interface_ratio``.
    """
    truth = json.loads(Path(truth_path).read_text())
    rows = []
    for p in truth["patients"]:
        row = {k: p[k] for k in ("patient_id", "cohort", "risk", "linear_predictor", "p_msi")}
        row.update({f"prob_{name}": v for name, v in p["p_subtype"].items()})
        for key in ("p_inflamed", "risk_wsi_oracle", "risk_omics_oracle", "interface_ratio"):
            if key in p:
                row[key] = p[key]
        for key in ("p_histology_fine", "p_histology_coarse"):
            row.update({f"prob_{name}": v for name, v in p.get(key, {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)
