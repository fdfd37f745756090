"""The planted truths of the v2 presets, each checked by an oracle that knows the truth.

Scores are recomputed here from truth.json and the written files with independent tools
(lifelines' concordance, scikit-learn), never with the simulator's own summary or with a model
the preset is meant to judge. Preset outcomes do not depend on the feature dimension, so the
worlds are simulated with few dimensions to keep the suite fast; the planted quantities are those
of the documented presets.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from oncoslide.simulate import SimulationResult, make_simulation_config, simulate_cohort

SMALL_FEATURES = {"feature_dim": 16, "within_prototype_rank": 2}


def _simulate(tmp: Path, preset: str, **settings: object) -> SimulationResult:
    config = make_simulation_config(preset, {**SMALL_FEATURES, **settings})
    return simulate_cohort(tmp, config)


def _truth(sim: SimulationResult) -> dict:
    return json.loads(sim.truth.read_text())


def _patients(sim: SimulationResult) -> pd.DataFrame:
    """One row per patient (sorted), with the truth's per-patient entries joined."""
    table = pd.read_csv(sim.cohort_table).groupby("patient_id", sort=True).first()
    truth = pd.DataFrame(_truth(sim)["patients"]).set_index("patient_id")
    return table.join(truth.drop(columns=["cohort", "site"]), how="left")


def _c(pt: pd.DataFrame, risk: pd.Series | np.ndarray) -> float:
    """Harrell's C by lifelines (higher risk = shorter survival)."""
    return float(concordance_index(pt["time"], -np.asarray(risk, dtype=float), pt["event"]))


def _mean_pooled(sim: SimulationResult, pt: pd.DataFrame) -> np.ndarray:
    table = pd.read_csv(sim.cohort_table)
    rows = {}
    for pid, group in table.groupby("patient_id", sort=True):
        feats = []
        for slide in group["slide_id"]:
            with h5py.File(sim.features_dir / f"{slide}.h5", "r") as f:
                feats.append(f["features"][:].astype(np.float64))
        rows[pid] = np.concatenate(feats).mean(axis=0)
    return pd.DataFrame(rows).T.loc[pt.index].to_numpy()


def _cv_cox(x: np.ndarray, pt: pd.DataFrame, n_pc: int = 8) -> float:
    """Out-of-fold C of a penalised Cox model on principal components of x (5-fold)."""
    risk = np.zeros(len(pt))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for train, test in folds.split(x, pt["event"]):
        z = StandardScaler().fit(x[train]).transform(x)
        k = min(n_pc, x.shape[1])
        z = PCA(k, random_state=0).fit(z[train]).transform(z)
        z /= z[train].std(axis=0)
        cols = [f"pc{i}" for i in range(k)]
        df = pd.DataFrame(z[train], columns=cols)
        df["time"] = pt["time"].to_numpy()[train]
        df["event"] = pt["event"].to_numpy()[train]
        cox = CoxPHFitter(penalizer=0.1).fit(df, "time", "event")
        risk[test] = cox.predict_log_partial_hazard(pd.DataFrame(z[test], columns=cols))
    return _c(pt, risk)


