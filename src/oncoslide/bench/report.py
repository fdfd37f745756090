"""``oncoslide bench leaderboard``: statistics over a benchmark folder, then the static page.

Reads the results store (only the cells of the benchmark's current plan, so entries removed
from the spec drop out), scores every task (bootstrap intervals over patients and seeds, seed spread),
compares every entry with the task's best (paired bootstrap), ranks the entries across tasks, and
renders the page and its CSVs (:mod:`oncoslide.bench.leaderboard`): the scores, each task's test
predictions (``predictions/<task>.csv`` beside the page) and, for classification tasks, the
points of the ROC curves and reliability bins drawn on the page (``curves/``). Within a task, estimates,
intervals, ranks and comparisons all use the test patients common to every entry of the task
(:func:`oncoslide.bench.stats.common_rows`); each entry's own and used patient counts are shown.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from oncoslide.bench.leaderboard import LeaderboardData, render_leaderboard
from oncoslide.bench.stats import (
    TaskInfo,
    TaskScores,
    common_rows,
    entry_name,
    fold_metric_summary,
    paired_comparison,
    rank_entries,
    task_scores,
)
from oncoslide.bench.store import ResultStore
from oncoslide.errors import ConfigError

SECONDARY_PREFIX = "mean:"


@dataclass
class Leaderboard:
    """The computed leaderboard: its tables and where the page and CSV were written."""

    data: LeaderboardData
    # task, entry, best, diff, lower, upper, p_value, n_patients (the common patients)
    comparisons: pd.DataFrame
    scores: list[TaskScores]
    html_path: Path
    csv_path: Path


def build_leaderboard(
    folder: str | os.PathLike[str],
    *,
    html: str | os.PathLike[str] | None = None,
    csv: str | os.PathLike[str] | None = None,
    n_boot: int | None = None,
    seed: int = 0,
) -> Leaderboard:
    """Compute the statistics of a benchmark folder and write its leaderboard page."""
    folder = Path(folder)
    if not (folder / "results.sqlite").exists():
        raise ConfigError(f"{folder} holds no benchmark results (results.sqlite); run bench run")
    with ResultStore.in_dir(folder) as store:
        spec = store.get_meta("spec") or {}
        tasks = store.get_meta("tasks") or []
        plan = set(store.get_meta("plan") or [])
        done = store.done_keys()
        metrics = store.metrics()
        by_task = {t["task"]: store.predictions(task=t["task"]) for t in tasks}
    if not (plan & done):
        raise ConfigError(f"{folder}: no finished cell of the current plan; run bench run first")
    n_boot = int(n_boot or spec.get("n_boot", 1000))
    metrics = metrics[metrics["cell_key"].isin(plan)]

    all_scores, comparisons, predictions, rows = [], [], [], []
    for t in tasks:
        preds = by_task[t["task"]]
        preds = preds[preds["cell_key"].isin(plan)]
        if preds.empty:
            continue
        outputs = [c for c in preds.columns if c == "risk" or c.startswith("prob_")]
        preds = preds.drop(columns=[c for c in outputs if preds[c].isna().all()])
        info = TaskInfo(t["task"], t["kind"], tuple(t.get("classes") or ()))
        scores = task_scores(preds, info, n_boot=n_boot, seed=seed)
        all_scores.append(scores)
        comparisons += _versus_best(
            common_rows(preds, info), info, scores, n_boot=n_boot, seed=seed
        )
        table = scores.table.assign(kind=t["kind"])
        rows.append(table)
        predictions.append(preds)
    if not rows:
        raise ConfigError(f"{folder}: no predictions of the current plan's tasks")
    score_table = _with_secondary(pd.concat(rows, ignore_index=True), metrics)
    # the primary metric's fold mean is the estimate itself: do not show it twice
    for metric in score_table["metric"].unique():
        col = f"{SECONDARY_PREFIX}{metric}"
        if col in score_table.columns:
            same = score_table["metric"] == metric
            score_table.loc[same, col] = np.nan
    comparison_table = pd.DataFrame(
        comparisons,
        columns=["task", "entry", "best", "diff", "lower", "upper", "p_value", "n_patients"],
    )
    score_table = _with_comparisons(score_table, comparison_table)
    ranking = rank_entries(all_scores)
    notes = _notes(spec, tasks, plan, done, folder) + _no_common_notes(all_scores)
    data = LeaderboardData(
        title=f"oncoslide benchmark · {spec.get('name', folder.name)}",
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        ranking=ranking,
        scores=score_table,
        tasks=_task_table(tasks, [s.table["task"].iloc[0] for s in all_scores if len(s.table)]),
        predictions=pd.concat(predictions, ignore_index=True),
        notes=notes,
    )
    html_path = Path(html) if html is not None else folder / "index.html"
    csv_path = Path(csv) if csv is not None else html_path.with_suffix(".csv")
    render_leaderboard(data, html_path, csv_path=csv_path)
    return Leaderboard(data, comparison_table, all_scores, html_path, csv_path)


def _versus_best(
    preds: pd.DataFrame, info: TaskInfo, scores: TaskScores, *, n_boot: int, seed: int
) -> list[dict[str, object]]:
    """Every entry against the task's best entry: ``diff`` is the entry's metric minus the best
    entry's (so <= 0), with its paired-bootstrap interval. ``preds`` holds the rows at the
    patients common to every entry of the task (:func:`common_rows`), so ``diff`` is the
    difference of the two entries' estimates in the scores table."""
    table = scores.table.dropna(subset=["estimate"])
    if len(table) < 2:
        return []
    best = table.sort_values(["estimate", "feature_set", "model"], ascending=[False, True, True])
    top = (str(best["feature_set"].iloc[0]), str(best["model"].iloc[0]))
    out = []
    for fs, model in zip(best["feature_set"].iloc[1:], best["model"].iloc[1:], strict=True):
        other = (str(fs), str(model))
        cmp = paired_comparison(preds, info, other, top, n_boot=n_boot, seed=seed)
        out.append(
            {
                "task": info.name,
                "entry": entry_name(*other),
                "best": entry_name(*top),
                "diff": cmp.diff,
                "lower": cmp.lower,
                "upper": cmp.upper,
                "p_value": cmp.p_value,
                "n_patients": cmp.n_patients,
            }
        )
    return out


