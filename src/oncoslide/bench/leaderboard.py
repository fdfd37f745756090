"""The benchmark's static leaderboard: one self-contained HTML page plus tidy CSVs.

``render_leaderboard(data, "bench/leaderboard.html")`` writes, each file atomically:

- ``leaderboard.html``: everything inline (CSS, a small vanilla-JS script, images as base64 PNG
  data URIs), so it opens from ``file://`` with no server and loads nothing from the network (a
  Content-Security-Policy forbids it). Sections, top to bottom:

  * **header** (``header#top``): the title, when it was generated, the notes (``ul.notes``) and
    a table of contents linking to every task.
  * **overall ranking** (``section#overall``): ``table#ranking``, one row per entry (feature
    set · model, ``tr[data-entry]``) with its protocol, mean rank over tasks with its
    [lo, hi] spread, the rank standard deviation, the number of tasks and the entry's rank on
    each task. Clicking a column header (``th[data-key]``) sorts the rows by that column,
    ascending then descending (numbers compare as numbers, missing values always last); the
    values compared are the cells' ``data-sort`` attributes. A *Download CSV* button
    (``button#download-csv``) saves the ranking table in its current order (full-precision
    values, built in the page as a Blob); a link (``a#csv-link``) points to the scores CSV.
  * **heat map** (``section#heatmap``): ``img.heatmap``, the primary-metric estimate of every
    entry (columns, best mean rank first) on every task (rows).
  * **one section per task** (``section.task[data-task=<name>]``): kind, metric, numbers of
    patients and events, the split (``p.task-meta``); the exclusion report
    (``p.exclusions``); when the scores have ``n_used``, how many test patients common to all
    entries the task's estimates use (``p.common-patients``) and, for entries without any
    patient in common with the others, their ``note`` (``p.no-common``); a sortable table of
    entries (``table.entries``, best estimate first) with the estimate and its 95% CI as
    ``0.742 [0.70, 0.79]``, the secondary metrics, the paired comparison with the best entry,
    the number of patients used (``n_used``, when present) and the entry's own number of test
    patients (``n_patients``, last). Survival tasks add the Kaplan-Meier curves of the best
    entry (``img.km.km-best``): its first seed's test patients split into high / low risk at
    the median predicted risk of their fold's training part (``risk_threshold``; predictions
    stored without one fall back to the median of their own test fold, and the caption says
    which), with the log-rank p-value; then small curves for every entry
    (``img.km.km-entry``). Classification tasks add one figure per feature set
    (``img.roc[data-feature-set]``, in ``div.roc-grid``, explained by ``p.roc-about``): the ROC
    curve of each model on it, averaged over its (seed, fold) test parts so that its area is the
    entry's estimate (``data-auc``: model -> AUC), beside a reliability diagram (10 equal-width
    bins of the pooled test probabilities) with its ECE and Brier score; see
    :func:`oncoslide.report.plots.mean_roc_curve` and
    :func:`~oncoslide.report.plots.calibration_bins`. Every task with predictions links to its
    CSVs (``p.task-files``).

- ``leaderboard.csv`` (``csv_path``; by default the HTML path with suffix ``.csv``): the tidy
  scores table, one row per task x entry (task, kind, metric, feature_set, model, protocol,
  estimate, lower, upper, n_patients, and whatever else the scores hold: from
  :mod:`oncoslide.bench.report` also n_used, note, the paired comparison ``diff_vs_best`` /
  ``p_vs_best`` and secondary ``mean:<metric>`` columns).

- Beside the page, per task with predictions: ``predictions/<task>.csv``, its test predictions
  (one row per entry, seed and test patient: task, feature_set, model, protocol, seed, fold,
  patient_id, the targets (time, event or label), the outputs (risk, risk_threshold or
  prob_<class>) and the store's cell_key); for classification tasks also
  ``curves/<task>-roc.csv`` (task, feature_set, model, point, fpr, tpr: the drawn ROC vertices
  in order) and ``curves/<task>-calibration.csv`` (task, feature_set, model, bin, lower, upper,
  n, mean_predicted, observed, target, ece, brier). The curves use the test patients common to
  all entries of the task, as the statistics do; the prediction CSV holds every prediction.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from oncoslide import _io
from oncoslide.bench.stats import RANKING_COLUMNS, TaskInfo, common_rows, entry_name
from oncoslide.errors import ConfigError, OncoslideError
from oncoslide.report.plots import (
    CALIBRATION_BINS,
    ClassifierCurves,
    calibration_bins,
    classification_figure,
    figure_png_base64,
    heatmap_figure,
    km_figure,
    mean_roc_curve,
    risk_groups,
)

SCORE_COLUMNS = (
    "task",
    "kind",
    "metric",
    "feature_set",
    "model",
    "protocol",
    "estimate",
    "lower",
    "upper",
    "n_patients",
)
TASK_COLUMNS = ("task", "kind", "metric", "n_patients", "n_events", "split", "excluded")
KM_PREDICTION_COLUMNS = ("task", "feature_set", "model", "seed", "fold", "patient_id", "time")
KINDS = ("survival", "binary", "multiclass")
RANK_PREFIX = "rank:"
SECONDARY_PREFIX = "mean:"

_KM_BEST_DPI = 100
_KM_BEST_SIZE = (5.6, 4.4)
_KM_ENTRY_DPI = 72
_KM_ENTRY_SIZE = (4.2, 3.6)  # inches: thumbnails with legible text
_ROC_DPI = 72
_ROC_SIZE = (8.4, 3.9)  # inches: ROC and reliability side by side
# folders beside the page: per-task test predictions, and the points the curves are drawn from
PREDICTIONS_DIR, CURVES_DIR = "predictions", "curves"
# the prediction CSV's leading columns; targets and outputs follow, then the store's cell key
_PREDICTION_ORDER = (
    "task",
    "feature_set",
    "model",
    "protocol",
    "seed",
    "fold",
    "patient_id",
    "time",
    "event",
    "label",
)
_HEATMAP_DPI = 100


def _entry_names(frame: pd.DataFrame) -> list[str]:
    """The entry display name of every row of a frame with feature_set and model columns."""
    pairs = zip(frame["feature_set"], frame["model"], strict=True)
    return [entry_name(str(f), str(m)) for f, m in pairs]


@dataclass(frozen=True, kw_only=True)
class LeaderboardData:
    """Everything the leaderboard page shows; validated on construction.

    ranking: one row per entry (feature_set, model, protocol, mean_rank, rank_sd, rank_lo,
    rank_hi, n_tasks, and ``rank:<task>`` columns). scores: one row per task x entry (task, kind,
    metric, feature_set, model, protocol, estimate, lower, upper, n_patients (the entry's own
    test patients), optional n_used (the patients common to all entries of the task that the
    estimate uses), note (why an entry has no estimate), ``diff_vs_best``, ``p_vs_best`` and
    ``mean:<metric>`` columns). tasks: one row per task (task, kind, metric, n_patients, n_events,
    split, excluded). predictions: the prediction frame of all tasks (for Kaplan-Meier curves, ROC
    curves, reliability bins and the per-task prediction CSVs; may be empty, then none of them
    is drawn or written). Raises :class:`ConfigError` listing every problem.
    """

    title: str
    generated: str
    ranking: pd.DataFrame
    scores: pd.DataFrame
    tasks: pd.DataFrame
    predictions: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        problems = _data_problems(self)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            n = len(problems)
            raise ConfigError(f"leaderboard data has {n} problem{'s' if n != 1 else ''}:\n{lines}")


# ------------------------------------------------------------------------------ validation


def _missing(frame: pd.DataFrame, columns: Iterable[str], name: str) -> list[str]:
    absent = [c for c in columns if c not in frame.columns]
    return [f"{name} lacks columns: {', '.join(absent)}"] if absent else []


def _duplicates(frame: pd.DataFrame, keys: list[str], name: str) -> list[str]:
    if not set(keys) <= set(frame.columns):
        return []
    dup = frame[frame.duplicated(keys, keep=False)]
    if dup.empty:
        return []
    shown = sorted({" / ".join(map(str, row)) for row in dup[keys].itertuples(index=False)})
    return [f"{name} has duplicate rows for: {', '.join(shown[:5])}"]


def _data_problems(data: LeaderboardData) -> list[str]:
    """Every contract violation of the leaderboard inputs, all at once."""
    frames = {
        "ranking": data.ranking,
        "scores": data.scores,
        "tasks": data.tasks,
        "predictions": data.predictions,
    }
    problems = [
        f"{n} is not a DataFrame" for n, f in frames.items() if not isinstance(f, pd.DataFrame)
    ]
    if problems:
        return problems
    problems += _missing(data.ranking, RANKING_COLUMNS, "ranking")
    problems += _missing(data.scores, SCORE_COLUMNS, "scores")
    problems += _missing(data.tasks, TASK_COLUMNS, "tasks")
    problems += _duplicates(data.ranking, ["feature_set", "model"], "ranking")
    problems += _duplicates(data.scores, ["task", "feature_set", "model"], "scores")
    problems += _duplicates(data.tasks, ["task"], "tasks")
    if "kind" in data.tasks.columns:
        bad = sorted(set(data.tasks["kind"].astype(str)) - set(KINDS))
        if bad:
            problems.append(
                f"tasks has unknown kinds: {', '.join(bad)} (known: {', '.join(KINDS)})"
            )
    if "task" in data.scores.columns and "task" in data.tasks.columns:
        unknown = sorted(set(data.scores["task"].astype(str)) - set(data.tasks["task"].astype(str)))
        if unknown:
            problems.append(f"scores name tasks absent from the tasks table: {', '.join(unknown)}")
    if not data.predictions.empty:
        problems += _missing(data.predictions, KM_PREDICTION_COLUMNS, "predictions")
        if "kind" in data.tasks.columns and (data.tasks["kind"] == "survival").any():
            if "event" not in data.predictions.columns or "risk" not in data.predictions.columns:
                problems.append("predictions of survival tasks need event and risk columns")
        kinds = data.tasks["kind"] if "kind" in data.tasks.columns else pd.Series(dtype=object)
        if kinds.isin(("binary", "multiclass")).any():
            probs = [c for c in data.predictions.columns if str(c).startswith("prob_")]
            if "label" not in data.predictions.columns or not probs:
                problems.append(
                    "predictions of classification tasks need label and prob_<class> columns"
                )
    return problems


# ------------------------------------------------------------------------------ formatting


def _e(value: object) -> str:
    """Escape text for HTML content and attribute values alike."""
    return html.escape(str(value), quote=True)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _num(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _short(value: object) -> str:
    """A rank-like number without trailing zeros: 1.0 -> "1", 2.50 -> "2.5"."""
    v = _num(value)
    return "–" if math.isnan(v) else f"{v:.2f}".rstrip("0").rstrip(".")


def _fixed(value: object, digits: int = 3) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _count(value: object) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else str(round(v))


def format_estimate(estimate: object, lower: object, upper: object) -> str:
    """An estimate with its 95% CI: ``0.742 [0.70, 0.79]`` (the CI is left out when unknown)."""
    est, lo, hi = _num(estimate), _num(lower), _num(upper)
    if math.isnan(est):
        return "–"
    if math.isnan(lo) or math.isnan(hi):
        return f"{est:.3f}"
    return f"{est:.3f} [{lo:.2f}, {hi:.2f}]"


def _sort_key(value: object) -> str:
    """The ``data-sort`` text of a numeric cell: full precision, empty when missing."""
    v = _num(value)
    return "" if math.isnan(v) else repr(v)


def _json_value(value: object) -> Any:
    """A plain JSON value (NaN becomes null: JSON has no NaN)."""
    if _is_missing(value) or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)


def _script_json(obj: object) -> str:
    """JSON safe to inline in a <script> element (no "</script>" or entity can break out)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class _Column:
    key: str
    label: str
    numeric: bool


