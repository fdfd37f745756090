"""Input checks shared by the numerical functions (survival metrics, the Cox model, benchmark
statistics). Each check records what is wrong in a ``problems`` list instead of raising, so a
caller can report every problem of its inputs at once and then raise its own typed error."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


def as_vector(
    x: ArrayLike,
    name: str,
    problems: list[str],
    *,
    size: int | None = None,
    nonnegative: bool = False,
) -> FloatArray | None:
    """A 1-D float64 array that should be finite (and >= 0 with ``nonnegative``).

    Returns None when ``x`` is unusable (not numeric, not 1-D, or not of length ``size``);
    otherwise the array, with any non-finite or negative values recorded as problems.
    """
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        problems.append(f"{name} must be numeric")
        return None
    if arr.ndim != 1:
        problems.append(f"{name} must be 1-D, got shape {arr.shape}")
        return None
    if size is not None and arr.size != size:
        problems.append(f"{name} has {arr.size} values, expected {size}")
        return None
    finite = np.isfinite(arr)
    if not finite.all():
        problems.append(f"{name} has {int((~finite).sum())} non-finite value(s)")
    if nonnegative:
        negative = int((arr[finite] < 0).sum())
        if negative:
            problems.append(f"{name} has {negative} negative value(s); it must be >= 0")
    return arr


def as_events(x: ArrayLike, name: str, problems: list[str]) -> BoolArray | None:
    """Event indicators (bool or 0/1) as a 1-D bool array; None (problem recorded) if not."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        problems.append(f"{name} must be 1-D, got shape {arr.shape}")
        return None
    if arr.dtype == np.bool_:
        return arr
    try:
        ok = bool(np.isin(arr, (0, 1)).all())
    except TypeError:
        ok = False
    if not ok:
        problems.append(f"{name} must be boolean or 0/1")
        return None
    return arr.astype(bool)


def as_matrix(x: ArrayLike, name: str, problems: list[str]) -> FloatArray | None:
    """A 2-D float64 (patients x features) array that should be finite.

    Returns None when unusable (not numeric or not 2-D); non-finite values are recorded.
    """
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        problems.append(f"{name} must be numeric")
        return None
    if arr.ndim != 2:
        problems.append(f"{name} must be 2-D (patients x features), got shape {arr.shape}")
        return None
    bad = ~np.isfinite(arr)
    if bad.any():
        problems.append(
            f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf) in "
            f"{int(bad.any(axis=0).sum())} column(s)"
        )
    return arr
