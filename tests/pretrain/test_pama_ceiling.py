"""The label-free ceiling of benchmarks/bench_pama_ceiling.py: its grid edges, co-occurrence
statistics and neighbour-denoised codes, checked against planted arrangements."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np


def _grid(w: int, h: int, seed: int) -> np.ndarray:
    """Level-0 coordinates (step 448) of a w x h grid, rows in a random order."""
    xy = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 2)
    return xy[np.random.default_rng(seed).permutation(len(xy))] * 448.0


def test_grid_edges_are_the_4_neighbour_pairs(
    benchmark_script: Callable[[str], ModuleType],
) -> None:
    bench = benchmark_script("bench_pama_ceiling")
    coords = _grid(7, 5, 0)[:-3]  # a few cells missing: no edge to them
    edges = bench.grid_edges(coords)
    cells = coords / 448.0
    gap = np.abs(cells[edges[:, 0]] - cells[edges[:, 1]]).sum(1)
    assert (gap == 1).all()  # one step, along one axis
    # every 4-neighbour pair once (brute force)
    d = np.abs(cells[:, None] - cells[None]).sum(-1)
    assert len(edges) == int((np.triu(d, 1) == 1).sum())
    assert len({tuple(sorted(e)) for e in edges.tolist()}) == len(edges)


def test_cooccurrence_of_a_checkerboard_and_of_blocks(
    benchmark_script: Callable[[str], ModuleType],
) -> None:
    bench = benchmark_script("bench_pama_ceiling")
    coords = _grid(8, 8, 1)
    cells = (coords / 448.0).astype(int)
    edges = bench.grid_edges(coords)
    checker = np.eye(2)[(cells.sum(1) % 2)]
    co, shares = bench.cooccurrence([(checker, edges)])
    # every edge joins the two colours: all mass off the diagonal, symmetric
    assert np.allclose(co, [[0, 0.5], [0.5, 0]]) and np.allclose(shares, 0.5)
    halves = np.eye(2)[(cells[:, 0] >= 4).astype(int)]
    co, _ = bench.cooccurrence([(halves, edges)])
    # two 4 x 8 blocks: 8 of the 112 edges cross the border
    assert np.isclose(co[0, 1] * 2, 8 / 112) and np.isclose(co.sum(), 1)
    # pmi: the checkerboard's cross pairs are above independence, its same pairs below
    pmi = bench.reduce(*bench.cooccurrence([(checker, edges)]), "pmi")  # [00, 01, 11]
    assert pmi[1] > 0 > pmi[0] and pmi[2] < 0


def test_neighbour_denoised_codes_beat_the_patch_alone(
    benchmark_script: Callable[[str], ModuleType],
) -> None:
    """Planted truth: 3 prototypes about 3 apart in 64-d plus unit noise (the `spatial`
    regime: one patch alone is often misread), arranged in blocks of 4 x 4 patches. The
    mean-field codes (label-free: codebook and potentials fitted on other slides) read the
    prototypes better than the nearest code, and the co-occurrence of the denoised codes is
    closer to the true one."""
    bench = benchmark_script("bench_pama_ceiling")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * (3 / np.sqrt(128))

    def slide(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        coords = _grid(16, 16, seed)
        cells = (coords / 448.0).astype(int)
        blocks = r.integers(0, 3, (4, 4))
        truth = blocks[cells[:, 0] // 4, cells[:, 1] // 4]
        feats = (centres[truth] + r.normal(size=(len(truth), 64))).astype(np.float32)
        return feats, coords, truth

    train = [slide(s)[:2] for s in range(1, 13)]
    tok = bench.Tokenizer(3, seed=0).fit(train)
    feats, coords, truth = slide(99)

    def accuracy(q: np.ndarray) -> float:
        code = q.argmax(1)  # codes are unordered: match each to its majority prototype
        hits = sum(np.bincount(truth[code == c]).max() for c in np.unique(code))
        return float(hits / len(truth))

    hard = accuracy(tok.codes(feats, "hard", coords))
    mf = accuracy(tok.codes(feats, "mf", coords))
    assert hard < 0.95 and mf > hard + 0.03, (hard, mf)
    edges = bench.grid_edges(coords)
    true_co, _ = bench.cooccurrence([(np.eye(3)[truth], edges)])
    errs = {}
    for kind in ("hard", "mf"):
        q = tok.codes(feats, kind, coords)
        # align codes to prototypes by majority before comparing matrices
        perm = [int(np.bincount(truth[q.argmax(1) == c], minlength=3).argmax()) for c in range(3)]
        co, _ = bench.cooccurrence([(q, edges)])
        aligned = np.zeros((3, 3))
        for a in range(3):
            for b in range(3):
                aligned[perm[a], perm[b]] += co[a, b]
        errs[kind] = float(np.abs(aligned - true_co).sum())
    assert errs["mf"] < errs["hard"], errs