def _th(column: _Column) -> str:
    kind = "num" if column.numeric else "text"
    return (
        f'<th scope="col" tabindex="0" aria-sort="none" data-key="{_e(column.key)}" '
        f'data-type="{kind}">{_e(column.label)}</th>'
    )


def _td(text: str, sort: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<td{cls} data-sort="{_e(sort)}">{_e(text)}</td>'


def _text_td(value: object) -> str:
    return _td(str(value), str(value), "text")


def _table(
    attrs: str, columns: Sequence[_Column], rows: Iterable[tuple[str, Sequence[str]]]
) -> str:
    """A sortable table; each row is (tr attributes, rendered td cells)."""
    head = "".join(_th(c) for c in columns)
    body = "\n".join(f"<tr {tr}>{''.join(cells)}</tr>" for tr, cells in rows)
    return f"<table {attrs}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _rank_columns(ranking: pd.DataFrame) -> list[str]:
    return [c for c in ranking.columns if str(c).startswith(RANK_PREFIX)]


def _ordered_ranking(ranking: pd.DataFrame) -> pd.DataFrame:
    """Best (lowest) mean rank first; ties keep their given order."""
    key = pd.to_numeric(ranking["mean_rank"], errors="coerce")
    order = np.argsort(key.fillna(np.inf).to_numpy(), kind="stable")
    return ranking.iloc[order].reset_index(drop=True)


def _ranking_table(ranking: pd.DataFrame) -> str:
    rank_cols = _rank_columns(ranking)
    columns = [
        _Column("position", "#", True),
        _Column("entry", "Entry", False),
        _Column("feature_set", "Feature set", False),
        _Column("model", "Model", False),
        _Column("protocol", "Protocol", False),
        _Column("mean_rank", "Mean rank [lo, hi]", True),
        _Column("rank_sd", "Rank SD", True),
        _Column("n_tasks", "Tasks", True),
        *[_Column(c, c[len(RANK_PREFIX) :], True) for c in rank_cols],
    ]
    rows = []
    for i, row in ranking.iterrows():
        name = entry_name(row["feature_set"], row["model"])
        spread = (
            f"{_fixed(row['mean_rank'], 2)} [{_short(row['rank_lo'])}, {_short(row['rank_hi'])}]"
        )
        cells = [
            _td(str(int(i) + 1), str(int(i) + 1)),
            _td(name, name, "entry text"),
            _text_td(row["feature_set"]),
            _text_td(row["model"]),
            _text_td(row["protocol"]),
            _td(spread, _sort_key(row["mean_rank"])),
            _td(_fixed(row["rank_sd"], 2), _sort_key(row["rank_sd"])),
            _td(_count(row["n_tasks"]), _sort_key(row["n_tasks"])),
            *[_td(_short(row[c]), _sort_key(row[c])) for c in rank_cols],
        ]
        rows.append((f'data-index="{i}" data-entry="{_e(name)}"', cells))
    return _table('id="ranking" class="sortable ranking"', columns, rows)


def _ranking_payload(ranking: pd.DataFrame) -> dict[str, Any]:
    """The ranking's raw values, in ``data-index`` order, for the in-page CSV export."""
    columns = [*RANKING_COLUMNS, *_rank_columns(ranking)]
    rows = [[_json_value(v) for v in row] for row in ranking[columns].itertuples(index=False)]
    return {"columns": columns, "rows": rows}


def _secondary_columns(scores: pd.DataFrame) -> list[str]:
    """``mean:<metric>`` columns with at least one value in these rows."""
    return [
        c
        for c in scores.columns
        if str(c).startswith(SECONDARY_PREFIX)
        and pd.to_numeric(scores[c], errors="coerce").notna().any()
    ]


# optional columns: the paired bootstrap comparison of each entry with the task's best entry
COMPARISON_COLUMNS = (("diff_vs_best", "Δ vs best"), ("p_vs_best", "p vs best"))


def _comparison_columns(scores: pd.DataFrame) -> list[tuple[str, str]]:
    return [
        (c, label)
        for c, label in COMPARISON_COLUMNS
        if c in scores.columns and pd.to_numeric(scores[c], errors="coerce").notna().any()
    ]


def _comparison_text(column: str, value: object) -> str:
    if _is_missing(value):
        return "–"
    if column == "p_vs_best":
        p = _num(value)
        return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"
    return f"{_num(value):+.3f}"


def _order_by_estimate(scores: pd.DataFrame, ranking: pd.DataFrame) -> pd.DataFrame:
    """Best estimate first; ties (and missing estimates, last) follow the overall ranking."""
    position = {name: i for i, name in enumerate(_entry_names(ranking))}
    keyed = scores.assign(
        _est=pd.to_numeric(scores["estimate"], errors="coerce").fillna(-np.inf),
        _pos=[position.get(name, len(position)) for name in _entry_names(scores)],
    )
    keyed = keyed.sort_values(["_est", "_pos"], ascending=[False, True], kind="stable")
    return keyed.drop(columns=["_est", "_pos"]).reset_index(drop=True)


def _entries_table(task_index: int, metric: str, scores: pd.DataFrame) -> str:
    secondary = _secondary_columns(scores)
    used = "n_used" in scores.columns
    columns = [
        _Column("position", "#", True),
        _Column("entry", "Entry", False),
        _Column("protocol", "Protocol", False),
        _Column("estimate", f"{metric} [95% CI]", True),
        *[_Column(c, c[len(SECONDARY_PREFIX) :], True) for c in secondary],
        *[_Column(c, label, True) for c, label in _comparison_columns(scores)],
        *([_Column("n_used", "Used", True)] if used else []),
        _Column("n_patients", "Patients", True),
    ]
    rows = []
    for i, row in scores.iterrows():
        name = entry_name(row["feature_set"], row["model"])
        cells = [
            _td(str(int(i) + 1), str(int(i) + 1)),
            _td(name, name, "entry text"),
            _text_td(row["protocol"]),
            _td(
                format_estimate(row["estimate"], row["lower"], row["upper"]),
                _sort_key(row["estimate"]),
                "estimate",
            ),
            *[_td(_fixed(row[c]), _sort_key(row[c])) for c in secondary],
            *[
                _td(_comparison_text(c, row[c]), _sort_key(row[c]))
                for c, _ in _comparison_columns(scores)
            ],
            *([_td(_count(row["n_used"]), _sort_key(row["n_used"]))] if used else []),
            _td(_count(row["n_patients"]), _sort_key(row["n_patients"])),
        ]
        rows.append((f'data-entry="{_e(name)}"', cells))
    attrs = f'id="entries-{task_index}" class="sortable entries"'
    return _table(attrs, columns, rows)


# ------------------------------------------------------------------------------ figures


def _img(b64: str, css: str, alt: str, extra: str = "") -> str:
    return f'<img class="{css}" alt="{_e(alt)}" {extra}src="data:image/png;base64,{b64}">'


def _heatmap_section(data: LeaderboardData, ranking: pd.DataFrame) -> str:
    scores = data.scores
    if scores.empty:
        return '<section id="heatmap"><h2>Heat map</h2><p class="empty">No scores.</p></section>'
    names = scores.assign(entry=_entry_names(scores))
    matrix = names.pivot(index="task", columns="entry", values="estimate")
    ranked = _entry_names(ranking)
    entries = [e for e in ranked if e in matrix.columns] + sorted(set(matrix.columns) - set(ranked))
    tasks = [t for t in data.tasks["task"] if t in matrix.index]
    matrix = matrix.loc[tasks, entries]
    metrics = ", ".join(dict.fromkeys(data.tasks["metric"].astype(str)))
    fig = heatmap_figure(matrix, f"Primary metric per task ({metrics})")
    image = _img(figure_png_base64(fig, dpi=_HEATMAP_DPI), "heatmap", "heat map of estimates")
    return (
        '<section id="heatmap"><h2>Heat map</h2>\n'
        "<p>Primary-metric estimate of every entry (columns, best mean rank first) on every task.</p>\n"
        f"{image}\n</section>"
    )


def _entry_predictions(
    preds: pd.DataFrame, task: str, feature_set: str, model: str
) -> pd.DataFrame:
    """Test predictions of one entry on one task at its first (smallest) seed."""
    if preds.empty:
        return preds
    mask = (
        (preds["task"].astype(str) == str(task))
        & (preds["feature_set"].astype(str) == str(feature_set))
        & (preds["model"].astype(str) == str(model))
    )
    sub = preds[mask]
    if sub.empty:
        return sub
    return sub[sub["seed"] == sub["seed"].min()]


def _km_image(
    sub: pd.DataFrame, title: str, name: str, *, small: bool
) -> tuple[str, float, set[str]]:
    """A Kaplan-Meier ``<img>`` of one entry's predictions (a thumbnail when ``small``), its
    log-rank p-value and where its thresholds came from (``"train"``, ``"test"``)."""
    css, dpi = ("km km-entry", _KM_ENTRY_DPI) if small else ("km km-best", _KM_BEST_DPI)
    size = _KM_ENTRY_SIZE if small else _KM_BEST_SIZE
    groups = risk_groups(sub)
    fig, p_value = km_figure(groups, title, figsize=size)
    extra = f'data-entry="{_e(name)}" data-seed="{_e(sub["seed"].iloc[0])}" '
    image = _img(figure_png_base64(fig, dpi=dpi), css, f"Kaplan-Meier curves, {title}", extra)
    return image, p_value, set(groups["threshold_source"])


def _threshold_text(sources: set[str]) -> str:
    """How the risk groups of a Kaplan-Meier figure were formed."""
    train = (
        "High / low risk: above / at or below the median predicted risk of the training part "
        "of the patient's fold"
    )
    if sources == {"train"}:
        return train + "."
    test = "the median risk of the patient's own test fold"
    if sources == {"test"}:
        return (
            f"High / low risk: above / at or below {test} (these predictions were stored "
            "without a training threshold)."
        )
    return f"{train}, or {test} for folds stored without a training threshold."


def _p_text(p_value: float) -> str:
    return "n/a" if math.isnan(p_value) else f"{p_value:.2g}"


def _km_best(data: LeaderboardData, task: str, metric: str, best: pd.Series) -> str:
    """The best entry's Kaplan-Meier figure with its caption."""
    name = entry_name(best["feature_set"], best["model"])
    sub = _entry_predictions(data.predictions, task, best["feature_set"], best["model"])
    if sub.empty:
        return f'<p class="km-missing">No predictions for the best entry, {_e(name)}.</p>'
    image, p_value, sources = _km_image(sub, f"{task}: {name}", name, small=False)
    estimate = format_estimate(best["estimate"], best["lower"], best["upper"])
    return (
        f'<figure class="km-best">{image}<figcaption>Best entry by {_e(metric)}: '
        f"<strong>{_e(name)}</strong> ({_e(estimate)}), seed {_e(sub['seed'].iloc[0])}. "
        f"{_e(_threshold_text(sources))} Log-rank p = {_e(_p_text(p_value))}."
        "</figcaption></figure>"
    )


def _km_grid(data: LeaderboardData, task: str, scores: pd.DataFrame) -> str:
    """Small Kaplan-Meier figures of every entry with predictions (first seed each)."""
    figures = []
    for _, row in scores.iterrows():
        name = entry_name(row["feature_set"], row["model"])
        sub = _entry_predictions(data.predictions, task, row["feature_set"], row["model"])
        if sub.empty:
            continue
        image, p_value, _ = _km_image(sub, name, name, small=True)
        figures.append(
            f"<figure>{image}<figcaption>{_e(name)}: p = {_e(_p_text(p_value))}</figcaption></figure>"
        )
    if not figures:
        return ""
    return '<div class="km-grid">\n' + "\n".join(figures) + "\n</div>"


# ------------------------------------------------------------------------------ exports and ROC


@dataclass(frozen=True)
class _PanelSet:
    """The ROC / reliability figures of one classification task, one per feature set."""

    # feature set -> [(model, curves)], feature sets and models in the entries table's order
    panels: list[tuple[str, list[tuple[str, ClassifierCurves]]]]
    colours: dict[str, str]  # model -> colour, equal in every figure of the task
    classes: list[str]
    n_patients: int  # distinct patients common to all entries
    roc: pd.DataFrame  # the curves' vertices, tidy
    calibration: pd.DataFrame  # the reliability bins, tidy


@dataclass(frozen=True)
class _TaskExport:
    """What the page shows and writes for one task beyond its table."""

    predictions: pd.DataFrame
    files: dict[str, Path]  # "predictions", "roc", "calibration" -> path relative to the page
    curves: _PanelSet | None = None
    message: str = ""  # why a classification task has no curves


def _file_stems(tasks: Iterable[str]) -> dict[str, str]:
    """A distinct file-name stem per task (spec names are already safe; others are made so)."""
    stems: dict[str, str] = {}
    for task in tasks:
        stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(task)).lstrip(".") or "task"
        candidate, n = stem, 1
        while candidate.lower() in {v.lower() for v in stems.values()}:
            n += 1
            candidate = f"{stem}-{n}"
        stems[str(task)] = candidate
    return stems