def _cv_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Out-of-fold (macro one-vs-rest) AUC of a logistic regression on standardised x."""
    classes = np.unique(y)
    prob = np.zeros((len(y), len(classes)))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(x[train]), y[train])
        prob[test] = clf.predict_proba(scaler.transform(x[test]))
    if len(classes) == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    return float(roc_auc_score(y, prob, multi_class="ovr"))


# ------------------------------------------------------------------------------ pan-cancer


@pytest.fixture(scope="module")
def pan(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    # few small patches: the prognosis truths live in latents and outcomes
    return _simulate(tmp_path_factory.mktemp("pan"), "pan-cancer", patches_median=16, patches_min=8)


def test_pan_cancer_sizes_range_from_common_to_rare(pan: SimulationResult) -> None:
    sizes = pd.read_csv(pan.cohort_table).groupby("cohort")["patient_id"].nunique()
    assert list(sizes.index) == [f"SIM-{c}" for c in "ABCDEFGHI"]
    assert sizes.iloc[0] >= 390 and sizes.iloc[-1] <= 30  # ~400 down to ~25
    assert (np.diff(sizes.to_numpy()) < 0).all()


def test_pan_cancer_similarity_predicts_transfer_of_true_risk(pan: SimulationResult) -> None:
    """Cancer a's true risk function applied to cancer b scores as the planted similarity says."""
    truth = _truth(pan)
    prognosis = truth["prognosis"]
    latents = prognosis["latents"]
    coefs = pd.DataFrame(prognosis["hazard_coefs"]).T[latents]
    pt = _patients(pan)
    z = np.array(pt["z"].tolist())[:, :4]
    cancers = list(coefs.index)
    c_matrix = pd.DataFrame(index=cancers, columns=cancers, dtype=float)
    for b in cancers:
        rows = (pt["cohort"] == b).to_numpy()
        for a in cancers:
            c_matrix.loc[a, b] = _c(pt[rows], z[rows] @ coefs.loc[a].to_numpy())
    # the similarity matrix is the cosine of the cancers' coefficient vectors
    unit = coefs.to_numpy() / np.linalg.norm(coefs.to_numpy(), axis=1, keepdims=True)
    sim = pd.DataFrame(prognosis["similarity"]).loc[cancers, cancers]
    np.testing.assert_allclose(sim.to_numpy(), unit @ unit.T, atol=1e-5)
    off = ~np.eye(len(cancers), dtype=bool)
    rho = stats.spearmanr(sim.to_numpy()[off], c_matrix.to_numpy()[off]).statistic
    assert rho >= 0.8
    # families: within a family the prognosis is shared, across some it is reversed
    family = pd.Series(prognosis["families"])
    same = family.to_numpy()[:, None] == family.to_numpy()[None, :]
    assert sim.to_numpy()[same & off].min() > 0.85
    reversed_pairs = sim.to_numpy() < -0.2
    assert reversed_pairs.any()
    assert c_matrix.to_numpy()[reversed_pairs].max() < 0.5  # at or below chance where reversed
    assert c_matrix.to_numpy()[same & off].min() > 0.65


def test_pan_cancer_families_share_their_tumour_morphologies(pan: SimulationResult) -> None:
    truth = _truth(pan)
    family = truth["prognosis"]["families"]
    present = {c: set(logits) for c, logits in truth["parameters"]["base_logits"].items()}
    tumour = {p["name"]: p for p in truth["prototypes"] if p["role"].startswith("tumour_")}
    assert len(tumour) == 3 * 3  # three tumour roles per family
    for a in present:
        for b in present:
            shared = {n for n in present[a] & present[b] if n in tumour}
            assert bool(shared) == (family[a] == family[b])
    centres = np.load(pan.truth_prototypes)
    assert centres.shape[0] == len(truth["prototypes"])


# ------------------------------------------------------------------------------ spatial


def _interface_from_files(sim: SimulationResult, pt: pd.DataFrame, merge_slides: bool) -> pd.Series:
    """Tumour share among immune patches' neighbours over the tissue's tumour share, per patient.

    Neighbours are the 4 grid neighbours inside the same slide; ``merge_slides`` ignores the slide
    index (a wrong reading: a patient's slides are separate coordinate frames).
    """
    truth = _truth(sim)
    roles = {p["index"]: p["role"] for p in truth["prototypes"]}
    immune = {i for i, r in roles.items() if r == "immune"}
    tumour = {i for i, r in roles.items() if r.startswith("tumour_")}
    labels = np.load(sim.truth_patch_labels)
    out = {}
    for pid, row in pt.iterrows():
        frames = []
        for slide in row["slides"]:
            with h5py.File(sim.features_dir / f"{slide}.h5", "r") as f:
                cells = f["coords"][:] // 448
            frames.append(
                dict(zip(map(tuple, cells.tolist()), labels[slide].tolist(), strict=True))
            )
        if merge_slides:
            merged: dict = {}
            for frame in frames:
                merged.update(frame)
            frames = [merged]
        near = at_tumour = n_tumour = n = 0
        for frame in frames:
            for (x, y), lab in frame.items():
                n += 1
                n_tumour += lab in tumour
                if lab not in immune:
                    continue
                for cell in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if cell in frame:
                        near += 1
                        at_tumour += frame[cell] in tumour
        out[pid] = (at_tumour / near) / (n_tumour / n) if near and n_tumour else np.nan
    return pd.Series(out)


