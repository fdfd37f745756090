from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from oncoslide.errors import ConfigError
from oncoslide.survival.bins import TimeBins


def _cohort(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.exponential(800.0, size=n).round(1), rng.random(n) < 0.4


def test_quantile_edges_are_the_mcat_qcut_edges_of_uncensored_times() -> None:
    time, event = _cohort()
    bins = TimeBins.quantile(time, event, n_bins=4)
    _, qcut_edges = pd.qcut(time[event], q=4, retbins=True, labels=False)
    assert bins.n_bins == 4
    assert bins.edges[0] == 0 and bins.edges[-1] == np.inf
    np.testing.assert_allclose(bins.edges[1:-1], qcut_edges[1:-1], rtol=1e-12)


def test_quantile_bins_put_patients_where_mcat_does() -> None:
    """MCAT: pd.cut(right=False) on qcut edges whose ends are widened to cover every time."""
    time, event = _cohort(seed=1)
    bins = TimeBins.quantile(time, event, n_bins=4)
    _, mcat_edges = pd.qcut(time[event], q=4, retbins=True, labels=False)
    mcat_edges[0], mcat_edges[-1] = time.min() - 1e-6, time.max() + 1e-6
    expected = pd.cut(time, bins=mcat_edges, labels=False, right=False)
    np.testing.assert_array_equal(bins.transform(time), expected)
    uncensored_counts = np.bincount(bins.transform(time[event]), minlength=4)
    assert uncensored_counts.max() - uncensored_counts.min() <= 1  # quartiles of the events


def test_quantile_ignores_censored_times() -> None:
    time, event = _cohort(seed=2)
    moved = time.copy()
    moved[~event] *= 10  # censored times change, event times do not
    assert TimeBins.quantile(moved, event) == TimeBins.quantile(time, event)
    assert TimeBins.quantile(time, np.ones_like(event)) != TimeBins.quantile(time, event)


def test_quantile_collapses_duplicate_edges() -> None:
    time = np.array([0.0] * 4 + [5.0] * 6)  # quartiles 0, 5, 5
    event = np.ones(10, dtype=bool)
    bins = TimeBins.quantile(time, event, n_bins=4)
    np.testing.assert_array_equal(bins.edges, [0.0, 5.0, np.inf])  # 0 quantile merged into edge 0
    assert bins.n_bins == 2
    assert TimeBins.quantile(time, event, n_bins=1).edges.tolist() == [0.0, np.inf]


def test_quantile_refuses_data_without_events_or_bad_input() -> None:
    with pytest.raises(ConfigError, match="uncensored"):
        TimeBins.quantile([1.0, 2.0], [0, 0])
    with pytest.raises(ConfigError, match="non-negative"):
        TimeBins.quantile([1.0, -2.0], [1, 1])
    with pytest.raises(ConfigError, match="equal length"):
        TimeBins.quantile([1.0, 2.0], [1])
    with pytest.raises(ConfigError, match="n_bins"):
        TimeBins.quantile([1.0, 2.0], [1, 1], n_bins=0)


def test_fixed_bins_cropkt() -> None:
    bins = TimeBins.fixed(365, 32)
    assert bins.n_bins == 32
    assert bins.edges[1] == 365 and bins.edges[31] == 11315 and bins.edges[32] == np.inf
    index = bins.transform([0, 364.99, 365, 730, 11314, 11315, 11679, 11680, 50_000])
    assert index.dtype == np.int64
    assert index.tolist() == [0, 0, 1, 2, 30, 31, 31, 31, 31]
    with pytest.raises(ConfigError, match="width"):
        TimeBins.fixed(0, 3)


def test_transform_uses_left_closed_bins() -> None:
    bins = TimeBins(np.array([0.0, 10.0, 20.0, np.inf]))
    assert bins.transform([0.0, 9.999, 10.0, 19.0, 20.0, 1e9]).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="non-negative"):
        bins.transform([-1.0])
    with pytest.raises(ConfigError, match="finite"):
        bins.transform([np.nan])


def test_survival_at_steps_at_bin_ends() -> None:
    bins = TimeBins(np.array([0.0, 1.0, 2.0, np.inf]))
    survival = np.array([[0.9, 0.5, 0.2], [0.8, 0.7, 0.1]])
    times = [0.0, 0.99, 1.0, 1.5, 2.0, 100.0]
    expected = np.array([[1.0, 1.0, 0.9, 0.9, 0.5, 0.5], [1.0, 1.0, 0.8, 0.8, 0.7, 0.7]])
    np.testing.assert_array_equal(bins.survival_at(survival, times), expected)
    with pytest.raises(ConfigError, match=r"\(n, 3\)"):
        bins.survival_at(survival[:, :2], times)


def test_survival_at_agrees_with_the_discrete_model_probability() -> None:
    """At a bin end e_{k+1}, S(t) is the model's P(survive past bin k) for every k."""
    bins = TimeBins.fixed(2.0, 5)
    hazards = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    survival = np.cumprod(1 - hazards, axis=1)
    at_ends = bins.survival_at(survival, bins.edges[1:-1])
    np.testing.assert_allclose(at_ends[0], survival[0, :-1])


def test_dict_round_trip_through_strict_json() -> None:
    time, event = _cohort(seed=3)
    bins = TimeBins.quantile(time, event, n_bins=4)
    text = json.dumps(bins.to_dict(), allow_nan=False)
    restored = TimeBins.from_dict(json.loads(text))
    assert restored == bins and hash(restored) == hash(bins)
    np.testing.assert_array_equal(restored.edges, bins.edges)
    with pytest.raises(ConfigError, match="finite_edges"):
        TimeBins.from_dict({"edges": [0, 1]})
    with pytest.raises(ConfigError, match="numbers"):
        TimeBins.from_dict({"finite_edges": ["a"]})


def test_edges_are_validated_and_read_only() -> None:
    source = np.array([0.0, 1.0, np.inf])
    bins = TimeBins(source)
    source[1] = 5.0  # the bins keep their own copy
    assert bins.edges[1] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        bins.edges[1] = 3.0
    with pytest.raises(ConfigError, match=r"first edge must be 0.*last edge must be inf"):
        TimeBins(np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="strictly increasing"):
        TimeBins(np.array([0.0, 2.0, 2.0, np.inf]))
    with pytest.raises(ConfigError, match="at least 2"):
        TimeBins(np.array([0.0]))