def _task_rows(preds: pd.DataFrame, task: str) -> pd.DataFrame:
    """One task's prediction rows, tidy: the columns it uses only, in a fixed order."""
    rows = preds[preds["task"].astype(str) == task]
    rows = rows.dropna(axis=1, how="all")
    first = [c for c in _PREDICTION_ORDER if c in rows.columns]
    last = [c for c in ("cell_key",) if c in rows.columns]
    middle = [c for c in rows.columns if c not in first and c not in last]
    return rows[[*first, *middle, *last]].reset_index(drop=True)


def _classes(rows: pd.DataFrame) -> list[str]:
    """A classification task's classes: its ``prob_<class>`` columns (sorted, as stored)."""
    return sorted(str(c)[len("prob_") :] for c in rows.columns if str(c).startswith("prob_"))


def _task_curves(rows: pd.DataFrame, task: str, kind: str, scores: pd.DataFrame) -> _PanelSet:
    """ROC curves and reliability bins of every entry on the task's common patients.

    The rows are those the task's statistics use (:func:`common_rows`), so each averaged ROC
    curve's area is the entry's estimate in the table.
    """
    classes = _classes(rows)
    common = common_rows(rows, TaskInfo(task, kind, tuple(classes)))
    if common.empty:
        raise ConfigError("no test patient is common to all entries of the task")
    order = list(zip(scores["feature_set"].astype(str), scores["model"].astype(str), strict=True))
    present = set(zip(common["feature_set"].astype(str), common["model"].astype(str), strict=True))
    order = [e for e in order if e in present] + sorted(present - set(order))
    models = list(dict.fromkeys(m for _, m in order))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    panels: dict[str, list[tuple[str, ClassifierCurves]]] = {}
    roc_parts, cal_parts = [], []
    for fs, model in order:
        sub = common[
            (common["feature_set"].astype(str) == fs) & (common["model"].astype(str) == model)
        ]
        curves = ClassifierCurves(
            model, mean_roc_curve(sub, classes), calibration_bins(sub, classes)
        )
        panels.setdefault(fs, []).append((model, curves))
        ids = {"task": task, "feature_set": fs, "model": model}
        roc_parts.append(curves.roc.frame().assign(**ids))
        cal = curves.calibration
        cal_parts.append(cal.bins.assign(**ids, target=cal.target, ece=cal.ece, brier=cal.brier))
    ids_first = ["task", "feature_set", "model"]
    roc = pd.concat(roc_parts, ignore_index=True)
    calibration = pd.concat(cal_parts, ignore_index=True)
    return _PanelSet(
        panels=list(panels.items()),
        colours=colours,
        classes=classes,
        n_patients=int(common["patient_id"].nunique()),
        roc=roc[ids_first + [c for c in roc.columns if c not in ids_first]],
        calibration=calibration[ids_first + [c for c in calibration.columns if c not in ids_first]],
    )


