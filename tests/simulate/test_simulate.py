"""The cohort simulator: contracts, determinism, planted signal and its absence in the control.

Signal checks use only mean-pooled bag features and off-the-shelf models (scikit-learn, lifelines),
never oncoslide's own training code, and compare with the ground truth written by the simulator.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from oncoslide.errors import CohortValidationError, ConfigError
from oncoslide.simulate import (
    SimulationConfig,
    SimulationResult,
    oracle_predictions,
    permute_outcomes,
    simulate_cohort,
    write_permuted_cohort,
)

# Small but statistically useful: 300 patients, ~80 patches of 32 dims per slide (~2 s).
SMALL = {
    "n_patients": 300,
    "feature_dim": 32,
    "patches_median": 80,
    "patches_min": 20,
    "patches_max": 400,
    "n_genes": 120,
    "within_prototype_rank": 4,
}
TINY = {**SMALL, "n_patients": 24, "patches_median": 30, "patches_min": 10, "n_genes": 24}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate_cohort(tmp_path_factory.mktemp("sim"), SimulationConfig(seed=0, **SMALL))


@pytest.fixture(scope="module")
def table(sim: SimulationResult) -> pd.DataFrame:
    return pd.read_csv(sim.cohort_table)


@pytest.fixture(scope="module")
def truth(sim: SimulationResult) -> dict:
    return json.loads(sim.truth.read_text())


@pytest.fixture(scope="module")
def pooled(sim: SimulationResult, table: pd.DataFrame) -> pd.DataFrame:
    """Mean of all patch features of each patient (all slides), indexed by sorted patient_id."""
    rows = {}
    for pid, group in table.groupby("patient_id", sort=True):
        feats = [_read(sim.features_dir / f"{s}.h5")[0] for s in group["slide_id"]]
        rows[pid] = np.concatenate(feats).astype(np.float64).mean(axis=0)
    return pd.DataFrame(rows).T


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, dict, dict, dict]:
    with h5py.File(path, "r") as f:
        return (
            f["features"][:],
            f["coords"][:],
            dict(f["coords"].attrs),
            dict(f["features"].attrs),
            dict(f.attrs),
        )


def _patients(table: pd.DataFrame) -> pd.DataFrame:
    return table.groupby("patient_id", sort=True).first()


def _mean_pool_cv(pooled: pd.DataFrame, table: pd.DataFrame) -> tuple[float, float]:
    """Out-of-fold C-index (PCA + penalised Cox) and MSI AUC (PCA + logistic), 5-fold CV."""
    pt = _patients(table)
    x = pooled.loc[pt.index].to_numpy()
    risk, p_msi = np.zeros(len(pt)), np.zeros(len(pt))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for train, test in folds.split(x, pt["event"]):
        z = StandardScaler().fit(x[train]).transform(x)
        z = PCA(10, random_state=0).fit(z[train]).transform(z)
        z /= z[train].std(axis=0)
        cols = [f"pc{i}" for i in range(z.shape[1])]
        df = pd.DataFrame(z[train], columns=cols)
        df["time"], df["event"] = pt["time"].to_numpy()[train], pt["event"].to_numpy()[train]
        cox = CoxPHFitter(penalizer=0.1).fit(df, "time", "event")
        risk[test] = cox.predict_log_partial_hazard(pd.DataFrame(z[test], columns=cols))
        clf = LogisticRegression(C=0.1, max_iter=2000).fit(z[train], pt["msi"].to_numpy()[train])
        p_msi[test] = clf.predict_proba(z[test])[:, 1]
    c_index = concordance_index(pt["time"], -risk, pt["event"])
    return float(c_index), float(roc_auc_score(pt["msi"], p_msi))


# ------------------------------------------------------------------------------ contracts


def test_feature_files_follow_the_contract(sim: SimulationResult, table: pd.DataFrame) -> None:
    files = sorted(p.stem for p in sim.features_dir.glob("*.h5"))
    assert files == sorted(table["slide_id"])  # one file per slide, nothing else
    for slide_id in table["slide_id"]:
        feats, coords, grid, fattrs, root = _read(sim.features_dir / f"{slide_id}.h5")
        assert feats.dtype == np.float16 and feats.ndim == 2 and feats.shape[1] == 32
        assert np.isfinite(feats).all()
        assert coords.dtype == np.int64 and coords.shape == (feats.shape[0], 2)
        assert root["oncoslide_layout_version"] == 1
        assert fattrs["encoder"] == "simulated" and fattrs["weights_fingerprint"].startswith("sim-")
        assert grid["patch_size"] == 224 and grid["patch_size_level0"] == 448
        assert grid["target_mpp"] == 0.5 and grid["level0_mpp"] == 0.25 and grid["overlap"] == 0
        step = grid["patch_size_level0"]
        assert (coords >= 0).all() and (coords % step == 0).all()
        assert (coords[:, 0] + step <= grid["level0_width"]).all()
        assert (coords[:, 1] + step <= grid["level0_height"]).all()
        assert len(np.unique(coords, axis=0)) == len(coords)  # no two patches on one spot
        assert 20 <= len(coords) <= 400


def test_cohort_table_columns_and_patient_consistency(
    sim: SimulationResult, table: pd.DataFrame
) -> None:
    expected = ["patient_id", "slide_id", "cohort", "site", "time", "event", "msi", "subtype"]
    assert list(table.columns) == expected
    assert table["slide_id"].is_unique
    assert set(table["cohort"]) == {"SIM-A", "SIM-B", "SIM-C"}
    assert (table["time"] >= 1.0).all() and set(table["event"]) == {0, 1}
    assert set(table["msi"]) == {0, 1}
    assert set(table["subtype"]) == {"proliferative", "immune", "mesenchymal"}
    per_patient = table.groupby("patient_id")[expected[2:]].nunique()
    assert (per_patient == 1).all().all()  # patient-level columns agree across slides
    n_slides = table.groupby("patient_id").size()
    assert set(n_slides) <= {1, 2}
    assert 0.15 < (n_slides == 2).mean() < 0.35  # two_slide_fraction = 0.25, n = 300
    assert sim.summary["n_patients"] == 300 and sim.summary["n_slides"] == len(table)


def test_barcodes_are_tcga_like_and_carry_the_site(table: pd.DataFrame) -> None:
    for row in table.itertuples():
        assert re.fullmatch(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", row.patient_id)
        assert re.fullmatch(re.escape(row.patient_id) + r"-01Z-00-DX[12]", row.slide_id)
        assert row.patient_id[5:7] == row.site  # site derivation from the barcode works
    sites = table.groupby("cohort")["site"].unique()
    assert all(len(s) == 3 for s in sites)  # sites_per_cohort
    assert len({s for ss in sites for s in ss}) == 9  # no site shared by two cohorts


def test_omics_and_gene_groups_follow_the_contract(sim: SimulationResult, truth: dict) -> None:
    omics = pd.read_csv(sim.omics_table)
    groups = json.loads(sim.gene_groups.read_text())
    assert set(groups) == {
        "tumour_suppressors",
        "oncogenes",
        "protein_kinases",
        "cell_differentiation",
        "transcription_factors",
        "cytokines_growth_factors",
    }
    genes = [g for members in groups.values() for g in members]
    assert len(genes) == len(set(genes)) == 96  # 120 genes, 20 % in no group
    assert set(genes) < set(omics.columns)
    assert omics.columns[0] == "patient_id" and omics.shape == (300, 121)
    assert set(omics["patient_id"]) == {p["patient_id"] for p in truth["patients"]}


def test_truth_has_parameters_patients_and_prototypes(sim: SimulationResult, truth: dict) -> None:
    assert len(truth["patients"]) == 300
    roles = {p["role"] for p in truth["prototypes"]}
    assert {"immune", "stroma", "necrosis", "tumour_high_grade", "tumour_mucinous"} <= roles
    centres = np.load(sim.truth_prototypes)
    assert centres.shape == (len(truth["prototypes"]), 32)
    labels = np.load(sim.truth_patch_labels)
    assert sum(len(labels[k]) for k in labels.files) == sim.summary["n_patches"]
    for p in truth["patients"][:20]:
        assert abs(sum(p["mix_expected"].values()) - 1.0) < 1e-5
        assert abs(sum(p["mix_realised"].values()) - 1.0) < 1e-5
        assert abs(sum(p["p_subtype"].values()) - 1.0) < 1e-5


def test_patches_lie_near_their_prototype_centre(
    sim: SimulationResult, table: pd.DataFrame
) -> None:
    """The written centres are the real cluster centres: nearest centre mostly = true label."""
    centres = np.load(sim.truth_prototypes).astype(np.float64)
    labels = np.load(sim.truth_patch_labels)
    hits = total = 0
    for slide_id in table["slide_id"][:60]:
        feats = _read(sim.features_dir / f"{slide_id}.h5")[0].astype(np.float64)
        d = ((feats[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
        hits += int((d.argmin(axis=1) == labels[slide_id]).sum())
        total += len(feats)
    # 16 candidate centres (chance ~ 0.06); noise, low-rank spread and batch shifts blur some
    assert hits / total > 0.5


def test_features_are_roughly_unit_variance(sim: SimulationResult, table: pd.DataFrame) -> None:
    feats = np.concatenate(
        [_read(sim.features_dir / f"{s}.h5")[0] for s in table["slide_id"][:100]]
    ).astype(np.float64)
    sd = feats.std(axis=0)
    assert 0.7 < np.median(sd) < 1.4 and sd.min() > 0.4 and sd.max() < 2.5


# ------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_outputs(tmp_path: Path) -> None:
    a = simulate_cohort(tmp_path / "a", SimulationConfig(seed=3, **TINY))
    b = simulate_cohort(tmp_path / "b", SimulationConfig(seed=3, **TINY))
    for name in ("cohort.csv", "omics.csv", "gene_groups.json", "truth.json"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes(), name
    assert np.array_equal(np.load(a.truth_prototypes), np.load(b.truth_prototypes))
    for f in sorted(a.features_dir.glob("*.h5")):
        fa, ca, ga, *_ = _read(f)
        fb, cb, gb, *_ = _read(b.features_dir / f.name)
        assert np.array_equal(fa, fb) and np.array_equal(ca, cb) and ga == gb

    c = simulate_cohort(tmp_path / "c", SimulationConfig(seed=4, **TINY))
    ta, tc = pd.read_csv(a.cohort_table), pd.read_csv(c.cohort_table)
    assert set(ta["patient_id"]).isdisjoint(tc["patient_id"])
    assert not np.array_equal(np.load(a.truth_prototypes), np.load(c.truth_prototypes))


def test_outcomes_do_not_depend_on_feature_settings(tmp_path: Path) -> None:
    """Separate random streams: the feature space can change without changing the patients."""
    a = simulate_cohort(tmp_path / "a", SimulationConfig(seed=5, **TINY))
    b = simulate_cohort(tmp_path / "b", SimulationConfig(seed=5, **{**TINY, "feature_dim": 16}))
    assert a.cohort_table.read_bytes() == b.cohort_table.read_bytes()
    assert a.omics_table.read_bytes() == b.omics_table.read_bytes()


def test_existing_cohort_is_not_overwritten_silently(tmp_path: Path) -> None:
    cfg = SimulationConfig(seed=1, **TINY)
    simulate_cohort(tmp_path, cfg)
    with pytest.raises(ConfigError, match="overwrite"):
        simulate_cohort(tmp_path, cfg)
    stale = tmp_path / "features" / "TCGA-XX-OLD0-01Z-00-DX1.h5"
    stale.write_bytes(b"")
    simulate_cohort(tmp_path, SimulationConfig(seed=2, **TINY), overwrite=True)
    slides = set(pd.read_csv(tmp_path / "cohort.csv")["slide_id"])
    assert {p.stem for p in (tmp_path / "features").glob("*.h5")} == slides


# ------------------------------------------------------------------------------ planted signal


def test_oracle_summary_matches_independent_metrics(sim: SimulationResult, truth: dict) -> None:
    pt = _patients(pd.read_csv(sim.cohort_table))
    oracle = oracle_predictions(sim.truth).set_index("patient_id").loc[pt.index]
    c_oracle = concordance_index(pt["time"], -oracle["risk"], pt["event"])
    auc_oracle = roc_auc_score(pt["msi"], oracle["p_msi"])
    assert sim.summary["oracle_c_index"] == pytest.approx(c_oracle, abs=1e-4)
    assert sim.summary["oracle_auc_msi"] == pytest.approx(auc_oracle, abs=1e-4)
    assert c_oracle > 0.75 and auc_oracle > 0.8  # the ceiling is high
    assert truth["summary"]["oracle_c_index"] == sim.summary["oracle_c_index"]


def test_event_rate_and_msi_prevalence_hit_their_targets(table: pd.DataFrame) -> None:
    pt = _patients(table)
    # calibrated on a 20 000-patient reference population; binomial sd at n = 300 is ~0.03
    assert abs(pt["event"].mean() - 0.55) < 0.09
    assert abs(pt["msi"].mean() - 0.25) < 0.09


def test_mean_pooled_features_recover_the_planted_signal(
    pooled: pd.DataFrame, table: pd.DataFrame, sim: SimulationResult
) -> None:
    c_index, auc = _mean_pool_cv(pooled, table)
    # standard errors at n = 300: ~0.03 for the C-index, ~0.035 for the AUC (75 positives)
    assert c_index >= 0.65
    assert auc >= 0.60
    assert c_index < sim.summary["oracle_c_index"] + 0.02  # nothing beats the oracle


def test_permuted_control_has_no_signal(pooled: pd.DataFrame, table: pd.DataFrame) -> None:
    scores = np.array([_mean_pool_cv(pooled, permute_outcomes(table, seed)) for seed in range(3)])
    # chance level 0.5; the mean of 3 permutations has sd ~0.02 (C) and ~0.03 (AUC); CV on
    # pure noise is also biased slightly below 0.5, so allow 0.1 either side
    assert abs(scores[:, 0].mean() - 0.5) < 0.1
    assert abs(scores[:, 1].mean() - 0.5) < 0.1


def test_bag_size_and_slide_count_do_not_predict_outcome(
    sim: SimulationResult, table: pd.DataFrame
) -> None:
    n_patches = np.load(sim.truth_patch_labels)
    size = table.assign(n=[len(n_patches[s]) for s in table["slide_id"]])
    pt = size.groupby("patient_id", sort=True).agg(
        n=("n", "sum"),
        slides=("slide_id", "size"),
        time=("time", "first"),
        event=("event", "first"),
    )
    # |C - 0.5| < 0.1 is > 3 standard errors at n = 300; a real size leak gives far more
    assert abs(concordance_index(pt["time"], -pt["n"], pt["event"]) - 0.5) < 0.1
    assert abs(concordance_index(pt["time"], -pt["slides"], pt["event"]) - 0.5) < 0.1


def _site_logrank_pvalues(table: pd.DataFrame) -> list[float]:
    """Per cohort, the p-value of the k-sample log-rank test of survival across its sites."""
    pt = _patients(table)
    return [
        float(multivariate_logrank_test(g["time"], g["site"], g["event"]).p_value)
        for _, g in pt.groupby("cohort")
    ]


def test_site_is_not_confounded_with_outcome_unless_asked(
    table: pd.DataFrame, tmp_path: Path
) -> None:
    # site is nested in cohort and cohorts differ in baseline hazard, so compare within cohort
    assert min(_site_logrank_pvalues(table)) > 0.01
    confounded = simulate_cohort(
        tmp_path,
        SimulationConfig(
            seed=0, **{**SMALL, "feature_dim": 4, "patches_median": 20, "site_confounding": 4.0}
        ),
    )
    # positive control: the same test does detect a planted site-outcome link
    assert min(_site_logrank_pvalues(pd.read_csv(confounded.cohort_table))) < 0.01


def test_omics_driven_genes_follow_the_latents(sim: SimulationResult, truth: dict) -> None:
    omics = pd.read_csv(sim.omics_table).set_index("patient_id")
    pts = {p["patient_id"]: p for p in truth["patients"]}
    z = pd.DataFrame([pts[i]["z"][:4] for i in omics.index], index=omics.index)
    cohort = [pts[i]["cohort"] for i in omics.index]
    # genes carry a cohort offset; centre genes and latents within cohort (partial correlation)
    omics = omics - omics.groupby(cohort).transform("mean")
    z = z - z.groupby(cohort).transform("mean")
    n = len(omics)
    driven = [g for g, info in truth["genes"].items() if info["driven"]]
    idle = [g for g, info in truth["genes"].items() if not info["driven"]]
    assert len(driven) > 40 and len(idle) > 40
    corr_driven = []
    for gene in driven:
        signal = z.to_numpy() @ np.asarray(truth["genes"][gene]["loadings"])
        corr_driven.append(np.corrcoef(omics[gene], signal)[0, 1])
    # loadings |a| in [0.5, 1] and noise sd 1: correlations ~0.45 to 0.7
    assert min(corr_driven) > 0.25 and np.mean(corr_driven) > 0.5
    # pure-noise genes: null correlations have sd ~1/sqrt(n); 4.5 sd over ~250 pairs is < 0.2 %
    corr = np.corrcoef(np.column_stack([omics[idle].to_numpy(), z.to_numpy()]).T)
    null = np.abs(corr[: len(idle), len(idle) :])
    assert null.max() < 4.5 / np.sqrt(n)
    assert null.mean() < 1.5 * np.sqrt(2 / np.pi) / np.sqrt(n)  # E|N(0, 1/n)| = 0.8 / sqrt(n)


def test_immune_clustering_follows_the_immune_latent(
    sim: SimulationResult, table: pd.DataFrame, truth: dict
) -> None:
    """Immune patches have more immune neighbours than their share when z_immune is high."""
    immune = next(p["index"] for p in truth["prototypes"] if p["role"] == "immune")
    z_immune = {p["patient_id"]: p["z"][1] for p in truth["patients"]}
    labels = np.load(sim.truth_patch_labels)
    excess, latent = [], []
    for row in table.itertuples():
        cells = _read(sim.features_dir / f"{row.slide_id}.h5")[1] // 448
        is_immune = labels[row.slide_id] == immune
        if is_immune.sum() < 4:
            continue
        occupied = {tuple(c): bool(i) for c, i in zip(cells.tolist(), is_immune, strict=True)}
        same = total = 0
        for x, y in cells[is_immune].tolist():
            for nb in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if nb in occupied:
                    total += 1
                    same += occupied[nb]
        excess.append(same / max(total, 1) - is_immune.mean())
        latent.append(z_immune[row.patient_id])
    rho = stats.spearmanr(excess, latent)
    assert np.mean(excess) > 0.05  # regions, not salt and pepper
    # ~200 slides: a null rho has sd ~0.07; the planted effect gives ~0.2 to 0.4
    assert rho.statistic > 0.15 and rho.pvalue < 0.01


# ------------------------------------------------------------------------------ permutation


def test_permute_outcomes_is_patient_level_and_joint(table: pd.DataFrame) -> None:
    permuted = permute_outcomes(table, seed=11)
    assert list(permuted.columns) == list(table.columns)
    ids = ["patient_id", "slide_id", "cohort", "site"]
    pd.testing.assert_frame_equal(permuted[ids], table[ids])
    outcome = ["time", "event", "msi", "subtype"]
    assert (permuted.groupby("patient_id")[outcome].nunique() == 1).all().all()
    before, after = _patients(table)[outcome], _patients(permuted)[outcome]
    # the same multiset of joint (time, event, msi, subtype) records, re-assigned
    key = lambda df: sorted(map(tuple, df.astype(str).to_numpy()))  # noqa: E731
    assert key(before) == key(after)
    assert (before["time"] != after["time"]).mean() > 0.9
    pd.testing.assert_frame_equal(permuted, permute_outcomes(table, seed=11))
    assert not permuted.equals(permute_outcomes(table, seed=12))
    assert permuted["event"].dtype == table["event"].dtype


def test_permute_within_cohort_keeps_each_cohorts_outcomes(table: pd.DataFrame) -> None:
    permuted = permute_outcomes(table, seed=1, columns=("time", "event"), within="cohort")
    assert permuted["msi"].equals(table["msi"])  # untouched column
    for cohort in table["cohort"].unique():
        a = _patients(table[table["cohort"] == cohort])
        b = _patients(permuted[permuted["cohort"] == cohort])
        assert sorted(zip(a["time"], a["event"], strict=True)) == sorted(
            zip(b["time"], b["event"], strict=True)
        )


def test_permute_outcomes_reports_every_problem() -> None:
    bad = pd.DataFrame(
        {
            "patient_id": ["p1", "p1", "p2"],
            "slide_id": ["s1", "s2", "s3"],
            "time": [1.0, 2.0, 3.0],
            "event": [1, 0, 1],
        }
    )
    with pytest.raises(CohortValidationError) as err:
        permute_outcomes(bad, seed=0, columns=("time", "event", "msi", "slide_id"))
    text = str(err.value)
    assert "msi" in text and "'slide_id' is an identifier" in text
    assert "'time' differs" in text and "'event' differs" in text
    with pytest.raises(CohortValidationError, match="patient_id"):
        permute_outcomes(bad.drop(columns="patient_id"), seed=0)


def test_write_permuted_cohort(sim: SimulationResult, table: pd.DataFrame, tmp_path: Path) -> None:
    out = write_permuted_cohort(sim.out_dir, tmp_path / "permuted.csv", seed=4)
    pd.testing.assert_frame_equal(pd.read_csv(out), permute_outcomes(table, seed=4))
    parquet = write_permuted_cohort(sim.cohort_table, tmp_path / "permuted.parquet", seed=4)
    assert len(pd.read_parquet(parquet)) == len(table)
    with pytest.raises(CohortValidationError, match="not found"):
        write_permuted_cohort(tmp_path / "missing.csv", tmp_path / "x.csv", seed=0)


# ------------------------------------------------------------------------------ configuration


def test_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        SimulationConfig(n_patients=1, feature_dim=4000, target_event_rate=1.5, n_cohorts=30)
    text = str(err.value)
    for name in ("n_patients", "feature_dim", "target_event_rate", "n_cohorts"):
        assert name in text
    with pytest.raises(ConfigError, match="integer"):
        SimulationConfig(n_patients=10.5)  # type: ignore[arg-type]


def test_unreachable_event_rate_is_a_config_error(tmp_path: Path) -> None:
    cfg = SimulationConfig(
        seed=0, **TINY, target_event_rate=0.95, median_survival_days=(5000.0, 6000.0)
    )
    with pytest.raises(ConfigError, match="unreachable"):
        simulate_cohort(tmp_path, cfg)
