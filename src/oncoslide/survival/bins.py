"""Time bins for discrete-time survival models.

K bins are given by K + 1 edges ``0 = e_0 < e_1 < ... < e_{K-1} < e_K = inf``; bin k holds the
times t with ``e_k <= t < e_{k+1}``. A discrete-time model predicts, per bin, the probability
``S_k`` of surviving past bin k, i.e. beyond ``e_{k+1}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oncoslide.errors import ConfigError
from oncoslide.survival.target import make_survival


@dataclass(frozen=True, eq=False)
class TimeBins:
    """Bin edges, a read-only float64 array of length K + 1 starting at 0 and ending at inf."""

    edges: np.ndarray

    def __post_init__(self) -> None:
        edges = np.array(self.edges, dtype=np.float64)  # a private copy
        problems = []
        if edges.ndim != 1 or edges.size < 2:
            problems.append(f"edges must be 1-D with at least 2 values, got shape {edges.shape}")
        else:
            if edges[0] != 0:
                problems.append(f"the first edge must be 0, got {edges[0]}")
            if edges[-1] != np.inf:
                problems.append(f"the last edge must be inf, got {edges[-1]}")
            if not np.isfinite(edges[:-1]).all():
                problems.append("all edges but the last must be finite")
            elif not (np.diff(edges) > 0).all():
                problems.append("edges must be strictly increasing")
        if problems:
            raise ConfigError("invalid time bins: " + "; ".join(problems))
        edges.setflags(write=False)
        object.__setattr__(self, "edges", edges)

    @classmethod
    def quantile(
        cls,
        time: Sequence[float] | np.ndarray,
        event: Sequence[object] | np.ndarray,
        n_bins: int = 4,
    ) -> TimeBins:
        """Bins at the quantiles of the uncensored times (the MCAT convention).

        The interior edges are the 1/K, ..., (K-1)/K quantiles (linear interpolation, as
        ``numpy.quantile`` and ``pandas.qcut``) of the times with an event; the first edge is 0
        and the last inf. Pass the **training part only**: edges computed on the whole cohort
        leak test information. Quantiles that coincide (many tied event times) or fall at 0
        are merged, so the result can have fewer than ``n_bins`` bins; check ``n_bins`` on it.
        """
        _check_n_bins(n_bins)
        target = make_survival(event, time)
        event_times = target["time"][target["event"]]
        if event_times.size == 0:
            raise ConfigError("quantile time bins need at least one uncensored time; got none")
        inner = np.quantile(event_times, np.arange(1, n_bins) / n_bins)
        inner = np.unique(inner[inner > 0])
        return cls(np.concatenate([[0.0], inner, [np.inf]]))

    @classmethod
    def fixed(cls, width: float, n_bins: int) -> TimeBins:
        """``n_bins`` bins of equal ``width``, the last one open-ended.

        Edges ``0, w, 2w, ..., (n_bins - 1) w, inf``: CROPKT's 32 one-year bins over
        [0, 11680] days are ``TimeBins.fixed(365, 32)`` (times past 11315 days fall in bin 31).
        """
        _check_n_bins(n_bins)
        if not np.isfinite(width) or width <= 0:
            raise ConfigError(f"bin width must be a positive finite number, got {width}")
        return cls(np.concatenate([np.arange(n_bins) * float(width), [np.inf]]))

    @property
    def n_bins(self) -> int:
        """Number of bins K."""
        return int(self.edges.size - 1)

    def transform(self, time: Sequence[float] | np.ndarray) -> np.ndarray:
        """Bin index (int64) of each time: k such that ``edges[k] <= t < edges[k+1]``."""
        t = _check_times(time, "time")
        return np.searchsorted(self.edges, t, side="right").astype(np.int64) - 1

    def survival_at(
        self, survival_per_bin: np.ndarray, times: Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """Survival curves of a discrete-time model evaluated at arbitrary times.

        ``survival_per_bin[i, k]`` is patient i's probability of surviving past bin k (beyond
        ``edges[k+1]``). The returned step function is right-continuous and steps at the bin
        ends: ``S(t) = survival_per_bin[i, j - 1]`` where j is the number of bins fully
        elapsed at t (bins k with ``edges[k+1] <= t``), and ``S(t) = 1`` for ``t < edges[1]``.
        Within a bin the survival stays at its value at the bin's start (deaths are counted
        when the bin is over).

        Args:
            survival_per_bin: (n, K) survival probabilities.
            times: (T,) evaluation times, finite and >= 0.

        Returns:
            (n, T) float64.
        """
        surv = np.asarray(survival_per_bin, dtype=np.float64)
        if surv.ndim != 2 or surv.shape[1] != self.n_bins:
            raise ConfigError(
                f"survival_per_bin must be (n, {self.n_bins}), got shape {surv.shape}"
            )
        t = _check_times(times, "times")
        elapsed = np.searchsorted(self.edges[1:], t, side="right")  # bins fully elapsed at t
        padded = np.concatenate([np.ones((surv.shape[0], 1)), surv], axis=1)
        return padded[:, elapsed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the finite edges (the last edge, inf, is implied)."""
        return {"finite_edges": [float(e) for e in self.edges[:-1]]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimeBins:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or "finite_edges" not in data:
            raise ConfigError("time bins must be a mapping with a 'finite_edges' list")
        try:
            finite = np.asarray(data["finite_edges"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError("time bins: 'finite_edges' must be a list of numbers") from None
        return cls(np.concatenate([finite.reshape(-1), [np.inf]]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TimeBins) and np.array_equal(self.edges, other.edges)

    def __hash__(self) -> int:
        return hash(self.edges.tobytes())

    def __repr__(self) -> str:
        return f"TimeBins(n_bins={self.n_bins}, edges={self.edges.tolist()})"


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")


def _check_times(time: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    try:
        t = np.asarray(time, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be numbers") from None
    if t.ndim != 1:
        raise ConfigError(f"{name} must be 1-D, got shape {t.shape}")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ConfigError(f"{name} must be finite and non-negative")
    return t