def _exports(data: LeaderboardData, ranking: pd.DataFrame) -> dict[str, _TaskExport]:
    """Per task with predictions: its prediction CSV and, for classification, its curves."""
    if data.predictions.empty:
        return {}
    stems = _file_stems(data.tasks["task"].astype(str))
    out = {}
    for _, task in data.tasks.iterrows():
        name = str(task["task"])
        rows = _task_rows(data.predictions, name)
        if rows.empty:
            continue
        stem = stems[name]
        files = {"predictions": Path(PREDICTIONS_DIR) / f"{stem}.csv"}
        if task["kind"] == "survival":
            out[name] = _TaskExport(rows, files)
            continue
        scores = _order_by_estimate(data.scores[data.scores["task"].astype(str) == name], ranking)
        try:
            curves = _task_curves(rows, name, str(task["kind"]), scores)
        except OncoslideError as exc:  # the table still stands; the page says why no curves
            out[name] = _TaskExport(rows, files, message=str(exc))
            continue
        files["roc"] = Path(CURVES_DIR) / f"{stem}-roc.csv"
        files["calibration"] = Path(CURVES_DIR) / f"{stem}-calibration.csv"
        out[name] = _TaskExport(rows, files, curves)
    return out


def _href(path: Path) -> str:
    return quote(path.as_posix())


