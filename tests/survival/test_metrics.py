"""Survival metrics against scikit-survival (GPL, used here only as a test oracle) on its bundled
real data sets, against lifelines, and against hand-worked closed forms."""

from __future__ import annotations

import time as timer
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from sksurv import datasets
from sksurv import metrics as sk
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.nonparametric import CensoringDistributionEstimator

from oncoslide.errors import ConfigError
from oncoslide.survival import make_survival, split_survival
from oncoslide.survival import metrics as om
from oncoslide.survival.metrics import (
    CensoringSupportError,
    ConcordanceResult,
    MetricInputError,
    TimeGridError,
)

LOADERS: dict[str, Callable[[], tuple[object, np.ndarray]]] = {
    "whas500": datasets.load_whas500,
    "gbsg2": datasets.load_gbsg2,
    "flchain": datasets.load_flchain,
    "veterans": datasets.load_veterans_lung_cancer,
}
DATASETS = list(LOADERS)


@cache
def dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y with sksurv's own field names, standardised numeric covariates, a linear risk score)."""
    frame, y = LOADERS[name]()
    x = frame.select_dtypes("number").to_numpy(dtype=float)
    x = np.nan_to_num((x - np.nanmean(x, axis=0)) / np.nanstd(x, axis=0))
    weights = np.random.default_rng(7).normal(size=x.shape[1])
    return y, x, x @ weights


