"""The patch grid's 4-neighbour edges (oncoslide.features.neighbours) against a brute-force
search, and the tissue summary's neighbour-pair counts built on them against a hand count."""

from __future__ import annotations

import numpy as np

from oncoslide.features.neighbours import coordinate_edges, grid_edges, grid_step
from oncoslide.training.feature_stats import neighbour_pairs


def _grid(w: int, h: int) -> np.ndarray:
    xy = np.stack(np.meshgrid(np.arange(w), np.arange(h), indexing="xy"), -1)
    return xy.reshape(-1, 2).astype(np.float64)


def _brute_edges(pos: np.ndarray) -> set[tuple[int, int]]:
    """Right and lower neighbours, the first patch of a cell as the neighbour."""
    pts = [tuple(round(v) for v in p) for p in pos.tolist()]
    first: dict[tuple[int, int], int] = {}
    for j, cell in enumerate(pts):
        first.setdefault(cell, j)
    out = set()
    for i, (x, y) in enumerate(pts):
        for nb in ((x + 1, y), (x, y + 1)):
            if nb in first:
                out.add((i, first[nb]))
    return out


def test_grid_edges_match_a_brute_force_search() -> None:
    rng = np.random.default_rng(0)
    full = _grid(9, 7)
    jitter = full + rng.uniform(-0.2, 0.2, size=full.shape)  # under a quarter step
    doubled = np.concatenate([full[:20], full[5:9]])  # four cells hold two patches each
    cases = {
        "full grid": full,
        "holes, shuffled order": full[rng.permutation(63)[:40]],
        "offset, negative": full - np.array([20.0, 3.0]),
        "a row": _grid(6, 1),
        "off the lattice by up to 0.2": jitter,
        "two patches in a cell": doubled,
    }
    for name, pos in cases.items():
        edges = grid_edges(pos)
        assert edges.dtype == np.int64, name
        got = {(int(a), int(b)) for a, b in edges.tolist()}
        assert len(got) == len(edges), name  # each edge once
        assert got == _brute_edges(pos), name
    assert len(grid_edges(_grid(9, 7))) == 8 * 7 + 9 * 6
    assert grid_edges(np.zeros((1, 2))).shape == (0, 2)
    assert coordinate_edges(np.zeros((0, 2))).shape == (0, 2)


def test_coordinate_edges_read_the_step_from_the_coordinates() -> None:
    xy = _grid(5, 4) * 448 + np.array([1000.0, 224.0])  # tissue somewhere on the glass
    assert grid_step(xy) == 448.0
    assert grid_step(np.array([[7.0, 9.0]])) == 1.0  # a single patch: no gap
    np.testing.assert_array_equal(coordinate_edges(xy), grid_edges(_grid(5, 4)))


def test_neighbour_pairs_count_each_edge_in_both_directions() -> None:
    """A 3 x 2 slide with a hole and a second slide of two patches, counted by hand."""
    # slide 1: labels on (x, y) cells; (2, 1) is missing
    #   y=0: 0 1 1
    #   y=1: 2 0 .
    xy1 = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1]]) * 256
    lab1 = np.array([0, 1, 1, 2, 0])
    xy2 = np.array([[0, 0], [0, 1]]) * 256  # one vertical pair
    lab2 = np.array([1, 2])
    pairs = neighbour_pairs([lab1, lab2], [xy1, xy2], 3)
    # edges: (0,0)-(1,0): 0-1; (1,0)-(2,0): 1-1; (0,1)-(1,1): 2-0; (0,0)-(0,1): 0-2;
    # (1,0)-(1,1): 1-0; slide 2: 1-2
    expected = np.zeros((3, 3))
    for a, b in [(0, 1), (1, 1), (2, 0), (0, 2), (1, 0), (1, 2)]:
        expected[a, b] += 1
        expected[b, a] += 1
    np.testing.assert_array_equal(pairs, expected)
