"""Rare-target gains of a transfer method over the cancer-specific model, pooled over the
benchmarks of independent worlds (or cohorts): issue 13's rare-target check with more targets
than one world holds (``--targets large``: the same over the targets above ``--rare-max``,
issue 13's "not worse beyond noise on large targets").

One world of the `pan-cancer` preset has three rare targets (25-50 patients each); under 5 x 5
CV the mean gain over them has an interval of about +-0.1, too wide to show a gain of a few
hundredths. Here every rare target (at most ``--rare-max`` patients) of every benchmark folder
given counts: each target's paired two-level bootstrap (patients, CV seeds) is drawn on its own
(targets are independent: disjoint patients, and different worlds), the replicate differences
are averaged over all targets, and the mean's 95 % interval and two-sided p come from those
averages. With one folder this is exactly `oncoslide transfer report`'s rare-target mean (the
same seeds: target i, in task-name order, draws with ``--seed + i``).

    python benchmarks/bench_transfer_pooled.py W4/bench-rare W5/bench-rare --method roupkt_std1
    python benchmarks/bench_transfer_pooled.py W4/bench W5/bench --method roupkt --targets large
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from oncoslide.bench.stats import (
    BenchInputError,
    TaskInfo,
    paired_comparison,
    paired_replicate_diffs,
)
from oncoslide.bench.store import ResultStore
from oncoslide.transfer.report import pooled_replicates


def target_tasks(
    bench: Path, rare_max: int, targets: str = "rare"
) -> tuple[pd.DataFrame, list[str]]:
    """The folder's current predictions and its survival tasks with at most ``rare_max``
    patients (``targets="large"``: more than ``rare_max``), in name order."""
    with ResultStore.in_dir(bench) as store:
        tasks = store.get_meta("tasks") or []
        plan = set(store.get_meta("plan") or [])
        preds = store.predictions()
    preds = preds[preds["cell_key"].isin(plan)]
    names = []
    for t in tasks:
        name = str(t["task"])
        if t.get("kind") != "survival":
            continue
        rare = preds.loc[preds["task"] == name, "patient_id"].nunique() <= rare_max
        if rare == (targets == "rare"):
            names.append(name)
    return preds, sorted(names)


def pooled(
    benches: list[Path],
    method: str,
    baseline: str,
    *,
    rare_max: int,
    n_boot: int,
    seed: int,
    targets: str = "rare",
) -> tuple[pd.DataFrame, dict[str, float]]:
    rows, draws, i = [], [], 0
    for bench in benches:
        preds, names = target_tasks(bench, rare_max, targets)
        for name in names:
            sub = preds[preds["task"] == name]
            fs = str(sub["feature_set"].iloc[0])
            info = TaskInfo(name, "survival")
            a, b = (fs, method), (fs, baseline)
            try:
                cmp = paired_comparison(sub, info, a, b, n_boot=n_boot, seed=seed + i)
            except BenchInputError as exc:  # e.g. the method was not in the folder's last run
                raise SystemExit(f"{bench}: {exc}") from None
            draws.append(paired_replicate_diffs(sub, info, a, b, n_boot=n_boot, seed=seed + i))
            rows.append({"bench": str(bench), "task": name,
                         "patients": int(sub["patient_id"].nunique()), "c_method": cmp.estimate_a,
                         "c_baseline": cmp.estimate_b, "diff": cmp.diff, "lower": cmp.lower,
                         "upper": cmp.upper, "p_value": cmp.p_value})  # fmt: skip
            i += 1
    table = pd.DataFrame(rows)
    if not draws:
        return table, {}
    interval = pooled_replicates(draws)
    if not interval:
        return table, {}
    summary = {
        "n_targets": len(rows),
        "mean_diff": float(table["diff"].mean()),
        "n_better": int((table["diff"] > 0).sum()),
        **interval,
    }
    return table, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benches", type=Path, nargs="+", help="benchmark folders (bench-rare/)")
    parser.add_argument("--targets", choices=["rare", "large"], default="rare",
                        help="the targets with at most --rare-max patients, or the others")  # fmt: skip
    parser.add_argument("--method", required=True, help="the transfer method's entry name")
    parser.add_argument("--baseline", default="abmil")
    parser.add_argument("--rare-max", type=int, default=60)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table, summary = pooled(args.benches, args.method, args.baseline, rare_max=args.rare_max,
                            n_boot=args.n_boot, seed=args.seed, targets=args.targets)  # fmt: skip
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    if summary:
        print(
            f"\n{args.method} - {args.baseline} over {summary['n_targets']} {args.targets} "
            f"targets: mean "
            f"{summary['mean_diff']:+.3f} [{summary['lower']:+.3f}, {summary['upper']:+.3f}], "
            f"p {summary['p_value']:.4f} ({summary['n_better']} better; "
            f"{summary['replicates']} of {args.n_boot} replicates defined)"
        )


if __name__ == "__main__":
    main()