@cache
def split(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded 50/50 train/test split with the longest follow-up in train.

    scikit-survival's td-AUC demands the censoring weight of *every* test event, so the test
    times must not exceed the training follow-up for the oracle to answer at all.
    """
    y, _, _ = dataset(name)
    _, t = split_survival(y)
    order = np.random.default_rng(seed).permutation(len(y))
    longest = int(np.argmax(t))
    order = np.r_[longest, order[order != longest]]
    half = len(y) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def assert_same_result(ours: ConcordanceResult, oracle: tuple, tol: float = 1e-9) -> None:
    assert ours.cindex == pytest.approx(float(oracle[0]), abs=tol)
    assert (ours.concordant, ours.discordant, ours.tied_risk, ours.tied_time) == tuple(
        int(v) for v in oracle[1:]
    )


# --------------------------------------------------------------------------- Harrell's C


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_harrell_matches_sksurv_on_real_data(name: str, decimals: int | None) -> None:
    y, _, risk = dataset(name)
    if decimals is not None:  # rounding creates many tied risks
        risk = np.round(risk, decimals)
    event, time = split_survival(y)
    ours = om.concordance_index_censored(event, time, risk)
    assert_same_result(ours, sk.concordance_index_censored(event, time, risk))
    if decimals == 0:
        assert ours.tied_risk > 0
    assert ours.tied_time > 0  # all four data sets have events tied with censorings


def test_harrell_hand_worked_example() -> None:
    # Pairs: (0,1) (0,2) (0,3) concordant; (1,3) concordant; (1,2) comparable through the tie
    # in time (2 is censored at the event time of 1) and tied in risk -> counts 1/2.
    event = np.array([True, True, False, False])
    time = np.array([1.0, 2.0, 2.0, 3.0])
    risk = np.array([4.0, 3.0, 3.0, 1.0])
    result = om.concordance_index_censored(event, time, risk)
    assert result == ConcordanceResult(4.5 / 5, 4, 0, 1, 1)
    reversed_result = om.concordance_index_censored(event, time, -risk)
    assert reversed_result.cindex == pytest.approx(0.5 / 5)
    assert reversed_result.discordant == 4


def test_harrell_accepts_integer_events_and_honours_tolerance() -> None:
    event, time = np.array([1, 1, 0]), np.array([1.0, 2.0, 3.0])
    close = np.array([1.0, 1.0 + 1e-9, 0.0])
    tied = om.concordance_index_censored(event, time, close)
    assert tied.tied_risk == 1
    strict = om.concordance_index_censored(event, time, close, tied_tol=0.0)
    assert strict.tied_risk == 0 and strict.discordant == 1


@pytest.mark.parametrize("seed", range(6))
def test_dense_and_tree_paths_agree_with_sksurv(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    event = rng.random(n) < rng.uniform(0.05, 0.95)
    time = rng.integers(1, 15, size=n).astype(float)  # heavy ties in time
    risk = rng.integers(0, 6, size=n).astype(float)  # heavy ties in risk
    dense = om._pair_counts_dense(event, time, risk, 1e-8)
    tree = om._pair_counts_tree(event, time, risk, 1e-8)
    for a, b in zip(dense, tree, strict=True):
        np.testing.assert_array_equal(a, b)
    if event[np.argsort(time)][:-1].any():  # sksurv raises when there is no comparable pair
        ours = om.concordance_index_censored(event, time, risk)
        oracle = sk.concordance_index_censored(event, time, risk)
        if np.isnan(oracle[0]):
            assert np.isnan(ours.cindex)
        else:
            assert_same_result(ours, oracle)


def test_harrell_undefined_cases_are_nan() -> None:
    all_censored = om.concordance_index_censored([0, 0, 0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert np.isnan(all_censored.cindex) and all_censored[1:] == (0, 0, 0, 0)
    same_time_events = om.concordance_index_censored([1, 1], [2.0, 2.0], [1.0, 0.0])
    assert np.isnan(same_time_events.cindex)
    assert np.isnan(om.concordance_index_censored([1], [1.0], [0.3]).cindex)


def test_harrell_bad_inputs_list_every_problem() -> None:
    with pytest.raises(MetricInputError) as info:
        om.concordance_index_censored([0, 2], [1.0, np.nan], [0.1, 0.2], tied_tol=-1)
    message = str(info.value)
    assert "0/1" in message and "non-finite" in message and "tied_tol" in message
    with pytest.raises(MetricInputError, match="lengths differ"):
        om.concordance_index_censored([1, 0, 1], [1.0, 2.0, 3.0], [0.1, 0.2])
    with pytest.raises(MetricInputError, match="1-D"):
        om.concordance_index_censored([1, 0], [1.0, 2.0], [[0.1, 0.2]])
    assert issubclass(MetricInputError, ConfigError)


def test_harrell_is_fast_for_2000_samples() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    event, time, risk = rng.random(n) < 0.5, rng.exponential(size=n), rng.normal(size=n)
    om.concordance_index_censored(event, time, risk)
    durations = []
    for _ in range(10):
        start = timer.perf_counter()
        om.concordance_index_censored(event, time, risk)
        durations.append(timer.perf_counter() - start)
    # Well under 10 ms on a quiet machine; the bound leaves room for a busy CI runner while
    # still failing for any pairwise Python loop (hundreds of ms).
    assert np.median(durations) < 0.03


# --------------------------------------------------------------------------- Uno's C


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("decimals", [None, 0])
def test_uno_matches_sksurv_with_and_without_tau(name: str, decimals: int | None) -> None:
    y, _, risk = dataset(name)
    if decimals is not None:
        risk = np.round(risk, decimals)
    train, test = split(name)
    grid = om.evaluation_times(y[train], y[test])
    _, test_time = split_survival(y[test])
    for tau in (None, float(grid[-1]), float(np.median(test_time))):
        ours = om.concordance_index_ipcw(y[train], y[test], risk[test], tau=tau)
        oracle = sk.concordance_index_ipcw(y[train], y[test], risk[test], tau=tau)
        assert_same_result(ours, oracle)


def test_uno_without_censoring_equals_harrell() -> None:
    y = make_survival(np.ones(6, bool), np.arange(1.0, 7.0))
    risk = np.array([3.0, 5.0, 1.0, 2.0, 0.0, 0.5])
    uno = om.concordance_index_ipcw(y, y, risk)
    harrell = om.concordance_index_censored(np.ones(6, bool), np.arange(1.0, 7.0), risk)
    assert uno == harrell


def test_uno_beyond_training_follow_up_raises_typed_error() -> None:
    y, _, risk = dataset("whas500")
    event, time = split_survival(y)
    # Train ends with an event that no censoring shares, so G stays positive at its last time
    # and is unknown after it; the test set has events beyond that.
    censored_times = set(time[~event].tolist())
    cut = max(t for t in time[event] if t < np.quantile(time, 0.7) and t not in censored_times)
    train = time <= cut
    with pytest.raises(ValueError):
        sk.concordance_index_ipcw(y[train], y, risk)
    with pytest.raises(CensoringSupportError, match="last training time"):
        om.concordance_index_ipcw(y[train], y, risk)
    tau = float(np.quantile(time[train], 0.5))  # truncation makes it well defined again
    assert_same_result(
        om.concordance_index_ipcw(y[train], y, risk, tau=tau),
        sk.concordance_index_ipcw(y[train], y, risk, tau=tau),
    )


def test_uno_zero_censoring_survival_raises() -> None:
    # The last training subject is censored: G drops to 0 at t = 4 and stays there.
    train = make_survival([1, 0, 1, 0], [1.0, 2.0, 3.0, 4.0])
    test = make_survival([1, 1, 0], [1.0, 4.0, 5.0])
    with pytest.raises(ValueError, match="zero"):
        sk.concordance_index_ipcw(train, test, [3.0, 2.0, 1.0])
    with pytest.raises(CensoringSupportError, match="zero"):
        om.concordance_index_ipcw(train, test, [3.0, 2.0, 1.0])


def test_uno_bad_inputs() -> None:
    y = make_survival([1, 0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(MetricInputError) as info:
        om.concordance_index_ipcw(np.array([1.0, 2.0]), y, [0.1, 0.2], tau=-1.0)
    message = str(info.value)  # every problem at once
    assert "structured" in message and "tau" in message and "2 rows" in message
    with pytest.raises(MetricInputError, match="non-finite"):
        om.cumulative_dynamic_auc(y, y, [0.1, 0.2, 0.3], [np.nan])
    # an empty test set is not malformed: NaN (see test_no_event_every_metric_is_nan)
    assert np.isnan(om.brier_score(y, y[:0], np.zeros((0, 1)), [1.5])[1]).all()


# --------------------------------------------------------------------------- td-AUC


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("decimals", [None, 0])
def test_cumulative_dynamic_auc_matches_sksurv(name: str, decimals: int | None) -> None:
    y, _, risk = dataset(name)
    if decimals is not None:
        risk = np.round(risk, decimals)
    train, test = split(name)
    grid = om.evaluation_times(y[train], y[test])
    auc, mean_auc = om.cumulative_dynamic_auc(y[train], y[test], risk[test], grid)
    auc_sk, mean_sk = sk.cumulative_dynamic_auc(y[train], y[test], risk[test], grid)
    np.testing.assert_allclose(auc, auc_sk, rtol=0, atol=1e-9)
    assert mean_auc == pytest.approx(mean_sk, abs=1e-9)
    single, single_mean = om.cumulative_dynamic_auc(y[train], y[test], risk[test], grid[3])
    assert single_mean == pytest.approx(auc_sk[3], abs=1e-9) and single.shape == (1,)


@pytest.mark.parametrize("name", ["whas500", "veterans"])
def test_cumulative_dynamic_auc_time_dependent_risk(name: str) -> None:
    y, _, risk = dataset(name)
    train, test = split(name)
    grid = om.evaluation_times(y[train], y[test])
    noise = np.random.default_rng(3).normal(size=(len(test), grid.size))
    risk_2d = np.round(risk[test][:, None] * np.linspace(0.5, 2, grid.size) + noise, 1)
    auc, mean_auc = om.cumulative_dynamic_auc(y[train], y[test], risk_2d, grid)
    auc_sk, mean_sk = sk.cumulative_dynamic_auc(y[train], y[test], risk_2d, grid)
    np.testing.assert_allclose(auc, auc_sk, rtol=0, atol=1e-9)
    assert mean_auc == pytest.approx(mean_sk, abs=1e-9)
    with pytest.raises(MetricInputError, match="strictly increasing"):
        om.cumulative_dynamic_auc(y[train], y[test], risk_2d[:, ::-1], grid[::-1])


def test_cumulative_dynamic_auc_closed_form() -> None:
    # No censoring anywhere: G = 1, so AUC(t) is the plain AUC of cases (t_i <= t) vs the rest.
    y = make_survival(np.ones(5, bool), [1.0, 2.0, 3.0, 4.0, 5.0])
    auc, mean_auc = om.cumulative_dynamic_auc(y, y, [5.0, 3.0, 4.0, 1.0, 2.0], [2.0, 3.0])
    # t=2: cases {5,3} vs controls {4,1,2} -> 5 wins 3, 3 wins 2 of 3 -> 5/6
    # t=3: cases {5,3,4} vs controls {1,2} -> 6/6
    np.testing.assert_allclose(auc, [5 / 6, 1.0])
    # test KM: S(2) = 3/5, S(3) = 2/5 -> weights 2/5 and 1/5 over 3/5
    assert mean_auc == pytest.approx((5 / 6 * 2 / 5 + 1 / 5) / (3 / 5))


def test_cumulative_dynamic_auc_time_outside_follow_up() -> None:
    y, _, risk = dataset("gbsg2")
    train, test = split("gbsg2")
    _, t_test = split_survival(y[test])
    for bad in (t_test.max(), t_test.min() - 1):
        with pytest.raises(ValueError):
            sk.cumulative_dynamic_auc(y[train], y[test], risk[test], [bad])
        with pytest.raises(TimeGridError, match="follow-up"):
            om.cumulative_dynamic_auc(y[train], y[test], risk[test], [bad])
    with pytest.raises(MetricInputError, match="columns"):
        om.cumulative_dynamic_auc(y[train], y[test], np.zeros((len(test), 2)), [500.0])


# --------------------------------------------------------------------------- Brier / IBS


@cache
def cox_survival(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train target, test target, grid, Cox survival probabilities (n_test, n_grid))."""
    y, x, _ = dataset(name)
    train, test = split(name)
    grid = om.evaluation_times(y[train], y[test])
    model = CoxPHSurvivalAnalysis(alpha=1e-3).fit(x[train], y[train])
    curves = model.predict_survival_function(x[test], return_array=True)
    column = np.searchsorted(model.unique_times_, grid, side="right") - 1
    return y[train], y[test], grid, curves[:, column]


@pytest.mark.parametrize("name", DATASETS)
def test_brier_and_ibs_match_sksurv(name: str) -> None:
    y_train, y_test, grid, estimate = cox_survival(name)
    times, scores = om.brier_score(y_train, y_test, estimate, grid)
    times_sk, scores_sk = sk.brier_score(y_train, y_test, estimate, grid)
    np.testing.assert_array_equal(times, times_sk)
    np.testing.assert_allclose(scores, scores_sk, rtol=0, atol=1e-9)
    ibs = om.integrated_brier_score(y_train, y_test, estimate, grid)
    assert ibs == pytest.approx(
        sk.integrated_brier_score(y_train, y_test, estimate, grid), abs=1e-9
    )
    _, one = om.brier_score(y_train, y_test, estimate[:, 2], grid[2])
    assert one[0] == pytest.approx(scores_sk[2], abs=1e-9)


def test_brier_without_censoring_is_the_mean_squared_error() -> None:
    rng = np.random.default_rng(0)
    time = rng.exponential(size=30)
    y = make_survival(np.ones(30, bool), time)
    grid = np.quantile(time, [0.25, 0.5, 0.75])
    estimate = rng.uniform(size=(30, 3))
    _, scores = om.brier_score(y, y, estimate, grid)
    alive = (time[:, None] > grid).astype(float)
    np.testing.assert_allclose(scores, ((alive - estimate) ** 2).mean(axis=0))
    expected_ibs = np.trapezoid(scores, grid) / (grid[-1] - grid[0])
    assert om.integrated_brier_score(y, y, estimate, grid) == pytest.approx(expected_ibs)


def test_brier_bad_inputs() -> None:
    y_train, y_test, grid, estimate = cox_survival("gbsg2")
    with pytest.raises(MetricInputError) as info:
        om.brier_score(y_train, y_test, estimate[:-1, :-1] + 2, grid)
    message = str(info.value)
    assert "rows" in message and "columns" in message and "[0, 1]" in message
    with pytest.raises(TimeGridError, match="two"):
        om.integrated_brier_score(y_train, y_test, estimate[:, :1], grid[:1])
    # G of this training set stays at 1/2 after its last time 3: unknown beyond it.
    short_train = make_survival([1, 0, 1], [1.0, 2.0, 3.0])
    test = make_survival([1, 0, 1, 0], [1.0, 2.0, 5.0, 10.0])
    with pytest.raises(ValueError):
        sk.brier_score(short_train, test, np.full((4, 1), 0.5), [4.0])
    with pytest.raises(CensoringSupportError, match="last training time"):
        om.brier_score(short_train, test, np.full((4, 1), 0.5), [4.0])


# --------------------------------------------------------------------------- Kaplan-Meier


def test_kaplan_meier_matches_lifelines() -> None:
    y, _, _ = dataset("whas500")
    event, time = split_survival(y)
    times, surv = om.kaplan_meier(time, event)
    fitter = KaplanMeierFitter().fit(time, event)
    expected = fitter.survival_function_at_times(times).to_numpy()
    np.testing.assert_allclose(surv, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(times, np.unique(time))


@pytest.mark.parametrize("name", DATASETS)
def test_censoring_kaplan_meier_matches_sksurv(name: str) -> None:
    y, _, _ = dataset(name)
    event, time = split_survival(y)
    times, surv = om.kaplan_meier(time, event, reverse=True)
    oracle = CensoringDistributionEstimator().fit(y)
    np.testing.assert_allclose(surv, oracle.predict_proba(times), rtol=0, atol=1e-12)


def test_censoring_kaplan_meier_is_lifelines_on_flipped_events_without_ties() -> None:
    rng = np.random.default_rng(1)
    time = rng.permutation(np.arange(1.0, 201.0))  # distinct times: the tie convention is moot
    event = rng.random(200) < 0.6
    times, surv = om.kaplan_meier(time, event, reverse=True)
    fitter = KaplanMeierFitter().fit(time, ~event)
    np.testing.assert_allclose(
        surv, fitter.survival_function_at_times(times).to_numpy(), atol=1e-12
    )


def test_kaplan_meier_bad_input() -> None:
    with pytest.raises(MetricInputError):
        om.kaplan_meier([1.0, 2.0], [1, 0, 1])
    with pytest.raises(MetricInputError, match="negative"):
        om.kaplan_meier([1.0, -2.0], [1, 0])
    times, surv = om.kaplan_meier([], [])  # no observation: nothing known, not an error
    assert times.size == 0 and surv.size == 0


# --------------------------------------------------------------------------- evaluation grid


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluation_times_are_accepted_everywhere(name: str, seed: int) -> None:
    y, _, risk = dataset(name)
    order = np.random.default_rng(seed).permutation(len(y))  # no help for the longest time here
    train, test = order[: len(y) // 2], order[len(y) // 2 :]
    grid = om.evaluation_times(y[train], y[test])
    _, t_test = split_survival(y[test])
    e_train, t_train = split_survival(y[train])
    cens_times, cens_surv = om.kaplan_meier(t_train, e_train, reverse=True)
    assert grid.size >= 2 and (np.diff(grid) > 0).all()
    assert grid.min() > t_test.min() and grid.max() < t_test.max()
    assert grid.max() < cens_times[cens_surv > 0].max()
    estimate = np.full((len(test), grid.size), 0.5)
    auc, mean_auc = om.cumulative_dynamic_auc(y[train], y[test], risk[test], grid)
    assert np.isfinite(auc).all() and np.isfinite(mean_auc)
    assert np.isfinite(
        om.concordance_index_ipcw(y[train], y[test], risk[test], tau=grid[-1]).cindex
    )
    assert np.isfinite(om.integrated_brier_score(y[train], y[test], estimate, grid))


def test_evaluation_times_too_few_raise() -> None:
    train = make_survival([1, 0, 1, 0], [1.0, 2.0, 3.0, 9.0])
    one_event_time = make_survival([1, 1, 0], [2.0, 2.0, 5.0])
    with pytest.raises(TimeGridError, match="valid time"):
        om.evaluation_times(train, one_event_time)
    with pytest.raises(TimeGridError, match="no events"):
        om.evaluation_times(train, make_survival([0, 0], [1.0, 2.0]))
    with pytest.raises(MetricInputError, match="quantiles"):
        om.evaluation_times(train, one_event_time, quantiles=(0.5, 1.5))


# --------------------------------------------------------------------------- survival_metrics


def test_survival_metrics_equal_the_individual_functions() -> None:
    y_train, y_test, grid, estimate = cox_survival("whas500")
    _, _, risk = dataset("whas500")
    _, test = split("whas500")
    event, time = split_survival(y_test)
    result = om.survival_metrics(
        y_train, y_test, risk[test], surv_fn=lambda t: estimate, times=None
    )
    assert set(result) == {"c_index", "c_index_uno", "td_auc", "ibs"}
    assert result["c_index"] == om.concordance_index_censored(event, time, risk[test]).cindex
    uno = om.concordance_index_ipcw(y_train, y_test, risk[test], tau=grid[-1]).cindex
    assert result["c_index_uno"] == uno
    assert result["td_auc"] == om.cumulative_dynamic_auc(y_train, y_test, risk[test], grid)[1]
    assert result["ibs"] == om.integrated_brier_score(y_train, y_test, estimate, grid)
    precomputed = om.survival_metrics(y_train, y_test, risk[test], surv_fn=estimate, times=grid)
    assert precomputed == result
    assert "ibs" not in om.survival_metrics(y_train, y_test, risk[test])
    with pytest.raises(MetricInputError, match="times"):
        om.survival_metrics(y_train, y_test, risk[test], surv_fn=estimate)


def test_survival_metrics_undefined_metrics_are_nan() -> None:
    train = make_survival([1, 0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0, 5.0])
    no_events = make_survival([0, 0, 0], [1.0, 2.0, 3.0])
    result = om.survival_metrics(train, no_events, [0.1, 0.2, 0.3], surv_fn=lambda t: None)
    assert all(np.isnan(v) for v in result.values()) and len(result) == 4
    with pytest.raises(MetricInputError):
        om.survival_metrics(train, no_events, [0.1, 0.2])


# --------------------------------------------------------------------------- structured targets


def relayout(y: np.ndarray, event_name: str, time_name: str, *, time_first: bool) -> np.ndarray:
    """The same target under other field names, event as 0/1 integers, optionally time first."""
    event, time = y[y.dtype.names[0]], y[y.dtype.names[1]]  # scikit-survival: event first
    fields = [(event_name, "<i8"), (time_name, "<f8")]
    out = np.empty(len(y), dtype=fields[::-1] if time_first else fields)
    out[event_name], out[time_name] = event.astype(int), time
    return out


def every_metric(y_train: np.ndarray, y_test: np.ndarray) -> tuple:
    """Every metric taking structured targets, on the whas500 split with its Cox estimate."""
    _, _, grid, estimate = cox_survival("whas500")
    risk = dataset("whas500")[2][split("whas500")[1]]
    auc, mean_auc = om.cumulative_dynamic_auc(y_train, y_test, risk, grid)
    return (
        om.concordance_index_ipcw(y_train, y_test, risk, tau=grid[-1]),
        auc.tolist(),
        mean_auc,
        om.brier_score(y_train, y_test, estimate, grid)[1].tolist(),
        om.integrated_brier_score(y_train, y_test, estimate, grid),
        om.evaluation_times(y_train, y_test).tolist(),
        om.survival_metrics(y_train, y_test, risk, surv_fn=estimate, times=grid),
    )


@pytest.mark.parametrize(
    ("event_name", "time_name"), [("event", "time"), ("status", "time"), ("fstat", "lenfol")]
)
def test_structured_targets_are_read_by_field_name(event_name: str, time_name: str) -> None:
    y_train, y_test, _, _ = cox_survival("whas500")
    expected = every_metric(y_train, y_test)
    for time_first in (False, True):
        train = relayout(y_train, event_name, time_name, time_first=time_first)
        test = relayout(y_test, event_name, time_name, time_first=time_first)
        assert every_metric(train, test) == expected


@pytest.mark.parametrize("bad", [2, -1, 0.5])
def test_structured_event_codes_must_be_0_or_1(bad: float) -> None:
    good = make_survival([1, 0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.zeros(5, dtype=[("time", "<f8"), ("status", "<f8")])
    y["time"], y["status"] = [1.0, 2.0, 3.0, 4.0, 5.0], [1, 0, bad, 0, 1]
    risk, grid, estimate = np.arange(5.0), [2.5, 3.5], np.full((5, 2), 0.5)
    calls = [
        lambda: om.concordance_index_ipcw(good, y, risk),
        lambda: om.concordance_index_ipcw(y, good, risk),
        lambda: om.cumulative_dynamic_auc(good, y, risk, grid),
        lambda: om.brier_score(y, good, estimate, grid),
        lambda: om.integrated_brier_score(good, y, estimate, grid),
        lambda: om.evaluation_times(y, good),
        lambda: om.survival_metrics(good, y, risk),
    ]
    for call in calls:
        with pytest.raises(MetricInputError, match=r"event field 'status' must hold 0/1"):
            call()


def test_structured_targets_with_unclear_fields_are_refused() -> None:
    good = make_survival([1, 0, 1], [1.0, 2.0, 3.0])
    unnamed = np.zeros(3, dtype=[("a", "<f8"), ("b", "<f8")])
    with pytest.raises(MetricInputError, match=r"survival_test: cannot tell"):
        om.concordance_index_ipcw(good, unnamed, [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- negative times


def raw_target(event: list[float], time: list[float]) -> np.ndarray:
    """A structured target built without make_survival's checks (which refuse negative times)."""
    y = np.zeros(len(time), dtype=[("event", "?"), ("time", "<f8")])
    y["event"], y["time"] = event, time
    return y


NEGATIVE = raw_target([1, 0, 1, 0], [1.0, -2.0, 3.0, 4.0])
POSITIVE = make_survival([1, 0, 1, 0], [1.0, 2.0, 3.0, 4.0])
NEGATIVE_TIME_CALLS: dict[str, Callable[[], object]] = {
    "harrell": lambda: om.concordance_index_censored([1, 0, 1], [1.0, -2.0, 3.0], [1, 2, 3]),
    "uno_test": lambda: om.concordance_index_ipcw(POSITIVE, NEGATIVE, np.arange(4.0)),
    "uno_train": lambda: om.concordance_index_ipcw(NEGATIVE, POSITIVE, np.arange(4.0)),
    "auc": lambda: om.cumulative_dynamic_auc(NEGATIVE, POSITIVE, np.arange(4.0), [2.0]),
    "auc_grid": lambda: om.cumulative_dynamic_auc(POSITIVE, POSITIVE, np.arange(4.0), [-1.0]),
    "brier": lambda: om.brier_score(POSITIVE, NEGATIVE, np.full((4, 1), 0.5), [2.0]),
    "ibs": lambda: om.integrated_brier_score(NEGATIVE, POSITIVE, np.full((4, 2), 0.5), [2, 3]),
    "metrics": lambda: om.survival_metrics(POSITIVE, NEGATIVE, np.arange(4.0)),
    "metrics_train": lambda: om.survival_metrics(NEGATIVE, POSITIVE, np.arange(4.0)),
    "kaplan_meier": lambda: om.kaplan_meier([1.0, -2.0], [1, 0]),
    "evaluation_times": lambda: om.evaluation_times(NEGATIVE, POSITIVE),
}


@pytest.mark.parametrize("name", NEGATIVE_TIME_CALLS)
def test_negative_times_are_refused(name: str) -> None:
    with pytest.raises(MetricInputError, match="negative"):
        NEGATIVE_TIME_CALLS[name]()


def test_negative_times_are_reported_with_every_other_problem() -> None:
    bad_test = np.zeros(3, dtype=[("status", "<i8"), ("time", "<f8")])
    bad_test["status"], bad_test["time"] = [1, 2, 0], [-1.0, 2.0, -3.0]
    with pytest.raises(MetricInputError) as info:
        om.concordance_index_ipcw(NEGATIVE, bad_test, [0.1, 0.2, 0.3], tau=-1.0)
    message = str(info.value)
    assert "survival_train has 1 negative time(s)" in message
    assert "survival_test has 2 negative time(s)" in message
    assert "event field 'status'" in message and "tau" in message
    with pytest.raises(MetricInputError) as info:
        om.concordance_index_censored([1, 2, 0], [-1.0, 2.0, np.nan], [0.1, 0.2, 0.3])
    message = str(info.value)
    assert "negative" in message and "non-finite" in message and "0/1" in message


def test_zero_times_are_allowed() -> None:
    y = make_survival([1, 0, 1, 1, 0], [0.0, 0.0, 1.0, 2.0, 3.0])
    risk = np.array([5.0, 1.0, 4.0, 2.0, 0.0])
    event, time = split_survival(y)
    assert_same_result(
        om.concordance_index_censored(event, time, risk),
        sk.concordance_index_censored(event, time, risk),
    )
    times, surv = om.kaplan_meier(time, event)
    assert times[0] == 0.0 and surv[0] == pytest.approx(4 / 5)
    auc, _ = om.cumulative_dynamic_auc(y, y, risk, [0.0, 1.5])
    np.testing.assert_allclose(auc, sk.cumulative_dynamic_auc(y, y, risk, [0.0, 1.5])[0])


# --------------------------------------------------------------------------- empty / all censored

TRAIN = make_survival([1, 0, 1, 0, 1, 0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
EMPTY = make_survival(np.zeros(0, bool), np.zeros(0))
ALL_CENSORED = make_survival([0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0])
GRID = np.array([1.5, 2.5])


def all_nan(values: object) -> bool:
    return bool(np.isnan(np.asarray(values, dtype=float)).all())


@pytest.mark.parametrize("train", ["train", "empty_train"])
@pytest.mark.parametrize("test", ["empty", "all_censored"])
def test_no_event_every_metric_is_nan(test: str, train: str) -> None:
    """One rule for n = 0 and for no event: every metric is NaN, none raises for that alone
    (not even when the training set is empty, since no censoring weight is needed)."""
    y = EMPTY if test == "empty" else ALL_CENSORED
    y_train = TRAIN if train == "train" else EMPTY
    n = len(y)
    event, time = split_survival(y)
    risk = np.arange(float(n))
    harrell = om.concordance_index_censored(event, time, risk)
    assert np.isnan(harrell.cindex) and harrell[1:] == (0, 0, 0, 0)
    for tau in (None, 2.5):
        uno = om.concordance_index_ipcw(y_train, y, risk, tau=tau)
        assert np.isnan(uno.cindex) and uno[1:] == (0, 0, 0, 0)
    for grid in (GRID, GRID[:1]):
        auc, mean_auc = om.cumulative_dynamic_auc(y_train, y, risk, grid)
        assert auc.shape == grid.shape and all_nan(auc) and np.isnan(mean_auc)
        times, scores = om.brier_score(y_train, y, np.full((n, grid.size), 0.5), grid)
        np.testing.assert_array_equal(times, grid)
        assert scores.shape == grid.shape and all_nan(scores)
    auc_2d, mean_2d = om.cumulative_dynamic_auc(y_train, y, np.zeros((n, 2)), GRID)
    assert auc_2d.shape == (2,) and all_nan(auc_2d) and np.isnan(mean_2d)
    assert np.isnan(om.integrated_brier_score(y_train, y, np.full((n, 2), 0.5), GRID))
    with pytest.raises(TimeGridError, match="no events"):
        om.evaluation_times(y_train, y)
    with_grid = om.survival_metrics(y_train, y, risk, surv_fn=np.full((n, 2), 0.5), times=GRID)
    default = om.survival_metrics(y_train, y, risk, surv_fn=lambda t: np.full((n, len(t)), 0.5))
    for result in (with_grid, default):
        assert set(result) == {"c_index", "c_index_uno", "td_auc", "ibs"}
        assert all_nan(list(result.values()))


def test_no_event_test_set_still_checks_its_inputs() -> None:
    assert all_nan(om.brier_score(TRAIN, EMPTY, np.zeros(0), [2.0])[1])  # (0,) for one time
    with pytest.raises(MetricInputError, match="rows"):
        om.brier_score(TRAIN, EMPTY, np.zeros((3, 2)), GRID)
    with pytest.raises(MetricInputError, match="rows"):
        om.cumulative_dynamic_auc(TRAIN, ALL_CENSORED, np.zeros(3), GRID)
    with pytest.raises(MetricInputError, match=r"\[0, 1\]"):
        om.brier_score(TRAIN, ALL_CENSORED, np.full((4, 2), 2.0), GRID)
    with pytest.raises(TimeGridError, match="follow-up"):  # a non-empty test set has one
        om.cumulative_dynamic_auc(TRAIN, ALL_CENSORED, np.zeros(4), [4.0])
    with pytest.raises(TimeGridError, match="two"):
        om.integrated_brier_score(TRAIN, EMPTY, np.zeros((0, 1)), [2.0])
    # scikit-survival refuses such test sets outright
    with pytest.raises(ValueError, match="censored"):
        sk.brier_score(TRAIN, ALL_CENSORED, np.full((4, 2), 0.5), GRID)


@pytest.mark.parametrize("test", ["empty", "all_censored"])
def test_no_event_kaplan_meier_is_one(test: str) -> None:
    event, time = split_survival(EMPTY if test == "empty" else ALL_CENSORED)
    times, surv = om.kaplan_meier(time, event)
    np.testing.assert_array_equal(times, np.unique(time))
    np.testing.assert_array_equal(surv, np.ones(len(times)))
    times, cens = om.kaplan_meier(time, event, reverse=True)
    assert cens.size == times.size and (cens.size == 0 or cens[-1] == 0.0)


def test_empty_training_set_means_no_censoring_weights() -> None:
    test = make_survival([1, 0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(CensoringSupportError, match="no training"):
        om.concordance_index_ipcw(EMPTY, test, [3.0, 2.0, 1.0])
    with pytest.raises(CensoringSupportError, match="no training"):
        om.cumulative_dynamic_auc(EMPTY, test, [3.0, 2.0, 1.0], [1.5])
    with pytest.raises(CensoringSupportError, match="no training"):
        om.brier_score(EMPTY, test, np.full((3, 1), 0.5), [1.5])
    with pytest.raises(TimeGridError):
        om.evaluation_times(EMPTY, test)
    result = om.survival_metrics(EMPTY, test, [3.0, 2.0, 1.0], surv_fn=lambda t: None)
    assert result["c_index"] == 1.0
    assert all_nan([result["c_index_uno"], result["td_auc"], result["ibs"]])


def test_all_censored_training_set_closed_form() -> None:
    # G from a train set censored at 1, 2, 3, 4: 3/4 on [1, 2), 1/2 on [2, 3), 1/4, then 0.
    train = make_survival([0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0])
    test = make_survival([1, 1, 0], [1.5, 2.5, 3.5])
    risk = np.array([2.0, 0.0, 1.0])
    # pairs (1.5, 2.5) and (1.5, 3.5) concordant with weight (4/3)^2, (2.5, 3.5) discordant x 4
    uno = om.concordance_index_ipcw(train, test, risk)
    assert uno.cindex == pytest.approx(8 / 17) and uno[1:] == (2, 1, 0, 0)
    # t = 3: cases 1.5 (weight 4/3, beats the control) and 2.5 (weight 2, loses)
    auc, _ = om.cumulative_dynamic_auc(train, test, risk, [3.0])
    assert auc[0] == pytest.approx(0.4)
    _, brier = om.brier_score(train, test, np.array([0.2, 0.4, 0.9]), [3.0])
    assert brier[0] == pytest.approx((0.04 * 4 / 3 + 0.16 * 2 + 0.01 * 4) / 3)


# --------------------------------------------------------------------------- size independence


def near_tie_sample(tol: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """400 subjects (tree path) whose risks sit at, just inside and just outside ``tol`` of each
    other, with heavy ties in time between events, censorings and both."""
    rng = np.random.default_rng(seed)
    n = 400
    event = rng.random(n) < 0.5
    time = rng.integers(0, 40, size=n).astype(float)
    if tol < 1e-3:  # groups of four at x, x + tol, x - tol, x + tol / 2 (rounded floats)
        offsets = np.array([0.0, tol, -tol, 0.5 * tol])
        risk = np.repeat(rng.normal(size=n // 4), 4) + offsets[np.arange(n) % 4]
    else:  # the tolerance is the rounding step of the scores, as with round(score, 1)
        risk = np.round(rng.normal(size=n), 1)
    return event, time, risk


@pytest.mark.parametrize("tol", [1e-8, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_concordance_does_not_depend_on_input_size(tol: float, seed: int) -> None:
    event, time, risk = near_tie_sample(tol, seed)
    assert int(event.sum()) * time.size > om._DENSE_MAX_PAIRS  # the fast path is taken
    dense = om._pair_counts_dense(event, time, risk, tol)
    tree = om._pair_counts_tree(event, time, risk, tol)
    for a, b in zip(dense, tree, strict=True):
        np.testing.assert_array_equal(a, b)
    ours = om.concordance_index_censored(event, time, risk, tied_tol=tol)
    assert_same_result(ours, sk.concordance_index_censored(event, time, risk, tied_tol=tol))
    # Size independence: k copies of a small sample (dense path) take the fast path, and every
    # pair (i, j) of the small sample appears k^2 times in the copies.
    small = np.r_[np.flatnonzero(event)[:15], np.flatnonzero(~event)[:15]]
    e, t, r = event[small], time[small], risk[small]
    k = 20
    assert int(e.sum()) * small.size <= om._DENSE_MAX_PAIRS < int(e.sum()) * k * k * small.size
    once = om.concordance_index_censored(e, t, r, tied_tol=tol)
    copies = om.concordance_index_censored(np.tile(e, k), np.tile(t, k), np.tile(r, k), tol)
    assert copies == ConcordanceResult(once.cindex, *(k * k * c for c in once[1:]))
