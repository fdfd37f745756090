"""Few-shot linear probes: draws from the training part only, shared across embeddings, the
frozen protocol (checked against a direct scikit-learn fit), summaries, paired comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from oncoslide.errors import ConfigError
from oncoslide.evaluation.fewshot import (
    ROW_COLUMNS,
    FewShotConfig,
    compare_few_shot,
    draw_shots,
    few_shot_classification,
    few_shot_survival,
    summarise_few_shot,
    write_few_shot,
)


def _data(n_train: int = 200, n_test: int = 150, seed: int = 0):
    """Binary labels; 'signal' carries the label in 2 of 20 dims, 'noise' carries nothing."""
    rng = np.random.default_rng(seed)
    ytr = rng.integers(0, 2, n_train)
    yte = rng.integers(0, 2, n_test)

    def emb(y: np.ndarray, strength: float) -> np.ndarray:
        x = rng.normal(size=(len(y), 20))
        x[:, :2] += strength * (2 * y[:, None] - 1)
        return x

    return ytr, yte, {"signal": (emb(ytr, 1.5), emb(yte, 1.5)), "noise": (emb(ytr, 0), emb(yte, 0))}


def test_draws_are_k_per_class_deterministic_and_only_from_the_given_labels() -> None:
    y = np.array(["a"] * 10 + ["b"] * 5 + ["c"] * 3)
    idx = draw_shots(y, 3, seed=0, fold=1, draw=2)
    assert idx is not None
    assert sorted(pd.Series(y[idx]).value_counts().to_dict().items()) == [
        ("a", 3),
        ("b", 3),
        ("c", 3),
    ]
    assert len(set(idx.tolist())) == 9
    assert np.array_equal(idx, draw_shots(y, 3, seed=0, fold=1, draw=2))
    assert not np.array_equal(idx, draw_shots(y, 3, seed=0, fold=1, draw=3))
    assert draw_shots(y, 4, seed=0, fold=1, draw=0) is None  # class c has only 3
    with pytest.raises(ConfigError):
        draw_shots(np.array(["a", "a"]), 1, seed=0, fold=0, draw=0)


def test_probe_matches_a_direct_scikit_learn_fit_on_the_drawn_patients() -> None:
    ytr, yte, emb = _data()
    config = FewShotConfig(shots=(4, 16), draws=3, seed=5)
    rows = few_shot_classification(emb, ytr, yte, config=config, task="t", fold=2)
    assert list(rows.columns) == list(ROW_COLUMNS)
    assert set(rows["k"]) == {4, 16}
    assert set(rows["n_train"]) == {8, 32}
    # one draw redone by hand: same patients (draws depend on labels, fold, k, draw, seed)
    idx = draw_shots(ytr, 16, seed=5, fold=2, draw=1)
    assert idx is not None
    xtr, xte = emb["signal"]
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000)
    )
    clf.fit(xtr[idx], ytr[idx])
    expected = roc_auc_score(yte, clf.predict_proba(xte)[:, 1])
    got = rows.query("embedding == 'signal' and k == 16 and draw == 1 and metric == 'auc'")
    assert got["value"].item() == pytest.approx(expected, abs=1e-12)


def test_signal_beats_noise_and_improves_with_k() -> None:
    ytr, yte, emb = _data()
    rows = few_shot_classification(emb, ytr, yte, config=FewShotConfig(shots=(1, 4, 64), draws=8))
    summary = summarise_few_shot(rows)
    auc = summary[summary["metric"] == "auc"].set_index(["embedding", "k"])["mean"]
    assert auc["signal", 64] > 0.85
    assert abs(auc["noise", 64] - 0.5) < 0.1
    assert auc["signal", 64] > auc["signal", 1]
    paired = compare_few_shot(rows, "signal", "noise").set_index(["metric", "k"])
    assert paired.loc[("auc", 64), "win_share"] == 1.0
    assert paired.loc[("auc", 64), "p_wilcoxon"] < 0.05
    assert paired.loc[("auc", 64), "n"] == 8


def test_k_larger_than_a_class_is_skipped() -> None:
    ytr, yte, emb = _data(n_train=60)
    rows = few_shot_classification(emb, ytr, yte, config=FewShotConfig(shots=(4, 64), draws=2))
    assert set(rows["k"]) == {4}


def test_summary_matches_numpy_and_files_are_written(tmp_path: Path) -> None:
    ytr, yte, emb = _data(seed=1)
    rows = few_shot_classification(emb, ytr, yte, config=FewShotConfig(shots=(4, 16), draws=5))
    summary = summarise_few_shot(rows, interval=0.9)
    vals = rows.query("embedding == 'signal' and k == 16 and metric == 'auc'")["value"]
    row = summary.query("embedding == 'signal' and k == 16 and metric == 'auc'").iloc[0]
    assert row["mean"] == pytest.approx(vals.mean())
    assert row["lo"] == pytest.approx(np.quantile(vals, 0.05))
    assert row["hi"] == pytest.approx(np.quantile(vals, 0.95))
    assert row["n"] == 5
    paths = write_few_shot(rows, tmp_path / "fs")
    assert pd.read_csv(paths["draws"]).shape == rows.shape
    assert pd.read_csv(paths["summary"]).shape == summary.shape
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"


def test_survival_probe_reads_risk_and_skips_k1() -> None:
    rng = np.random.default_rng(3)
    n_tr, n_te = 200, 200
    z_tr, z_te = rng.normal(size=n_tr), rng.normal(size=n_te)

    def times(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = rng.exponential(np.exp(-1.2 * z))
        c = rng.exponential(1.5, size=len(z))
        return np.minimum(t, c), (t <= c).astype(int)

    ttr, etr = times(z_tr)
    tte, ete = times(z_te)
    noise = rng.normal(size=(n_tr + n_te, 5))
    signal = noise.copy()
    signal[:, 0] = np.concatenate([z_tr, z_te]) + 0.3 * rng.normal(size=n_tr + n_te)
    emb = {
        "signal": (signal[:n_tr], signal[n_tr:]),
        "noise": (noise[:n_tr], noise[n_tr:]),
    }
    rows = few_shot_survival(emb, ttr, etr, tte, ete, config=FewShotConfig(shots=(1, 16), draws=4))
    assert set(rows["k"]) == {16}
    assert set(rows["n_train"]) == {32}
    mean = rows.groupby("embedding")["value"].mean()
    assert mean["signal"] > 0.65
    assert abs(mean["noise"] - 0.5) < 0.1


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError):
        FewShotConfig(shots=(0,))
    ytr, yte, emb = _data()
    bad = {"x": (emb["signal"][0][:10], emb["signal"][1])}
    with pytest.raises(ConfigError, match="rows"):
        few_shot_classification(bad, ytr, yte)


@pytest.mark.slow
def test_planted_latents_beat_mean_pooling_in_few_shot_msi(tmp_path: Path) -> None:
    """On the histogenomic preset, the truth's latents z (what MSI is drawn from) used as the
    embedding beat mean-pooled features at every k >= 4 over the same draws, and their
    64-shot AUC comes close to the oracle's (which also knows the coefficients)."""
    import json

    from oncoslide.cohort.splits import make_splits
    from oncoslide.cohort.table import load_cohort
    from oncoslide.features.cache import FeatureCache
    from oncoslide.pretrain.threads_eval import mean_pooled
    from oncoslide.simulate import make_simulation_config, simulate_cohort

    simulate_cohort(tmp_path, make_simulation_config("histogenomic"))
    truth = json.loads((tmp_path / "truth.json").read_text())
    cohort = load_cohort(tmp_path / "cohort.csv", tmp_path / "features", label_cols=("msi",))
    ids = cohort.patient_ids
    z = {p["patient_id"]: p["z"] for p in truth["patients"]}
    x_z = np.array([z[p] for p in ids], dtype=float)
    x_mean = mean_pooled(cohort, ids, FeatureCache())
    y = cohort.labels("msi", ids).astype(int)
    splits = make_splits(ids, n_folds=3, strata=y, val_fraction=0.0)
    config = FewShotConfig(shots=(1, 4, 16, 64), draws=10)
    rows = []
    for fold in range(3):
        test = splits.query("fold == @fold and part == 'test'")["patient_id"]
        is_test = np.isin(ids, test.to_numpy())
        emb = {
            "latents": (x_z[~is_test], x_z[is_test]),
            "meanpool": (x_mean[~is_test], x_mean[is_test]),
        }
        rows.append(few_shot_classification(emb, y[~is_test], y[is_test], config=config, fold=fold))
    paired = compare_few_shot(pd.concat(rows), "latents", "meanpool")
    auc = paired[paired["metric"] == "auc"].set_index("k")
    assert set(auc.index) == {1, 4, 16, 64}
    for k in (4, 16, 64):
        assert auc.loc[k, "diff"] > 0
        assert auc.loc[k, "p_wilcoxon"] < 0.05
    assert auc.loc[64, "mean_a"] > auc.loc[4, "mean_a"]
    assert abs(auc.loc[64, "mean_a"] - truth["summary"]["oracle_auc_msi"]) < 0.05
