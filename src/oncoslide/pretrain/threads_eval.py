"""Threads-style embeddings against mean pooling in the frozen linear protocol, full and few-shot.

Protocol (leak-free): patient-level K-fold splits of the evaluated patients. A Threads-style
encoder is pre-trained either once on a separate set of patients (``pretrain_patients``, never
evaluated: Threads' own setting) or in each fold on the fold's non-test patients only (their
expression and mutation profiles; the expression scaler fitted on them), then frozen. Every patient is embedded (the
mean of its slides' embeddings) and so is its mean-pooled patch features. Probes are fitted on
the fold's non-test patients and scored on its test patients, never seen in pre-training:

- full: logistic regression (standardised, C = 0.5, balanced) for each label; elastic-net Cox
  (l1_ratio 0.5, penalty chosen on a validation part carved from the training patients, 20 %)
  for survival. Out-of-fold predictions are pooled, and the two embeddings are compared by a
  paired bootstrap over patients (:func:`paired_bootstrap`).
- few-shot: :mod:`oncoslide.evaluation.fewshot` (k per class drawn from the training patients).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide.cohort.omics import Omics
from oncoslide.cohort.splits import make_splits
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.evaluation.classification import classification_metrics
from oncoslide.evaluation.fewshot import (
    FewShotConfig,
    few_shot_classification,
    few_shot_survival,
)
from oncoslide.features.cache import FeatureCache
from oncoslide.pretrain.threads import ThreadsConfig, patient_embeddings, pretrain_threads

PathLike = str | os.PathLike[str]
THREADS = "threads"
MEANPOOL = "meanpool"


@dataclass(frozen=True, kw_only=True)
class ThreadsEvalConfig:
    n_folds: int = 5
    seed: int = 0
    epochs: int = 20
    batch_size: int = 32
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    use_mutations: bool = True
    survival: bool = True
    C: float = 0.5
    l1_ratio: float = 0.5
    n_boot: int = 1000


@dataclass(frozen=True, eq=False)
class ThreadsEvaluation:
    predictions: pd.DataFrame  # embedding, task, fold, patient_id, label/time/event, score(s)
    fold_metrics: pd.DataFrame  # embedding, task, fold, metric, value
    fewshot: pd.DataFrame  # fewshot ROW_COLUMNS
    pretraining: pd.DataFrame  # fold, patients, seconds, chosen_epoch, rankme, bags_per_s
    tasks: dict[str, list[str]]  # task -> classes ([] for survival)


def mean_pooled(cohort: Cohort, patient_ids: list[str], cache: FeatureCache) -> np.ndarray:
    """(P, D) float64 mean of every patch of each patient's slides (the benchmark's meanpool)."""
    from oncoslide.cohort.bags import load_bag

    return np.stack(
        [load_bag(cohort, p, cache).features.astype(np.float32).mean(axis=0) for p in patient_ids]
    ).astype(np.float64)


def evaluate_threads(
    cohort: Cohort,
    expression: Omics,
    labels: Mapping[str, pd.Series],
    work: PathLike,
    *,
    mutations: Omics | None = None,
    config: ThreadsEvalConfig = ThreadsEvalConfig(),
    eval_patients: list[str] | None = None,
    pretrain_patients: list[str] | None = None,
    log: Any = None,
) -> ThreadsEvaluation:
    """Run the protocol of the module docstring. ``labels`` maps a task name to a Series of
    class labels indexed by patient id (patients without a value are left out of that task);
    survival uses the cohort's time and event columns when ``config.survival``.

    ``eval_patients`` (default: all) are split into folds. With ``pretrain_patients`` (which
    must not overlap them) one encoder is pre-trained on those patients only and used in
    every fold (a separate pre-training set, as Threads pre-trains on other cohorts than it is
    evaluated on); without, each fold pre-trains on its own non-test patients."""
    say = log if log is not None else (lambda *_: None)
    work = Path(work)
    ids = sorted(eval_patients) if eval_patients is not None else cohort.patient_ids
    if pretrain_patients is not None:
        overlap = set(pretrain_patients) & set(ids)
        if overlap:
            raise ConfigError(
                f"{len(overlap)} pre-training patient(s) are also evaluated: {sorted(overlap)[:5]}"
            )
    strata = _strata(cohort, labels, ids)
    splits = make_splits(
        ids, n_folds=config.n_folds, seeds=(config.seed,), strata=strata, val_fraction=0.0
    )
    tasks = {
        name: sorted({str(v) for v in series.dropna().tolist()}) for name, series in labels.items()
    }
    cache = FeatureCache(max_bytes=4 * 2**30)
    x_mean = mean_pooled(cohort, ids, cache)
    row_of = {p: i for i, p in enumerate(ids)}
    preds: list[pd.DataFrame] = []
    metrics: list[tuple[str, str, int, str, float]] = []
    few: list[pd.DataFrame] = []
    pre: list[dict[str, Any]] = []
    x_threads: np.ndarray | None = None
    for fold in range(config.n_folds):
        part = splits[(splits["seed"] == config.seed) & (splits["fold"] == fold)]
        test_ids = sorted(part.loc[part["part"] == "test", "patient_id"].astype(str))
        train_ids = sorted(set(ids) - set(test_ids))
        if pretrain_patients is None or x_threads is None:
            x_threads = _pretrain_and_embed(
                cohort,
                expression,
                mutations,
                work / ("fold" + str(fold) if pretrain_patients is None else "shared"),
                pretrain_patients if pretrain_patients is not None else train_ids,
                test_ids if pretrain_patients is None else ids,
                ids,
                config,
                fold,
                cache,
                pre,
            )
            say(
                f"fold {fold}: pre-trained on {pre[-1]['patients']} patients in "
                f"{pre[-1]['seconds']:.0f} s (epoch {pre[-1]['chosen_epoch']}, "
                f"RankMe {pre[-1]['rankme']:.1f})"
            )
        emb = {THREADS: x_threads, MEANPOOL: x_mean}
        tr_rows = np.array([row_of[p] for p in train_ids])
        te_rows = np.array([row_of[p] for p in test_ids])
        for task, series in labels.items():
            lab = series.dropna().astype(str)
            tr = [p for p in train_ids if p in lab.index]
            te = [p for p in test_ids if p in lab.index]
            tr_i = np.array([row_of[p] for p in tr])
            te_i = np.array([row_of[p] for p in te])
            ytr, yte = lab.loc[tr].to_numpy(), lab.loc[te].to_numpy()
            parts = {name: (x[tr_i], x[te_i]) for name, x in emb.items()}
            for name, (xtr, xte) in parts.items():
                probs = _logistic(xtr, ytr, xte, tasks[task], config.C)
                out = classification_metrics(yte, probs, classes=tasks[task])
                metrics += [(name, task, fold, m, float(v)) for m, v in out.items()]
                frame = pd.DataFrame({"patient_id": te, "label": yte})
                for j, c in enumerate(tasks[task]):
                    frame[f"prob_{c}"] = probs[:, j]
                frame.insert(0, "fold", fold)
                frame.insert(0, "task", task)
                frame.insert(0, "embedding", name)
                preds.append(frame)
            few.append(
                few_shot_classification(
                    parts, ytr, yte, config=config.fewshot, task=task, fold=fold
                )
            )
        if config.survival and cohort.has_survival:
            y = cohort.survival(ids)
            parts = {name: (x[tr_rows], x[te_rows]) for name, x in emb.items()}
            for name, (xtr, xte) in parts.items():
                risk = _coxnet(
                    xtr, y[tr_rows], xte, config.l1_ratio, seed=config.seed * 1000 + fold
                )
                from oncoslide.survival.metrics import concordance_index_censored

                cidx = concordance_index_censored(y["event"][te_rows], y["time"][te_rows], risk)
                metrics.append((name, "survival", fold, "c_index", float(cidx[0])))
                preds.append(
                    pd.DataFrame(
                        {
                            "embedding": name,
                            "task": "survival",
                            "fold": fold,
                            "patient_id": test_ids,
                            "time": y["time"][te_rows],
                            "event": y["event"][te_rows].astype(float),
                            "risk": risk,
                        }
                    )
                )
            few.append(
                few_shot_survival(
                    parts,
                    y["time"][tr_rows],
                    y["event"][tr_rows],
                    y["time"][te_rows],
                    y["event"][te_rows],
                    config=config.fewshot,
                    fold=fold,
                )
            )
    if config.survival and cohort.has_survival:
        tasks["survival"] = []
    return ThreadsEvaluation(
        predictions=pd.concat(preds, ignore_index=True),
        fold_metrics=pd.DataFrame(
            metrics, columns=["embedding", "task", "fold", "metric", "value"]
        ),
        fewshot=pd.concat(few, ignore_index=True),
        pretraining=pd.DataFrame(pre),
        tasks=tasks,
    )


def _pretrain_and_embed(
    cohort: Cohort,
    expression: Omics,
    mutations: Omics | None,
    out: Path,
    pretrain_ids: list[str],
    held_out: list[str],
    ids: list[str],
    config: ThreadsEvalConfig,
    fold: int,
    cache: FeatureCache,
    pre: list[dict[str, Any]],
) -> np.ndarray:
    from oncoslide.pretrain.folder import load_slide_encoder

    started = time.perf_counter()
    result, profiles = pretrain_threads(
        cohort,
        expression,
        out,
        mutations=mutations if config.use_mutations else None,
        patients=pretrain_ids,
        config=config.threads,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed * 1000 + fold,
        cache=cache,
        resume=False,
    )
    leaked = set(profiles.patient_ids) & set(held_out)
    if leaked:  # never: the guard of the protocol's one promise
        raise ConfigError(f"fold {fold}: test patients in pre-training: {sorted(leaked)[:5]}")
    encoder = load_slide_encoder(out).encoder
    x = patient_embeddings(encoder, cohort, ids, cache)
    pre.append(
        {
            "fold": fold,
            "patients": len(profiles.usable),
            "seconds": time.perf_counter() - started,
            "chosen_epoch": result.chosen_epoch,
            "rankme": result.rankme,
            "bags_per_s": result.bags_per_second,
        }
    )
    return x


def _strata(cohort: Cohort, labels: Mapping[str, pd.Series], ids: list[str]) -> list[str]:
    first = next(iter(labels.values()), None)
    if first is None:
        return ["all"] * len(ids)
    return [str(first.get(p, "na")) for p in ids]


def _logistic(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, classes: list[str], C: float
) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[v] for v in ytr])
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
    )
    clf.fit(xtr, y)
    probs = np.zeros((len(xte), len(classes)))
    probs[:, clf.classes_] = clf.predict_proba(xte)
    return probs


def _coxnet(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, l1_ratio: float, *, seed: int
) -> np.ndarray:
    """Elastic-net Cox, penalty chosen on a validation part (20 %, stratified by event) carved
    from the training patients, refitted on all of them (the benchmark's linear protocol)."""
    from oncoslide.survival.coxnet import fit_select_alpha

    rng = np.random.default_rng(seed)
    event = ytr["event"].astype(bool)
    val = np.zeros(len(ytr), bool)
    for stratum in (False, True):
        idx = np.flatnonzero(event == stratum)
        val[rng.choice(idx, size=max(1, round(0.2 * len(idx))), replace=False)] = True
    cox, _, _ = fit_select_alpha(
        xtr[~val],
        ytr["time"][~val],
        event[~val],
        xtr[val],
        ytr["time"][val],
        event[val],
        l1_ratio=l1_ratio,
    )
    return np.asarray(cox.predict(xte), dtype=np.float64)


def paired_bootstrap(
    predictions: pd.DataFrame,
    task: str,
    classes: list[str],
    a: str = THREADS,
    b: str = MEANPOOL,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Pooled out-of-fold metric (macro AUC, or Harrell's C for survival) of ``a`` and ``b``
    and a paired bootstrap over patients of the difference: 95 % interval and the two-sided
    p-value (twice the smaller share of replicates on either side of 0)."""
    from oncoslide.survival.metrics import concordance_index_censored

    part = predictions[predictions["task"] == task]
    pa = part[part["embedding"] == a].set_index("patient_id").sort_index()
    pb = part[part["embedding"] == b].set_index("patient_id").loc[pa.index]

    def metric(frame: pd.DataFrame, idx: np.ndarray) -> float:
        rows = frame.iloc[idx]
        if not classes:
            return float(
                concordance_index_censored(
                    rows["event"].to_numpy(bool), rows["time"].to_numpy(), rows["risk"].to_numpy()
                )[0]
            )
        probs = rows[[f"prob_{c}" for c in classes]].to_numpy()
        return float(classification_metrics(rows["label"].to_numpy(), probs, classes)["auc"])

    n = len(pa)
    full = np.arange(n)
    ma, mb = metric(pa, full), metric(pb, full)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        d = metric(pa, idx) - metric(pb, idx)
        if np.isfinite(d):
            diffs.append(d)
    arr = np.asarray(diffs)
    share = min(float(np.mean(arr <= 0)), float(np.mean(arr >= 0))) if len(arr) else np.nan
    p = min(1.0, 2.0 * share) if len(arr) else np.nan
    return {
        "metric_a": ma,
        "metric_b": mb,
        "diff": ma - mb,
        "lo": float(np.quantile(arr, 0.025)) if len(arr) else np.nan,
        "hi": float(np.quantile(arr, 0.975)) if len(arr) else np.nan,
        "p": p,
        "n": n,
    }


__all__ = [
    "MEANPOOL",
    "THREADS",
    "ThreadsEvalConfig",
    "ThreadsEvaluation",
    "evaluate_threads",
    "mean_pooled",
    "paired_bootstrap",
]
