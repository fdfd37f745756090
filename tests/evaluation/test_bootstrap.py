"""Grouped percentile bootstrap: estimand, determinism, NaN skipping, coverage and speed."""

from __future__ import annotations

import time as timer
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pytest

from oncoslide.bench.stats import TaskInfo, bootstrap_counts, task_scores
from oncoslide.evaluation import BootstrapCI, GroupData, bootstrap_ci, grouped_bootstrap_ci
from oncoslide.survival import make_survival, split_survival
from oncoslide.survival.metrics import (
    CensoringSupportError,
    MetricInputError,
    concordance_index_censored,
)


def mean_of_x(data: Mapping[str, np.ndarray], _context: Mapping[str, Any]) -> float:
    return float(np.mean(data["x"]))


def harrell(data: Mapping[str, np.ndarray], _context: Mapping[str, Any]) -> float:
    event, time = split_survival(data["y"])
    return concordance_index_censored(event, time, data["risk"]).cindex


def survival_group(rng: np.random.Generator, n: int, offset: float = 0.0) -> GroupData:
    x = rng.normal(size=n)
    t, c = rng.exponential(np.exp(-x)), rng.exponential(2.0, size=n)
    y = make_survival(t <= c, np.minimum(t, c))
    return GroupData({"y": y, "risk": x + rng.normal(size=n) + offset})


def test_estimate_is_the_mean_of_group_metrics_not_the_pooled_metric() -> None:
    rng = np.random.default_rng(0)
    # Fold models on different risk scales: pooling their scores would rank folds, not patients.
    groups = [survival_group(rng, 80, offset) for offset in (0.0, 50.0, -50.0)]
    result = grouped_bootstrap_ci(groups, harrell, n_boot=50)
    per_group = [harrell(g.arrays, g.context) for g in groups]
    assert result.estimate == pytest.approx(np.mean(per_group))
    pooled = GroupData({k: np.concatenate([g.arrays[k] for g in groups]) for k in ("y", "risk")})
    assert abs(harrell(pooled.arrays, {}) - result.estimate) > 0.02
    assert result.lower <= result.estimate <= result.upper
    assert result.n_groups == 3 and result.n_boot == 50


def test_resampling_stays_within_each_group() -> None:
    # Group A is all 0 and group B all 1: within-group resamples always average to exactly 0.5,
    # while any resampling across groups would move the average.
    groups = [GroupData({"x": np.zeros(20)}), GroupData({"x": np.ones(35)})]
    result = grouped_bootstrap_ci(groups, mean_of_x, n_boot=200)
    assert (result.estimate, result.lower, result.upper) == (0.5, 0.5, 0.5)
    assert result.n_boot_ok == 200


def test_same_seed_same_result_other_seed_differs() -> None:
    rng = np.random.default_rng(1)
    groups = [survival_group(rng, 60) for _ in range(3)]
    first = grouped_bootstrap_ci(groups, harrell, n_boot=100, seed=5)
    again = grouped_bootstrap_ci(groups, harrell, n_boot=100, seed=5)
    other = grouped_bootstrap_ci(groups, harrell, n_boot=100, seed=6)
    assert first == again
    assert (first.lower, first.upper) != (other.lower, other.upper)
    assert first.estimate == other.estimate


def test_width_matches_the_normal_theory_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(2)
    widths = {}
    for n in (100, 1600):
        x = rng.normal(size=n)
        result = bootstrap_ci(lambda idx, x=x: float(x[idx].mean()), n, n_boot=1000, seed=0)
        widths[n] = result.upper - result.lower
        expected = 2 * 1.959964 * x.std() / np.sqrt(n)
        assert widths[n] == pytest.approx(expected, rel=0.15)
        assert result.lower < result.estimate < result.upper
    assert widths[1600] < widths[100] / 3


def test_coverage_of_the_mean_is_close_to_nominal() -> None:
    rng = np.random.default_rng(3)
    hits = 0
    for trial in range(200):
        x = rng.normal(loc=1.0, size=60)
        result = bootstrap_ci(lambda idx, x=x: float(x[idx].mean()), 60, n_boot=200, seed=trial)
        hits += result.lower <= 1.0 <= result.upper
    assert 0.86 <= hits / 200 <= 0.99


def test_undefined_replicates_are_skipped_and_counted() -> None:
    x = np.arange(10.0)

    def mean_if_first_row_drawn(idx: np.ndarray) -> float:
        return float(x[idx].mean()) if (idx == 0).any() else float("nan")

    result = bootstrap_ci(mean_if_first_row_drawn, 10, n_boot=1000, seed=0)
    # P(row 0 missing from a resample of 10) = 0.9**10 = 0.349; about 651 replicates survive.
    assert 580 <= result.n_boot_ok <= 720
    assert np.isfinite(result.lower) and np.isfinite(result.upper)


