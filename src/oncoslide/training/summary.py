"""A run's summary: mean of each metric over (seed, fold) with a 95% bootstrap interval.

Each (seed, fold) is scored by its own model, so the bootstrap resamples test patients within
every (seed, fold) and averages the per-fold metrics (``grouped_bootstrap_ci``); risk scores of
different models are never pooled into one ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide.evaluation.bootstrap import GroupData, grouped_bootstrap_ci
from oncoslide.evaluation.classification import balanced_accuracy, roc_auc
from oncoslide.survival.metrics import (
    CensoringSupportError,
    TimeGridError,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from oncoslide.survival.target import make_survival
from oncoslide.training.tasks import TaskSpec

Metric = Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], float]
UNDEFINED = (CensoringSupportError, TimeGridError)
# IPCW metrics re-estimate the censoring distribution per replicate: fewer replicates keep the
# summary quick, and their intervals are reported with the replicate count used.
EXPENSIVE = {"c_index_uno": 200, "td_auc": 200, "ibs": 200}


def _harrell(d: Mapping[str, np.ndarray], c: Mapping[str, Any]) -> float:
    return concordance_index_censored(d["event"], d["time"], d["risk"]).cindex


def _uno(d: Mapping[str, np.ndarray], c: Mapping[str, Any]) -> float:
    if not len(c["grid"]):
        return float("nan")
    y = make_survival(d["event"], d["time"])
    return concordance_index_ipcw(c["y_fit"], y, d["risk"], tau=float(np.max(c["grid"]))).cindex


def _td_auc(d: Mapping[str, np.ndarray], c: Mapping[str, Any]) -> float:
    if len(c["grid"]) < 1:
        return float("nan")
    y = make_survival(d["event"], d["time"])
    return cumulative_dynamic_auc(c["y_fit"], y, d["risk"], c["grid"])[1]


def _ibs(d: Mapping[str, np.ndarray], c: Mapping[str, Any]) -> float:
    if len(c["grid"]) < 2 or "surv" not in d:
        return float("nan")
    y = make_survival(d["event"], d["time"])
    return integrated_brier_score(c["y_fit"], y, d["surv"], c["grid"])


def _auc(d: Mapping[str, np.ndarray], c: Mapping[str, Any]) -> float:
    return roc_auc(d["label"], d["probs"], classes=c["classes"])


def _bacc(d: Mapping[str, np.ndarray], c: Mapping[str, Any]) -> float:
    return balanced_accuracy(d["label"], d["probs"], classes=c["classes"])


METRIC_FUNCTIONS: dict[str, Metric] = {
    "c_index": _harrell,
    "c_index_uno": _uno,
    "td_auc": _td_auc,
    "ibs": _ibs,
    "auc": _auc,
    "balanced_accuracy": _bacc,
}


def _groups(fold_dirs: Sequence[tuple[int, int, Path]], task: TaskSpec) -> list[GroupData]:
    groups = []
    for seed, fold, fdir in fold_dirs:
        with np.load(fdir / "eval.npz") as z:
            payload = {k: z[k] for k in z.files}
        name = f"seed{seed}/fold{fold}"
        if task.is_survival:
            arrays = {
                "time": payload["test_time"],
                "event": payload["test_event"].astype(bool),
                "risk": payload["risk"],
            }
            if "surv" in payload:
                arrays["surv"] = payload["surv"]
            context = {
                "y_fit": make_survival(payload["fit_event"].astype(bool), payload["fit_time"]),
                "grid": payload["grid"],
            }
        else:
            arrays = {"label": payload["label"], "probs": payload["probs"]}
            context = {"classes": list(range(payload["probs"].shape[1]))}
        groups.append(GroupData(arrays, context, name=name))
    return groups


def summarise_run(
    out: Path, task: TaskSpec, seeds: Sequence[int], folds: Sequence[int], *, n_boot: int, seed: int
) -> pd.DataFrame:
    """One row per metric: mean over folds/seeds, std over folds, bootstrap 95% CI."""
    from oncoslide.training.cv import fold_dir

    fold_dirs = [(int(s), int(k), fold_dir(out, int(s), int(k))) for s in seeds for k in folds]
    groups = _groups(fold_dirs, task)
    per_fold = pd.concat(
        [pd.read_csv(fdir / "metrics.csv") for _, _, fdir in fold_dirs], ignore_index=True
    )
    rows = []
    for metric in task.metric_names:
        values = per_fold.loc[per_fold["metric"] == metric, "value"].to_numpy(dtype=float)
        row: dict[str, Any] = {
            "metric": metric,
            "mean": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
            "std": float(np.nanstd(values, ddof=1))
            if np.isfinite(values).sum() > 1
            else float("nan"),
            "n_folds": int(np.isfinite(values).sum()),
            "ci_lower": float("nan"),
            "ci_upper": float("nan"),
            "n_boot": 0,
        }
        boots = min(n_boot, EXPENSIVE.get(metric, n_boot))
        if boots > 0:
            ci = grouped_bootstrap_ci(
                groups, METRIC_FUNCTIONS[metric], n_boot=boots, seed=seed, skip_errors=UNDEFINED
            )
            row.update(ci_lower=ci.lower, ci_upper=ci.upper, n_boot=ci.n_boot_ok)
        rows.append(row)
    return pd.DataFrame(rows)
