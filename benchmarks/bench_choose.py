"""ROUPKT with k and the learning rate chosen on validation, on the rare `pan-cancer` targets.

1. simulate the untouched `pan-cancer` preset (``--seed``);
2. a zoo of the cancers with >= ``--min-patients`` patients (ABMIL, ``--epochs``, 5-fold CV);
3. a benchmark with one survival task per rare target (<= ``--max-target`` patients) and the
   entries ``abmil`` (the cancer-specific model), ``roupkt`` (k = ``--k``, lr 5e-4 fixed) and
   ``roupkt-choose`` (``choose: {top_k: [1, 2, 3], lr: [2e-4, 1e-3]}``, chosen per fold on
   the validation part), ``--seeds`` x 5 folds;
4. prints per target the mean C-index of each entry, the paired differences over the
   (seed, fold) test parts with a Wilcoxon signed-rank p-value, and how often each
   combination was kept.

    OMP_NUM_THREADS=1 python benchmarks/bench_choose.py --out /tmp/bench-choose
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pandas as pd
from scipy.stats import wilcoxon

from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.bench.store import ResultStore
from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import make_config
from oncoslide.transfer import build_zoo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--min-patients", type=int, default=200)
    parser.add_argument("--max-target", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--k", type=int, default=2, help="top_k of the fixed roupkt entry")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--fixed-grid", action="store_true", help="also run every combination of the grid fixed"
    )
    args = parser.parse_args()
    out: Path = args.out
    started = time.perf_counter()

    world = out / "world"
    if not (world / "truth.json").exists():
        simulate_cohort(world, make_simulation_config("pan-cancer", {"seed": args.seed}))
    cohort = load_cohort(world / "cohort.csv", world / "features")
    print(f"world: {len(cohort.patient_ids)} patients ({time.perf_counter() - started:.0f} s)")
    config = make_config(task="survival", model="abmil", epochs=args.epochs, n_boot=0,
                         progress=False)  # fmt: skip
    zoo, _ = build_zoo(cohort, config, out / "zoo", by="cohort", min_patients=args.min_patients)
    print(f"zoo: {zoo.cancers} ({time.perf_counter() - started:.0f} s)")

    sizes = cohort.patients["cohort"].astype(str).value_counts()
    targets = sorted(c for c, n in sizes.items() if n <= args.max_target)
    kwargs = {"experts": str(out / "zoo"), "exclude": "auto"}
    train = {"epochs": args.epochs}
    models: list[dict[str, Any]] = [
        {"name": "abmil", "model": "abmil", "train": train},
        {"name": "roupkt", "model": "roupkt", "kwargs": {**kwargs, "top_k": args.k},
         "train": train},
        {"name": "roupkt-choose", "model": "roupkt", "kwargs": kwargs, "train": train,
         "choose": {"top_k": [1, 2, 3], "lr": [2e-4, 1e-3]}},
    ]  # fmt: skip
    if args.fixed_grid:  # every combination of the grid fixed: what each would have scored
        models += [
            {"name": f"roupkt-k{k}-lr{lr:g}", "model": "roupkt",
             "kwargs": {**kwargs, "top_k": k}, "train": {**train, "lr": lr}}
            for k in (1, 2, 3) for lr in (2e-4, 1e-3)
        ]  # fmt: skip
    raw = {
        "name": "roupkt-choose", "cohort": str(world / "cohort.csv"), "folds": 5,
        "seeds": list(args.seeds), "n_boot": 1000,
        "feature_sets": [{"name": "sim", "features": str(world / "features")}],
        "tasks": [{"name": f"os-{c}", "kind": "survival", "filter": {"cohort": [c]}}
                  for c in targets],
        "models": models,
    }  # fmt: skip
    run = run_benchmark(spec_from_dict(raw), out / "bench", workers=args.workers, progress=False)
    print(f"benchmark: {run.n_ran} cells ran, {len(run.failures)} failed "
          f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    for failure in run.failures[:5]:
        print("  failed:", failure)

    with ResultStore(out / "bench" / "results.sqlite") as store:
        cells, metrics = store.cells(), store.metrics()
    c_index = metrics[metrics["metric"] == "c_index"].set_index("cell_key")["value"]
    rows = [
        {"task": c.task, "model": c.model, "seed": c.seed, "fold": c.fold,
         "c_index": c_index.get(c.cell_key), "top_k": c.info.get("chosen_top_k"),
         "lr": c.info.get("chosen_lr"), "seconds": c.seconds}
        for c in cells.itertuples()
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    table.to_csv(out / "cells.csv", index=False)
    wide = table.pivot_table(index=["task", "seed", "fold"], columns="model", values="c_index")
    for task, part in wide.groupby(level="task"):
        n = int(sizes[task.removeprefix("os-")])
        means = ", ".join(f"{m} {part[m].mean():.3f}" for m in part.columns)
        if args.fixed_grid:  # the best fixed combination in hindsight (on the test parts)
            fixed = [m for m in part.columns if m.startswith("roupkt-k")]
            best = max(fixed, key=lambda m: part[m].mean())
            means += f"; best fixed in hindsight {best}"
        print(f"{task} ({n} patients, {len(part)} test parts): {means}")
        for other in ("abmil", "roupkt"):
            diff = part["roupkt-choose"] - part[other]
            p = wilcoxon(diff).pvalue if (diff != 0).any() else 1.0
            print(f"  roupkt-choose - {other}: {diff.mean():+.3f} (Wilcoxon p {p:.2f})")
        chosen = table[(table["task"] == task) & (table["model"] == "roupkt-choose")]
        counts = chosen.groupby(["top_k", "lr"]).size().to_dict()
        print(f"  kept (top_k, lr): {counts}")
    allp = wide.dropna()
    for other in ("abmil", "roupkt"):
        diff = allp["roupkt-choose"] - allp[other]
        print(f"all rare targets: roupkt-choose - {other} {diff.mean():+.3f} "
              f"(Wilcoxon p {wilcoxon(diff).pvalue:.3f}, {len(diff)} test parts)")  # fmt: skip
    if args.fixed_grid:  # each chosen cell equals the fixed run of its kept combination
        chosen = table[table["model"] == "roupkt-choose"]
        same = [
            wide.loc[(r.task, r.seed, r.fold), f"roupkt-k{int(r.top_k)}-lr{r.lr:g}"] == r.c_index
            for r in chosen.itertuples()
        ]
        print(f"chosen cells equal to the fixed run of their kept values: {sum(same)}/{len(same)}")
    secs = table.groupby("model")["seconds"].mean()
    print("mean seconds per cell: " + ", ".join(f"{m} {s:.1f}" for m, s in secs.items()))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
