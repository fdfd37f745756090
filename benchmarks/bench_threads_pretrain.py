"""Threads-style molecular contrastive pre-training on the `histogenomic` world vs mean pooling.

The `histogenomic` preset (untouched: 20 % of patients without omics, a mutation table) is
simulated with 1,500 more patients (same seed: the world's parameters do not depend on the
number of patients). 500 patients (the preset's size) are evaluated; the other 1,500 are the
separate pre-training set, and the evaluated patients' omics are never read - as Threads
pre-trains on other cohorts than it is evaluated on. `--separate 0` instead simulates the preset
as it is and pre-trains in each fold on the fold's non-test patients (their omics only).

Evaluation (:func:`oncoslide.pretrain.threads_eval.evaluate_threads`): patient-level K-fold CV
of the evaluated patients; frozen embeddings (mean of a patient's slides) and mean-pooled
patch features in the frozen linear protocol (logistic C = 0.5 balanced; elastic-net Cox
l1_ratio 0.5) with all training labels, and few-shot (k = 1, 4, 16, 64 patients per class drawn
from the training part; test part fixed; the same draws for both embeddings).

Tasks: the preset's molecular labels `msi` and `subtype`; mutation-driven labels: for each
latent that drives mutations, its most prevalent driver gene (read off truth.json, rule fixed
before any result: `mut_<latent>`, patients without a mutation profile left out); and overall
survival.

    python benchmarks/bench_threads_pretrain.py                  # ~10 min on 2 CPU cores
    python benchmarks/bench_threads_pretrain.py --separate 0 --folds 2 --draws 5 --out out/

Writes into --out: predictions.csv, fold_metrics.csv, full.csv (pooled metrics, paired
bootstrap), fewshot_draws.csv, fewshot_summary.csv, fewshot_paired.csv, fewshot_curves.png,
pretraining.csv; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def mutation_labels(sim: Path) -> dict[str, pd.Series]:
    """One 0/1 label per mutation-driving latent: its most prevalent driver gene."""
    truth = json.loads((sim / "truth.json").read_text())
    muts = pd.read_csv(sim / "mutations.csv", dtype={"patient_id": str}).set_index("patient_id")
    best: dict[str, tuple[float, str]] = {}
    for gene, info in truth["mutations"].items():
        if info.get("driver"):
            latent = str(info["latent"])
            if latent not in best or info["prevalence"] > best[latent][0]:
                best[latent] = (float(info["prevalence"]), gene)
    return {f"mut_{lat}": muts[gene].astype(int).astype(str) for lat, (_, gene) in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="split, pre-training and draws")
    parser.add_argument("--sim-seed", type=int, default=None, help="simulator seed (preset's)")
    parser.add_argument("--no-mutations", action="store_true", help="expression only")
    parser.add_argument(
        "--separate",
        type=int,
        default=1500,
        metavar="N",
        help="simulate N more patients of the same world and pre-train once on them only "
        "(the evaluation keeps the preset's size); 0: pre-train per fold on its training part",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="ThreadsConfig settings, e.g. patch_keep=0.5 dropout=0.25 (values read as JSON)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from oncoslide.cohort.omics import load_omics
    from oncoslide.cohort.table import load_cohort
    from oncoslide.evaluation.fewshot import FewShotConfig, compare_few_shot, write_few_shot
    from oncoslide.pretrain.threads import ThreadsConfig, load_mutations
    from oncoslide.pretrain.threads_eval import (
        MEANPOOL,
        THREADS,
        ThreadsEvalConfig,
        evaluate_threads,
        paired_bootstrap,
    )
    from oncoslide.simulate import make_simulation_config, simulate_cohort

    tmp = tempfile.TemporaryDirectory()
    out = args.out or Path(tmp.name) / "out"
    out.mkdir(parents=True, exist_ok=True)
    sim = Path(tmp.name) / "sim"
    overrides: dict[str, object] = {} if args.sim_seed is None else {"seed": args.sim_seed}
    preset = make_simulation_config("histogenomic", overrides)
    if args.separate:
        # same seed, more patients: the same world (model parameters, gene loadings, mutation
        # drivers and calibration do not depend on the number of patients)
        overrides["n_patients"] = preset.n_patients + args.separate
    simulate_cohort(sim, make_simulation_config("histogenomic", overrides))
    cohort = load_cohort(sim / "cohort.csv", sim / "features", label_cols=("msi", "subtype"))
    expression = load_omics(sim / "omics.csv")
    mutations = None if args.no_mutations else load_mutations(sim / "mutations.csv")
    labels: dict[str, pd.Series] = {
        "msi": cohort.patients["msi"].astype(int).astype(str),
        "subtype": cohort.patients["subtype"].astype(str),
        **mutation_labels(sim),
    }
    threads = ThreadsConfig(**{k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)})
    config = ThreadsEvalConfig(
        threads=threads,
        n_folds=args.folds,
        seed=args.seed,
        epochs=args.epochs,
        fewshot=FewShotConfig(draws=args.draws, seed=args.seed),
        use_mutations=not args.no_mutations,
    )
    eval_ids = pretrain_ids = None
    if args.separate:
        rng = np.random.default_rng([args.seed, 99])
        eval_ids = sorted(rng.choice(cohort.patient_ids, preset.n_patients, replace=False))
        pretrain_ids = sorted(set(cohort.patient_ids) - set(eval_ids))
    started = time.perf_counter()
    result = evaluate_threads(
        cohort,
        expression,
        labels,
        out / "encoders",
        mutations=mutations,
        config=config,
        eval_patients=eval_ids,
        pretrain_patients=pretrain_ids,
        log=print,
    )
    seconds = time.perf_counter() - started
    rows = []
    for task, classes in result.tasks.items():
        stats = paired_bootstrap(result.predictions, task, classes, n_boot=1000, seed=args.seed)
        rows.append({"task": task, "metric": "c_index" if not classes else "auc", **stats})
    full = pd.DataFrame(rows).rename(columns={"metric_a": THREADS, "metric_b": MEANPOOL})
    paired = compare_few_shot(result.fewshot, THREADS, MEANPOOL)
    paired = paired[paired["metric"].isin(["auc", "c_index"])]
    result.predictions.to_csv(out / "predictions.csv", index=False)
    result.fold_metrics.to_csv(out / "fold_metrics.csv", index=False)
    result.pretraining.to_csv(out / "pretraining.csv", index=False)
    full.to_csv(out / "full.csv", index=False)
    paired.to_csv(out / "fewshot_paired.csv", index=False)
    write_few_shot(result.fewshot, out, metric="auc")

    pd.set_option("display.width", 200)
    where = (
        f"once on {len(pretrain_ids)} separate patients of the same world"
        if pretrain_ids
        else "per fold on its training part"
    )
    n_eval = len(eval_ids) if eval_ids else len(cohort)
    print(
        f"\nhistogenomic, {n_eval} patients, {args.folds}-fold CV, seed {args.seed}; "
        f"pre-trained {where}, {args.epochs} epochs"
    )
    print(f"Threads settings: {threads.to_dict()}")
    print(f"total {seconds:.0f} s; pre-training per fold:")
    print(result.pretraining.round(2).to_string(index=False))
    print("\nfull training part (pooled out-of-fold; paired bootstrap over patients, 1000 reps):")
    print(full.round(3).to_string(index=False))
    print("\nfew-shot (mean over folds x draws; paired Wilcoxon over the same draws):")
    print(paired.round(3).to_string(index=False))
    print(f"\nfiles in {out}")
    if args.out is None:
        print("(temporary: give --out to keep them)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
