"""Structured survival targets, laid out as scikit-survival does: fields ``event`` and ``time``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oncoslide.errors import ConfigError

SURVIVAL_DTYPE = np.dtype([("event", "?"), ("time", "<f8")])


def make_survival(
    event: Sequence[object] | np.ndarray, time: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Build a structured array from event indicators (0/1 or bool) and times."""
    event = np.asarray(event)
    time = np.asarray(time, dtype=np.float64)
    if event.shape != time.shape or event.ndim != 1:
        raise ConfigError(
            f"event and time must be 1-D of equal length, got {event.shape} and {time.shape}"
        )
    if event.dtype != np.bool_:
        if not np.isin(event, (0, 1)).all():
            raise ConfigError("event indicators must be 0 or 1")
        event = event.astype(bool)
    if not np.isfinite(time).all() or (time < 0).any():
        raise ConfigError("survival times must be finite and non-negative")
    y = np.empty(time.shape[0], dtype=SURVIVAL_DTYPE)
    y["event"] = event
    y["time"] = time
    return y


def split_survival(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (event as bool, time as float64) from a structured survival array."""
    if y.dtype.names is None or len(y.dtype.names) != 2:
        raise ConfigError("a survival target is a structured array with an event and a time field")
    event_field, time_field = y.dtype.names
    return np.asarray(y[event_field], dtype=bool), np.asarray(y[time_field], dtype=np.float64)
