"""The omics side on real data: ``omics_snn`` against our elastic-net Cox, same folds.

Data: scikit-survival's bundled breast-cancer set (``sksurv.datasets.load_breast_cancer``: 198
patients, 76 expression probes plus 4 clinical columns, distant metastasis-free survival, 51
events; shipped with the package, no download). scikit-survival is GPL and a dev-only
dependency: only this script and the tests load it, never ``src/``.

Protocol, per (seed, fold) of a stratified 5-fold split (``make_splits``, validation carved from
the training folds, 20 %):

- the 76 probes, standardised with the mean and sd of the fold's training + validation patients
  (the test fold is never seen);
- ``omics_snn`` (2 SELU blocks of 256, AlphaDropout 0.25) trained as a Cox model on the training
  part, full-batch Adam, the number of epochs chosen by the validation part's Harrell's C, then
  refitted on training + validation for that many epochs;
- ``ElasticNetCox`` (l1_ratio 0.5): ``fit_select_alpha`` chooses alpha on the same validation
  part and refits on training + validation;
- Harrell's C of each on the test fold. The summary is the mean over folds with a patient
  bootstrap 95 % interval (``grouped_bootstrap_ci``, one shared patient draw per replicate).

    python benchmarks/bench_omics_real.py               # about 5 s on 2 CPU cores
    python benchmarks/bench_omics_real.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from oncoslide.cohort.splits import fold_parts, make_splits, survival_strata
from oncoslide.evaluation.bootstrap import BootstrapCI, GroupData, grouped_bootstrap_ci
from oncoslide.models.omics_baselines import fit_omics_snn
from oncoslide.survival.coxnet import fit_select_alpha
from oncoslide.survival.metrics import concordance_index_censored


def load_breast_cancer_omics() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The 76 expression probes (columns starting with 'X'), time and event."""
    from sksurv.datasets import load_breast_cancer

    x, y = load_breast_cancer()
    genes = x[[c for c in x.columns if c.startswith("X")]].astype(float)
    genes.index = [f"p{i:03d}" for i in range(len(genes))]
    return genes, np.asarray(y["t.tdm"], dtype=float), np.asarray(y["e.tdm"], dtype=bool)


def cross_validated_risks(
    genes: pd.DataFrame, time_: np.ndarray, event: np.ndarray, seeds: list[int], folds: int = 5
) -> pd.DataFrame:
    """One row per (seed, fold, test patient): the two models' test risks."""
    ids = list(genes.index)
    splits = make_splits(
        ids, n_folds=folds, seeds=seeds, strata=survival_strata(time_, event), val_fraction=0.2
    )
    row = {p: i for i, p in enumerate(ids)}
    x_all = genes.to_numpy()
    rows = []
    for seed in seeds:
        for fold in range(folds):
            parts = fold_parts(splits, seed, fold)
            tr, va, te = ([row[p] for p in parts[k]] for k in ("train", "val", "test"))
            fit = tr + va
            mean, sd = x_all[fit].mean(axis=0), x_all[fit].std(axis=0)
            x = (x_all - mean) / np.where(sd > 0, sd, 1.0)
            chosen = fit_omics_snn(
                x[tr], time_[tr], event[tr], x_val=x[va], time_val=time_[va],
                event_val=event[va], seed=seed * 100 + fold,
            )  # fmt: skip
            snn = fit_omics_snn(
                x[fit], time_[fit], event[fit], epochs=chosen.epochs, seed=seed * 100 + fold
            )
            coxnet, _, _ = fit_select_alpha(
                x[tr], time_[tr], event[tr], x[va], time_[va], event[va], l1_ratio=0.5,
                n_alphas=20, standardize=False,
            )  # fmt: skip
            for name, risk in (("omics_snn", snn.risk(x[te])), ("coxnet", coxnet.predict(x[te]))):
                rows += [
                    {"model": name, "seed": seed, "fold": fold, "patient_id": ids[i],
                     "time": time_[i], "event": event[i], "risk": r, "epochs": chosen.epochs}
                    for i, r in zip(te, risk, strict=True)
                ]  # fmt: skip
    return pd.DataFrame(rows)


def summarise(risks: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, BootstrapCI]:
    """Per model: mean over (seed, fold) of Harrell's C, with a patient bootstrap interval."""

    def c_index(data: dict, _context: dict) -> float:
        return concordance_index_censored(data["event"], data["time"], data["risk"]).cindex

    out = {}
    for name, frame in risks.groupby("model"):
        groups = [
            GroupData(
                {k: g[k].to_numpy() for k in ("time", "event", "risk")},
                name=f"seed{s}/fold{f}",
                patients=g["patient_id"].to_numpy(),
            )
            for (s, f), g in frame.groupby(["seed", "fold"])
        ]
        out[str(name)] = grouped_bootstrap_ci(groups, c_index, n_boot=n_boot, seed=seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    genes, time_, event = load_breast_cancer_omics()
    risks = cross_validated_risks(genes, time_, event, args.seeds, args.folds)
    summary = summarise(risks, n_boot=args.n_boot)
    print(
        f"breast cancer (sksurv): {len(genes)} patients, {genes.shape[1]} probes, "
        f"{int(event.sum())} events; {args.folds}-fold x seeds {args.seeds}"
    )
    for name, ci in summary.items():
        per_fold = [
            concordance_index_censored(g["event"], g["time"], g["risk"]).cindex
            for _, g in risks[risks["model"] == name].groupby(["seed", "fold"])
        ]
        print(
            f"  {name:10s} Harrell's C {ci.estimate:.3f}  95% CI [{ci.lower:.3f}, {ci.upper:.3f}]"
            f"  folds: {' '.join(f'{v:.3f}' for v in per_fold)}"
        )
    snn, net = summary["omics_snn"].estimate, summary["coxnet"]
    inside = net.lower <= snn <= net.upper
    epochs = risks[risks["model"] == "omics_snn"].groupby(["seed", "fold"])["epochs"].first()
    print(f"  SNN epochs chosen on validation: {' '.join(map(str, epochs))}")
    print(
        f"  SNN mean {'inside' if inside else 'OUTSIDE'} the elastic-net interval; "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
