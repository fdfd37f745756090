"""Leaderboard statistics: the vectorised patient bootstrap vs the obvious loop, same process.

``task_scores`` scores every bootstrap replicate of a (seed, fold) with one matrix product over
a fixed pair-score matrix (weighted Harrell's C / Mann-Whitney AUC). The obvious way, and what
most benchmark scripts do, is to materialise each replicate (rows repeated by multiplicity) and
call the metric function on it. Both are run here on the same prediction frame; the script
checks they agree on every replicate it times and prints replicates per second and the ratio.

    python benchmarks/bench_stats.py                    # about a minute on 2 CPU cores
    python benchmarks/bench_stats.py --patients 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from oncoslide.bench.stats import TaskInfo, bootstrap_counts, task_scores
from oncoslide.evaluation.classification import roc_auc
from oncoslide.survival.metrics import concordance_index_censored


def prediction_frame(task: TaskInfo, n: int, n_folds: int, seed: int = 0) -> pd.DataFrame:
    """One entry's out-of-fold predictions with a moderate planted signal."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    fold = rng.permutation(np.arange(n) % n_folds)
    frame = pd.DataFrame(
        {
            "task": task.name,
            "feature_set": "enc",
            "model": "m",
            "protocol": "linear",
            "seed": 0,
            "fold": fold,
            "patient_id": [f"p{i:05d}" for i in range(n)],
        }
    )
    if task.is_survival:
        t_event, t_cens = rng.exponential(np.exp(-x)), rng.exponential(1.5, size=n)
        frame["time"] = np.round(np.minimum(t_event, t_cens), 3)
        frame["event"] = (t_event <= t_cens).astype(float)
        frame["label"] = None
        frame["risk"] = x + rng.normal(size=n)
    else:
        p = 1 / (1 + np.exp(-(x + rng.normal(size=n))))
        frame["time"] = np.nan
        frame["event"] = np.nan
        frame["label"] = np.where(rng.random(n) < 1 / (1 + np.exp(-2 * x)), "1", "0")
        frame["prob_0"], frame["prob_1"] = 1 - p, p
    return frame


def naive_replicates(frame: pd.DataFrame, task: TaskInfo, counts: np.ndarray) -> np.ndarray:
    """Each replicate materialised (rows repeated) and scored by the library metric."""
    patients = np.sort(frame["patient_id"].unique())
    column = {p: i for i, p in enumerate(patients)}
    out = np.empty(counts.shape[0])
    folds = [cell for _, cell in frame.groupby("fold")]
    for b in range(counts.shape[0]):
        values = []
        for cell in folds:
            reps = counts[b, cell["patient_id"].map(column).to_numpy()]
            drawn = cell.loc[cell.index.repeat(reps)]
            if task.is_survival:
                values.append(
                    concordance_index_censored(
                        drawn["event"].to_numpy().astype(bool),
                        drawn["time"].to_numpy(),
                        drawn["risk"].to_numpy(),
                    ).cindex
                )
            else:
                values.append(
                    roc_auc(
                        drawn["label"].to_numpy(),
                        drawn[["prob_0", "prob_1"]].to_numpy(),
                        classes=["0", "1"],
                    )
                )
        out[b] = np.mean(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=1000, help="vectorised replicates")
    parser.add_argument("--naive-boot", type=int, default=100, help="naive replicates timed")
    args = parser.parse_args()
    print(f"{args.patients} patients, {args.folds} folds, one entry")
    for task in (TaskInfo("os", "survival"), TaskInfo("msi", "binary", ("0", "1"))):
        frame = prediction_frame(task, args.patients, args.folds)
        started = time.perf_counter()
        scores = task_scores(frame, task, n_boot=args.n_boot, seed=0)
        fast = time.perf_counter() - started
        counts = bootstrap_counts(args.patients, args.n_boot, seed=0)[: args.naive_boot]
        started = time.perf_counter()
        naive = naive_replicates(frame, task, counts)
        slow = time.perf_counter() - started
        ours = scores.replicates[("enc", "m")][: args.naive_boot]
        agree = float(np.max(np.abs(ours - naive)))
        assert agree < 1e-9, f"replicates disagree by {agree}"
        fast_rate, slow_rate = args.n_boot / fast, args.naive_boot / slow
        row = scores.table.iloc[0]
        print(
            f"{task.name:>4} ({task.metric}): estimate {row['estimate']:.3f} "
            f"[{row['lower']:.3f}, {row['upper']:.3f}]\n"
            f"      vectorised {fast_rate:9.1f} replicates/s ({args.n_boot} in {fast:.2f} s)\n"
            f"      naive      {slow_rate:9.1f} replicates/s ({args.naive_boot} in {slow:.2f} s)\n"
            f"      ratio      {fast_rate / slow_rate:9.1f}x   (max |difference| {agree:.1e})"
        )


if __name__ == "__main__":
    main()