@pytest.fixture(scope="module")
def spatial(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return _simulate(tmp_path_factory.mktemp("spatial"), "spatial")


def test_spatial_interface_is_read_from_arrangement_not_counts(spatial: SimulationResult) -> None:
    pt = _patients(spatial)
    ratio = _interface_from_files(spatial, pt, merge_slides=False)
    np.testing.assert_allclose(
        ratio.dropna(), pt["interface_ratio"].astype(float).dropna(), atol=1e-5
    )
    parts = pd.DataFrame(list(pt["linear_predictor_parts"]), index=pt.index)
    assert _c(pt, parts["interface"]) >= 0.70  # the true interface risk
    ok = ratio.notna()
    # the oracle counting adjacencies (more interface, better survival)
    assert _c(pt[ok], -ratio[ok]) >= 0.68
    # the composition-only risk: what any count of morphologies can reach, out of fold
    comp = pd.DataFrame(list(pt["mix_realised"]), index=pt.index)
    log_shares = np.log(comp.clip(lower=1e-3))
    assert _cv_cox(log_shares.to_numpy(), pt) <= 0.55
    assert abs(_cv_cox(_mean_pooled(spatial, pt), pt) - 0.5) < 0.06  # mean pooling: chance
    # the 'inflamed' label: arrangement shows it, mean pooling does not
    assert roc_auc_score(pt["inflamed"][ok], ratio[ok]) >= 0.75
    assert _cv_auc(_mean_pooled(spatial, pt), pt["inflamed"].to_numpy()) < 0.6


def test_spatial_slides_are_separate_coordinate_frames(spatial: SimulationResult) -> None:
    pt = _patients(spatial)
    two = pt[pt["slides"].map(len) == 2]
    assert len(two) > 50
    overlapping = 0
    for _, row in two.iterrows():
        sets = []
        for slide in row["slides"]:
            with h5py.File(spatial.features_dir / f"{slide}.h5", "r") as f:
                sets.append(set(map(tuple, f["coords"][:].tolist())))
        overlapping += bool(sets[0] & sets[1])
    assert overlapping > 0.5 * len(two)  # same coordinates on different slides
    # merging the frames invents neighbours: the interface reading changes
    right = _interface_from_files(spatial, two, merge_slides=False)
    wrong = _interface_from_files(spatial, two, merge_slides=True)
    assert (np.abs(right - wrong) > 1e-6).mean() > 0.5


def test_shuffled_positions_keep_every_patch_and_remove_the_signal(
    spatial: SimulationResult, tmp_path: Path
) -> None:
    shuffled = _simulate(tmp_path, "spatial", shuffle_positions=True)
    pt = _patients(shuffled)
    original = _patients(spatial)
    pd.testing.assert_frame_equal(
        pt[["time", "event", "inflamed"]], original[["time", "event", "inflamed"]]
    )
    for slide in list(pt["slides"].explode())[:60]:
        with (
            h5py.File(spatial.features_dir / f"{slide}.h5") as a,
            h5py.File(shuffled.features_dir / f"{slide}.h5") as b,
        ):
            fa, fb = a["features"][:], b["features"][:]
            assert np.array_equal(np.sort(fa, axis=0), np.sort(fb, axis=0))  # same patches
            assert set(map(tuple, a["coords"][:].tolist())) == set(
                map(tuple, b["coords"][:].tolist())
            )
            assert not np.array_equal(fa, fb)  # on other cells
    ratio = _interface_from_files(shuffled, pt, merge_slides=False)
    ok = ratio.notna()
    assert abs(_c(pt[ok], -ratio[ok]) - 0.5) < 0.06
    assert abs(roc_auc_score(pt["inflamed"][ok], ratio[ok]) - 0.5) < 0.08


# ------------------------------------------------------------------------------ histogenomic


@pytest.fixture(scope="module")
def histogenomic(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return _simulate(
        tmp_path_factory.mktemp("histogenomic"), "histogenomic", patches_median=30, patches_min=10
    )


def _omics_only_cox(sim: SimulationResult, pt: pd.DataFrame) -> float:
    omics = pd.read_csv(sim.omics_table).set_index("patient_id").loc[pt.index]
    x = omics.to_numpy()
    # genes carry a cohort offset: centre within cancer
    x = x - pd.DataFrame(x).groupby(pt["cohort"].to_numpy()).transform("mean").to_numpy()
    return _cv_cox(x, pt, n_pc=10)


def test_histogenomic_omics_carry_prognosis_the_slides_barely_show(
    histogenomic: SimulationResult,
) -> None:
    truth = _truth(histogenomic)
    pt = _patients(histogenomic)
    with_omics = pt[pt["has_omics"]]
    assert 0.15 < 1 - len(with_omics) / len(pt) < 0.25  # 20 % without omics
    c_wsi = _c(with_omics, with_omics["risk_wsi_oracle"])
    c_omics = _c(with_omics, with_omics["risk_omics_oracle"])
    assert c_omics - c_wsi >= 0.05
    # an omics-only Cox model fitted here beats the best the slides can carry
    assert _omics_only_cox(histogenomic, with_omics) > c_wsi
    # the WSI oracle: composition exactly, of the genomic programme only what slides show
    parts = pd.DataFrame(list(with_omics["linear_predictor_parts"]), index=with_omics.index)
    r = 1 - truth["config"]["omics_hidden"]
    expected = (
        parts["composition"] + truth["config"]["genomic_signal"] * r * with_omics["genomic_visible"]
    )
    np.testing.assert_allclose(with_omics["risk_wsi_oracle"], expected, atol=1e-5)
    visible = stats.pearsonr(pt["genomic_latent"], pt["genomic_visible"]).statistic
    assert abs(visible - r) < 0.12


def test_histogenomic_gap_closes_when_the_slides_show_the_programme(tmp_path: Path) -> None:
    sim = _simulate(tmp_path, "histogenomic", omics_hidden=0.0, patches_median=30, patches_min=10)
    pt = _patients(sim)
    with_omics = pt[pt["has_omics"]]
    c_wsi = _c(with_omics, with_omics["risk_wsi_oracle"])
    assert abs(_c(with_omics, with_omics["risk_omics_oracle"]) - c_wsi) < 0.03
    assert _omics_only_cox(sim, with_omics) < c_wsi + 0.01


def test_histogenomic_mutations_are_sparse_driven_and_hypermutated_in_msi(
    histogenomic: SimulationResult,
) -> None:
    truth = _truth(histogenomic)
    pt = _patients(histogenomic)
    mutations = pd.read_csv(histogenomic.mutations_table).set_index("patient_id")
    omics = pd.read_csv(histogenomic.omics_table).set_index("patient_id")
    assert list(mutations.index) == list(omics.index)  # the same profiled patients
    assert mutations.shape[1] == 300 and set(np.unique(mutations.to_numpy())) <= {0, 1}
    prevalence = mutations.mean()
    genes = truth["mutations"]
    drivers = [g for g, info in genes.items() if info["driver"]]
    passengers = [g for g in genes if g not in drivers]
    assert 0.005 <= prevalence[passengers].median() <= 0.05
    assert prevalence[drivers].median() >= 0.08
    burden = mutations[passengers].sum(axis=1)
    msi = pt.loc[mutations.index, "msi"]
    assert (
        stats.mannwhitneyu(burden[msi == 1], burden[msi == 0], alternative="greater").pvalue < 1e-3
    )
    latent_value = {
        "aggressiveness": pt["z"].map(lambda z: z[0]),
        "molecular": pt["z"].map(lambda z: z[2]),
        "stromal": pt["z"].map(lambda z: z[3]),
        "genomic": pt["genomic_latent"],
    }
    for gene in drivers:
        values = latent_value[genes[gene]["latent"]].loc[mutations.index]
        calls = mutations[gene]
        assert values[calls == 1].mean() > values[calls == 0].mean()


def test_histogenomic_genes_express_the_programme(histogenomic: SimulationResult) -> None:
    truth = _truth(histogenomic)
    pt = _patients(histogenomic)
    omics = pd.read_csv(histogenomic.omics_table).set_index("patient_id")
    g = pt.loc[omics.index, "genomic_latent"]
    strong = [n for n, info in truth["genes"].items() if abs(info.get("genomic_loading", 0)) > 0.5]
    idle = [n for n, info in truth["genes"].items() if info["group"] is None]
    assert len(strong) > 20
    signs = [np.sign(truth["genes"][n]["genomic_loading"]) for n in strong]
    corr = [s * stats.pearsonr(omics[n], g).statistic for n, s in zip(strong, signs, strict=True)]
    assert np.mean(corr) > 0.3
    assert max(abs(stats.pearsonr(omics[n], g).statistic) for n in idle) < 4.5 / np.sqrt(len(g))
    groups = json.loads(histogenomic.gene_groups.read_text())
    gmt = {
        line.split("\t")[0]: sorted(line.rstrip("\n").split("\t")[2:])
        for line in histogenomic.gene_groups_gmt.read_text().splitlines()
    }
    assert gmt == {k: sorted(v) for k, v in groups.items()}


# ------------------------------------------------------------------------------ site shift


@pytest.fixture(scope="module")
def site_shift(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return _simulate(
        tmp_path_factory.mktemp("site"),
        "site-shift",
        feature_dim=32,
        within_prototype_rank=4,
        patches_median=40,
        patches_min=15,
    )


def _patches_by_site(sim: SimulationResult, pt: pd.DataFrame, per_site: int = 25):
    labels = np.load(sim.truth_patch_labels)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for site, group in pt.groupby("site"):
        x, y = [], []
        for slides in group["slides"].iloc[:per_site]:
            for slide in slides:
                with h5py.File(sim.features_dir / f"{slide}.h5", "r") as f:
                    x.append(f["features"][:].astype(np.float64))
                y.append(labels[slide])
        out[site] = (np.concatenate(x), np.concatenate(y))
    return out


def test_site_shift_degrades_what_models_read_by_a_recorded_amount(
    site_shift: SimulationResult,
) -> None:
    truth = _truth(site_shift)
    pt = _patients(site_shift)
    shifted = set(truth["site_shift"]["shifted_sites"])
    assert len(shifted) == 1 and shifted <= set(pt["site"])
    centres = np.load(site_shift.truth_prototypes).astype(np.float64)
    by_site = _patches_by_site(site_shift, pt)

    def nearest_accuracy(x: np.ndarray, y: np.ndarray) -> float:
        d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        return float((d.argmin(1) == y).mean())

    acc = {s: nearest_accuracy(*xy) for s, xy in by_site.items()}
    source = [a for s, a in acc.items() if s not in shifted]
    assert min(source) - max(acc[s] for s in shifted) > 0.2
    # a patch classifier trained on source sites loses accuracy on the shifted one
    x_src = np.concatenate([by_site[s][0] for s in by_site if s not in shifted][1:])
    y_src = np.concatenate([by_site[s][1] for s in by_site if s not in shifted][1:])
    held = next(s for s in by_site if s not in shifted)
    clf = LogisticRegression(max_iter=2000).fit(x_src, y_src)
    drop = clf.score(*by_site[held]) - np.mean([clf.score(*by_site[s]) for s in shifted])
    assert drop > 0.15
    # the recorded amount: the composition reader loses on shifted sites, not on source sites
    summary = truth["summary"]["site_shift"]
    loss = {
        k: summary[k]["reader_c_index_true_labels"] - summary[k]["reader_c_index_as_seen"]
        for k in ("source_sites", "shifted_sites")
    }
    assert loss["shifted_sites"] > loss["source_sites"] + 0.03


def test_site_transform_is_documented_exactly(site_shift: SimulationResult) -> None:
    """Undoing the recorded transform brings the shifted site's patches back to source geometry."""
    truth = _truth(site_shift)
    pt = _patients(site_shift)
    site = truth["site_shift"]["shifted_sites"][0]
    saved = np.load(site_shift.site_transforms)
    scale, offset = saved["scale"], saved["output_offset"]
    mixing, gain = saved[f"{site}/mixing"].astype(np.float64), saved[f"{site}/gain"]
    shift, content = saved[f"{site}/offset"], saved[f"{site}/content"]
    centres = np.load(site_shift.truth_prototypes).astype(np.float64)
    labels = np.load(site_shift.truth_patch_labels)
    hits = total = 0
    for slides in pt.loc[pt["site"] == site, "slides"].iloc[:20]:
        for slide in slides:
            with h5py.File(site_shift.features_dir / f"{slide}.h5", "r") as f:
                x = f["features"][:].astype(np.float64)
            y = labels[slide]
            raw = ((x - offset) / scale - shift - content[y]) / gain
            restored = np.linalg.solve(mixing.T, raw.T).T * scale + offset
            d = ((restored[:, None, :] - centres[None]) ** 2).sum(-1)
            hits += int((d.argmin(1) == y).sum())
            total += len(y)
    assert hits / total > 0.75


# ------------------------------------------------------------------------------ hierarchical


@pytest.fixture(scope="module")
def hierarchical(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return _simulate(
        tmp_path_factory.mktemp("hier"),
        "hierarchical",
        feature_dim=32,
        within_prototype_rank=4,
        patches_median=60,
        patches_min=20,
    )


def test_hierarchical_labels_follow_the_written_tree(hierarchical: SimulationResult) -> None:
    assert hierarchical.label_tree is not None
    tree = yaml.safe_load(hierarchical.label_tree.read_text())
    assert tree["levels"] == ["histology_coarse", "histology_fine"]
    parent = {fine: coarse for coarse, fines in tree["tree"].items() for fine in fines}
    table = pd.read_csv(hierarchical.cohort_table)
    assert (table["histology_fine"].map(parent) == table["histology_coarse"]).all()
    assert set(table["histology_fine"]) == set(parent)  # every subtype occurs
    per_patient = table.groupby("patient_id")[["histology_coarse", "histology_fine"]].nunique()
    assert (per_patient == 1).all().all()


def test_hierarchical_morphology_drives_both_levels(hierarchical: SimulationResult) -> None:
    pt = _patients(hierarchical)
    coarse_p = pd.DataFrame(list(pt["p_histology_coarse"]), index=pt.index)
    fine_p = pd.DataFrame(list(pt["p_histology_fine"]), index=pt.index)
    assert (
        roc_auc_score(pt["histology_coarse"], coarse_p[sorted(coarse_p)], multi_class="ovr") > 0.8
    )
    assert roc_auc_score(pt["histology_fine"], fine_p[sorted(fine_p)], multi_class="ovr") > 0.8
    x = _mean_pooled(hierarchical, pt)
    assert _cv_auc(x, pt["histology_coarse"].to_numpy()) > 0.7
    assert _cv_auc(x, pt["histology_fine"].to_numpy()) > 0.65
    # sibling patterns look alike: their centres are closer than patterns of other families
    truth = _truth(hierarchical)
    centres = np.load(hierarchical.truth_prototypes)
    patterns = [p for p in truth["prototypes"] if p["role"] == "histology"]
    near, far = [], []
    for i, a in enumerate(patterns):
        for b in patterns[i + 1 :]:
            d = float(np.linalg.norm(centres[a["index"]] - centres[b["index"]]))
            (near if a["coarse"] == b["coarse"] else far).append(d)
    assert max(near) < min(far)
