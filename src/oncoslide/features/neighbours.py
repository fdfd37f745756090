"""Patch-grid geometry shared by every reader of the slide arrangement: the grid's step and
the 4-neighbour edges between patches (PAMA's pairs readout, the tissue summary of test-time
adaptation, the label-free arrangement statistics of the benchmarks).

Coordinates are a feature file's patch positions (level-0 pixels, top-left corners). A patch
grid has one step along both axes (the tiling stride); positions are put on that lattice by
rounding (relative to the slide's first row and column), so coordinates off the lattice by
less than a quarter step still find their neighbours. numpy rather than torch: at a slide's
few hundred to few thousand positions torch's per-operation overhead made the edges 3-5x
slower than numpy's.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def grid_step(coords: ArrayLike) -> float:
    """The patch grid's step in coordinate units: the smallest positive gap between distinct
    x (or y) values; 1 when the bag has a single column and row."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    gaps = []
    for axis in range(2):
        values = np.unique(xy[:, axis])
        if len(values) > 1:
            gaps.append(float(np.diff(values).min()))  # unique values: every gap is positive
    return min(gaps) if gaps else 1.0


def grid_edges(pos: ArrayLike) -> np.ndarray:
    """(E, 2) int64 indices of the patch pairs one grid step apart (each 4-neighbour edge
    once: the right and the lower neighbour), for positions (N, 2) in patch units. Positions
    are rounded to the lattice; a cell holding several patches links its first (lowest index)
    patch."""
    p = np.asarray(pos, dtype=np.float64).reshape(-1, 2)
    n = len(p)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    cells = np.rint(p - p.min(axis=0)).astype(np.int64)
    width = int(cells[:, 0].max()) + 2  # + 2: a right neighbour never wraps to the next row
    key = cells[:, 1] * width + cells[:, 0]
    idx = np.argsort(key, kind="stable")
    sorted_keys = key[idx]
    parts = []
    for step in (1, width):  # right, down
        want = key + step
        at = np.minimum(np.searchsorted(sorted_keys, want), n - 1)
        hit = sorted_keys[at] == want
        parts.append(np.stack([np.flatnonzero(hit), idx[at[hit]]], axis=1))
    return np.concatenate(parts).astype(np.int64, copy=False)


def coordinate_edges(coords: ArrayLike) -> np.ndarray:
    """:func:`grid_edges` of a slide's patch coordinates (N, 2) in coordinate units, the step
    read from them (:func:`grid_step`)."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return grid_edges(xy / grid_step(xy)) if len(xy) > 1 else np.zeros((0, 2), dtype=np.int64)


__all__ = ["coordinate_edges", "grid_edges", "grid_step"]