_FILE_LABELS = {
    "predictions": "test predictions",
    "roc": "ROC curve points",
    "calibration": "reliability bins",
}


def _files_line(export: _TaskExport | None) -> str:
    if export is None:
        return ""
    links = " · ".join(
        f'<a class="{_e(kind)}-link" href="{_e(_href(path))}">{_e(_FILE_LABELS[kind])} (CSV)</a>'
        for kind, path in export.files.items()
    )
    return f'<p class="task-files">{links}</p>'


def _roc_about(curves: _PanelSet, kind: str) -> str:
    if kind == "binary":
        roc = f"positive class {curves.classes[-1]}"
        binned = f"the predicted probability of {curves.classes[-1]}"
        observed = f"the share of {curves.classes[-1]}"
    else:
        roc = "macro one-vs-rest over the classes present in each test part"
        binned = "the top-label confidence (largest probability)"
        observed = "the share whose most probable class is right"
    return (
        f"ROC curves (left) and reliability diagrams (right) of every entry, one figure per "
        f"feature set, on the {curves.n_patients} test patients common to all entries. "
        f"ROC ({roc}): each seed and fold is scored by its own model, so a curve is drawn "
        "within each (seed, fold) and the curves are averaged; its area, the AUC in the legend, "
        "is the mean per-fold AUC, the estimate in the table. Reliability: the test predictions "
        f"of all folds and seeds pooled, {CALIBRATION_BINS} equal-width bins of {binned} against "
        f"{observed}; ECE is the gap between the two averaged over bins weighted by their "
        "numbers of patients, Brier the mean squared error of the probabilities."
    )