def _with_secondary(scores: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    if metrics.empty:
        return scores
    summary = fold_metric_summary(metrics)
    wide = summary.pivot_table(
        index=["task", "feature_set", "model"], columns="metric", values="mean"
    )
    wide.columns = [f"{SECONDARY_PREFIX}{c}" for c in wide.columns]
    return scores.merge(wide.reset_index(), on=["task", "feature_set", "model"], how="left")


def _with_comparisons(scores: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """Add the paired comparison with the task's best (diff and p) as score columns."""
    entries = [
        entry_name(f, m) for f, m in zip(scores["feature_set"], scores["model"], strict=True)
    ]
    scores = scores.assign(entry=entries)
    cmp = comparisons.rename(columns={"diff": "diff_vs_best", "p_value": "p_vs_best"})[
        ["task", "entry", "diff_vs_best", "p_vs_best"]
    ]
    merged = scores.merge(cmp, on=["task", "entry"], how="left")
    return merged.drop(columns=["entry"])


def _task_table(tasks: list[dict[str, object]], scored: list[str]) -> pd.DataFrame:
    rows = [
        {
            "task": t["task"],
            "kind": t["kind"],
            "metric": t["metric"],
            "n_patients": t["n_patients"],
            "n_events": np.nan if t.get("n_events") is None else t["n_events"],
            "split": t["split"],
            "excluded": t["excluded"],
        }
        for t in tasks
        if t["task"] in scored
    ]
    return pd.DataFrame(rows)


def _notes(
    spec: dict[str, object],
    tasks: list[dict[str, object]],
    plan: set[str],
    done: set[str],
    folder: Path,
) -> list[str]:
    notes = []
    missing = len(plan - done)
    if missing:
        notes.append(
            f"{missing} of {len(plan)} planned cells have no result yet (rerun bench run): "
            "these results are partial"
        )
    else:
        notes.append(f"all {len(plan)} planned cells finished")
    if (folder / "failures.csv").exists():
        notes.append("some cells failed in the last run: see failures.csv")
    notes.append(
        "within a task every entry is scored, ranked and compared on the test patients common "
        "to all its entries (per seed): 'Patients' counts an entry's own test patients, "
        "'Used' the common ones"
    )
    notes.append(
        "intervals: 95% bootstrap over patients (and over seeds, when there are several) of "
        "the per-fold metric averaged over folds and seeds; 'Δ vs best': the entry minus the "
        "task's best entry on the same patients, with a paired-bootstrap p-value"
    )
    return notes


def _no_common_notes(scores: list[TaskScores]) -> list[str]:
    """A note for every task whose entries have no test patient in common (none is ranked)."""
    notes = []
    for s in scores:
        table = s.table
        if len(table) > 1 and (table["n_used"] == 0).all():
            notes.append(
                f"task {table['task'].iloc[0]!r}: its entries have no test patient in common, "
                "so none of them is scored or ranked there (see the task's section)"
            )
    return notes


def print_leaderboard(board: Leaderboard, console: Console) -> None:
    """The ranking and each task's estimates on the terminal."""
    ranking = board.data.ranking
    table = Table(title="overall ranking (mean rank over tasks)")
    for col in ("#", "entry", "protocol", "mean rank", "spread"):
        table.add_column(col, justify="left" if col in ("entry", "protocol") else "right")
    for i, row in enumerate(ranking.itertuples(index=False), start=1):
        table.add_row(
            str(i),
            escape(entry_name(str(row.feature_set), str(row.model))),
            escape(str(row.protocol)),
            f"{row.mean_rank:.2f}",
            f"[{row.rank_lo:.1f}, {row.rank_hi:.1f}]",
        )
    console.print(table)
    scores = board.data.scores
    per_task = Table(title="per task: estimate [95% CI]")
    per_task.add_column("entry")
    tasks = list(dict.fromkeys(scores["task"]))
    for t in tasks:
        metric = scores.loc[scores["task"] == t, "metric"].iloc[0]
        per_task.add_column(escape(f"{t} ({metric})"), justify="right")
    for row in ranking.itertuples(index=False):
        cells = []
        for t in tasks:
            sel = scores[
                (scores["task"] == t)
                & (scores["feature_set"] == row.feature_set)
                & (scores["model"] == row.model)
            ]
            if sel.empty or not np.isfinite(sel["estimate"].iloc[0]):
                cells.append("-")
            else:
                r = sel.iloc[0]
                cells.append(f"{r['estimate']:.3f} [{r['lower']:.2f}, {r['upper']:.2f}]")
        per_task.add_row(escape(entry_name(str(row.feature_set), str(row.model))), *cells)
    console.print(per_task)


__all__ = ["Leaderboard", "build_leaderboard", "print_leaderboard"]
