"""Few-shot linear probes on frozen embeddings (the Threads paper's k-shot curves).

For each k in ``shots`` (1, 4, 16, 64 labelled patients per class) and each of ``draws``
repeated draws, k patients per class are drawn **from the training part only** and a probe is
fitted on them; the test part is fixed and every probe is scored on all of it. The frozen
protocol is the benchmark's linear one (:mod:`oncoslide.bench.protocols`): standardised
logistic regression, C = 0.5, balanced class weights, for classification; elastic-net Cox
(l1_ratio 0.5, :mod:`oncoslide.survival.coxnet`) for survival, its penalty chosen on a
validation half carved from the draw (half of each stratum), then refitted on the whole draw.

Draws depend only on the labels, the fold, k, the draw number and the seed, never on the
embedding, so two embeddings probed on the same fold see the same patients in every draw: their
per-draw differences are paired (:func:`compare_few_shot`).

For survival, a "class" is an event stratum: k patients with an event and k censored ones (the
k = 1 draw is too small to carve a validation part from and is skipped, k >= 2).

A k for which some class of the training part has fewer than k patients is skipped (no row).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray
from scipy import stats

from oncoslide._io import atomic_path, write_table
from oncoslide.errors import ConfigError
from oncoslide.evaluation.classification import classification_metrics

PathLike = str | os.PathLike[str]
FloatArray = NDArray[np.float64]

#: Columns of the per-draw rows.
ROW_COLUMNS = ("embedding", "task", "fold", "k", "draw", "n_train", "metric", "value")


@dataclass(frozen=True, kw_only=True)
class FewShotConfig:
    """The frozen few-shot protocol (defaults: Threads / Patho-Bench)."""

    shots: tuple[int, ...] = (1, 4, 16, 64)
    draws: int = 10
    C: float = 0.5
    l1_ratio: float = 0.5
    n_alphas: int = 10
    seed: int = 0
    interval: float = 0.95

    def __post_init__(self) -> None:
        problems = []
        if not self.shots or any(not isinstance(k, int) or k < 1 for k in self.shots):
            problems.append(f"shots must be positive integers, got {self.shots!r}")
        if self.draws < 1:
            problems.append(f"draws must be >= 1, got {self.draws}")
        if not self.C > 0:
            problems.append(f"C must be > 0, got {self.C}")
        if not 0 <= self.l1_ratio <= 1:
            problems.append(f"l1_ratio must be in [0, 1], got {self.l1_ratio}")
        if not 0 < self.interval < 1:
            problems.append(f"interval must be in (0, 1), got {self.interval}")
        if problems:
            raise ConfigError("FewShotConfig: " + "; ".join(problems))


def draw_shots(
    labels: Sequence[object] | np.ndarray, k: int, *, seed: int, fold: int, draw: int
) -> NDArray[np.intp] | None:
    """Positions of k patients per class of ``labels`` (sorted), or None when a class has
    fewer than k. Deterministic in (seed, fold, k, draw) and the labels alone."""
    y = np.asarray(labels)
    rng = np.random.default_rng([int(seed), int(fold), int(k), int(draw)])
    classes = sorted(set(y.tolist()), key=str)
    if len(classes) < 2:
        raise ConfigError("few-shot draws need at least two classes in the training part")
    picked = []
    for c in classes:
        members = np.flatnonzero(y == c)
        if len(members) < k:
            return None
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def _check_parts(
    embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]], n_train: int, n_test: int
) -> None:
    if not embeddings:
        raise ConfigError("few-shot probing needs at least one embedding")
    problems = []
    for name, (xtr, xte) in embeddings.items():
        if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
            problems.append(f"{name}: expected (n, d) train and test matrices of one width")
        elif xtr.shape[0] != n_train or xte.shape[0] != n_test:
            problems.append(
                f"{name}: {xtr.shape[0]} train / {xte.shape[0]} test rows for "
                f"{n_train} / {n_test} labels"
            )
        elif not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
            problems.append(f"{name}: non-finite values")
    if problems:
        raise ConfigError("few-shot probing: " + "; ".join(problems))


def few_shot_classification(
    embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    y_train: Sequence[object] | np.ndarray,
    y_test: Sequence[object] | np.ndarray,
    *,
    config: FewShotConfig = FewShotConfig(),
    task: str = "task",
    fold: int = 0,
) -> pd.DataFrame:
    """Per-draw AUC and balanced accuracy of the logistic probe (C, balanced) on each
    embedding; ``embeddings`` maps a name to its (train, test) matrices (rows aligned with
    ``y_train`` / ``y_test``). Returns rows with :data:`ROW_COLUMNS`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ytr, yte = np.asarray(y_train), np.asarray(y_test)
    _check_parts(embeddings, len(ytr), len(yte))
    classes = sorted(set(ytr.tolist()) | set(yte.tolist()), key=str)
    lookup = {c: i for i, c in enumerate(classes)}
    ytr_i = np.array([lookup[v] for v in ytr.tolist()])
    yte_i = np.array([lookup[v] for v in yte.tolist()])
    rows = []
    for k in config.shots:
        for d in range(config.draws):
            idx = draw_shots(ytr_i, k, seed=config.seed, fold=fold, draw=d)
            if idx is None:
                break
            for name, (xtr, xte) in embeddings.items():
                clf = make_pipeline(
                    StandardScaler(),
                    LogisticRegression(C=config.C, class_weight="balanced", max_iter=5000),
                )
                clf.fit(xtr[idx], ytr_i[idx])
                probs = np.zeros((len(yte_i), len(classes)))
                probs[:, clf.classes_] = clf.predict_proba(xte)
                out = classification_metrics(yte_i, probs, classes=list(range(len(classes))))
                for metric, value in out.items():
                    rows.append((name, task, fold, k, d, len(idx), metric, float(value)))
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def few_shot_survival(
    embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    time_train: np.ndarray,
    event_train: np.ndarray,
    time_test: np.ndarray,
    event_test: np.ndarray,
    *,
    config: FewShotConfig = FewShotConfig(),
    task: str = "survival",
    fold: int = 0,
) -> pd.DataFrame:
    """Per-draw C-index (Harrell) of the elastic-net Cox probe: k events and k censored
    patients per draw, the penalty chosen on half of each stratum, refitted on the draw."""
    from oncoslide.survival.coxnet import fit_select_alpha
    from oncoslide.survival.metrics import concordance_index_censored

    ttr, etr = np.asarray(time_train, float), np.asarray(event_train).astype(bool)
    tte, ete = np.asarray(time_test, float), np.asarray(event_test).astype(bool)
    _check_parts(embeddings, len(ttr), len(tte))
    rows = []
    for k in config.shots:
        if k < 2:
            continue  # one event and one censored patient cannot be split into fit + validation
        for d in range(config.draws):
            idx = draw_shots(etr, k, seed=config.seed, fold=fold, draw=d)
            if idx is None:
                break
            # validation: every other patient of each stratum (deterministic given the draw)
            val_mask = np.zeros(len(idx), bool)
            for stratum in (False, True):
                pos = np.flatnonzero(etr[idx] == stratum)
                val_mask[pos[1::2]] = True
            fit_i, val_i = idx[~val_mask], idx[val_mask]
            for name, (xtr, xte) in embeddings.items():
                cox, _, _ = fit_select_alpha(
                    xtr[fit_i],
                    ttr[fit_i],
                    etr[fit_i],
                    xtr[val_i],
                    ttr[val_i],
                    etr[val_i],
                    l1_ratio=config.l1_ratio,
                    n_alphas=config.n_alphas,
                )
                risk = np.asarray(cox.predict(xte), dtype=np.float64)
                c = concordance_index_censored(ete, tte, risk)[0]
                rows.append((name, task, fold, k, d, len(idx), "c_index", float(c)))
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def summarise_few_shot(rows: pd.DataFrame, interval: float = 0.95) -> pd.DataFrame:
    """Per (embedding, task, metric, k): mean, sd, the central ``interval`` of the draws
    (``lo``, ``hi``: what one draw of k patients may give) and the number of draws."""
    if rows.empty:
        raise ConfigError("no few-shot rows to summarise")
    q = (1 - interval) / 2
    grouped = rows.groupby(["embedding", "task", "metric", "k"], sort=True)["value"]
    out = grouped.agg(
        mean="mean",
        sd="std",
        lo=lambda v: float(np.nanquantile(v, q)),
        hi=lambda v: float(np.nanquantile(v, 1 - q)),
        n="count",
    )
    return out.reset_index()


