"""Genomics-guided slide models (G-HANet, PathLUPI) against ABMIL on the `histogenomic` world.

Two parts, both in one process:

* **cost**: seconds per training epoch of ``ghanet`` and ``pathlupi`` relative to ``abmil`` on
  the same bags (a fixed schedule, no validation part), printed as ratios.
* **baselines**: the models that read test omics (``omics_snn``, ``fusion_late``, ``mome``)
  on the preset as written, and ``mome`` with 0, 50 and 100 % of its test omics hidden.
* **ceiling**: how much slide-only prognosis the omics could teach at all, with linear models
  and no deep learning: on the same patients (5 folds x 3 repeats), a penalised Cox model on the
  mean-pooled slide features (8 principal components) against the same Cox model on the omics
  *predicted from the slides* (ridge from the mean features to the training part's 8 omics
  principal components: the two-stage LUPI estimate), both together, and the true test omics;
  for ``omics_hidden`` 0.9 (the preset), 0.5 and 0 (the programme fully visible on the slides).
* **signal**: 5-fold cross-validation x ``--seeds`` seeds with 100 training patients per fold
  (125 patients drawn from the preset's world), omics in training only, on the preset as
  written (``genomic_signal`` 1.2) and with the world's omics knob off (``genomic_signal`` 0).
  Prints each model's mean C-index, the paired difference to ABMIL over the same test patients
  and a paired bootstrap p-value (patients resampled within each fold's test part).

    python benchmarks/bench_genomic.py              # about 10 minutes on 2 CPU cores
    python benchmarks/bench_genomic.py --seeds 1    # quicker
    python benchmarks/bench_genomic.py --only signal --recipe paper --values 1.2
    python benchmarks/bench_genomic.py --only ceiling   # about 1 minute
    python benchmarks/bench_genomic.py --only signal --values 1.2 --omics-hidden 0   # off-preset

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


def _world(
    root: Path, signal: float, seed: int, hidden: float | None = None
) -> tuple[Path, Path, Path]:
    knobs: dict[str, object] = {"n_patients": 125, "seed": seed, "genomic_signal": signal}
    if hidden is not None:
        knobs["omics_hidden"] = hidden
    config = make_simulation_config("histogenomic", knobs)
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
    root: Path,
    seeds: int,
    recipe: str = "default",
    values: tuple[float, ...] = (1.2, 0.0),
    hidden: float | None = None,
) -> None:
    for value in values:
        world = root / f"signal-{value}"
        _world(world, value, seed=1, hidden=hidden)
        preds = {m: _cv(world, m, seeds, **RECIPES[recipe]) for m in MODELS}
        print(
            f"histogenomic, genomic_signal {value}: 5 folds x {seeds} seed(s), 100 train/fold, "
            f"{recipe} recipe" + (f", omics_hidden {hidden}" if hidden is not None else "")
        )
        for model in MODELS:
            folds = [_cindex(g) for _, g in preds[model].groupby(["seed", "fold"])]
            line = f"  {model:9s} C {np.mean(folds):.3f} (sd {np.std(folds):.3f})"
            if model != "abmil":
                d, p = _paired(preds["abmil"], preds[model])
                line += f"   vs abmil {d:+.3f}, paired bootstrap p = {p:.3f}"
            print(line)


def _patient_means(root: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    import h5py

    table = pd.read_csv(root / "cohort.csv")
    ids, means = [], []
    for pid, rows in table.groupby("patient_id"):
        parts = []
        for slide in rows["slide_id"]:
            with h5py.File(root / "features" / f"{slide}.h5", "r") as f:
                parts.append(f["features"][:])
        ids.append(str(pid))
        means.append(np.concatenate(parts).mean(axis=0))
    first = table.drop_duplicates("patient_id").set_index("patient_id").loc[ids]
    return ids, np.stack(means), first["time"].to_numpy(), first["event"].to_numpy().astype(bool)


def _cox_risk(train: np.ndarray, test: np.ndarray, time: np.ndarray, event: np.ndarray):
    from lifelines import CoxPHFitter

    fitted = CoxPHFitter(penalizer=0.5).fit(pd.DataFrame(train).assign(T=time, E=event), "T", "E")
    return fitted.predict_partial_hazard(pd.DataFrame(test)).to_numpy()


def _ceiling_fold(
    x: np.ndarray, t: np.ndarray, e: np.ndarray, omics: pd.DataFrame, has: np.ndarray,
    tr: np.ndarray, te: np.ndarray,
) -> dict[str, float]:  # fmt: skip
    """One fold of the linear ceiling: Cox on slide PCs, on slide-predicted omics PCs, on both,
    and on the true omics PCs; everything fitted on the training part ``tr``."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    scale = StandardScaler().fit(x[tr])
    pca = PCA(8, random_state=0).fit(scale.transform(x[tr]))
    f_tr, f_te = (pca.transform(scale.transform(x[i])) for i in (tr, te))
    with_omics, test_omics = tr[has[tr]], te[has[te]]
    o_scale = StandardScaler().fit(omics.iloc[with_omics])
    o_pca = PCA(8, random_state=0).fit(o_scale.transform(omics.iloc[with_omics]))
    o_tr, o_te = (
        o_pca.transform(o_scale.transform(omics.iloc[i])) for i in (with_omics, test_omics)
    )
    ridge = Ridge(alpha=10.0).fit(scale.transform(x[with_omics]), o_tr)
    p_tr, p_te = (ridge.predict(scale.transform(x[i])) for i in (tr, te))
    c = {}
    for name, train, test in (
        ("slides", f_tr, f_te),
        ("predicted omics", p_tr, p_te),
        ("both", np.hstack([f_tr, p_tr]), np.hstack([f_te, p_te])),
    ):
        risk = _cox_risk(train, test, t[tr], e[tr])
        c[name] = concordance_index_censored(e[te], t[te], risk).cindex
    risk = _cox_risk(o_tr, o_te, t[with_omics], e[with_omics])
    c["true omics (test omics)"] = concordance_index_censored(
        e[test_omics], t[test_omics], risk
    ).cindex
    return c


