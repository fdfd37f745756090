"""Every knob of the simulated world, its documented constants, and the checks on a configuration.

The constants are the planted parameters that do not vary with the seed (docs/simulator.md
lists them with their meaning); ``SimulationConfig`` holds what a user may change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from oncoslide.errors import ConfigError

# The four named latent factors; latents beyond these are nuisance factors (morphology only).
LATENT_NAMES = ("aggressiveness", "immune", "molecular", "stromal")
AGGR, IMMUNE, MOLECULAR, STROMAL = range(4)

# Roles of the shared prototypes (same centre in every cohort) and of the cohort-specific ones,
# assigned in this order; prototypes beyond the named roles are nuisance morphologies.
SHARED_ROLES = ("stroma", "immune", "necrosis", "normal")
SPECIFIC_ROLES = ("tumour_high_grade", "tumour_low_grade", "tumour_mucinous")
# Roles that count as tumour for the tumour-immune interface (histology patterns included).
TUMOUR_ROLES = (*SPECIFIC_ROLES, "histology")

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
    "histology": -0.3,
}
# Tumour prototypes whose patches also shift along a direction with a latent (cell "state").
ROLE_STATE: dict[str, int] = {"tumour_high_grade": AGGR, "tumour_mucinous": MOLECULAR}
# The low-grade tumour's cell state shows the genomic programme (when it exists), weakly.
GENOMIC_STATE_ROLE = "tumour_low_grade"

# Log hazard ratio per unit of each named latent (times ``survival_signal``).
HAZARD_COEFS = (1.1, -0.6, 0.25, 0.4)
# Prognostic families (``prognosis_families``): multipliers of HAZARD_COEFS per family. Family 0
# is the default prognosis; the others keep, drop (0) or reverse (< 0) single coefficients.
FAMILY_PATTERNS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 1.0, 1.0, 1.0),  # aggressive and immune-cold tumours do badly
    (1.0, -1.0, 0.0, -1.0),  # immune infiltrate and stroma reversed, molecular absent
    (0.0, -1.5, 4.0, -1.5),  # grade absent, molecular dominant, immune and stroma reversed
    (-0.5, 1.0, 2.0, 1.5),  # grade reversed (responds to therapy), molecular and stroma stronger
)
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
# Loading of each group's driven genes on the genomic programme (when ``genomic_signal`` != 0).
GENOMIC_GROUP_LOADINGS: dict[str, float] = {
    "tumour_suppressors": -0.6,
    "oncogenes": 1.0,
    "protein_kinases": 0.8,
    "cell_differentiation": -0.8,
    "transcription_factors": 0.6,
    "cytokines_growth_factors": 0.0,
}
# Share of a group's driven genes that also load on each omics nuisance latent.
OMICS_NUISANCE_SHARE = 0.5

# Default label tree of ``hierarchical_labels``: histological family -> subtype.
HISTOLOGY_TREE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("glandular", ("acinar", "papillary", "solid")),
    ("squamous", ("keratinising", "basaloid")),
    ("neuroendocrine", ("small_cell", "large_cell")),
)
HISTOLOGY_SLOPE = 1.5  # class log-odds per unit histology latent (times ``hierarchy_signal``)

# Patch grid: 224-px patches at 0.5 µm/px cut from a 0.25 µm/px level 0 (40x scan, 20x patches).
PATCH_SIZE = 224
TARGET_MPP = 0.5
LEVEL0_MPP = 0.25
PATCH_SIZE_LEVEL0 = 448
ENCODER_NAME = "simulated"

# TCGA barcodes: 2-character tissue-source-site codes and 4-character patient tails.
BARCODE_CHARS = string.ascii_uppercase + string.digits

N_CALIBRATION = 20_000  # reference patients used to calibrate censoring and MSI prevalence


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """Every knob of the simulator; defaults give the ``demo`` world (docs/simulator.md).

    Signal strengths are multipliers of the documented base coefficients (1.0 = default, 0.0 = no
    signal on that route). Feature-space lengths are in units of the isotropic patch noise sd.
    The knobs after ``site_confounding`` build the v2 worlds; at their defaults they are off and
    the output is exactly that of the first simulator.
    """

    seed: int = 0
    # --- cohort layout
    n_patients: int = 240
    n_cohorts: int = 3
    cohort_names: tuple[str, ...] | None = None  # default "SIM-A", "SIM-B", ...
    cohort_size_ratio: float = 1.0  # largest / smallest cohort, sizes spaced geometrically
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
    # --- v2: cancer-specific prognosis with a planted sharing structure
    prognosis_families: int = 0  # 0: one prognosis for all; k: k families sharing morphology
    family_jitter: float = 0.15  # sd of a cancer's hazard coefficients around its family's
    # --- v2: spatial signal that counts cannot see (the tumour-immune interface)
    interface_coupling: float = 0.0  # how strongly the interface latent places immune at tumour
    interface_hazard: float = 0.0  # log hazard ratio per unit interface latent
    interface_label_signal: float = 0.0  # log-odds of the 'inflamed' label per unit latent
    shuffle_positions: bool = False  # ablation: same patches, positions shuffled within slides
    # --- v2: omics beyond morphology
    genomic_signal: float = 0.0  # log hazard ratio of the genomic programme (0 = no programme)
    omics_hidden: float = 0.0  # 0: slides show the programme like other latents; 1: not at all
    omics_nuisance_latents: int = 0  # latent factors that move genes and nothing else
    n_mutation_genes: int = 0  # genes in mutations.csv (0 = no mutation table)
    # --- v2: site shift (stain / scanner)
    site_shift_sites: int = 0  # per cohort, the last sites (by code) are scanned differently
    site_shift_strength: float = 1.5  # angle scale of the shifted sites' feature-space rotation
    site_shift_gain: float = 0.3  # sd of the log gain per feature dimension
    site_shift_offset: float = 2.0  # length of the shifted sites' extra offset
    site_shift_content: float = 4.0  # length of the shifted sites' per-prototype shifts
    # --- v2: hierarchical labels (histological family -> subtype)
    hierarchical_labels: bool = False
    hierarchy_signal: float = 1.0  # multiplies the histology latents' effect on labels and tissue
    fine_separation: float = 0.4  # sibling pattern distance relative to prototype_separation
    hierarchy_tree: tuple[tuple[str, tuple[str, ...]], ...] = HISTOLOGY_TREE

    def __post_init__(self) -> None:
        problems = config_problems(self)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ConfigError(f"simulation config has {len(problems)} problem(s):\n{lines}")

    @property
    def cohorts(self) -> tuple[str, ...]:
        """The cohort (cancer type) names, given or ``SIM-A``, ``SIM-B``, ..."""
        if self.cohort_names is not None:
            return tuple(self.cohort_names)
        return tuple(f"SIM-{string.ascii_uppercase[i]}" for i in range(self.n_cohorts))

    @property
    def cohort_sizes(self) -> tuple[int, ...]:
        """Patients per cohort: even, or geometric from largest to smallest (``cohort_size_ratio``)."""
        n, k = self.n_patients, self.n_cohorts
        if self.cohort_size_ratio == 1.0 or k == 1:
            return tuple(n // k + (c < n % k) for c in range(k))
        weights = self.cohort_size_ratio ** (-np.arange(k) / (k - 1))
        exact = n * weights / weights.sum()
        sizes = np.floor(exact).astype(int)
        # largest remainders take the patients left over; ties go to the earlier cohort
        for c in np.argsort(-(exact - sizes), kind="stable")[: n - int(sizes.sum())]:
            sizes[c] += 1
        return tuple(int(s) for s in sizes)

    @property
    def families(self) -> tuple[int, ...]:
        """Prognostic family of each cohort (round robin, so every family has large and rare)."""
        if self.prognosis_families == 0:
            return tuple(range(self.n_cohorts))  # every cancer is its own (identical) family
        return tuple(c % self.prognosis_families for c in range(self.n_cohorts))

    @property
    def histology_classes(self) -> tuple[tuple[str, str], ...]:
        """(coarse, fine) for every fine class of the label tree, in tree order."""
        return tuple((coarse, fine) for coarse, fines in self.hierarchy_tree for fine in fines)

    @property
    def has_interface(self) -> bool:
        return self.interface_coupling > 0.0

    @property
    def has_genomic(self) -> bool:
        return self.genomic_signal != 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


_NONNEGATIVE = (
    "within_prototype_spread",
    "site_effect",
    "slide_effect",
    "mix_noise",
    "spatial_clustering",
    "gene_noise",
    "family_jitter",
    "interface_coupling",
    "site_shift_gain",
    "site_shift_offset",
    "site_shift_content",
    "fine_separation",
)
_FINITE = (
    "morphology_signal",
    "state_signal",
    "immune_clustering_signal",
    "survival_signal",
    "label_signal",
    "omics_signal",
    "site_confounding",
    "interface_hazard",
    "interface_label_signal",
    "genomic_signal",
    "hierarchy_signal",
)


def config_problems(cfg: SimulationConfig) -> list[str]:
    """Every problem with a configuration, so they are all reported at once."""
    p: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            p.append(message)

    typed = _type_problems(cfg)
    if typed:
        # the range checks below assume the declared types; report the type problems alone
        return typed
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
    ratio_ok = math.isfinite(cfg.cohort_size_ratio) and cfg.cohort_size_ratio >= 1.0
    need(ratio_ok, f"cohort_size_ratio must be >= 1, got {cfg.cohort_size_ratio}")
    if ratio_ok and 1 <= cfg.n_cohorts <= 26 and cfg.n_patients >= 2 * cfg.n_cohorts:
        smallest = min(cfg.cohort_sizes)
        need(smallest >= 2, f"the smallest cohort would have {smallest} patient(s); need >= 2")
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
    for name in _NONNEGATIVE:
        value = getattr(cfg, name)
        need(math.isfinite(value) and value >= 0.0, f"{name} must be finite and >= 0")
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
    for name in _FINITE:
        need(math.isfinite(getattr(cfg, name)), f"{name} must be finite")
    need(
        0 <= cfg.prognosis_families <= len(FAMILY_PATTERNS),
        f"prognosis_families must be in [0, {len(FAMILY_PATTERNS)}], got {cfg.prognosis_families}",
    )
    need(
        cfg.prognosis_families <= cfg.n_cohorts,
        f"prognosis_families ({cfg.prognosis_families}) cannot exceed n_cohorts ({cfg.n_cohorts})",
    )
    need(0.0 <= cfg.omics_hidden <= 1.0, f"omics_hidden must be in [0, 1], got {cfg.omics_hidden}")
    need(0 <= cfg.omics_nuisance_latents <= 20, "omics_nuisance_latents must be in [0, 20]")
    need(0 <= cfg.n_mutation_genes <= 20_000, "n_mutation_genes must be in [0, 20000]")
    need(
        0 <= cfg.site_shift_sites < max(cfg.sites_per_cohort, 1) or cfg.site_shift_sites == 0,
        f"site_shift_sites must leave at least one unshifted site per cohort "
        f"(sites_per_cohort = {cfg.sites_per_cohort}), got {cfg.site_shift_sites}",
    )
    need(0.0 <= cfg.site_shift_strength <= 3.0, "site_shift_strength must be in [0, 3]")
    p.extend(_tree_problems(cfg.hierarchy_tree))
    return p


def _type_problems(cfg: SimulationConfig) -> list[str]:
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int | np.integer)):
            problems.append(f"{f.name} must be an integer, got {value!r}")
        elif f.type == "float" and (
            isinstance(value, bool) or not isinstance(value, int | float | np.number)
        ):
            problems.append(f"{f.name} must be a number, got {value!r}")
        elif f.type == "bool" and not isinstance(value, bool | np.bool_):
            problems.append(f"{f.name} must be true or false, got {value!r}")
    return problems


def _tree_problems(tree: Any) -> list[str]:
    try:
        pairs = [(coarse, tuple(fines)) for coarse, fines in tree]
    except (TypeError, ValueError):
        return ["hierarchy_tree must map each coarse class to a list of fine classes"]
    names = [c for c, _ in pairs] + [f for _, fines in pairs for f in fines]
    problems = []
    if len(pairs) < 2:
        problems.append("hierarchy_tree needs at least 2 coarse classes")
    if any(len(fines) < 1 for _, fines in pairs):
        problems.append("every coarse class of hierarchy_tree needs at least one fine class")
    if not all(isinstance(n, str) and n for n in names):
        problems.append("hierarchy_tree class names must be non-empty strings")
    elif len(set(names)) != len(names):
        problems.append("hierarchy_tree class names must be distinct (coarse and fine together)")
    return problems
