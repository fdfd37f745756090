"""Shared input checks: every problem recorded, unusable inputs returned as None."""

from __future__ import annotations

import numpy as np

from oncoslide._checks import as_events, as_matrix, as_vector


def test_as_vector_records_non_finite_and_negative_values_and_refuses_bad_shapes() -> None:
    problems: list[str] = []
    arr = as_vector([1.0, np.nan, -2.0, np.inf], "time", problems, nonnegative=True)
    assert arr is not None and arr.size == 4
    assert problems == [
        "time has 2 non-finite value(s)",
        "time has 1 negative value(s); it must be >= 0",
    ]
    problems.clear()
    assert as_vector([[1.0]], "risk", problems) is None and "1-D" in problems[0]
    assert as_vector(["a"], "risk", problems) is None and "numeric" in problems[1]
    assert as_vector([1.0, 2.0], "risk", problems, size=3) is None and "expected 3" in problems[2]
    assert as_vector([-1.0], "x", [], nonnegative=False) is not None


def test_as_events_accepts_bool_and_01_only() -> None:
    problems: list[str] = []
    assert as_events(np.array([True, False]), "event", problems).tolist() == [True, False]
    assert as_events([0, 1, 1], "event", problems).tolist() == [False, True, True]
    assert not problems
    assert as_events([0, 2], "event", problems) is None
    assert as_events(["yes"], "event", problems) is None
    assert as_events([[0, 1]], "event", problems) is None
    assert problems == ["event must be boolean or 0/1"] * 2 + [
        "event must be 1-D, got shape (1, 2)"
    ]


def test_as_matrix_counts_bad_values_and_columns() -> None:
    problems: list[str] = []
    x = np.ones((3, 4))
    x[0, 1] = np.nan
    x[2, 1] = np.inf
    x[1, 3] = np.nan
    assert as_matrix(x, "X", problems) is not None
    assert problems == ["X has 3 non-finite value(s) (NaN or inf) in 2 column(s)"]
    assert as_matrix(np.ones(3), "X", problems) is None and "2-D" in problems[1]