def _roc_section(export: _TaskExport | None, kind: str) -> str:
    """The ROC / reliability figures of a classification task (or why there are none)."""
    if export is None:
        return '<p class="roc-missing">No predictions: no ROC curves.</p>'
    if export.curves is None:
        return f'<p class="roc-missing">No ROC curves: {_e(export.message)}.</p>'
    curves = export.curves
    figures = []
    for fs, entries in curves.panels:
        fig = classification_figure(
            [c for _, c in entries],
            f"feature set {fs}",
            figsize=_ROC_SIZE,
            colours=[curves.colours[m] for m, _ in entries],
        )
        aucs = {m: _json_value(c.roc.auc) for m, c in entries}
        extra = f'data-feature-set="{_e(fs)}" data-auc="{_e(json.dumps(aucs))}" '
        image = _img(
            figure_png_base64(fig, dpi=_ROC_DPI),
            "roc",
            f"ROC curves and reliability diagram, feature set {fs}",
            extra,
        )
        caption = "; ".join(
            f"{entry_name(fs, m)}: AUC {_fixed(c.roc.auc)}, ECE {_fixed(c.calibration.ece)}, "
            f"Brier {_fixed(c.calibration.brier)}"
            for m, c in entries
        )
        figures.append(f"<figure>{image}<figcaption>{_e(caption)}</figcaption></figure>")
    return (
        f'<p class="roc-about">{_e(_roc_about(curves, kind))}</p>\n'
        '<div class="roc-grid">\n' + "\n".join(figures) + "\n</div>"
    )


def _write_exports(exports: dict[str, _TaskExport], folder: Path) -> None:
    """Each task's prediction CSV and curve CSVs, each written atomically."""
    for export in exports.values():
        _io.write_table(folder / export.files["predictions"], export.predictions)
        if export.curves is not None:
            _io.write_table(folder / export.files["roc"], export.curves.roc)
            _io.write_table(folder / export.files["calibration"], export.curves.calibration)


