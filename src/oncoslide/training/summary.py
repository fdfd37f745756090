"""A run's summary: mean of each metric over (seed, fold) with a 95% bootstrap interval.

Each (seed, fold) is scored by its own model, so a replicate recomputes the metric within every
(seed, fold) and averages (``grouped_bootstrap_ci``); risk scores of different models are never
pooled into one ranking. The unit of resampling is the *patient*: a replicate draws the run's
test patients once, with replacement, and that draw is shared by every seed and fold; each
(seed, fold) is scored on the drawn patients of its test part, a patient drawn k times counting
k times (the benchmark's patient draws, ``oncoslide.bench.stats.bootstrap_counts``). With
repeated cross-validation (``--repeats R``) every patient is a test patient once per seed, and
the shared draw keeps the R repetitions from counting as R times the patients: repeating the
same predictions R times gives the interval of one repetition, not one about sqrt(R) narrower.
The interval covers the sampling of test patients, not the variability of training across
seeds (the ``std`` column shows the spread over (seed, fold)).

The patients of a fold come from its ``predictions.parquet`` (``patient_id``, rows in the order
of the arrays of its ``eval.npz``, both written from the fold's test patients in one order), or
from a ``patient_id`` array in ``eval.npz`` where there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide.errors import ConfigError
from oncoslide.evaluation.bootstrap import GroupData, grouped_bootstrap_ci
from oncoslide.evaluation.classification import balanced_accuracy, roc_auc
from oncoslide.evaluation.hierarchy import COARSE_METRICS, hierarchical_metric
from oncoslide.survival.metrics import (
    CensoringSupportError,
    TimeGridError,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from oncoslide.survival.target import make_survival
from oncoslide.training.run_folder import RunFolder
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
    if "parent" in c:  # a label tree: the top-down decision (oncoslide.evaluation.hierarchy)
        return hierarchical_metric("balanced_accuracy", d["label"], d["probs"], c["parent"])
    return balanced_accuracy(d["label"], d["probs"], classes=c["classes"])


def _coarse(metric: str) -> Metric:
    def score(d: Mapping[str, np.ndarray], c: Mapping[str, Any]) -> float:
        return hierarchical_metric(metric, d["label"], d["probs"], c["parent"])

    return score


METRIC_FUNCTIONS: dict[str, Metric] = {
    "c_index": _harrell,
    "c_index_uno": _uno,
    "td_auc": _td_auc,
    "ibs": _ibs,
    "auc": _auc,
    "balanced_accuracy": _bacc,
    **{m: _coarse(m) for m in COARSE_METRICS},
}


def _patient_ids(fdir: Path, payload: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """The test patients of a fold, in the row order of its eval.npz arrays."""
    if "patient_id" in payload:
        ids, source = payload["patient_id"], "eval.npz patient_id"
    else:
        frame = pd.read_parquet(fdir / "predictions.parquet", columns=["patient_id"])
        ids, source = frame["patient_id"].to_numpy(), "predictions.parquet"
    if len(ids) != n:
        raise ConfigError(
            f"fold folder {fdir}: {source} has {len(ids)} test patients but eval.npz has {n}; "
            "the fold's files do not belong together (rerun the fold)"
        )
    return np.asarray([str(p) for p in ids])


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
            if task.tree:
                context["parent"] = task.tree_parent()[1]
        n = len(next(iter(arrays.values())))
        groups.append(
            GroupData(arrays, context, name=name, patients=_patient_ids(fdir, payload, n))
        )
    return groups


def summarise_run(
    out: Path, task: TaskSpec, seeds: Sequence[int], folds: Sequence[int], *, n_boot: int, seed: int
) -> pd.DataFrame:
    """One row per metric: mean over folds/seeds, std over folds, bootstrap 95% CI.

    The interval resamples patients, one draw per replicate shared by every seed and fold (see
    the module docstring); ``n_boot`` is the number of replicates used (at most ``EXPENSIVE``
    for the IPCW metrics, fewer where replicates were undefined and skipped).
    """
    run = RunFolder(out)
    fold_dirs = [(int(s), int(k), run.fold(int(s), int(k)).path) for s in seeds for k in folds]
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
