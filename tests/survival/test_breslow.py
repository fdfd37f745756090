"""Breslow's baseline hazard against scikit-survival, lifelines and a hand computation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from oncoslide.errors import ConfigError
from oncoslide.survival.breslow import BreslowEstimator


def _data(n: int = 80, seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = np.ceil(rng.exponential(scale=np.exp(-0.8 * x)) * 5)  # rounded: ties everywhere
    event = rng.random(n) < 0.7
    return x, time, event


def test_hand_computed_example() -> None:
    # times 1 (event), 2 (censored), 3 (two events), 4 (event); risks 0, ln 2, 0, ln 3, 0
    risk = np.log([1.0, 2.0, 1.0, 3.0, 1.0])
    time = np.array([1.0, 2.0, 3.0, 3.0, 4.0])
    event = np.array([1, 0, 1, 1, 1])
    estimator = BreslowEstimator().fit(risk, time, event)
    h1, h3, h4 = 1 / 8, 2 / 5, 1 / 1  # events / sum of exp(risk) over the risk set
    np.testing.assert_allclose(estimator.event_times_, [1.0, 3.0, 4.0])
    times = [0.0, 0.99, 1.0, 2.5, 3.0, 3.9, 4.0, 100.0]
    expected = np.array([0, 0, h1, h1, h1 + h3, h1 + h3, h1 + h3 + h4, h1 + h3 + h4])
    np.testing.assert_allclose(estimator.baseline_cumulative_hazard(times), expected, rtol=1e-12)
    np.testing.assert_allclose(
        estimator.survival_function([np.log(2.0)], times)[0], np.exp(-2 * expected), rtol=1e-12
    )


def test_matches_scikit_survival() -> None:
    from sksurv.linear_model.coxph import BreslowEstimator as SksurvBreslow

    x, time, event = _data()
    risk = 0.7 * x
    ours = BreslowEstimator().fit(risk, time, event)
    theirs = SksurvBreslow().fit(risk, event, time)
    grid = np.unique(time)
    grid = np.concatenate([grid, grid[:-1] + 0.5])  # at and between the steps
    np.testing.assert_allclose(
        ours.baseline_cumulative_hazard(grid), theirs.cum_baseline_hazard_(grid), rtol=1e-12
    )
    new_risk = np.array([-2.0, 0.0, 0.3, 1.5])
    expected = np.stack([f(grid) for f in theirs.get_survival_function(new_risk)])
    np.testing.assert_allclose(ours.survival_function(new_risk, grid), expected, rtol=1e-12)


def test_matches_lifelines_coxph_predictions() -> None:
    """lifelines centres the covariates; survival predictions do not depend on that."""
    from lifelines import CoxPHFitter

    x, time, event = _data(seed=3)
    frame = pd.DataFrame({"x": x, "T": time, "E": event.astype(int)})
    fitter = CoxPHFitter().fit(frame, duration_col="T", event_col="E")
    beta = float(fitter.params_["x"])
    ours = BreslowEstimator().fit(beta * x, time, event)
    new_x = np.array([-1.0, 0.0, 2.0])
    grid = np.unique(time)  # lifelines interpolates linearly between its own time points
    expected = fitter.predict_survival_function(pd.DataFrame({"x": new_x}), times=grid)
    np.testing.assert_allclose(
        ours.survival_function(beta * new_x, grid), expected.to_numpy().T, rtol=1e-10
    )
    # lifelines' baseline is the curve of the mean covariate
    centred = ours.cumulative_hazard([beta * x.mean()], grid)[0]
    np.testing.assert_allclose(
        centred, fitter.baseline_cumulative_hazard_.loc[grid].to_numpy()[:, 0], rtol=1e-10
    )


def test_shift_invariance_and_no_overflow() -> None:
    x, time, event = _data(seed=5)
    base = BreslowEstimator().fit(x, time, event)
    shifted = BreslowEstimator().fit(x + 800.0, time, event)  # exp(800) overflows float64
    grid = np.linspace(0, time.max() + 1, 17)
    new = np.array([-1.0, 0.5])
    np.testing.assert_allclose(
        shifted.survival_function(new + 800.0, grid), base.survival_function(new, grid), rtol=1e-10
    )
    assert np.isfinite(shifted.cumulative_hazard(new + 800.0, grid)).all()


def test_survival_curves_are_monotone_and_ordered_by_risk() -> None:
    x, time, event = _data(seed=9)
    estimator = BreslowEstimator().fit(x, time, event)
    curves = estimator.survival_function([-1.0, 0.0, 1.0], np.linspace(0, 30, 50))
    assert (np.diff(curves, axis=1) <= 0).all()
    assert (curves[0] >= curves[1]).all() and (curves[1] >= curves[2]).all()
    assert curves[:, 0].tolist() == [1.0, 1.0, 1.0]


def test_dict_round_trip() -> None:
    x, time, event = _data(seed=2)
    estimator = BreslowEstimator().fit(x, time, event)
    restored = BreslowEstimator.from_dict(json.loads(json.dumps(estimator.to_dict())))
    grid = np.linspace(0, 20, 9)
    np.testing.assert_array_equal(
        restored.survival_function([0.2, -0.4], grid),
        estimator.survival_function([0.2, -0.4], grid),
    )
    with pytest.raises(ConfigError, match="keys"):
        BreslowEstimator.from_dict({"event_times": [1.0]})


def test_errors() -> None:
    with pytest.raises(ConfigError, match="not fitted"):
        BreslowEstimator().survival_function([0.0], [1.0])
    with pytest.raises(ConfigError, match="at least one event"):
        BreslowEstimator().fit([0.0, 1.0], [1.0, 2.0], [0, 0])
    with pytest.raises(ConfigError, match="risk has 3 values"):
        BreslowEstimator().fit([0.0, 1.0, 2.0], [1.0, 2.0], [1, 0])
    with pytest.raises(ConfigError, match="finite"):
        BreslowEstimator().fit([0.0, np.nan], [1.0, 2.0], [1, 0])
    fitted = BreslowEstimator().fit([0.0, 1.0], [1.0, 2.0], [1, 1])
    with pytest.raises(ConfigError, match="non-negative"):
        fitted.survival_function([0.0], [-1.0])