# ------------------------------------------------------------------------------ sections


def _task_meta(task: pd.Series) -> str:
    bits = [str(task["kind"]), f"metric {task['metric']}", f"{_count(task['n_patients'])} patients"]
    if not math.isnan(_num(task["n_events"])):
        bits.append(f"{_count(task['n_events'])} events")
    if str(task["split"]).strip():
        bits.append(f"split: {task['split']}")
    return " · ".join(bits)


def _common_patients(scores: pd.DataFrame) -> list[str]:
    """The paragraphs on the patients a task's entries are scored on (needs ``n_used``)."""
    if "n_used" not in scores.columns or scores.empty:
        return []
    used = pd.to_numeric(scores["n_used"], errors="coerce").fillna(0)
    parts = []
    if (used > 0).any():
        n = len(scores)
        text = (
            f"Estimates, intervals, ranks and comparisons use the {_count(used.max())} test "
            f"patients common to all {n} {'entries' if n != 1 else 'entry'} (per seed, "
            "column Used); Patients counts each entry's own test patients."
        )
        parts.append(f'<p class="common-patients">{_e(text)}</p>')
    notes = scores["note"] if "note" in scores.columns else pd.Series(dtype=object)
    lines = [
        f"{entry_name(fs, model)}: {note}"
        for fs, model, note in zip(scores["feature_set"], scores["model"], notes, strict=False)
        if not _is_missing(note) and str(note).strip()
    ]
    if lines:
        parts.append(f'<p class="no-common">{_e("; ".join(lines))}.</p>')
    return parts


def _task_section(
    index: int,
    task: pd.Series,
    data: LeaderboardData,
    ranking: pd.DataFrame,
    export: _TaskExport | None,
) -> str:
    name = str(task["task"])
    scores = _order_by_estimate(data.scores[data.scores["task"].astype(str) == name], ranking)
    excluded = "" if _is_missing(task["excluded"]) else str(task["excluded"]).strip()
    exclusions = f"Exclusions: {excluded}" if excluded else "No exclusions."
    parts = [
        f'<section class="task" id="task-{index}" data-task="{_e(name)}" data-kind="{_e(task["kind"])}">',
        f"<h3>{_e(name)}</h3>",
        f'<p class="task-meta">{_e(_task_meta(task))}</p>',
        f'<p class="exclusions">{_e(exclusions)}</p>',
        *_common_patients(scores),
    ]
    if scores.empty:
        parts.append('<p class="empty">No scores for this task.</p>')
    else:
        parts.append(_entries_table(index, str(task["metric"]), scores))
        parts.append(_files_line(export))
        if task["kind"] == "survival":
            parts.append(_km_best(data, name, str(task["metric"]), scores.iloc[0]))
            parts.append(_km_grid(data, name, scores))
        else:
            parts.append(_roc_section(export, str(task["kind"])))
    parts.append("</section>")
    return "\n".join(parts)


def _header(data: LeaderboardData, csv_href: str) -> str:
    notes = "".join(f"<li>{_e(n)}</li>" for n in data.notes)
    toc = "".join(
        f'<li><a href="#task-{i}">{_e(t)}</a></li>' for i, t in enumerate(data.tasks["task"])
    )
    return (
        f'<header id="top"><h1>{_e(data.title)}</h1>\n'
        f'<p class="generated">Generated {_e(data.generated)}</p>\n'
        + (f'<ul class="notes">{notes}</ul>\n' if notes else "")
        + f'<nav><a href="#overall">Overall ranking</a> · <a href="#heatmap">Heat map</a> · '
        f'<a id="csv-link" class="csv-link" href="{_e(csv_href)}">Scores (CSV)</a>'
        f'<ul class="toc">{toc}</ul></nav></header>'
    )


def _overall_section(ranking: pd.DataFrame, csv_name: str) -> str:
    return (
        '<section id="overall"><h2>Overall ranking</h2>\n'
        "<p>Mean rank of each entry over tasks (1 = best), with the range of its ranks. "
        "Click a column header to sort.</p>\n"
        f'<p><button type="button" id="download-csv" data-filename="{_e(csv_name)}">'
        "Download CSV</button> (the ranking table in its current order)</p>\n"
        f"{_ranking_table(ranking)}\n"
        f'<script type="application/json" id="ranking-data">{_script_json(_ranking_payload(ranking))}'
        "</script>\n</section>"
    )


