"""PAMA's probe gains over mean pooling, pooled over the runs of independent `spatial` worlds:
issue 14's spatial check with more patients than one world's probe half holds.

One world's probe half (about 200 patients) gives an AUC difference an interval of about
+-0.09, too wide to show a gain of a few hundredths (docs/pretrain.md). Each folder given is a
``benchmarks/bench_pama.py --part probe`` run on its own world (``--set seed=S``), which saves
the probe's out-of-fold probabilities (``probe.npz``). Per world the patient-level bootstrap
replicates of AUC(variant) - AUC(baseline) are drawn as bench_pama.py draws them (worlds are
independent: disjoint patients, separate pre-trainings; world i draws with ``--seed + i``);
the replicates are averaged over the worlds, and the pooled mean's 95 % interval and
two-sided p come from those averages. With one folder this is exactly that run's paired
comparison (same seed), tested.

    python benchmarks/bench_pama_pooled.py out/s4 out/s5 out/s6 out/s7 --variant full
    python benchmarks/bench_pama_pooled.py out/s4 out/s5 --variant full --baseline shuffled
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from bench_pama import bootstrap_diffs, mean_auc, summarise_diffs


def load_probe(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A run's probe labels and out-of-fold probabilities per variant (repeats, patients)."""
    path = run / "probe.npz"
    if not path.is_file():
        raise SystemExit(
            f"{run} has no probe.npz: run benchmarks/bench_pama.py --part probe --out {run} "
            "(runs before 2026-12-01 20:00 UTC did not save it)"
        )
    with np.load(path) as data:
        y = data["y"]
        probs = {k.removeprefix("probs_"): data[k] for k in data.files if k.startswith("probs_")}
    return y, probs


def pooled(
    runs: list[Path], variant: str, baseline: str = "mean-pool", *, n_boot: int, seed: int
) -> tuple[pd.DataFrame, dict[str, float]]:
    rows, draws = [], []
    for i, run in enumerate(runs):
        y, probs = load_probe(run)
        missing = [v for v in (variant, baseline) if v not in probs]
        if missing:
            raise SystemExit(f"{run}: no probe of {missing}; it has {sorted(probs)}")
        d = bootstrap_diffs(y, probs[variant], probs[baseline], n_boot=n_boot, seed=seed + i)
        auc_v, auc_b = mean_auc(y, probs[variant]), mean_auc(y, probs[baseline])
        diff, lo, hi, p = summarise_diffs(auc_v - auc_b, d)
        draws.append(d)
        rows.append({"run": str(run), "patients": len(y), "auc_variant": auc_v,
                     "auc_baseline": auc_b, "diff": diff, "lo": lo, "hi": hi, "p": p})  # fmt: skip
    table = pd.DataFrame(rows)
    mean_diff, lo, hi, p = summarise_diffs(
        float(table["diff"].mean()), np.mean(np.vstack(draws), axis=0)
    )
    summary = {"n_worlds": len(rows), "mean_diff": mean_diff, "lower": lo, "upper": hi,
               "p_value": p, "n_better": int((table["diff"] > 0).sum())}  # fmt: skip
    return table, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="bench_pama.py probe run folders")
    parser.add_argument("--variant", required=True, help="e.g. full")
    parser.add_argument("--baseline", default="mean-pool")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table, s = pooled(args.runs, args.variant, args.baseline, n_boot=args.n_boot, seed=args.seed)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    print(
        f"\n{args.variant} - {args.baseline} over {s['n_worlds']} worlds: mean AUC difference "
        f"{s['mean_diff']:+.3f} [{s['lower']:+.3f}, {s['upper']:+.3f}], p {s['p_value']:.4f} "
        f"({s['n_better']} better)"
    )


if __name__ == "__main__":
    main()
