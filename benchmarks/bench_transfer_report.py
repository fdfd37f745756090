"""The transfer report on the `pan-cancer` world, end to end (issue 13's "Report" part).

1. simulate the untouched `pan-cancer` preset (``--seed``);
2. a zoo of the cancers with >= ``--min-patients`` patients (ABMIL, ``--epochs``, 5-fold CV);
3. the transfer matrix of the zoo on every cancer;
4. benchmarks with one survival task per target cancer and the entries ``abmil`` (the
   cancer-specific model), ``roupkt``, ``zoo_finetune`` and ``zoo_probe`` (all three with
   ``exclude: auto``; ``--models`` chooses): the rare targets (at most ``--rare-max``
   patients) under repeated stratified CV, 5 folds x ``--rare-seeds`` (``bench-rare/``; issue
   13 asks for e.g. 5 x 5 where the patients are few), the others 5 folds x ``--seeds``
   (``bench/``); ``--parts`` runs one of the two only;
5. ``oncoslide transfer report`` of the matrix and both benchmarks, with the world's truth.

``--roupkt-arg KEY=VALUE`` passes a keyword to the ``roupkt`` entry (e.g. ``source_risk=true``)
and ``--roupkt-name`` names that entry (a variant keeps its cells and report rows apart);
``--world`` and ``--zoo`` reuse a world and zoo simulated or trained elsewhere (benchmark cells
are keyed by the features' path, so cached cells stay valid when only ``--out`` moves).

It prints the report's router-weight check (same-family concentration). Everything is written
under ``--out`` and resumes (zoo runs and benchmark cells are keyed by their data).

    OMP_NUM_THREADS=1 python benchmarks/bench_transfer_report.py --out /tmp/transfer-report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import make_config
from oncoslide.transfer import build_zoo, load_zoo, transfer_matrix

METHODS = ("abmil", "roupkt", "zoo_finetune", "zoo_probe")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--min-patients", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="CV repeats of the large targets")  # fmt: skip
    parser.add_argument("--rare-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="CV repeats of the rare targets")  # fmt: skip
    parser.add_argument("--rare-max", type=int, default=60)
    parser.add_argument("--parts", nargs="+", choices=["rare", "large"],
                        default=["rare", "large"])  # fmt: skip
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(METHODS),
                        help="entries of the benchmark (abmil is the baseline)")  # fmt: skip
    parser.add_argument("--roupkt-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword of the roupkt entry (VALUE read as JSON if it parses)")  # fmt: skip
    parser.add_argument("--roupkt-name", default="roupkt", help="the roupkt entry's name")
    parser.add_argument("--world", type=Path, default=None, help="the world (default OUT/world)")
    parser.add_argument("--zoo", type=Path, default=None, help="the zoo (default OUT/zoo)")
    args = parser.parse_args()
    out: Path = args.out
    started = time.perf_counter()
    roupkt_kwargs = {}
    for item in args.roupkt_arg:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--roupkt-arg wants KEY=VALUE, got {item!r}")
        try:
            roupkt_kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            roupkt_kwargs[key] = value

    world = args.world or out / "world"
    if not (world / "truth.json").exists():
        simulate_cohort(world, make_simulation_config("pan-cancer", {"seed": args.seed}))
    cohort = load_cohort(world / "cohort.csv", world / "features")
    print(f"world: {len(cohort.patient_ids)} patients ({time.perf_counter() - started:.0f} s)")

    config = make_config(task="survival", model="abmil", epochs=args.epochs, n_boot=0,
                         progress=False)  # fmt: skip
    zoo_dir = args.zoo or out / "zoo"
    zoo, notes = build_zoo(cohort, config, zoo_dir, by="cohort",
                           min_patients=args.min_patients)  # fmt: skip
    print(f"zoo: {zoo.cancers} ({time.perf_counter() - started:.0f} s); left out: {notes}")
    if not (out / "tm" / "matrix.csv").exists():
        transfer_matrix(load_zoo(zoo_dir), cohort, out / "tm", n_boot=200)
    print(f"matrix ({time.perf_counter() - started:.0f} s)")

    sizes = cohort.patients["cohort"].astype(str).value_counts()
    kwargs = {"experts": str(zoo_dir), "exclude": "auto"}
    train = {"epochs": args.epochs}
    benches = []
    for part, folder, seeds in (("rare", "bench-rare", args.rare_seeds),
                                ("large", "bench", args.seeds)):  # fmt: skip
        rare = part == "rare"
        cancers = sorted(c for c, n in sizes.items() if (n <= args.rare_max) == rare)
        if not cancers:
            continue
        if part not in args.parts:
            if (out / folder / "results.sqlite").exists():
                benches.append(out / folder)  # computed before: reported
            continue
        raw = {
            "name": f"pan-cancer-transfer-{part}", "cohort": str(world / "cohort.csv"),
            "folds": 5, "seeds": list(seeds), "n_boot": 1000,
            "feature_sets": [{"name": "sim", "features": str(world / "features")}],
            "tasks": [{"name": f"os-{c}", "kind": "survival", "filter": {"cohort": [c]}}
                      for c in cancers],
            "models": [
                {"name": args.roupkt_name if m == "roupkt" else m, "protocol": "mil",
                 "model": m, "train": train,
                 **({"kwargs": {**kwargs, **(roupkt_kwargs if m == "roupkt" else {})}}
                    if m != "abmil" else {})}
                for m in args.models
            ],
        }  # fmt: skip
        run = run_benchmark(spec_from_dict(raw), out / folder, workers=args.workers,
                            progress=False)  # fmt: skip
        print(f"benchmark {part} ({', '.join(cancers)}; {len(seeds)} x 5-fold CV): "
              f"{run.n_ran} cells ran, {len(run.failures)} failed "
              f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
        for failure in run.failures[:10]:
            print("  failed:", failure)
        benches.append(out / folder)

    from oncoslide.transfer.report import transfer_report

    report = transfer_report(out / "tm", out / "report", bench=benches, world=world,
                             rare_max=args.rare_max)  # fmt: skip
    print(report.summary_text())
    print(f"report: {report.html_path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
