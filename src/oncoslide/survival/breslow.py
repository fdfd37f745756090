"""Breslow's estimator of the baseline cumulative hazard of a Cox model with given risks.

After training a Cox model (``cox_ph_loss``), fit this on the **training** patients' risks
(log partial hazards) to turn any patient's risk into a survival curve:

    H0(t) = sum over event times t_k <= t of  d_k / sum_{j: T_j >= t_k} exp(risk_j)
    H(t | risk) = H0(t) * exp(risk),   S(t | risk) = exp(-H(t | risk))

with d_k the number of events at t_k. Any constant added to all risks cancels in the
predictions (it scales H0 by the inverse factor), so centring conventions do not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from oncoslide.errors import ConfigError
from oncoslide.survival.target import make_survival

ArrayLike = Sequence[float] | np.ndarray


class BreslowEstimator:
    """Baseline cumulative hazard by Breslow's method; a step function over event times.

    Attributes (after :meth:`fit`):
        event_times_: (K,) sorted unique event times.
        cum_baseline_hazard_: (K,) H0 at those times, for risks shifted by ``offset_``.
        offset_: the largest training risk; risks are shifted by it so that exp() cannot
            overflow whatever their scale.
    """

    def __init__(self) -> None:
        self.event_times_: np.ndarray | None = None
        self.cum_baseline_hazard_: np.ndarray | None = None
        self.offset_: float = 0.0

    def fit(self, risk: ArrayLike, time: ArrayLike, event: ArrayLike) -> BreslowEstimator:
        """Estimate H0 from training risks (n,), times (n,) and event indicators (n,)."""
        target = make_survival(event, time)
        r = _check_risk(risk, "risk")
        if r.shape[0] != target.shape[0]:
            raise ConfigError(f"risk has {r.shape[0]} values but time/event have {target.shape[0]}")
        observed, times = target["event"], target["time"]
        if not observed.any():
            raise ConfigError("Breslow's estimator needs at least one event; got none")
        self.offset_ = float(r.max())
        weight = np.exp(r - self.offset_)
        order = np.argsort(times, kind="stable")
        sorted_times = times[order]
        # sum of exp(risk) over {j: T_j >= t}, read at the first index of each event time
        tail_sums = np.cumsum(weight[order][::-1])[::-1]
        event_times, n_events = np.unique(times[observed], return_counts=True)
        first = np.searchsorted(sorted_times, event_times, side="left")
        self.event_times_ = event_times
        self.cum_baseline_hazard_ = np.cumsum(n_events / tail_sums[first])
        return self

    def baseline_cumulative_hazard(self, times: ArrayLike) -> np.ndarray:
        """H0 at ``times`` (T,), for a patient with risk 0."""
        grid, hazard = self._fitted()
        t = _check_times(times)
        steps = np.searchsorted(grid, t, side="right")
        padded = np.concatenate([[0.0], hazard])
        return padded[steps] * np.exp(-self.offset_)

    def cumulative_hazard(self, risk: ArrayLike, times: ArrayLike) -> np.ndarray:
        """H(t | risk) = H0(t) exp(risk), shape (m, T)."""
        grid, hazard = self._fitted()
        r = _check_risk(risk, "risk")
        t = _check_times(times)
        padded = np.concatenate([[0.0], hazard])
        base = padded[np.searchsorted(grid, t, side="right")]
        return np.exp(r - self.offset_)[:, None] * base[None, :]

    def survival_function(self, risk: ArrayLike, times: ArrayLike) -> np.ndarray:
        """S(t | risk) = exp(-H(t | risk)), shape (m, T)."""
        return np.exp(-self.cumulative_hazard(risk, times))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of a fitted estimator."""
        grid, hazard = self._fitted()
        return {
            "event_times": grid.tolist(),
            "cum_baseline_hazard": hazard.tolist(),
            "offset": self.offset_,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreslowEstimator:
        """Inverse of :meth:`to_dict`."""
        keys = ("event_times", "cum_baseline_hazard", "offset")
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise ConfigError(f"a Breslow estimator needs the keys {keys}")
        grid = np.asarray(data["event_times"], dtype=np.float64)
        hazard = np.asarray(data["cum_baseline_hazard"], dtype=np.float64)
        if grid.ndim != 1 or grid.shape != hazard.shape or not (np.diff(grid) > 0).all():
            raise ConfigError("Breslow estimator: event_times must increase and match the hazards")
        estimator = cls()
        estimator.event_times_, estimator.cum_baseline_hazard_ = grid, hazard
        estimator.offset_ = float(data["offset"])
        return estimator

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.event_times_ is None or self.cum_baseline_hazard_ is None:
            raise ConfigError("the Breslow estimator is not fitted; call fit() first")
        return self.event_times_, self.cum_baseline_hazard_


def _check_risk(risk: ArrayLike, name: str) -> np.ndarray:
    try:
        r = np.asarray(risk, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be numbers") from None
    if r.ndim != 1 or not np.isfinite(r).all():
        raise ConfigError(f"{name} must be a 1-D array of finite numbers, got shape {r.shape}")
    return r


def _check_times(times: ArrayLike) -> np.ndarray:
    t = _check_risk(times, "times")
    if (t < 0).any():
        raise ConfigError("times must be non-negative")
    return t