def test_an_undefined_group_is_left_out_of_its_replicate_only() -> None:
    always = GroupData({"x": np.arange(5.0)})
    sometimes = GroupData({"x": np.arange(10.0)}, context={"needed": 0})

    def metric(data: Mapping[str, np.ndarray], context: Mapping[str, Any]) -> float:
        if "needed" in context and not (data["x"] == context["needed"]).any():
            return float("nan")
        return float(data["x"].mean())

    result = grouped_bootstrap_ci([always, sometimes], metric, n_boot=500, seed=1)
    assert result.estimate == pytest.approx((2.0 + 4.5) / 2)
    # every replicate counts: `sometimes` misses row 0 in about 35 % of them (0.9**10), and
    # those replicates are `always`'s mean alone (recomputed here from the same streams)
    assert result.n_boot_ok == 500
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(1).spawn(2)]
    a = np.arange(5.0)[streams[0].integers(0, 5, size=(500, 5))].mean(axis=1)
    draws = streams[1].integers(0, 10, size=(500, 10))
    b = draws.astype(float).mean(axis=1)
    missed = ~(draws == 0).any(axis=1)
    assert 120 < missed.sum() < 230
    means = np.where(missed, a, (a + b) / 2)
    want = np.quantile(means, [0.025, 0.975])
    assert (result.lower, result.upper) == pytest.approx(tuple(want))
    # the old rule (drop the replicate) would have given another interval
    assert tuple(np.quantile(((a + b) / 2)[~missed], [0.025, 0.975])) != pytest.approx(tuple(want))


def test_groups_undefined_on_full_data_are_left_out() -> None:
    rng = np.random.default_rng(4)
    censored_only = GroupData({"y": make_survival(np.zeros(5, bool), np.arange(1.0, 6.0)),
                               "risk": np.arange(5.0)})  # fmt: skip
    good = survival_group(rng, 50)
    result = grouped_bootstrap_ci([censored_only, good], harrell, n_boot=100)
    assert result.n_groups == 1
    assert result.estimate == pytest.approx(harrell(good.arrays, {}))
    nothing = grouped_bootstrap_ci([censored_only], harrell, n_boot=10)
    assert np.isnan(nothing.estimate) and nothing.n_boot_ok == 0 and nothing.n_groups == 0


