"""Structured survival targets: fields are found by name (scikit-survival's layouts included),
event codes are exactly 0/1 or bool, times are finite and non-negative."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sksurv import datasets

from oncoslide.errors import ConfigError
from oncoslide.survival import make_survival, split_survival
from oncoslide.survival import target as ot

EVENT = np.array([True, False, True, False])
TIME = np.array([3.0, 1.0, 2.0, 0.0])


def structured(fields: list[tuple[str, str]], **values: object) -> np.ndarray:
    y = np.empty(len(TIME), dtype=fields)
    for name, value in values.items():
        y[name] = value
    return y


@pytest.mark.parametrize(
    ("event_name", "time_name"),
    [("event", "time"), ("status", "time"), ("Status", "Survival_in_days"), ("cens", "futime")],
)
@pytest.mark.parametrize("time_first", [False, True])
@pytest.mark.parametrize("event_dtype", ["?", "<i8", "<f8"])
def test_fields_are_read_by_name_in_either_order(
    event_name: str, time_name: str, time_first: bool, event_dtype: str
) -> None:
    fields = [(event_name, event_dtype), (time_name, "<f8")]
    y = structured(fields[::-1] if time_first else fields, **{event_name: EVENT, time_name: TIME})
    assert ot.survival_fields(y.dtype) == (event_name, time_name)
    event, time = split_survival(y)
    assert event.dtype == np.bool_ and time.dtype == np.float64
    np.testing.assert_array_equal(event, EVENT)
    np.testing.assert_array_equal(time, TIME)


def test_unknown_names_fall_back_on_the_one_boolean_field() -> None:
    # scikit-survival's breast_cancer data: ('e.tdm', bool), ('t.tdm', float)
    y = structured([("t.tdm", "<f8"), ("e.tdm", "?")], **{"t.tdm": TIME, "e.tdm": EVENT})
    assert ot.survival_fields(y.dtype) == ("e.tdm", "t.tdm")
    np.testing.assert_array_equal(split_survival(y)[0], EVENT)


@pytest.mark.parametrize(
    "loader",
    [
        datasets.load_whas500,
        datasets.load_gbsg2,
        datasets.load_flchain,
        datasets.load_veterans_lung_cancer,
        datasets.load_aids,
        datasets.load_breast_cancer,
    ],
)
def test_scikit_survival_data_sets_are_read(
    loader: Callable[[], tuple[object, np.ndarray]],
) -> None:
    _, y = loader()
    event, time = split_survival(y)
    event_field, time_field = y.dtype.names  # scikit-survival: event first, boolean
    np.testing.assert_array_equal(event, y[event_field])
    np.testing.assert_array_equal(time, y[time_field])


@pytest.mark.parametrize("bad", [2, -1, 0.5, np.nan])
def test_event_codes_other_than_0_1_are_refused(bad: float) -> None:
    y = structured([("status", "<f8"), ("time", "<f8")], status=[1, 0, bad, 1], time=TIME)
    with pytest.raises(ConfigError, match=r"event field 'status' must hold 0/1 or booleans"):
        split_survival(y)


def test_ambiguous_or_misleading_fields_are_refused() -> None:
    both_float = structured([("a", "<f8"), ("b", "<f8")], a=[1, 0, 1, 0], b=TIME)
    with pytest.raises(ConfigError, match=r"cannot tell.*\('a', 'b'\)"):
        split_survival(both_float)
    two_events = structured([("event", "?"), ("status", "<f8")], event=EVENT, status=TIME)
    with pytest.raises(ConfigError, match="two event"):
        split_survival(two_events)
    censored = structured([("censored", "?"), ("time", "<f8")], censored=EVENT, time=TIME)
    with pytest.raises(ConfigError, match="censoring indicator"):
        split_survival(censored)
    bool_time = structured([("event", "?"), ("x", "?")], event=EVENT, x=EVENT)
    with pytest.raises(ConfigError, match="time field 'x'"):
        split_survival(bool_time)
    with pytest.raises(ConfigError, match="two fields"):
        split_survival(np.zeros(3, dtype=[("event", "?"), ("time", "<f8"), ("id", "<i8")]))


def test_times_must_be_finite_and_non_negative_and_every_problem_is_listed() -> None:
    y = structured(
        [("time", "<f8"), ("status", "<i8")], time=[-1.0, np.inf, 2.0, 0.0], status=[1, 2, 0, 1]
    )
    with pytest.raises(ConfigError) as info:
        split_survival(y)
    message = str(info.value)
    assert "negative" in message and "non-finite" in message and "'status'" in message
    zero = make_survival([1, 0], [0.0, 0.0])  # zero times are allowed
    np.testing.assert_array_equal(split_survival(zero)[1], [0.0, 0.0])


def test_make_survival_round_trip() -> None:
    y = make_survival(EVENT.astype(int), TIME)
    assert y.dtype == ot.SURVIVAL_DTYPE
    event, time = split_survival(y)
    np.testing.assert_array_equal(event, EVENT)
    np.testing.assert_array_equal(time, TIME)
