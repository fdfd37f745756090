"""benchmarks/bench_pama_pooled.py: PAMA's probe gain pooled over worlds. With one run folder it
is that run's paired comparison exactly; with several, the mean of per-world bootstrap
replicates (world i drawn with seed i), checked against a direct computation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest


def _run(folder: Path, n: int, gain: float, seed: int) -> Path:
    """A probe run's saved probabilities: labels, a baseline and a variant that is better by
    about ``gain`` in AUC (3 repeats)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    base = rng.random((3, n)) + 0.3 * y
    variant = base + gain * y + 0.2 * rng.random((3, n))
    folder.mkdir(parents=True)
    np.savez(folder / "probe.npz", patients=np.asarray([f"p{i}" for i in range(n)]), y=y,
             **{"probs_mean-pool": base, "probs_full": variant})  # fmt: skip
    return folder


def test_one_world_is_its_paired_comparison_and_worlds_pool(
    tmp_path: Path, benchmark_script: Callable[[str], ModuleType]
) -> None:
    pool = benchmark_script("bench_pama_pooled")
    from bench_pama import bootstrap_diffs, mean_auc, paired_bootstrap

    runs = [_run(tmp_path / f"w{i}", 60 + 10 * i, 0.1 * i, seed=i) for i in range(3)]
    table, one = pool.pooled(runs[:1], "full", n_boot=300, seed=0)
    y, probs = pool.load_probe(runs[0])
    expected = paired_bootstrap(y, probs["full"], probs["mean-pool"], n_boot=300, seed=0)
    assert (one["mean_diff"], one["lower"], one["upper"], one["p_value"]) == pytest.approx(expected)
    assert table["diff"].iloc[0] == pytest.approx(expected[0])

    table, three = pool.pooled(runs, "full", n_boot=300, seed=5)
    draws, diffs = [], []
    for i, run in enumerate(runs):
        y, probs = pool.load_probe(run)
        draws.append(bootstrap_diffs(y, probs["full"], probs["mean-pool"], 300, seed=5 + i))
        diffs.append(mean_auc(y, probs["full"]) - mean_auc(y, probs["mean-pool"]))
    means = np.mean(np.vstack(draws), axis=0)
    assert three["n_worlds"] == 3 and three["mean_diff"] == pytest.approx(np.mean(diffs))
    assert [three["lower"], three["upper"]] == pytest.approx(np.percentile(means, [2.5, 97.5]))
    assert list(table["patients"]) == [60, 70, 80]
    # the planted gains grow with the world: the pooled interval sits above 0
    assert three["lower"] > 0 and three["n_better"] >= 2


def test_missing_files_and_variants_are_named(
    tmp_path: Path, benchmark_script: Callable[[str], ModuleType]
) -> None:
    pool = benchmark_script("bench_pama_pooled")
    run = _run(tmp_path / "w", 40, 0.1, seed=1)
    with pytest.raises(SystemExit, match="no probe of"):
        pool.pooled([run], "shuffled", n_boot=50, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"has no probe\.npz"):
        pool.pooled([tmp_path / "empty"], "full", n_boot=50, seed=0)