def compare_few_shot(rows: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Paired comparison of embeddings ``a`` and ``b`` per (task, metric, k) over the same
    draws: mean difference a - b, share of draws a wins, and the two-sided Wilcoxon
    signed-rank p-value of the per-draw differences."""
    keys = ["task", "metric", "k", "fold", "draw"]
    left = rows[rows["embedding"] == a].set_index(keys)["value"]
    right = rows[rows["embedding"] == b].set_index(keys)["value"]
    both = pd.concat({"a": left, "b": right}, axis=1, join="inner").dropna()
    if both.empty:
        raise ConfigError(f"no paired few-shot draws of {a!r} and {b!r}")
    both["diff"] = both["a"] - both["b"]
    out = []
    for (task, metric, k), grp in both.groupby(level=["task", "metric", "k"], sort=True):
        diff = grp["diff"].to_numpy()
        p = float("nan")
        if len(diff) >= 2 and np.any(diff != 0):
            p = float(stats.wilcoxon(diff, zero_method="zsplit").pvalue)
        out.append(
            {
                "task": task,
                "metric": metric,
                "k": int(k),
                "a": a,
                "b": b,
                "mean_a": float(grp["a"].mean()),
                "mean_b": float(grp["b"].mean()),
                "diff": float(diff.mean()),
                "win_share": float(np.mean(diff > 0)),
                "p_wilcoxon": p,
                "n": len(diff),
            }
        )
    return pd.DataFrame(out)


def few_shot_figure(summary: pd.DataFrame, metric: str | Mapping[str, str] = "auc") -> Figure:
    """Curves of the mean metric against k (log scale) with the draws' interval shaded, one
    panel per task, one line per embedding. ``metric`` may map task -> metric."""
    tasks = list(dict.fromkeys(summary["task"]))
    if not tasks:
        raise ConfigError("no few-shot summary rows to plot")
    fig = Figure(figsize=(4.0 * len(tasks), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        m = metric.get(task, "auc") if isinstance(metric, Mapping) else metric
        part = summary[(summary["task"] == task) & (summary["metric"] == m)]
        if part.empty:  # e.g. survival: its one metric
            part = summary[summary["task"] == task]
            m = str(part["metric"].iloc[0])
        for name, grp in part.groupby("embedding", sort=True):
            grp = grp.sort_values("k")
            line = ax.plot(grp["k"], grp["mean"], marker="o", label=str(name))[0]
            ax.fill_between(grp["k"], grp["lo"], grp["hi"], alpha=0.2, color=line.get_color())
        ax.set_xscale("log", base=2)
        ks = sorted(part["k"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("labelled patients per class (k)")
        ax.set_ylabel(m)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_few_shot(
    rows: pd.DataFrame,
    out: PathLike,
    *,
    metric: str | Mapping[str, str] = "auc",
    interval: float = 0.95,
) -> dict[str, Path]:
    """Write ``fewshot_draws.csv`` (per draw), ``fewshot_summary.csv`` and
    ``fewshot_curves.png`` into ``out`` (atomically); returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise_few_shot(rows, interval)
    paths = {
        "draws": folder / "fewshot_draws.csv",
        "summary": folder / "fewshot_summary.csv",
        "figure": folder / "fewshot_curves.png",
    }
    write_table(paths["draws"], rows)
    write_table(paths["summary"], summary)
    fig = few_shot_figure(summary, metric)
    with atomic_path(paths["figure"], suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return paths


__all__ = [
    "ROW_COLUMNS",
    "FewShotConfig",
    "compare_few_shot",
    "draw_shots",
    "few_shot_classification",
    "few_shot_figure",
    "few_shot_survival",
    "summarise_few_shot",
    "write_few_shot",
]