def _page(
    data: LeaderboardData,
    csv_href: str,
    csv_name: str,
    ranking: pd.DataFrame,
    exports: dict[str, _TaskExport],
) -> str:
    tasks = "\n".join(
        _task_section(i, task, data, ranking, exports.get(str(task["task"])))
        for i, (_, task) in enumerate(data.tasks.iterrows())
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{_e(data.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{_header(data, csv_href)}\n<main>\n"
        f"{_overall_section(ranking, csv_name)}\n"
        f"{_heatmap_section(data, ranking)}\n"
        f'<section id="tasks"><h2>Tasks</h2>\n{tasks}\n</section>\n'
        f"</main>\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


def render_leaderboard(
    data: LeaderboardData,
    html_path: str | os.PathLike[str],
    *,
    csv_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the leaderboard page, its scores CSV and the per-task CSVs beside the page (each
    file atomically); return the HTML path.

    ``csv_path`` defaults to ``html_path`` with suffix ``.csv``. Beside the page go
    ``predictions/<task>.csv`` (every task with predictions) and, for classification tasks,
    ``curves/<task>-roc.csv`` and ``curves/<task>-calibration.csv``. The page links to all of
    them by relative addresses, so keep them together when moving them.
    """
    html_path = Path(html_path)
    csv_path = html_path.with_suffix(".csv") if csv_path is None else Path(csv_path)
    if csv_path.suffix.lower() != ".csv":
        raise ConfigError(f"the scores export must be a .csv file, got {csv_path}")
    if csv_path.resolve() == html_path.resolve():
        raise ConfigError(f"the CSV and HTML paths are the same file: {html_path}")
    relative = os.path.relpath(csv_path.resolve(), html_path.resolve().parent)
    csv_href = quote(Path(relative).as_posix())
    ranking = _ordered_ranking(data.ranking)
    exports = _exports(data, ranking)
    page = _page(data, csv_href, f"{html_path.stem}-ranking.csv", ranking, exports)
    # the page links to every CSV: write them first
    _write_exports(exports, html_path.parent)
    _io.write_table(csv_path, data.scores)
    with _io.atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return html_path


# ------------------------------------------------------------------------------ inline assets

# Nothing may be fetched: inline styles and scripts only, images only as data URIs.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em;
  color: #222; }
h1 { margin-bottom: 0.2em; } .generated { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
td.text, th[data-type="text"] { text-align: left; }
th { cursor: pointer; user-select: none; background: #f3f3f3; white-space: nowrap; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:hover { background: #f7fbff; }
section.task { border-top: 2px solid #ccc; margin-top: 2em; }
.task-meta, .exclusions, .common-patients { color: #444; margin: 0.3em 0; }
.no-common { color: #a00; margin: 0.3em 0; }
img.heatmap, img.km-best, img.roc { max-width: 100%; height: auto; }
.km-grid, .roc-grid { display: flex; flex-wrap: wrap; gap: 0.5em; }
.km-grid figure, .roc-grid figure { margin: 0; font-size: 0.8em; }
.roc-grid figcaption { max-width: 620px; }
.task-files, .roc-about { color: #444; margin: 0.3em 0; font-size: 0.9em; }
figure.km-best figcaption { max-width: 640px; font-size: 0.9em; color: #444; }
nav ul.toc { display: inline; padding-left: 1em; } nav ul.toc li { display: inline;
  margin-right: 0.8em; }
button { padding: 0.3em 0.8em; }
"""

# Sorting: every table.sortable sorts on a header click (or Enter / Space), ascending first, then
# toggling; cells compare by data-sort (numbers as numbers, text numeric-aware), missing values
# last in both directions, ties in their previous order. The CSV export reads the ranking's raw
# values from the JSON block in the rows' current order; window.oncoslideLeaderboard exposes it.
_JS = r"""
(function () {
  "use strict";
  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    var raw = "";
    if (cell) {
      raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort")
                                           : cell.textContent.trim();
    }
    if (!numeric) { return raw; }
    return raw === "" ? NaN : Number(raw);
  }
  function isMissing(value, numeric) { return numeric ? isNaN(value) : value === ""; }
  function sortBy(table, th) {
    var headers = th.parentNode.cells;
    var index = Array.prototype.indexOf.call(headers, th);
    var numeric = th.getAttribute("data-type") === "num";
    var descending = th.getAttribute("aria-sort") === "ascending";
    var body = table.tBodies[0];
    var keyed = Array.prototype.map.call(body.rows, function (row, position) {
      return { row: row, value: cellValue(row, index, numeric), position: position };
    });
    keyed.sort(function (a, b) {
      var am = isMissing(a.value, numeric), bm = isMissing(b.value, numeric);
      if (am || bm) { return am === bm ? a.position - b.position : (am ? 1 : -1); }
      var c = numeric ? a.value - b.value
                      : a.value.localeCompare(b.value, undefined, { numeric: true });
      if (descending) { c = -c; }
      return c !== 0 ? c : a.position - b.position;
    });
    keyed.forEach(function (k) { body.appendChild(k.row); });
    Array.prototype.forEach.call(headers, function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.addEventListener("click", function () { sortBy(table, th); });
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          sortBy(table, th);
        }
      });
    });
  });
  function csvField(value) {
    if (value === null || value === undefined) { return ""; }
    var text = String(value);
    if (/[",\r\n]/.test(text) || text !== text.trim()) {
      text = '"' + text.replace(/"/g, '""') + '"';
    }
    return text;
  }
  function rankingCsv() {
    var payload = JSON.parse(document.getElementById("ranking-data").textContent);
    var lines = [payload.columns.map(csvField).join(",")];
    document.querySelectorAll("#ranking tbody tr").forEach(function (tr) {
      var values = payload.rows[Number(tr.getAttribute("data-index"))];
      lines.push(values.map(csvField).join(","));
    });
    return lines.join("\n") + "\n";
  }
  var api = { rankingCsv: rankingCsv, lastCsv: null };
  window.oncoslideLeaderboard = api;
  var button = document.getElementById("download-csv");
  button.addEventListener("click", function () {
    var text = rankingCsv();
    var url = URL.createObjectURL(new Blob([text], { type: "text/csv;charset=utf-8" }));
    var link = document.createElement("a");
    link.href = url;
    link.download = button.getAttribute("data-filename");
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
    api.lastCsv = text;
  });
})();
"""