def ceiling(root: Path, hidden: tuple[float, ...] = (0.9, 0.5, 0.0)) -> None:
    """Two-stage linear LUPI against slide features alone (see the module docstring)."""
    from sklearn.model_selection import StratifiedKFold

    print("linear ceiling (histogenomic, 125 patients, 5 folds x 3 repeats, penalised Cox):")
    for value in hidden:
        world = root / f"hidden-{value}"
        config = make_simulation_config(
            "histogenomic", {"n_patients": 125, "seed": 1, "omics_hidden": value}
        )
        simulate_cohort(world, config)
        ids, x, t, e = _patient_means(world)
        table = pd.read_csv(world / "omics.csv").set_index("patient_id")
        table.index = table.index.astype(str)
        has = np.isin(ids, table.index)
        omics = table.reindex(ids)  # rows aligned with ``ids`` (NaN where missing, never used)
        rows = []
        for repeat in range(3):
            for tr, te in StratifiedKFold(5, shuffle=True, random_state=repeat).split(x, e):
                rows.append(_ceiling_fold(x, t, e, omics, has, tr, te))
        means = pd.DataFrame(rows).mean()
        print(f"  omics_hidden {value}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


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
    parser.add_argument("--only", choices=["cost", "signal", "baselines", "ceiling"], default=None)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    parser.add_argument("--values", type=float, nargs="+", default=[1.2, 0.0])
    parser.add_argument(
        "--omics-hidden", type=float, default=None, help="override the preset's 0.9 (signal part)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "cost"):
            cost(Path(tmp) / "cost")
        if args.only in (None, "signal"):
            signal(
                Path(tmp) / "signal", args.seeds, args.recipe, tuple(args.values), args.omics_hidden
            )
        if args.only in (None, "baselines"):
            baselines(Path(tmp) / "baselines", args.seeds)
        if args.only in (None, "ceiling"):
            ceiling(Path(tmp) / "ceiling")


if __name__ == "__main__":
    main()