def test_skip_errors_turn_listed_exceptions_into_nan() -> None:
    def flaky(idx: np.ndarray) -> float:
        if (idx == 0).sum() >= 2:
            raise CensoringSupportError("no weight")
        return float(idx.mean())

    result = bootstrap_ci(flaky, 10, n_boot=300, skip_errors=(CensoringSupportError,))
    assert 0 < result.n_boot_ok < 300
    with pytest.raises(CensoringSupportError):
        bootstrap_ci(flaky, 10, n_boot=300)


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(MetricInputError, match="equal row counts"):
        GroupData({"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(MetricInputError, match="at least one"):
        GroupData({})
    with pytest.raises(MetricInputError) as info:
        bootstrap_ci(lambda idx: 0.0, 5, n_boot=0, alpha=1.5)
    assert "n_boot" in str(info.value) and "alpha" in str(info.value)
    with pytest.raises(MetricInputError, match="at least one group"):
        grouped_bootstrap_ci([], mean_of_x)


def test_harrell_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(5)
    groups = [survival_group(rng, 100) for _ in range(5)]
    start = timer.perf_counter()
    result = grouped_bootstrap_ci(groups, harrell, n_boot=1000, seed=0)
    elapsed = timer.perf_counter() - start
    assert isinstance(result, BootstrapCI) and result.n_boot_ok == 1000
    assert elapsed < 4.0  # about 0.6 s here; generous for a loaded CI machine


def test_named_patients_are_drawn_once_for_all_groups() -> None:
    # Two groups holding the same patients (another row order): with one shared patient draw
    # both group metrics move together, so the interval is that of one group. Independent
    # draws per group would average two independent resamples: about sqrt(2) narrower.
    rng = np.random.default_rng(6)
    ids = np.array([f"P{i:02d}" for i in range(40)])
    x = rng.normal(size=40)
    order = rng.permutation(40)
    first = GroupData({"x": x}, patients=ids)
    again = GroupData({"x": x[order]}, patients=ids[order])
    one = grouped_bootstrap_ci([first], mean_of_x, n_boot=1000, seed=3)
    both = grouped_bootstrap_ci([first, again], mean_of_x, n_boot=1000, seed=3)
    assert (both.lower, both.upper) == pytest.approx((one.lower, one.upper), abs=1e-12)
    unnamed = [GroupData({"x": x}), GroupData({"x": x[order]})]
    independent = grouped_bootstrap_ci(unnamed, mean_of_x, n_boot=1000, seed=3)
    ratio = (independent.upper - independent.lower) / (one.upper - one.lower)
    assert ratio == pytest.approx(1 / np.sqrt(2), rel=0.15)


@pytest.mark.parametrize("censoring", [2.0, 0.05])
def test_named_patients_draw_the_benchmarks_patient_bootstrap(censoring: float) -> None:
    # One seed, three folds: the benchmark's task_scores weights every fold's Harrell C by the
    # same multinomial patient counts; here the rows are repeated instead. Same draws, same C.
    # Heavy censoring (0.05) leaves few events per fold, so folds are undefined in some
    # replicates: both leave them out of those replicates alike.
    rng = np.random.default_rng(7)
    n = 90
    x = rng.normal(size=n)
    t, c = rng.exponential(np.exp(-x)), rng.exponential(censoring, size=n)
    ids = np.array([f"P{i:03d}" for i in rng.permutation(n)])
    frame = pd.DataFrame(
        {"task": "os", "feature_set": "f", "model": "m", "protocol": "cv", "seed": 0}
        | {"fold": np.arange(n) % 3, "patient_id": ids, "time": np.minimum(t, c)}
        | {"event": (t <= c).astype(int), "risk": x + rng.normal(size=n)}
    )
    groups = [
        GroupData(
            {"y": make_survival(part["event"] == 1, part["time"]), "risk": part["risk"]},
            patients=part["patient_id"],
        )
        for _, part in frame.groupby("fold")
    ]
    ours = grouped_bootstrap_ci(groups, harrell, n_boot=400, seed=9)
    bench = task_scores(frame, TaskInfo("os", "survival"), n_boot=400, seed=9).table.iloc[0]
    assert ours.estimate == pytest.approx(bench["estimate"], abs=1e-12)
    assert (ours.lower, ours.upper) == pytest.approx((bench["lower"], bench["upper"]), abs=1e-9)
    assert ours.n_boot_ok == bench["n_boot_ok"]
    assert ours.n_boot_ok == 400 or censoring < 1  # a draw with no fold defined is skipped
    if censoring < 1:  # the case this parameter is for: some fold undefined in some draws
        counts = bootstrap_counts(n, 400, 9)
        order = np.argsort(ids)
        drawn = counts[:, np.argsort(order)]  # per row of the frame
        events = frame["event"].to_numpy() == 1
        fold = frame["fold"].to_numpy()
        no_event = [((drawn[:, (fold == k) & events]).sum(axis=1) == 0) for k in range(3)]
        assert np.any(no_event), "no fold without a drawn event: the case is not exercised"


def test_a_group_without_drawn_patients_is_left_out_of_that_replicate() -> None:
    # Group A is one patient of ten: a replicate misses it with p = 0.9**10 = 0.349.
    ids = [f"P{i}" for i in range(10)]
    groups = [
        GroupData({"x": np.zeros(1)}, patients=ids[:1]),
        GroupData({"x": np.arange(9.0)}, patients=ids[1:]),
    ]
    result = grouped_bootstrap_ci(groups, mean_of_x, n_boot=1000, seed=0)
    assert result.n_boot_ok == 1000
    counts = bootstrap_counts(10, 1000, 0)  # the shared draw over the sorted ids
    b = (counts[:, 1:] * np.arange(9.0)).sum(axis=1) / counts[:, 1:].sum(axis=1)
    missed = counts[:, 0] == 0
    assert 280 < missed.sum() < 420
    means = np.where(missed, b, b / 2)  # group A's mean is 0 when drawn
    assert (result.lower, result.upper) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_patient_ids_are_checked() -> None:
    with pytest.raises(MetricInputError, match="2 patient ids for 3 rows"):
        GroupData({"x": np.zeros(3)}, patients=["a", "b"])
    with pytest.raises(MetricInputError, match="unique"):
        GroupData({"x": np.zeros(3)}, patients=["a", "b", "a"])
    named = GroupData({"x": np.zeros(3)}, patients=["a", "b", "c"])
    with pytest.raises(MetricInputError, match="every group names its patients or none"):
        grouped_bootstrap_ci([named, GroupData({"x": np.zeros(2)}, name="fold1")], mean_of_x)
