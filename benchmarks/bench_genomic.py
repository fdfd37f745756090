"""Genomics-guided slide models (G-HANet, PathLUPI) against ABMIL on the `histogenomic` world.

Two parts, both in one process:

* **cost**: seconds per training epoch of ``ghanet`` and ``pathlupi`` relative to ``abmil`` on
  the same bags (a fixed schedule, no validation part), printed as ratios.
* **baselines**: the models that read test omics (``omics_snn``, ``fusion_late``, ``mome``)
  on the preset as written, and ``mome`` with 0, 50 and 100 % of its test omics hidden.
* **signal**: 5-fold cross-validation x ``--seeds`` seeds with 100 training patients per fold
  (125 patients drawn from the preset's world), omics in training only, on the preset as
  written (``genomic_signal`` 1.2) and with the world's omics knob off (``genomic_signal`` 0).
  Prints each model's mean C-index, the paired difference to ABMIL over the same test patients
  and a paired bootstrap p-value (patients resampled within each fold's test part).

    python benchmarks/bench_genomic.py              # about 10 minutes on 2 CPU cores
    python benchmarks/bench_genomic.py --seeds 1    # quicker
    python benchmarks/bench_genomic.py --only signal --recipe paper --values 1.2

``--recipe paper`` trains every model (ABMIL too) with the G-HANet paper's recipe: discrete-time
NLL over 4 quantile bins, one bag per step with gradients accumulated over 32, Adam at 2e-4,
weight decay 1e-5, batches balanced over time bin x censoring.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from oncoslide.cohort.omics import load_omics
from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training import cross_validate, make_config

MODELS = ("abmil", "ghanet", "pathlupi")
RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    "paper": dict(
        survival_loss="nll", n_bins=4, batch_size=1, accumulate_grad_batches=32, lr=2e-4,
        optimizer="adam", weight_decay=1e-5, sampler="balanced",
    ),
}  # fmt: skip


def _world(root: Path, signal: float, seed: int) -> tuple[Path, Path, Path]:
    config = make_simulation_config(
        "histogenomic", {"n_patients": 125, "seed": seed, "genomic_signal": signal}
    )
    simulate_cohort(root, config)
    return root / "cohort.csv", root / "features", root / "omics.csv"


def _cv(root: Path, model: str, seeds: int, **over: object) -> pd.DataFrame:
    cohort = load_cohort(root / "cohort.csv", root / "features")
    omics = load_omics(root / "omics.csv", root / "gene_groups.gmt")
    settings: dict[str, object] = dict(
        task="survival", model=model, folds=5, repeats=seeds, epochs=20, n_boot=0,
        progress=False,
    )  # fmt: skip
    settings.update(over)
    side = {"omics": omics} if model != "abmil" else None
    run = cross_validate(cohort, make_config(**settings), root / f"run-{model}", side=side)
    return run.predictions


def _cindex(frame: pd.DataFrame) -> float:
    return concordance_index_censored(
        frame["event"].to_numpy().astype(bool), frame["time"].to_numpy(), frame["risk"].to_numpy()
    ).cindex


def _paired(base: pd.DataFrame, other: pd.DataFrame, n_boot: int = 1000) -> tuple[float, float]:
    """Mean over (seed, fold) of C(other) - C(base), and a one-sided paired bootstrap p."""
    keys = ["seed", "fold", "patient_id"]
    merged = base.merge(other[[*keys, "risk"]], on=keys, suffixes=("_a", "_b"))
    groups = [g for _, g in merged.groupby(["seed", "fold"])]

    def diff(parts: list[pd.DataFrame]) -> float:
        out = []
        for g in parts:
            e, t = g["event"].to_numpy().astype(bool), g["time"].to_numpy()
            a = concordance_index_censored(e, t, g["risk_a"].to_numpy()).cindex
            b = concordance_index_censored(e, t, g["risk_b"].to_numpy()).cindex
            out.append(b - a)
        return float(np.nanmean(out))

    observed = diff(groups)
    rng = np.random.default_rng(0)
    boots = [diff([g.iloc[rng.integers(0, len(g), len(g))] for g in groups]) for _ in range(n_boot)]
    return observed, float(np.mean(np.asarray(boots) <= 0))


def cost(root: Path) -> None:
    _world(root, 1.2, seed=0)
    fixed = dict(val_fraction=0.0, checkpoint="last", early_stopping_patience=None, epochs=3)
    seconds = {}
    for model in MODELS:
        started = time.perf_counter()
        _cv(root, model, 1, folds=2, **fixed)
        seconds[model] = time.perf_counter() - started
    base = seconds["abmil"]
    print("cost per training epoch relative to ABMIL (same bags, 2 folds x 3 epochs):")
    for model in MODELS:
        print(f"  {model:9s} {seconds[model]:6.1f} s   {seconds[model] / base:4.2f}x")


def signal(
    root: Path, seeds: int, recipe: str = "default", values: tuple[float, ...] = (1.2, 0.0)
) -> None:
    for value in values:
        world = root / f"signal-{value}"
        _world(world, value, seed=1)
        preds = {m: _cv(world, m, seeds, **RECIPES[recipe]) for m in MODELS}
        print(
            f"histogenomic, genomic_signal {value}: 5 folds x {seeds} seed(s), 100 train/fold, "
            f"{recipe} recipe"
        )
        for model in MODELS:
            folds = [_cindex(g) for _, g in preds[model].groupby(["seed", "fold"])]
            line = f"  {model:9s} C {np.mean(folds):.3f} (sd {np.std(folds):.3f})"
            if model != "abmil":
                d, p = _paired(preds["abmil"], preds[model])
                line += f"   vs abmil {d:+.3f}, paired bootstrap p = {p:.3f}"
            print(line)


def baselines(root: Path, seeds: int) -> None:
    """The baselines that read test omics, on the preset as written, and the mixture of
    experts with 0, 50 and 100 % of its test patients' omics hidden."""
    from oncoslide.training.missing import missing_omics_evaluation

    world = root / "baselines"
    _world(world, 1.2, seed=1)
    preds = {m: _cv(world, m, seeds) for m in ("abmil", "omics_snn", "fusion_late", "mome")}
    print(f"baselines reading test omics (histogenomic, 5 folds x {seeds} seed(s)):")
    for model, frame in preds.items():
        folds = [_cindex(g) for _, g in frame.groupby(["seed", "fold"])]
        line = f"  {model:11s} C {np.mean(folds):.3f} (sd {np.std(folds):.3f})"
        if model != "abmil":
            d, p = _paired(preds["abmil"], frame)
            line += f"   vs abmil {d:+.3f}, paired bootstrap p = {p:.3f}"
        print(line)
    cohort = load_cohort(world / "cohort.csv", world / "features")
    omics = load_omics(world / "omics.csv", world / "gene_groups.gmt")
    rows = []
    for model_dir in sorted((world / "run-mome" / "folds").glob("*/model")):
        scores = missing_omics_evaluation(model_dir, cohort, omics).scores
        rows.append(scores[scores["metric"] == "c_index"])
    table = pd.concat(rows).groupby("missing_share")["value"].agg(["mean", "std"])
    abmil = np.mean([_cindex(g) for _, g in preds["abmil"].groupby(["seed", "fold"])])
    print("  mome with test omics hidden (mean C over folds; abmil, slides only: "
          f"{abmil:.3f}):")  # fmt: skip
    for share, row in table.iterrows():
        print(f"    {float(share):4.0%} hidden: C {row['mean']:.3f} (sd {row['std']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=["cost", "signal", "baselines"], default=None)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    parser.add_argument("--values", type=float, nargs="+", default=[1.2, 0.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "cost"):
            cost(Path(tmp) / "cost")
        if args.only in (None, "signal"):
            signal(Path(tmp) / "signal", args.seeds, args.recipe, tuple(args.values))
        if args.only in (None, "baselines"):
            baselines(Path(tmp) / "baselines", args.seeds)


if __name__ == "__main__":
    main()
