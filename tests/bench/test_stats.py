"""Benchmark statistics: weighted metrics against library/sksurv/sklearn oracles, the shared
patient-level bootstrap against metrics on duplicated rows, planted signals, paired tests,
rank aggregation and fold-metric summaries."""

from __future__ import annotations

import time as timer
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score
from sksurv.datasets import load_gbsg2, load_whas500
from sksurv.metrics import concordance_index_censored as sksurv_cindex

from oncoslide.bench.stats import (
    BenchInputError,
    SeedDraws,
    TaskInfo,
    TaskScores,
    bootstrap_counts,
    common_rows,
    fold_metric_summary,
    paired_comparison,
    rank_entries,
    task_scores,
    weighted_auc,
    weighted_c_index,
)
from oncoslide.errors import ConfigError
from oncoslide.evaluation.classification import roc_auc
from oncoslide.survival.metrics import MetricInputError, concordance_index_censored

SURV = TaskInfo("os", "survival")
BINARY = TaskInfo("msi", "binary", ("MSI", "MSS"))
MULTI = TaskInfo("subtype", "multiclass", ("A", "B", "C"))


# --------------------------------------------------------------------------- simulated frames


def _folds(rng: np.random.Generator, n: int, n_folds: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % n_folds)


def survival_frame(
    strengths: dict[tuple[str, str], float],
    *,
    n: int = 150,
    seeds: Sequence[int] = (0,),
    n_folds: int = 3,
    rng_seed: int = 0,
    drop: dict[tuple[str, str], int] | None = None,
) -> pd.DataFrame:
    """Patients with a latent x driving the hazard; entry risk = strength * x + noise.

    Every fold model gets its own offset and scale, so pooling folds would be visibly wrong.
    ``drop`` removes the first k patients of an entry (an encoder's exclusion list).
    """
    rng = np.random.default_rng(rng_seed)
    x = rng.normal(size=n)
    t_event, t_cens = rng.exponential(np.exp(-x)), rng.exponential(1.5, size=n)
    time = np.round(np.minimum(t_event, t_cens), 2)  # rounding makes tied times
    event = (t_event <= t_cens).astype(float)
    pid = np.array([f"p{i:04d}" for i in range(n)])
    parts = []
    for s in seeds:
        fold = _folds(np.random.default_rng(100 + s), n, n_folds)
        for (fs, model), strength in strengths.items():
            risk = strength * x + rng.normal(size=n)
            offset, scale = rng.normal(0, 20, size=n_folds), rng.uniform(0.5, 3, size=n_folds)
            keep = slice((drop or {}).get((fs, model), 0), None)
            parts.append(
                pd.DataFrame(
                    {
                        "cell_key": [f"{fs}/{model}/{s}/{k}" for k in fold[keep]],
                        "task": SURV.name,
                        "feature_set": fs,
                        "model": model,
                        "protocol": "mil" if model.startswith("mil") else "linear",
                        "seed": s,
                        "fold": fold[keep],
                        "patient_id": pid[keep],
                        "time": time[keep],
                        "event": event[keep],
                        "label": None,
                        "risk": (risk * scale[fold] + offset[fold])[keep],
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def class_frame(
    task: TaskInfo,
    strengths: dict[tuple[str, str], float],
    *,
    n: int = 150,
    seeds: Sequence[int] = (0,),
    n_folds: int = 3,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """Labels drawn uniformly; probabilities = softmax(strength * onehot + noise)."""
    rng = np.random.default_rng(rng_seed)
    k = len(task.classes)
    y = rng.integers(0, k, size=n)
    pid = np.array([f"p{i:04d}" for i in range(n)])
    parts = []
    for s in seeds:
        fold = _folds(np.random.default_rng(100 + s), n, n_folds)
        for (fs, model), strength in strengths.items():
            logits = strength * np.eye(k)[y] + rng.normal(size=(n, k))
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            frame = pd.DataFrame(
                {
                    "cell_key": "c",
                    "task": task.name,
                    "feature_set": fs,
                    "model": model,
                    "protocol": "linear",
                    "seed": s,
                    "fold": fold,
                    "patient_id": pid,
                    "time": np.nan,
                    "event": np.nan,
                    "label": np.array(task.classes)[y],
                }
            )
            for j, c in enumerate(task.classes):
                frame[f"prob_{c}"] = probs[:, j]
            parts.append(frame)
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- oracles


def library_metric(cell: pd.DataFrame, task: TaskInfo) -> float:
    if task.kind == "survival":
        return concordance_index_censored(
            cell["event"].to_numpy().astype(bool), cell["time"].to_numpy(), cell["risk"].to_numpy()
        ).cindex
    probs = cell[[f"prob_{c}" for c in task.classes]].to_numpy()
    return roc_auc(cell["label"].to_numpy(), probs, classes=list(task.classes))


def oracle_entry(
    entry: pd.DataFrame,
    task: TaskInfo,
    multiplicity: dict[str, int] | None = None,
    seed_multiplicity: dict[int, int] | None = None,
) -> float:
    """Mean over (seed, fold) of the library metric on rows duplicated by multiplicity, each
    (seed, fold) listed as often as its seed's multiplicity.

    Cells whose metric is undefined on the full data are left out (as documented); so is a
    listed cell undefined in the duplicated data (NaN only when no listed cell is defined).
    """
    values = []
    for (seed, _), cell in entry.groupby(["seed", "fold"]):
        if not np.isfinite(library_metric(cell, task)):
            continue
        if multiplicity is not None:
            reps = cell["patient_id"].map(multiplicity).to_numpy()
            cell = cell.loc[cell.index.repeat(reps)]
        times = 1 if seed_multiplicity is None else seed_multiplicity[int(seed)]
        value = library_metric(cell, task) if len(cell) else np.nan
        if np.isfinite(value):
            values += [value] * times
    return float(np.mean(values)) if values else float("nan")


def entry_rows(frame: pd.DataFrame, fs: str, model: str) -> pd.DataFrame:
    return frame.loc[(frame["feature_set"] == fs) & (frame["model"] == model)]


# --------------------------------------------------------------------------- weighted metrics


def test_weighted_c_index_equals_library_on_duplicated_rows() -> None:
    rng = np.random.default_rng(1)
    for n in (2, 7, 40, 120):
        event = rng.integers(0, 2, size=n).astype(bool)
        time = rng.integers(1, 8, size=n).astype(float)  # many tied times
        risk = rng.integers(0, 5, size=n) + rng.choice([0.0, 1e-9, 0.3], size=n)  # tied risks
        weights = rng.integers(0, 4, size=(6, n))
        got = weighted_c_index(event, time, risk, weights)
        for b in range(6):
            rows = np.repeat(np.arange(n), weights[b])
            want = concordance_index_censored(event[rows], time[rows], risk[rows]).cindex
            assert got[b] == pytest.approx(want, abs=1e-10, nan_ok=True)
            assert weighted_c_index(event, time, risk, weights[b]) == pytest.approx(
                want, abs=1e-10, nan_ok=True
            )


def test_weighted_c_index_with_real_weights_matches_an_explicit_pair_loop() -> None:
    rng = np.random.default_rng(2)
    n = 25
    event = rng.integers(0, 2, size=n).astype(bool)
    time = rng.integers(1, 6, size=n).astype(float)
    risk = rng.integers(0, 4, size=n).astype(float)
    w = rng.uniform(0, 2, size=n)
    num = den = 0.0
    for i in range(n):
        for j in range(n):
            if event[i] and (time[j] > time[i] or (time[j] == time[i] and not event[j])):
                den += w[i] * w[j]
                num += (
                    w[i] * w[j] * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0)
                )
    assert weighted_c_index(event, time, risk, w) == pytest.approx(num / den, abs=1e-12)


@pytest.mark.parametrize("loader", [load_whas500, load_gbsg2])
def test_weighted_c_index_matches_sksurv_on_real_data(loader) -> None:
    x, y = loader()
    event_field, time_field = y.dtype.names
    event, time = y[event_field].astype(bool), y[time_field].astype(float)
    age = x["age"].to_numpy(dtype=float)  # integer-valued in whas500: many tied risks
    for risk in (age, np.round(age / 10)):
        want = sksurv_cindex(event, time, risk)[0]
        assert weighted_c_index(event, time, risk, np.ones(time.size)) == pytest.approx(
            want, abs=1e-10
        )


def test_weighted_auc_matches_sklearn_with_sample_weights() -> None:
    rng = np.random.default_rng(3)
    n = 80
    y2 = rng.choice(["neg", "pos"], size=n)
    score = np.round(rng.normal(size=n) + (y2 == "pos"), 1)  # tied scores
    w = rng.uniform(0, 3, size=n)
    assert weighted_auc(y2, score, ["neg", "pos"], w) == pytest.approx(
        roc_auc_score(y2 == "pos", score, sample_weight=w), abs=1e-12
    )
    y3 = rng.choice(["a", "b", "c"], size=n)
    probs = rng.dirichlet(np.ones(3), size=n)
    want = roc_auc_score(y3, probs, multi_class="ovr", average="macro", sample_weight=w)
    assert weighted_auc(y3, probs, ["a", "b", "c"], w) == pytest.approx(want, abs=1e-12)


def test_weighted_auc_equals_library_on_duplicated_rows_including_absent_classes() -> None:
    rng = np.random.default_rng(4)
    classes = ["a", "b", "c", "d"]
    n = 30
    y = np.array(classes)[rng.integers(0, 4, size=n)]
    probs = np.round(rng.dirichlet(np.ones(4), size=n), 1)  # exact ties
    weights = rng.integers(0, 3, size=(8, n))
    weights[0, y == "a"] = 0  # class a absent: it drops out of the macro mean
    weights[1, y != "b"] = 0  # only class b: undefined
    got = weighted_auc(y, probs, classes, weights)
    assert np.isnan(got[1])
    for b in range(8):
        rows = np.repeat(np.arange(n), weights[b])
        want = roc_auc(y[rows], probs[rows], classes=classes)
        assert got[b] == pytest.approx(want, abs=1e-10, nan_ok=True)
    binary = weighted_auc(y == "a", probs[:, 0], [False, True], weights)
    for b in range(8):
        rows = np.repeat(np.arange(n), weights[b])
        want = roc_auc((y == "a")[rows], probs[rows, 0], classes=[False, True])
        assert binary[b] == pytest.approx(want, abs=1e-10, nan_ok=True)


def test_weighted_metrics_reject_bad_input() -> None:
    with pytest.raises(MetricInputError, match="weights"):
        weighted_c_index([1, 0], [1.0, 2.0], [0.1, 0.2], [1.0, -1.0])
    with pytest.raises(MetricInputError, match="risk"):
        weighted_c_index([1, 0], [1.0, 2.0], [0.1, np.nan], [1, 1])
    with pytest.raises(MetricInputError, match="labels not in classes"):
        weighted_auc(["a", "z"], [0.1, 0.2], ["a", "b"], [1, 1])


# --------------------------------------------------------------------------- task scores


def test_estimate_is_mean_of_within_fold_library_metrics_not_pooled() -> None:
    frame = survival_frame({("enc", "mil_a"): 1.0, ("enc", "lin_b"): 0.3})
    scores = task_scores(frame, SURV, n_boot=50)
    table = scores.table.set_index(["feature_set", "model"])
    for (fs, model), row in table.iterrows():
        entry = entry_rows(frame, fs, model)
        assert row["estimate"] == pytest.approx(oracle_entry(entry, SURV), abs=1e-12)
    # Pooling the fold models' scores into one ranking measures something else.
    strong = entry_rows(frame, "enc", "mil_a")
    assert abs(library_metric(strong, SURV) - table.loc[("enc", "mil_a"), "estimate"]) > 0.05
    assert table.loc[("enc", "mil_a"), "protocol"] == "mil"
    assert list(scores.table.columns[:5]) == ["task", "metric", "feature_set", "model", "protocol"]
    assert (scores.table["metric"] == "c_index").all()
    assert (scores.table[["n_patients", "n_seeds", "n_folds"]] == [150, 1, 3]).all().all()


@pytest.mark.parametrize("task", [SURV, MULTI])
def test_replicates_equal_library_metrics_on_shared_duplicated_patients(task: TaskInfo) -> None:
    strengths = {("e1", "m1"): 1.0, ("e2", "m2"): 0.0}
    if task.kind == "survival":
        frame = survival_frame(strengths, n=60, seeds=(0, 1), n_folds=4, drop={("e2", "m2"): 5})
    else:
        frame = class_frame(task, strengths, n=45, seeds=(0, 1), n_folds=2)
    n_boot = 40 if task.kind == "survival" else 10  # sklearn's AUC makes the oracle slow
    scores = task_scores(frame, task, n_boot=n_boot, seed=7)
    # every entry is scored on the patients all entries have (e2 lacks the first five)
    shared = entry_rows(frame, "e2", "m2")[["seed", "patient_id"]]
    frame = frame.merge(shared, on=["seed", "patient_id"])
    patients = np.sort(frame["patient_id"].unique())
    assert len(patients) == (55 if task.kind == "survival" else 45)
    counts = bootstrap_counts(len(patients), n_boot, seed=7)
    seed_draws = SeedDraws.draw([0, 1], n_boot, seed=7)
    assert (seed_draws.counts.sum(axis=1) == 2).all() and len(
        set(map(tuple, seed_draws.counts))
    ) > 1
    for b in range(n_boot):
        multiplicity = dict(zip(patients, counts[b], strict=True))
        seed_multiplicity = dict(zip([0, 1], seed_draws.counts[b].tolist(), strict=True))
        for key, reps in scores.replicates.items():
            want = oracle_entry(entry_rows(frame, *key), task, multiplicity, seed_multiplicity)
            assert reps[b] == pytest.approx(want, abs=1e-10, nan_ok=True)
    for key, reps in scores.replicates.items():
        row = scores.table.set_index(["feature_set", "model"]).loc[key]
        finite = reps[np.isfinite(reps)]
        assert row["n_boot_ok"] == finite.size
        assert (row["lower"], row["upper"]) == pytest.approx(
            tuple(np.quantile(finite, [0.025, 0.975]))
        )


def test_a_cell_undefined_in_a_replicate_is_left_out_of_it_only() -> None:
    frame = survival_frame({("e", "m"): 1.0}, n=200, n_folds=4)
    # Fold 0 keeps a single event: replicates that miss that patient have no comparable pair.
    in_fold0 = frame["fold"] == 0
    first_event = frame.index[in_fold0 & (frame["event"] == 1)][0]
    frame.loc[in_fold0 & (frame.index != first_event), "event"] = 0.0
    frame.loc[first_event, "time"] = 0.0  # every censored partner outlives it
    # The other folds (50 patients, all events) are defined in every plausible draw.
    frame.loc[~in_fold0, "event"] = 1.0
    scores = task_scores(frame, SURV, n_boot=300, seed=1)
    reps = scores.replicates[("e", "m")]
    patients = np.sort(frame["patient_id"].unique())
    counts = bootstrap_counts(len(patients), 300, seed=1)
    missed = counts[:, np.searchsorted(patients, frame.loc[first_event, "patient_id"])] == 0
    assert 70 < missed.sum() < 150  # about (1 - 1/200)^200 = 37% of 300
    # every replicate counts; one that missed the event averages the three other folds
    assert np.isfinite(reps).all() and scores.table["n_boot_ok"].iloc[0] == 300
    others = frame.loc[~in_fold0]
    for b in np.flatnonzero(missed)[:5]:
        multiplicity = dict(zip(patients, counts[b], strict=True))
        want = oracle_entry(others, SURV, multiplicity)
        assert reps[b] == pytest.approx(want, abs=1e-10)
    for b in np.flatnonzero(~missed)[:5]:
        multiplicity = dict(zip(patients, counts[b], strict=True))
        assert reps[b] == pytest.approx(oracle_entry(frame, SURV, multiplicity), abs=1e-10)


def test_a_replicate_with_no_defined_cell_is_skipped_and_counted() -> None:
    frame = survival_frame({("e", "m"): 1.0}, n=60, n_folds=2)
    # each fold keeps a single event, dated first: a replicate missing both is undefined
    for fold in (0, 1):
        rows = frame["fold"] == fold
        first = frame.index[rows & (frame["event"] == 1)][0]
        frame.loc[rows & (frame.index != first), "event"] = 0.0
        frame.loc[first, "time"] = 0.0
    scores = task_scores(frame, SURV, n_boot=400, seed=2)
    reps = scores.replicates[("e", "m")]
    assert 0 < np.isnan(reps).sum() < 100  # about (1 - 1/60)^120 = 13 %
    assert scores.table["n_boot_ok"].iloc[0] == np.isfinite(reps).sum()


def test_a_cell_undefined_on_its_full_data_is_left_out() -> None:
    frame = survival_frame({("e", "m"): 1.0}, n=60, n_folds=3)
    frame.loc[frame["fold"] == 2, "event"] = 0.0  # no event: no comparable pair in fold 2
    row = task_scores(frame, SURV, n_boot=30).table.iloc[0]
    kept = frame.loc[frame["fold"] != 2]
    assert row["estimate"] == pytest.approx(oracle_entry(kept, SURV), abs=1e-12)
    assert (row["n_cells"], row["n_folds"], row["n_boot_ok"]) == (2, 2, 30)


def test_seed_spread() -> None:
    frame = survival_frame({("e", "m"): 0.7}, seeds=(0, 1, 2))
    scores = task_scores(frame, SURV, n_boot=20)
    entry = entry_rows(frame, "e", "m")
    per_seed = [oracle_entry(entry.loc[entry["seed"] == s], SURV) for s in (0, 1, 2)]
    assert scores.per_seed["estimate"].to_numpy() == pytest.approx(per_seed, abs=1e-12)
    row = scores.table.iloc[0]
    assert row["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert row["estimate"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert (row["n_seeds"], row["n_cells"]) == (3, 9)
    one = task_scores(frame.loc[frame["seed"] == 0], SURV, n_boot=20).table.iloc[0]
    assert np.isnan(one["seed_sd"])


def test_seed_draws() -> None:
    single = SeedDraws.draw([3, 3, 3], 50, seed=0)
    assert single.seeds.tolist() == [3] and (single.counts == 1).all()
    draws = SeedDraws.draw([2, 0, 1, 0], 400, seed=9)
    assert draws.seeds.tolist() == [0, 1, 2]
    assert (draws.counts.sum(axis=1) == 3).all()
    # Each seed is drawn Binomial(3, 1/3) times: mean 1, and 0 with probability 8/27.
    assert draws.counts.mean() == pytest.approx(1.0, abs=0.1)
    assert (draws.counts == 0).mean() == pytest.approx(8 / 27, abs=0.05)
    assert np.array_equal(draws.counts, SeedDraws.draw([0, 1, 2], 400, seed=9).counts)
    assert not np.array_equal(draws.counts, SeedDraws.draw([0, 1, 2], 400, seed=8).counts)
    weights = draws.cell_weights(np.array([2, 2, 7, 0]))
    assert np.array_equal(weights[:, 0], draws.counts[:, 2]) and (weights[:, 2] == 0).all()


def test_training_variability_across_seeds_widens_the_interval() -> None:
    """Seed 1 trains a far weaker model than seed 0 on the same patients: with one seed the
    patient bootstrap is narrow, with both it must reach towards either seed's estimate."""
    strong = survival_frame({("e", "m"): 3.0}, n=300, rng_seed=2)
    weak = survival_frame({("e", "m"): 0.3}, n=300, rng_seed=2).assign(seed=1)
    frame = pd.concat([strong, weak], ignore_index=True)
    scores = task_scores(frame, SURV, n_boot=1000, seed=0)
    both, per_seed = scores.table.iloc[0], scores.per_seed["estimate"].to_numpy()
    only_strong = task_scores(strong, SURV, n_boot=1000, seed=0).table.iloc[0]
    assert per_seed[0] - per_seed[1] > 0.15
    assert both["upper"] - both["lower"] > 3 * (only_strong["upper"] - only_strong["lower"])
    # A quarter of the replicates draw seed 0 twice, a quarter seed 1 twice.
    assert both["upper"] > per_seed[0] - 0.03 and both["lower"] < per_seed[1] + 0.03
    assert both["lower"] < both["estimate"] < both["upper"]


@pytest.mark.parametrize("task", [SURV, BINARY, MULTI])
def test_planted_signal_strong_ci_above_random_and_random_covers_half(task: TaskInfo) -> None:
    strengths = {("enc", "strong"): 3.0, ("enc", "random"): 0.0}
    if task.kind == "survival":
        frame = survival_frame(strengths, n=200, n_folds=4, rng_seed=5)
    else:
        frame = class_frame(task, strengths, n=200, n_folds=4, rng_seed=5)
    table = task_scores(frame, task, n_boot=300, seed=3).table.set_index("model")
    strong, rand = table.loc["strong"], table.loc["random"]
    assert strong["lower"] > rand["upper"]
    assert rand["lower"] < 0.5 < rand["upper"]
    assert strong["lower"] <= strong["estimate"] <= strong["upper"]
    assert (table["n_boot_ok"] == 300).all()


def test_same_seed_same_result_other_seed_differs() -> None:
    frame = class_frame(BINARY, {("e", "a"): 1.0, ("e", "b"): 0.5})
    first = task_scores(frame, BINARY, n_boot=100, seed=4)
    again = task_scores(frame, BINARY, n_boot=100, seed=4)
    other = task_scores(frame, BINARY, n_boot=100, seed=5)
    pd.testing.assert_frame_equal(first.table, again.table)
    for key in first.replicates:
        assert np.array_equal(first.replicates[key], again.replicates[key])
    assert not np.array_equal(first.table["lower"], other.table["lower"])
    assert np.array_equal(first.table["estimate"], other.table["estimate"])


def test_other_tasks_rows_are_ignored() -> None:
    surv = survival_frame({("e", "m"): 1.0}, n=50)
    both = pd.concat([surv, class_frame(BINARY, {("e", "m"): 1.0}, n=30)], ignore_index=True)
    alone = task_scores(surv, SURV, n_boot=20)
    mixed = task_scores(both, SURV, n_boot=20)
    pd.testing.assert_frame_equal(alone.table, mixed.table)


def test_speed_six_entries_five_folds_thousand_replicates() -> None:
    strengths = {(f"enc{i}", f"m{j}"): 0.5 * j for i in range(2) for j in range(3)}
    frame = survival_frame(strengths, n=250, n_folds=5)  # 50 patients per fold
    start = timer.perf_counter()
    scores = task_scores(frame, SURV, n_boot=1000)
    elapsed = timer.perf_counter() - start
    assert len(scores.table) == 6 and (scores.table["n_boot_ok"] == 1000).all()
    assert elapsed < 2.0, f"took {elapsed:.2f} s"


# --------------------------------------------------------------------------- input checks


def test_bad_frames_list_every_problem() -> None:
    frame = class_frame(MULTI, {("e", "m"): 1.0}, n=20)
    frame.loc[0, "label"] = "Z"
    frame.loc[1, "prob_B"] = np.nan
    frame = pd.concat([frame, frame.iloc[[2]]], ignore_index=True)  # patient twice
    with pytest.raises(BenchInputError) as info:
        task_scores(frame, MULTI)
    assert len(info.value.problems) == 3
    text = str(info.value)
    assert "'Z'" in text and "prob_B" in text and "twice" in text
    with pytest.raises(BenchInputError, match=r"missing column\(s\): \['risk'\]"):
        task_scores(survival_frame({("e", "m"): 1.0}).drop(columns="risk"), SURV)
    with pytest.raises(BenchInputError, match="no rows for task"):
        task_scores(survival_frame({("e", "m"): 1.0}), TaskInfo("other", "survival"))
    surv = survival_frame({("e", "m"): 1.0})
    surv.loc[0, "event"] = 2
    surv.loc[1, "time"] = -1.0
    with pytest.raises(BenchInputError) as info:
        task_scores(surv, SURV)
    assert len(info.value.problems) == 2


def test_bad_options_and_tasks() -> None:
    frame = survival_frame({("e", "m"): 1.0}, n=30)
    with pytest.raises(ConfigError, match="n_boot"):
        task_scores(frame, SURV, n_boot=0)
    with pytest.raises(ConfigError, match="alpha"):
        task_scores(frame, SURV, alpha=1.5)
    with pytest.raises(ConfigError, match="kind"):
        TaskInfo("t", "regression")
    with pytest.raises(ConfigError, match="exactly 2 classes"):
        TaskInfo("t", "binary", ("a", "b", "c"))
    assert TaskInfo("t", "binary", ("a", "b")).metric == "auc" and SURV.metric == "c_index"


# --------------------------------------------------------------------------- common patients

Uneven = Callable[[str, str], pd.DataFrame]
FULL, PART = ("full", "lin"), ("part", "lin")


def independent_estimate(rows: pd.DataFrame, task: TaskInfo) -> float:
    """Mean over (seed, fold) of lifelines' C (survival) or scikit-learn's AUC (binary)."""
    values = []
    for _, cell in rows.groupby(["seed", "fold"]):
        if task.kind == "survival":
            values.append(concordance_index(cell["time"], -cell["risk"], cell["event"]))
        else:
            positive = task.classes[-1]
            values.append(roc_auc_score(cell["label"] == positive, cell[f"prob_{positive}"]))
    return float(np.mean(values))


def on_common_patients(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of every entry at the (seed, patient) pairs that every entry has."""
    keys = frame.groupby(["feature_set", "model"])[["seed", "patient_id"]]
    shared = None
    for _, pairs in keys:
        pairs = pairs.drop_duplicates()
        shared = pairs if shared is None else shared.merge(pairs, on=["seed", "patient_id"])
    assert shared is not None
    return frame.merge(shared, on=["seed", "patient_id"])


@pytest.mark.parametrize("kind", ["survival", "binary"])
@pytest.mark.parametrize("missing", ["easy", "hard"])
def test_entries_are_ranked_and_scored_on_the_patients_common_to_all(
    uneven_frame: Uneven, kind: str, missing: str
) -> None:
    """One entry lacks patients it would have scored perfectly (easy) or perfectly wrongly
    (hard): on their own patients the entries rank one way, on the common ones the other."""
    task = SURV if kind == "survival" else BINARY
    frame = uneven_frame(kind, missing)
    common = on_common_patients(frame)
    own = {key: independent_estimate(entry_rows(frame, *key), task) for key in (FULL, PART)}
    shared = {key: independent_estimate(entry_rows(common, *key), task) for key in (FULL, PART)}
    # the data are built so that the two rules disagree about which entry is better
    assert (own[FULL] > own[PART]) != (shared[FULL] > shared[PART])
    assert abs(own[FULL] - shared[FULL]) > 0.05

    scores = task_scores(frame, task, n_boot=200, seed=3)
    table = scores.table.set_index(["feature_set", "model"])
    for key in (FULL, PART):
        assert table.loc[key, "estimate"] == pytest.approx(shared[key], abs=1e-12)
        assert table.loc[key, "lower"] <= table.loc[key, "estimate"] <= table.loc[key, "upper"]
        per_seed = scores.per_seed.set_index(["feature_set", "model", "seed"])
        for seed in (0, 1):
            rows = entry_rows(common, *key)
            want = independent_estimate(rows.loc[rows["seed"] == seed], task)
            assert per_seed.loc[(*key, seed), "estimate"] == pytest.approx(want, abs=1e-12)
    # patients: each entry's own test patients (over seeds) and the common ones it was scored on
    assert (table.loc[FULL, "n_patients"], table.loc[PART, "n_patients"]) == (90, 66)
    assert (table["n_used"] == 66).all() and (table["note"] == "").all()
    ranking = rank_entries([scores])
    best = max(shared, key=shared.__getitem__)
    assert tuple(ranking.iloc[0][["feature_set", "model"]]) == best
    assert ranking.iloc[0][f"rank:{task.name}"] == 1.0
    # the rows the statistics use
    used = common_rows(frame, task)
    assert len(used) == 2 * (66 + 63)  # p030..p032 are missing from "part" in seed 1 only
    pd.testing.assert_frame_equal(
        used.sort_values(["feature_set", "seed", "patient_id"]).reset_index(drop=True),
        common.sort_values(["feature_set", "seed", "patient_id"]).reset_index(drop=True)[
            used.columns
        ],
    )


def test_paired_comparison_pairs_patients_within_each_seed(uneven_frame: Uneven) -> None:
    """``part`` lacks p030..p032 in seed 1 but not in seed 0: only seed 1 loses them."""
    frame = uneven_frame("survival", "easy")
    common = on_common_patients(frame)
    result = paired_comparison(frame, SURV, FULL, PART, n_boot=100)
    want_full = independent_estimate(entry_rows(common, *FULL), SURV)
    want_part = independent_estimate(entry_rows(common, *PART), SURV)
    assert result.estimate_a == pytest.approx(want_full, abs=1e-12)
    assert result.diff == pytest.approx(want_full - want_part, abs=1e-12)
    assert result.n_patients == 66
    table = task_scores(frame, SURV, n_boot=100).table.set_index("feature_set")
    assert result.diff == pytest.approx(
        table.loc["full", "estimate"] - table.loc["part", "estimate"]
    )


def test_entries_without_a_common_patient_are_reported_not_ranked() -> None:
    first = survival_frame({("a", "m"): 1.0, ("b", "m"): 0.5}, n=60, seeds=(0,))
    late = survival_frame({("c", "m"): 2.0}, n=60, seeds=(1,))  # another seed only
    frame = pd.concat([first, late], ignore_index=True)
    scores = task_scores(frame, SURV, n_boot=50)
    table = scores.table.set_index("feature_set")
    assert table["estimate"].isna().all() and (table["n_used"] == 0).all()
    assert (table["n_patients"] == 60).all()
    assert "no test patient in common" in table.loc["c", "note"]
    assert "a · m" in table.loc["c", "note"] and "b · m" in table.loc["c", "note"]
    assert "c · m" in table.loc["a", "note"] and "b · m" not in table.loc["a", "note"]
    assert all(np.isnan(reps).all() for reps in scores.replicates.values())
    assert (rank_entries([scores])["n_tasks"] == 0).all()
    assert common_rows(frame, SURV).empty
    with pytest.raises(BenchInputError, match="share no patient"):
        paired_comparison(frame, SURV, ("a", "m"), ("c", "m"))


# --------------------------------------------------------------------------- paired comparison


def test_identical_predictions_give_zero_difference_and_p_one() -> None:
    frame = survival_frame({("e1", "m"): 0.5})
    twin = frame.assign(feature_set="e2")
    both = pd.concat([frame, twin], ignore_index=True)
    result = paired_comparison(both, SURV, ("e1", "m"), ("e2", "m"), n_boot=200)
    assert (result.diff, result.lower, result.upper, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert result.n_patients == 150 and result.n_boot_ok == 200


@pytest.mark.parametrize("task", [SURV, BINARY])
def test_planted_strong_model_beats_random(task: TaskInfo) -> None:
    strengths = {("enc", "strong"): 2.0, ("enc", "random"): 0.0}
    if task.kind == "survival":
        frame = survival_frame(strengths, n=150, rng_seed=8)
    else:
        frame = class_frame(task, strengths, n=150, rng_seed=8)
    result = paired_comparison(frame, task, ("enc", "strong"), ("enc", "random"), n_boot=500)
    assert result.p_value < 0.01
    assert result.p_value == pytest.approx(2 / 501)  # no replicate difference at or below 0
    assert 0 < result.lower <= result.diff <= result.upper
    reverse = paired_comparison(frame, task, ("enc", "random"), ("enc", "strong"), n_boot=500)
    assert reverse.diff == pytest.approx(-result.diff)
    assert reverse.upper < 0


def test_null_difference_is_not_significant() -> None:
    # Two models with the same (moderate) signal and independent noise.
    frame = survival_frame({("enc", "a"): 1.0, ("enc", "b"): 1.0}, n=120, rng_seed=11)
    result = paired_comparison(frame, SURV, ("enc", "a"), ("enc", "b"), n_boot=400)
    assert result.lower <= result.diff <= result.upper
    assert result.lower < 0 < result.upper
    assert result.p_value > 0.05


def test_paired_comparison_uses_the_common_patients() -> None:
    frame = survival_frame(
        {("e1", "m"): 1.0, ("e2", "m"): 0.5}, n=90, drop={("e2", "m"): 12}, rng_seed=3
    )
    result = paired_comparison(frame, SURV, ("e1", "m"), ("e2", "m"), n_boot=100)
    common = set(entry_rows(frame, "e2", "m")["patient_id"])
    a = entry_rows(frame, "e1", "m")
    oracle_a = oracle_entry(a.loc[a["patient_id"].isin(common)], SURV)
    oracle_b = oracle_entry(entry_rows(frame, "e2", "m"), SURV)
    assert result.n_patients == 78
    assert result.estimate_a == pytest.approx(oracle_a, abs=1e-12)
    assert result.diff == pytest.approx(oracle_a - oracle_b, abs=1e-12)
    assert result.metric == "c_index" and result.a == ("e1", "m")
    with pytest.raises(BenchInputError, match="no predictions for entry"):
        paired_comparison(frame, SURV, ("e1", "m"), ("e9", "m"))


# --------------------------------------------------------------------------- ranking


def make_scores(task: str, estimates: dict[tuple[str, str], float], reps: np.ndarray) -> TaskScores:
    table = pd.DataFrame(
        [
            {"task": task, "feature_set": fs, "model": m, "protocol": "linear", "estimate": e}
            for (fs, m), e in estimates.items()
        ]
    )
    return TaskScores(table, {key: reps[i] for i, key in enumerate(estimates)})


def test_rank_entries_against_a_loop_oracle() -> None:
    rng = np.random.default_rng(6)
    n_boot = 200
    t1 = {("e", "a"): 0.70, ("e", "b"): 0.65, ("f", "c"): 0.65}  # b and c tie
    t2 = {("e", "a"): 0.60, ("e", "b"): 0.80}  # c is missing here
    reps1 = np.array(list(t1.values()))[:, None] + rng.normal(0, 0.05, size=(3, n_boot))
    reps2 = np.array(list(t2.values()))[:, None] + rng.normal(0, 0.05, size=(2, n_boot))
    reps1[2, 5] = np.nan  # a skipped replicate
    ranked = rank_entries([make_scores("t1", t1, reps1), make_scores("t2", t2, reps2)])
    table = ranked.set_index("model")
    assert table.loc["a", ["rank:t1", "rank:t2"]].tolist() == [1.0, 2.0]
    assert table.loc["b", ["rank:t1", "rank:t2"]].tolist() == [2.5, 1.0]
    assert table.loc["c", "rank:t1"] == 2.5 and np.isnan(table.loc["c", "rank:t2"])
    assert table.loc["a", "mean_rank"] == 1.5 and table.loc["b", "mean_rank"] == 1.75
    assert table.loc["a", "rank_sd"] == pytest.approx(np.std([1, 2], ddof=1))
    assert np.isnan(table.loc["c", "rank_sd"])
    assert table["n_tasks"].tolist() == [2, 2, 1]
    assert ranked["model"].tolist() == ["a", "b", "c"]  # by mean_rank 1.5, 1.75, 2.5
    # Oracle for the interval: loop over replicates, rank with pandas, average per entry.
    means: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for b in range(n_boot):
        if b == 5:
            continue
        r1 = pd.Series(reps1[:, b], index=["a", "b", "c"]).rank(ascending=False)
        r2 = pd.Series(reps2[:, b], index=["a", "b"]).rank(ascending=False)
        means["a"].append((r1["a"] + r2["a"]) / 2)
        means["b"].append((r1["b"] + r2["b"]) / 2)
        means["c"].append(r1["c"])
    for model, values in means.items():
        lo, hi = np.percentile(values, [2.5, 97.5])
        assert (table.loc[model, "rank_lo"], table.loc[model, "rank_hi"]) == pytest.approx((lo, hi))
    assert ranked.attrs["n_boot_ok"] == n_boot - 1


def test_rank_entries_on_planted_tasks_and_ties_by_name() -> None:
    strengths = {("enc", "strong"): 3.0, ("enc", "weak"): 0.3, ("abc", "weak"): 0.3}
    surv = task_scores(survival_frame(strengths, n=120), SURV, n_boot=100)
    binary = task_scores(class_frame(BINARY, strengths, n=120), BINARY, n_boot=100)
    ranked = rank_entries([surv, binary])
    assert ranked.iloc[0][["feature_set", "model", "mean_rank"]].tolist() == ["enc", "strong", 1.0]
    assert ranked.iloc[0]["rank_hi"] == 1.0
    assert [c for c in ranked.columns if c.startswith("rank:")] == ["rank:os", "rank:msi"]
    same = {("zz", "m"): 0.6, ("aa", "m"): 0.6}
    tied = rank_entries([make_scores("t", same, np.full((2, 10), 0.6))])
    assert tied["feature_set"].tolist() == ["aa", "zz"] and (tied["mean_rank"] == 1.5).all()
    with pytest.raises(BenchInputError, match="more than once"):
        rank_entries([surv, surv])


def test_an_entry_without_estimate_is_listed_last_and_does_not_void_the_interval() -> None:
    estimates = {("e", "a"): 0.7, ("e", "b"): 0.6, ("e", "nan"): np.nan}
    reps = np.array([[0.7, 0.5, 0.72], [0.6, 0.65, 0.5], [np.nan, np.nan, np.nan]])
    ranked = rank_entries([make_scores("t", estimates, reps)])
    assert ranked["model"].tolist() == ["a", "b", "nan"]
    assert ranked["n_tasks"].tolist() == [1, 1, 0]
    assert np.isnan(
        ranked.loc[2, ["mean_rank", "rank_lo", "rank_hi", "rank:t"]].astype(float)
    ).all()
    assert (ranked.loc[0, "rank_lo"], ranked.loc[0, "rank_hi"]) == pytest.approx((1.0, 1.95))
    assert ranked.attrs["n_boot_ok"] == 3
    assert rank_entries([]).empty


# --------------------------------------------------------------------------- fold metrics


def test_fold_metric_summary() -> None:
    rng = np.random.default_rng(9)
    rows = [
        {"cell_key": "k", "task": "os", "feature_set": fs, "model": m, "protocol": "mil"}
        | {"seed": s, "fold": k, "metric": metric, "value": float(rng.uniform())}
        for fs in ("e1", "e2")
        for m in ("a", "b")
        for s in (0, 1)
        for k in range(3)
        for metric in ("c_index", "ibs")
    ]
    metrics = pd.DataFrame(rows)
    metrics.loc[0, "value"] = np.nan  # undefined in one fold
    out = fold_metric_summary(metrics)
    assert len(out) == 8
    assert list(out.columns) == [
        *["task", "feature_set", "model", "protocol", "metric", "mean", "sd", "n"]
    ]
    for _, row in out.iterrows():
        mask = (
            (metrics["feature_set"] == row["feature_set"])
            & (metrics["model"] == row["model"])
            & (metrics["metric"] == row["metric"])
        )
        values = metrics.loc[mask, "value"].dropna().to_numpy()
        assert row["n"] == values.size
        assert row["mean"] == pytest.approx(values.mean())
        assert row["sd"] == pytest.approx(np.std(values, ddof=1))
    assert sorted(out["n"].unique()) == [5, 6]
    with pytest.raises(BenchInputError, match="duplicated"):
        fold_metric_summary(pd.concat([metrics, metrics.iloc[[3]]]))
    with pytest.raises(BenchInputError, match="missing column"):
        fold_metric_summary(metrics.drop(columns="value"))
