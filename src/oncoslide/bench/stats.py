"""Benchmark statistics: per-entry estimates with patient-level bootstrap intervals, paired
comparisons between entries, rank aggregation over tasks and per-fold metric summaries.

Every (seed, fold) of an entry is scored by its own model, so a metric is always computed within
one (seed, fold) and then averaged; risk scores of different fold models are never pooled into
one ranking. The unit of resampling is the *patient*: one bootstrap replicate draws the task's
patients with replacement (a multinomial count vector) and that one draw is shared by every
entry, seed and fold of the task. The replicate recomputes each (seed, fold) metric with the
patients' multiplicities as weights, which equals the metric on the data with the rows of a
patient duplicated as many times as it was drawn.

Entries of one task may be scored on different test patients: an encoder's exclusion list removes
the patients it saw in pre-training from its test parts, an unusable feature file drops a patient
from one feature set, a failed cell drops a whole test fold. Comparing such entries on their own
patients would compare them on different (easier or harder) patients, so within a task every
entry is ranked, compared and given its interval on the patients *common to all entries* of the
task: the (seed, patient) pairs that every entry scored (:func:`common_rows`). Each entry's own
number of test patients is reported next to the number used.

With several training seeds the bootstrap has a second level: each replicate also draws the
seeds with replacement (again shared by every entry of the task) and averages the cells of a
seed as often as it was drawn, so the interval carries the variability of training across
seeds as well as the sampling of test patients. With one seed it is the patient bootstrap.

The weighted metrics are pair statistics: Harrell's C and the Mann-Whitney AUC are ratios of
sums over pairs, and with weights ``w`` a pair (i, j) counts ``w_i * w_j``. For a fold of ``m``
patients and a ``(B, m)`` weight matrix ``W`` the numerator of every replicate is
``rowsum((W @ S) * W)`` for a fixed pair-score matrix ``S``, so all replicates of a fold cost a
single matrix product. The pair matrices are O(m^2) in memory, which suits folds of up to a few
thousand patients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from oncoslide._checks import as_events, as_vector
from oncoslide.errors import ConfigError, ProblemsError
from oncoslide.evaluation.classification import roc_auc
from oncoslide.survival.metrics import MetricInputError, concordance_index_censored

__all__ = [
    "RANKING_COLUMNS",
    "BenchInputError",
    "PairedComparison",
    "SeedDraws",
    "TaskInfo",
    "TaskScores",
    "bootstrap_counts",
    "bootstrap_p_value",
    "common_rows",
    "entry_name",
    "fold_metric_summary",
    "paired_comparison",
    "paired_replicate_diffs",
    "rank_entries",
    "task_scores",
    "weighted_auc",
    "weighted_c_index",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]
Entry = tuple[str, str]

TASK_KINDS: dict[str, str] = {"survival": "c_index", "binary": "auc", "multiclass": "auc"}
# Risks closer than this are tied, as in concordance_index_censored's default.
TIED_TOL = 1e-8
# Cap on the elements of one (replicates x patients) block, to bound memory on large folds.
_CHUNK_ELEMENTS = 1 << 22


class BenchInputError(ProblemsError):
    """A prediction frame or a metric table does not follow the benchmark contract."""

    what = "benchmark input"


def entry_name(feature_set: str, model: str) -> str:
    """Display name of an entry: ``"<feature_set> · <model>"``."""
    return f"{feature_set} \u00b7 {model}"


# --------------------------------------------------------------------------- task description


@dataclass(frozen=True)
class TaskInfo:
    """What the statistics need to know about a task.

    Attributes:
        name: the task name, as in the prediction frame's ``task`` column.
        kind: ``"survival"``, ``"binary"`` or ``"multiclass"``.
        classes: the sorted class labels of a classification task (``prob_<class>`` columns);
            empty for survival.
    """

    name: str
    kind: str
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append(f"name must be a non-empty string, got {self.name!r}")
        if self.kind not in TASK_KINDS:
            problems.append(f"kind must be one of {sorted(TASK_KINDS)}, got {self.kind!r}")
        elif self.kind == "survival" and self.classes:
            problems.append("a survival task has no classes")
        elif self.kind == "binary" and len(self.classes) != 2:
            problems.append(f"a binary task needs exactly 2 classes, got {list(self.classes)}")
        elif self.kind == "multiclass" and len(self.classes) < 3:
            problems.append(f"a multiclass task needs at least 3 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            problems.append(f"classes has duplicates: {list(self.classes)}")
        if problems:
            raise ConfigError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def metric(self) -> str:
        """The primary metric: ``"c_index"`` (survival) or ``"auc"`` (classification)."""
        return TASK_KINDS[self.kind]

    @property
    def is_survival(self) -> bool:
        """Whether the task is a survival task."""
        return self.kind == "survival"

    @property
    def prob_columns(self) -> list[str]:
        """The prediction frame's output columns of a classification task."""
        return [f"prob_{c}" for c in self.classes]


# --------------------------------------------------------------------------- weighted metrics


@dataclass(frozen=True)
class _PairBlock:
    """One ratio of pair sums: sum_ij w_i w_j score_ij / sum_ij w_i w_j comparable_ij.

    ``rows`` and ``cols`` index the fold's patients (events and all partners for Harrell's C,
    positives and negatives for an AUC). ``comparable`` is None when every (row, col) pair
    counts, so the denominator factorises into (sum of row weights) * (sum of column weights).
    """

    rows: IntArray
    cols: IntArray
    score: FloatArray
    comparable: FloatArray | None = None

    def ratio(self, weights: FloatArray) -> FloatArray:
        """The statistic for every row of ``weights`` (B, m); NaN where no pair has weight."""
        w_rows, w_cols = weights[:, self.rows], weights[:, self.cols]
        numerator = np.einsum("bj,bj->b", w_rows @ self.score, w_cols)
        if self.comparable is None:
            denominator = w_rows.sum(axis=1) * w_cols.sum(axis=1)
        else:
            denominator = np.einsum("bj,bj->b", w_rows @ self.comparable, w_cols)
        defined = denominator > 0
        return np.where(defined, numerator / np.where(defined, denominator, 1.0), np.nan)


@dataclass(frozen=True)
class _PairMetric:
    """A fold's metric as one pair block, or the macro mean of several (one-vs-rest AUCs)."""

    blocks: tuple[_PairBlock, ...]
    n: int

    def values(self, weights: FloatArray) -> FloatArray:
        """The metric for every row of a (B, n) weight matrix."""
        out = np.empty(weights.shape[0])
        step = max(1, _CHUNK_ELEMENTS // max(1, self.n))
        for start in range(0, weights.shape[0], step):
            out[start : start + step] = self._values(weights[start : start + step])
        return out

    def _values(self, weights: FloatArray) -> FloatArray:
        ratios = np.vstack([block.ratio(weights) for block in self.blocks])
        if len(self.blocks) == 1:
            return ratios[0]
        # Macro average over the classes whose one-vs-rest AUC is defined in this sample
        # (absent classes drop out), as roc_auc does; NaN when none is defined.
        defined = np.isfinite(ratios)
        count = defined.sum(axis=0)
        total = np.where(defined, ratios, 0.0).sum(axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _harrell_metric(
    event: np.ndarray, time: FloatArray, risk: FloatArray, tied_tol: float = TIED_TOL
) -> _PairMetric:
    """Harrell's C as a pair metric, with concordance_index_censored's comparability rules.

    A pair (i, j) is comparable when i has an event and t_j > t_i, or t_j == t_i and j is
    censored (two events at the same time are not comparable, nor is a patient with itself).
    It is concordant when r_i - r_j > tol and counts 1/2 when |r_i - r_j| <= tol.
    """
    rows = np.flatnonzero(event)
    cols = np.arange(time.size)
    t_row = time[rows][:, None]
    comparable = (time[None, :] > t_row) | ((time[None, :] == t_row) & ~event[None, :])
    diff = risk[rows][:, None] - risk[None, :]
    score = np.where(diff > tied_tol, 1.0, np.where(np.abs(diff) <= tied_tol, 0.5, 0.0))
    block = _PairBlock(rows, cols, score * comparable, comparable.astype(np.float64))
    return _PairMetric((block,), time.size)


def _auc_block(positive: np.ndarray, score: FloatArray) -> _PairBlock:
    """Mann-Whitney AUC of positives vs the rest; exactly equal scores count 1/2 (as sklearn)."""
    rows, cols = np.flatnonzero(positive), np.flatnonzero(~positive)
    diff = score[rows][:, None] - score[cols][None, :]
    return _PairBlock(rows, cols, (diff > 0) + 0.5 * (diff == 0))


def _auc_metric(labels: np.ndarray, scores: FloatArray, classes: Sequence[str]) -> _PairMetric:
    """Binary AUC (positive class ``classes[-1]``) or macro one-vs-rest AUC, as roc_auc."""
    if scores.ndim == 1 or len(classes) == 2:
        positive_score = scores if scores.ndim == 1 else scores[:, 1]
        blocks: tuple[_PairBlock, ...] = (_auc_block(labels == classes[-1], positive_score),)
    else:
        blocks = tuple(_auc_block(labels == c, scores[:, k]) for k, c in enumerate(classes))
    return _PairMetric(blocks, labels.size)


def _weight_matrix(weights: ArrayLike, n: int, where: str) -> tuple[FloatArray, bool]:
    """Weights as a (B, n) float matrix and whether a single (n,) vector was given."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(f"{where}: weights must be numeric") from exc
    single = w.ndim == 1
    w2 = w[None, :] if single else w
    problems = []
    if w2.ndim != 2 or w2.shape[1] != n:
        problems.append(f"weights must have shape ({n},) or (B, {n}), got {w.shape}")
    elif not np.isfinite(w2).all() or (w2 < 0).any():
        problems.append("weights must be finite and >= 0")
    if problems:
        raise MetricInputError(f"{where}: " + "; ".join(problems))
    return w2, single


def weighted_c_index(
    event: ArrayLike,
    time: ArrayLike,
    risk: ArrayLike,
    weights: ArrayLike,
    tied_tol: float = TIED_TOL,
) -> float | FloatArray:
    """Harrell's C with patient weights: pair (i, j) counts ``w_i * w_j``.

    With integer weights this equals :func:`~oncoslide.survival.metrics.concordance_index_censored`
    on the data with every row repeated ``w_i`` times.

    Args:
        event: event indicators (bool or 0/1), (n,).
        time: event or censoring times, (n,).
        risk: risk scores, higher = earlier event, (n,).
        weights: (n,) weights, or a (B, n) matrix giving B weightings at once (bootstrap).
        tied_tol: risks whose absolute difference is at most this are tied (count 1/2).

    Returns:
        A float for (n,) weights, a (B,) array for (B, n) weights; NaN where no comparable pair
        has positive weight.
    """
    where = "weighted_c_index"
    problems: list[str] = []
    t = as_vector(time, "time", problems)
    n = None if t is None else t.size
    r = as_vector(risk, "risk", problems, size=n)
    e = as_events(event, "event", problems)
    if e is not None and n is not None and e.size != n:
        problems.append(f"event has {e.size} values, expected {n}")
    if problems:
        raise MetricInputError(f"{where}: " + "; ".join(problems))
    assert t is not None and r is not None and e is not None  # no problems recorded
    w, single = _weight_matrix(weights, t.size, where)
    values = _harrell_metric(e, t, r, float(tied_tol)).values(w)
    return float(values[0]) if single else values


def weighted_auc(
    labels: ArrayLike, scores: ArrayLike, classes: Sequence[Any], weights: ArrayLike
) -> float | FloatArray:
    """ROC AUC with patient weights (weighted Mann-Whitney), binary or macro one-vs-rest.

    Same conventions as :func:`~oncoslide.evaluation.classification.roc_auc`: ``scores`` is (n,)
    for the positive class ``classes[-1]`` of two classes, or (n, C) with column k for
    ``classes[k]``; in the multiclass case classes without weight drop out of the macro mean.
    With integer weights this equals ``roc_auc`` on the rows repeated ``w_i`` times.

    Returns:
        A float for (n,) weights, a (B,) array for (B, n) weights; NaN where fewer than two
        classes have positive weight.
    """
    where = "weighted_auc"
    y = np.asarray(labels)
    cls = list(classes)
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(f"{where}: scores must be numeric") from exc
    problems = []
    if y.ndim != 1:
        problems.append(f"labels must be 1-D, got shape {y.shape}")
    if len(cls) < 2 or len(set(cls)) != len(cls):
        problems.append(f"classes must hold at least 2 distinct labels, got {cls}")
    if s.ndim not in (1, 2) or s.shape[0] != y.shape[0] or not np.isfinite(s).all():
        problems.append(f"scores must be finite with shape ({y.shape[0]},) or ({y.shape[0]}, C)")
    elif (s.ndim == 2 and s.shape[1] != len(cls)) or (s.ndim == 1 and len(cls) != 2):
        problems.append(f"scores of shape {s.shape} do not fit {len(cls)} classes")
    unknown = set(y.tolist()) - set(cls) if y.ndim == 1 else set()
    if unknown:
        problems.append(f"labels not in classes: {sorted(unknown, key=repr)[:10]}")
    if problems:
        raise MetricInputError(f"{where}: " + "; ".join(problems))
    w, single = _weight_matrix(weights, y.size, where)
    values = _auc_metric(y, s, cls).values(w)
    return float(values[0]) if single else values


# --------------------------------------------------------------------------- bootstrap draws


def bootstrap_counts(n_patients: int, n_boot: int, seed: int = 0) -> NDArray[np.int64]:
    """Patient multiplicities of ``n_boot`` bootstrap replicates, a (n_boot, n_patients) matrix.

    Row b is a multinomial draw of ``n_patients`` patients with replacement (equal
    probabilities); equal seeds give equal matrices. Column k belongs to the k-th patient in
    sorted patient-id order of the set being resampled.
    """
    if n_patients < 1:
        raise ConfigError(f"bootstrap: n_patients must be positive, got {n_patients}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_boot)


def _check_options(n_boot: int, alpha: float, seed: int) -> None:
    problems = []
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        problems.append(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (isinstance(alpha, float | int) and 0 < alpha < 1):
        problems.append(f"alpha must lie in (0, 1), got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if problems:
        raise ConfigError("bootstrap: " + "; ".join(problems))


# --------------------------------------------------------------------------- prediction frames

_KEY_COLUMNS = ("task", "feature_set", "model", "protocol", "seed", "fold", "patient_id")


def _required_columns(task: TaskInfo) -> list[str]:
    if task.is_survival:
        return [*_KEY_COLUMNS, "time", "event", "risk"]
    return [*_KEY_COLUMNS, "label", *task.prob_columns]


def _integer_column(values: pd.Series, name: str, problems: list[str]) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | (numeric != np.round(numeric))
    if bad.any():
        problems.append(f"{name} must be integers ({int(bad.sum())} row(s) are not)")
        return pd.Series(np.zeros(len(values), dtype=np.int64), index=values.index)
    return numeric.astype(np.int64)


def _float_column(
    frame: pd.DataFrame, name: str, problems: list[str], *, nonnegative: bool = False
) -> np.ndarray:
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if nonnegative:
        bad |= np.isfinite(values) & (values < 0)
    if bad.any():
        rule = "finite and >= 0" if nonnegative else "finite numbers"
        problems.append(f"{name} must be {rule} ({int(bad.sum())} row(s) are not)")
    return values


def _check_targets(frame: pd.DataFrame, task: TaskInfo, problems: list[str]) -> pd.DataFrame:
    """Typed target and output columns; problems are collected, not raised."""
    out = pd.DataFrame(index=frame.index)
    if task.is_survival:
        out["time"] = _float_column(frame, "time", problems, nonnegative=True)
        event = pd.to_numeric(frame["event"], errors="coerce")
        if not event.isin((0, 1)).all():
            problems.append(f"event must be 0 or 1 ({int((~event.isin((0, 1))).sum())} bad rows)")
        out["event"] = event.isin((1,)).to_numpy()
        out["risk"] = _float_column(frame, "risk", problems)
        return out
    label = frame["label"]
    missing = label.isna()
    text = label.astype(str)
    unknown = sorted(set(text[~missing]) - set(task.classes))
    if missing.any():
        problems.append(f"label is missing in {int(missing.sum())} row(s)")
    if unknown:
        problems.append(f"label has values not in classes {list(task.classes)}: {unknown[:10]}")
    out["label"] = text
    for column in task.prob_columns:
        out[column] = _float_column(frame, column, problems)
    return out


def _prepare(preds: pd.DataFrame, task: TaskInfo) -> pd.DataFrame:
    """The task's rows of a prediction frame, checked and typed; every problem listed at once."""
    source = f"(predictions of task {task.name!r})"
    if not isinstance(preds, pd.DataFrame):
        raise BenchInputError([f"expected a pandas DataFrame, got {type(preds).__name__}"], source)
    missing = [c for c in _required_columns(task) if c not in preds.columns]
    if missing:
        raise BenchInputError([f"missing column(s): {missing}"], source)
    frame = preds.loc[preds["task"].astype(str) == task.name]
    if frame.empty:
        raise BenchInputError([f"no rows for task {task.name!r}"], source)
    problems: list[str] = []
    out = _check_targets(frame, task, problems)
    for column in ("feature_set", "model", "protocol", "patient_id"):
        if frame[column].isna().any():
            problems.append(f"{column} is missing in {int(frame[column].isna().sum())} row(s)")
        out[column] = frame[column].astype(str)
    out["seed"] = _integer_column(frame["seed"], "seed", problems)
    out["fold"] = _integer_column(frame["fold"], "fold", problems)
    dup = out.duplicated(["feature_set", "model", "seed", "patient_id"])
    if dup.any():
        examples = out.loc[dup, ["feature_set", "model", "seed", "patient_id"]].head(3)
        problems.append(
            f"{int(dup.sum())} patient(s) appear twice within one (feature_set, model, seed), "
            f"e.g. {examples.to_dict('records')}"
        )
    protocols = out.groupby(["feature_set", "model"])["protocol"].nunique()
    for (fs, model), count in protocols[protocols > 1].items():
        problems.append(f"entry {entry_name(fs, model)!r} has {count} different protocols")
    if problems:
        raise BenchInputError(problems, source)
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- common patients

_ENTRY_KEYS = ["feature_set", "model"]
_PAIR_KEYS = ["seed", "patient_id"]


def _common_mask(frame: pd.DataFrame) -> NDArray[np.bool_]:
    """Rows of a prepared frame whose (seed, patient) every entry of the task scored.

    A patient appears at most once per entry and seed (checked by :func:`_prepare`), so a pair
    is common when it has as many rows as the task has entries.
    """
    n_entries = frame.groupby(_ENTRY_KEYS).ngroups
    rows = frame.groupby(_PAIR_KEYS)["patient_id"].transform("size")
    return (rows == n_entries).to_numpy()


def _no_common_notes(frame: pd.DataFrame) -> dict[Entry, str]:
    """Why no (seed, patient) is common to every entry, said for each entry."""
    pairs = {
        (str(fs), str(model)): set(zip(part["seed"], part["patient_id"], strict=True))
        for (fs, model), part in frame.groupby(_ENTRY_KEYS, sort=True)
    }
    notes = {}
    for key, mine in pairs.items():
        disjoint = [entry_name(*k) for k, theirs in pairs.items() if k != key and not mine & theirs]
        reason = (
            f"it shares none (same seed and patient) with {', '.join(disjoint)}"
            if disjoint
            else f"no (seed, patient) is scored by all {len(pairs)} entries"
        )
        notes[key] = f"no test patient in common with the other entries of the task: {reason}"
    return notes


def common_rows(preds: pd.DataFrame, task: TaskInfo) -> pd.DataFrame:
    """The task's rows of a prediction frame at the patients common to all its entries.

    A row is kept when every entry (feature set x model) of the task scored the same patient in
    the same seed; the statistics of :func:`task_scores` use exactly these rows, and passing them
    to :func:`paired_comparison` compares two entries on the same patients. The columns are those
    of ``preds``; the result is empty when no (seed, patient) is common to every entry.

    Raises:
        BenchInputError: the frame breaks the contract (all problems listed).
    """
    frame = _prepare(preds, task)
    rows = preds.loc[preds["task"].astype(str) == task.name]
    return rows.loc[_common_mask(frame)].reset_index(drop=True)


# --------------------------------------------------------------------------- per-entry evaluation


def _library_metric(cell: pd.DataFrame, task: TaskInfo) -> float:
    """The reference metric of one (seed, fold), by the library functions."""
    if task.is_survival:
        return concordance_index_censored(
            cell["event"].to_numpy(), cell["time"].to_numpy(), cell["risk"].to_numpy()
        ).cindex
    probs = cell[task.prob_columns].to_numpy(dtype=np.float64)
    return roc_auc(cell["label"].to_numpy(), probs, classes=list(task.classes))


def _pair_metric(cell: pd.DataFrame, task: TaskInfo) -> _PairMetric:
    if task.is_survival:
        return _harrell_metric(
            cell["event"].to_numpy(), cell["time"].to_numpy(), cell["risk"].to_numpy()
        )
    probs = cell[task.prob_columns].to_numpy(dtype=np.float64)
    return _auc_metric(cell["label"].to_numpy(), probs, list(task.classes))


@dataclass(frozen=True)
class SeedDraws:
    """Seed multiplicities of the bootstrap replicates: the second level of the bootstrap.

    Row b of ``counts`` draws the task's ``seeds`` with replacement; replicate b weights every
    (seed, fold) cell by its seed's count. With a single seed every count is 1 and the
    bootstrap reduces to the patient level.
    """

    seeds: IntArray
    counts: NDArray[np.int64]  # (n_boot, n_seeds)

    @classmethod
    def draw(cls, seeds: ArrayLike, n_boot: int, seed: int) -> SeedDraws:
        """Draw ``n_boot`` resamples of ``seeds``; equal arguments give equal draws.

        The stream is separate from the patient draws of :func:`bootstrap_counts` with the same
        ``seed``, so adding seeds to a benchmark leaves its patient draws unchanged.
        """
        values = np.unique(np.asarray(seeds, dtype=np.intp))
        if values.size <= 1:
            return cls(values, np.ones((n_boot, values.size), dtype=np.int64))
        rng = np.random.default_rng([seed, 1])
        probs = np.full(values.size, 1.0 / values.size)
        return cls(values, rng.multinomial(values.size, probs, size=n_boot))

    def cell_weights(self, cell_seeds: IntArray) -> FloatArray:
        """(n_boot, n_cells) weights of cells with the given seeds; 0 for seeds not drawn."""
        position = np.searchsorted(self.seeds, cell_seeds)
        position = np.clip(position, 0, max(self.seeds.size - 1, 0))
        known = self.seeds.size > 0 and (self.seeds[position] == cell_seeds)
        weights = self.counts[:, position].astype(np.float64)
        return np.where(known, weights, 0.0)


@dataclass(frozen=True)
class _EntryEval:
    """Per-(seed, fold) point metrics and bootstrap replicates of one entry.

    Only (seed, fold) cells whose metric is defined on their full data are kept (an undefined
    cell would otherwise make every replicate undefined).
    """

    seeds: IntArray
    folds: IntArray
    points: FloatArray
    replicates: FloatArray  # (n_boot, n_cells)
    n_patients: int  # distinct patients evaluated

    @property
    def estimate(self) -> float:
        return float(self.points.mean()) if self.points.size else float("nan")

    def replicate_means(self, seed_draws: SeedDraws | None = None) -> FloatArray:
        """Mean per replicate over the cells whose metric is defined in it; NaN where none is.

        A (seed, fold) cell whose resampled patients leave its metric undefined (e.g. no
        comparable pair among a few test patients) is left out of that replicate's mean, as a
        class absent from a draw leaves a macro AUC. Dropping the whole replicate instead
        would keep only the draws in which every small fold has pairs: on targets of a few
        dozen patients under repeated CV a biased subset of a tenth of the replicates. In a
        paired comparison both entries leave out the same cells (whether a cell is defined
        depends on its drawn times, events or labels, never on the scores).

        With ``seed_draws`` each cell counts as often as its seed was drawn in that replicate,
        so the replicates also carry the variability of training across seeds; a replicate
        that draws none of this entry's seeds is NaN.
        """
        if not self.points.size:
            return np.full(self.replicates.shape[0], np.nan)
        weights = (
            np.ones_like(self.replicates)
            if seed_draws is None
            else seed_draws.cell_weights(self.seeds)
        )
        defined = np.isfinite(self.replicates)
        weights = np.where(defined, weights, 0.0)
        mass = weights.sum(axis=1)
        total = (weights * np.where(defined, self.replicates, 0.0)).sum(axis=1)
        return np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), np.nan)


def _cells(entry: pd.DataFrame) -> Iterator[tuple[int, int, pd.DataFrame]]:
    for (seed, fold), cell in entry.groupby(["seed", "fold"], sort=True):
        yield int(seed), int(fold), cell


def _evaluate_entry(
    entry: pd.DataFrame, task: TaskInfo, counts: NDArray[np.int64], positions: pd.Index
) -> _EntryEval:
    """Point metric and replicate metrics of every (seed, fold) of one entry."""
    seeds, folds, points, replicates = [], [], [], []
    for seed, fold, cell in _cells(entry):
        point = _library_metric(cell, task)
        if not np.isfinite(point):
            continue
        weights = counts[:, positions.get_indexer(cell["patient_id"])].astype(np.float64)
        seeds.append(seed)
        folds.append(fold)
        points.append(point)
        replicates.append(_pair_metric(cell, task).values(weights))
    matrix = np.column_stack(replicates) if replicates else np.empty((counts.shape[0], 0))
    return _EntryEval(
        np.asarray(seeds, dtype=np.intp),
        np.asarray(folds, dtype=np.intp),
        np.asarray(points, dtype=np.float64),
        matrix,
        int(entry["patient_id"].nunique()),
    )


def _percentiles(values: FloatArray, alpha: float) -> tuple[float, float, int]:
    ok = values[np.isfinite(values)]
    if not ok.size:
        return float("nan"), float("nan"), 0
    lower, upper = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return float(lower), float(upper), int(ok.size)


def _seed_means(result: _EntryEval) -> dict[int, float]:
    return {int(s): float(result.points[result.seeds == s].mean()) for s in np.unique(result.seeds)}


# --------------------------------------------------------------------------- task scores


@dataclass
class TaskScores:
    """Scores of every entry of one task.

    Attributes:
        table: one row per entry: task, metric, feature_set, model, protocol, estimate, lower,
            upper, n_boot_ok, n_patients, n_used, n_seeds, n_folds, n_cells, seed_sd, note.
            Every column describes the entry on the task's common patients (see
            :func:`task_scores`) except ``n_patients``. ``n_seeds`` and
            ``n_folds`` count the distinct seeds and fold ids among the (seed, fold) cells whose
            metric is defined, ``n_cells`` those cells (the estimate averages over them);
            ``n_patients`` counts the entry's own distinct test patients, ``n_used`` those it is
            scored on: the patients common to all entries of the task (equal for every entry);
            ``seed_sd`` is the sd (ddof 1) of the per-seed means over folds (NaN with one seed);
            ``note`` is empty, or says why the entry has no estimate (no test patient in common
            with the other entries).
        replicates: (feature_set, model) -> the n_boot replicate means (NaN where skipped); the
            replicate index is shared by all entries of the task (same patient draws).
        per_seed: one row per (entry, seed): task, feature_set, model, seed, estimate (mean over
            that seed's folds), n_folds.
    """

    table: pd.DataFrame
    replicates: dict[Entry, FloatArray]
    per_seed: pd.DataFrame = field(default_factory=pd.DataFrame)


_TABLE_COLUMNS = [
    "task",
    "metric",
    "feature_set",
    "model",
    "protocol",
    "estimate",
    "lower",
    "upper",
    "n_boot_ok",
    "n_patients",
    "n_used",
    "n_seeds",
    "n_folds",
    "n_cells",
    "seed_sd",
    "note",
]


def _entry_row(
    task: TaskInfo,
    key: Entry,
    protocol: str,
    result: _EntryEval,
    replicate_means: FloatArray,
    alpha: float,
    n_patients: int,
    note: str,
) -> dict[str, Any]:
    lower, upper, n_ok = _percentiles(replicate_means, alpha)
    seed_means = list(_seed_means(result).values())
    return {
        "task": task.name,
        "metric": task.metric,
        "feature_set": key[0],
        "model": key[1],
        "protocol": protocol,
        "estimate": result.estimate,
        "lower": lower,
        "upper": upper,
        "n_boot_ok": n_ok,
        "n_patients": n_patients,
        "n_used": result.n_patients,
        "n_seeds": len(seed_means),
        "n_folds": int(np.unique(result.folds).size),
        "n_cells": int(result.points.size),
        "seed_sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else float("nan"),
        "note": note,
    }


def task_scores(
    preds: pd.DataFrame,
    task: TaskInfo,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> TaskScores:
    """Estimate and patient-level bootstrap interval of every entry of one task.

    Every entry is scored on the patients common to all entries of the task: the (seed,
    patient) pairs every entry scored (:func:`common_rows`), so that entries scored on different
    patients (exclusion lists, unusable feature files, failed cells) are compared on the same
    ones. When no pair is common to every entry, no entry gets an estimate and each row's
    ``note`` says which entries share no patient.

    The estimate is the mean over (seed, fold) of the primary metric computed within each
    (seed, fold). Each replicate draws the common patients with replacement; that draw is
    shared by every entry, seed and fold, and every (seed, fold) metric is recomputed with the
    drawn multiplicities as weights and averaged. With several seeds the replicate
    also draws the seeds with replacement and weights each (seed, fold) by its seed's count
    (:class:`SeedDraws`). A (seed, fold) metric undefined in a replicate (e.g. no comparable
    pair among its drawn patients) is left out of that replicate's average; the interval is
    the percentile interval of the averages over the replicates with at least one defined
    (``n_boot_ok`` of them). A (seed, fold) whose metric is undefined on its full data (e.g.
    no comparable pair) is left out of the entry's estimate and replicates.

    Args:
        preds: a prediction frame (contract); rows of other tasks are ignored.
        task: the task; its kind decides the metric (Harrell's C or AUC).
        n_boot: number of bootstrap replicates.
        alpha: 1 - confidence level.
        seed: seed of the patient draws; equal seeds give identical results.

    Raises:
        BenchInputError: the frame breaks the contract (all problems listed).
        ConfigError: bad options.
    """
    _check_options(n_boot, alpha, seed)
    frame = _prepare(preds, task)
    common = _common_mask(frame)
    used = frame.loc[common]
    notes = {} if common.any() else _no_common_notes(frame)
    patients = pd.Index(np.sort(used["patient_id"].unique()))
    counts = (
        bootstrap_counts(len(patients), n_boot, seed)
        if len(patients)
        else np.zeros((n_boot, 0), dtype=np.int64)
    )
    seed_draws = SeedDraws.draw(used["seed"], n_boot, seed)
    rows, replicates, seed_rows = [], {}, []
    for (fs, model), entry in frame.groupby(_ENTRY_KEYS, sort=True):
        key = (str(fs), str(model))
        result = _evaluate_entry(entry.loc[common[entry.index]], task, counts, patients)
        means = result.replicate_means(seed_draws)
        protocol = str(entry["protocol"].iloc[0])
        n_own = int(entry["patient_id"].nunique())
        rows.append(
            _entry_row(task, key, protocol, result, means, alpha, n_own, notes.get(key, ""))
        )
        replicates[key] = means
        for s, mean in _seed_means(result).items():
            n_folds = int((result.seeds == s).sum())
            seed_rows.append(
                {"task": task.name, "feature_set": key[0], "model": key[1], "seed": s}
                | {"estimate": mean, "n_folds": n_folds}
            )
    per_seed = pd.DataFrame(
        seed_rows, columns=["task", "feature_set", "model", "seed", "estimate", "n_folds"]
    )
    return TaskScores(pd.DataFrame(rows, columns=_TABLE_COLUMNS), replicates, per_seed)


# --------------------------------------------------------------------------- paired comparison


@dataclass(frozen=True)
class PairedComparison:
    """Entry ``a`` minus entry ``b`` on the patients both have, with a paired bootstrap.

    ``n_patients`` counts the distinct patients of the (seed, patient) pairs both entries scored.

    ``diff`` is the difference of the entries' per-(seed, fold) metrics averaged; ``lower`` and
    ``upper`` the percentile interval of the replicate differences; ``p_value`` the two-sided
    bootstrap p-value of "no difference"; ``n_boot_ok`` the replicates in which both entries'
    averages were defined (each over the (seed, fold) metrics defined in that replicate).
    """

    a: Entry
    b: Entry
    metric: str
    diff: float
    lower: float
    upper: float
    p_value: float
    n_patients: int
    estimate_a: float = float("nan")
    estimate_b: float = float("nan")
    n_boot_ok: int = 0


def bootstrap_p_value(diffs: FloatArray) -> float:
    """Two-sided: 2 * the smaller tail share of replicate differences at or beyond 0, with the
    +1 correction ((k + 1) / (B + 1)) that keeps a p-value from being exactly zero."""
    if not diffs.size:
        return float("nan")
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    tail = min(below + 1, above + 1) / (diffs.size + 1)
    return float(min(1.0, 2.0 * tail))


def _entry_frame(frame: pd.DataFrame, key: Entry) -> pd.DataFrame:
    return frame.loc[(frame["feature_set"] == key[0]) & (frame["model"] == key[1])]


def paired_replicate_diffs(
    preds: pd.DataFrame, task: TaskInfo, a: Entry, b: Entry, *, n_boot: int = 2000, seed: int = 0
) -> FloatArray:
    """The (n_boot,) replicate differences a - b behind :func:`paired_comparison` with the
    same arguments (the same patient and seed draws; NaN where a replicate is undefined),
    whose percentiles are its interval: for statistics over several comparisons (e.g. a mean
    over targets whose patients are disjoint, each drawn with its own seed).

    Raises:
        BenchInputError: as :func:`paired_comparison`.
    """
    _check_options(n_boot, 0.05, seed)
    return _paired_replicates(preds, task, a, b, n_boot, seed)[2]


def _paired_replicates(
    preds: pd.DataFrame, task: TaskInfo, a: Entry, b: Entry, n_boot: int, seed: int
) -> tuple[_EntryEval, _EntryEval, FloatArray, int]:
    """Both entries evaluated on the (seed, patient) pairs they share, the replicate
    differences of their means (NaN where undefined) and the number of shared patients."""
    frame = _prepare(preds, task)
    source = f"(predictions of task {task.name!r})"
    key_a, key_b = (str(a[0]), str(a[1])), (str(b[0]), str(b[1]))
    part_a, part_b = _entry_frame(frame, key_a), _entry_frame(frame, key_b)
    unknown = [entry_name(*k) for k, part in ((key_a, part_a), (key_b, part_b)) if part.empty]
    if unknown:
        raise BenchInputError([f"no predictions for entry {name!r}" for name in unknown], source)
    pairs_a = pd.MultiIndex.from_frame(part_a[_PAIR_KEYS])
    pairs_b = pd.MultiIndex.from_frame(part_b[_PAIR_KEYS])
    part_a, part_b = part_a.loc[pairs_a.isin(pairs_b)], part_b.loc[pairs_b.isin(pairs_a)]
    if part_a.empty:
        names = f"{entry_name(*key_a)!r} and {entry_name(*key_b)!r}"
        raise BenchInputError([f"entries {names} share no patient (in the same seed)"], source)
    patients = pd.Index(np.sort(part_a["patient_id"].unique()))
    counts = bootstrap_counts(len(patients), n_boot, seed)
    seed_draws = SeedDraws.draw(part_a["seed"], n_boot, seed)
    result_a, result_b = (
        _evaluate_entry(part, task, counts, patients) for part in (part_a, part_b)
    )
    diffs = result_a.replicate_means(seed_draws) - result_b.replicate_means(seed_draws)
    return result_a, result_b, np.asarray(diffs, dtype=np.float64), len(patients)


def paired_comparison(
    preds: pd.DataFrame,
    task: TaskInfo,
    a: Entry,
    b: Entry,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedComparison:
    """Paired patient-level bootstrap comparison of two entries of one task.

    Both entries are restricted to the patients they share, seed by seed (a patient one entry
    lacks in one seed is left out of that seed only); each replicate draws those patients (and,
    with several seeds, the seeds) with replacement once and scores both entries with the same
    multiplicities, so the variation common to both cancels out of the difference. To compare
    two entries on the patients common to *every* entry of the task, as the leaderboard does,
    pass :func:`common_rows` of the frame.

    Args:
        preds: a prediction frame (contract); rows of other tasks are ignored.
        task: the task.
        a, b: the entries as (feature_set, model).
        n_boot, alpha, seed: bootstrap replicates, 1 - confidence level, seed of the draws.

    Raises:
        BenchInputError: bad frame, an unknown entry, or no patient shared by both entries.
    """
    _check_options(n_boot, alpha, seed)
    result_a, result_b, diffs, n_patients = _paired_replicates(preds, task, a, b, n_boot, seed)
    diffs = diffs[np.isfinite(diffs)]
    lower, upper, n_ok = _percentiles(diffs, alpha)
    return PairedComparison(
        a=(str(a[0]), str(a[1])),
        b=(str(b[0]), str(b[1])),
        metric=task.metric,
        diff=result_a.estimate - result_b.estimate,
        lower=lower,
        upper=upper,
        p_value=bootstrap_p_value(diffs),
        n_patients=n_patients,
        estimate_a=result_a.estimate,
        estimate_b=result_b.estimate,
        n_boot_ok=n_ok,
    )


# --------------------------------------------------------------------------- ranking


def _task_name(scores: TaskScores) -> str:
    names = scores.table["task"].astype(str).unique()
    if names.size != 1:
        raise BenchInputError([f"a TaskScores table must hold one task, got {list(names)}"])
    return str(names[0])


def _check_scores(scores: Sequence[TaskScores]) -> tuple[list[str], int]:
    """Task names and the common replicate count; every problem listed at once."""
    problems, names, lengths = [], [], set()
    for s in scores:
        name = _task_name(s)
        names.append(name)
        lengths |= {len(v) for v in s.replicates.values()}
        keys = set(zip(s.table["feature_set"], s.table["model"], strict=True))
        if keys != set(s.replicates):
            problems.append(f"task {name!r}: table entries and replicate keys differ")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        problems.append(f"tasks given more than once: {duplicated}")
    if len(lengths) > 1:
        problems.append(f"replicate counts differ between tasks: {sorted(lengths)}")
    if problems:
        raise BenchInputError(problems, "(task scores)")
    return names, lengths.pop() if lengths else 0


def _replicate_mean_ranks(
    scores: Sequence[TaskScores], entries: list[Entry], n_boot: int
) -> tuple[FloatArray, NDArray[np.bool_]]:
    """Each entry's mean rank per replicate over the tasks it is ranked in, (entries, n_boot)
    (NaN rows for entries ranked nowhere), and which replicates are usable: those in which
    every ranked entry of every task has a replicate value."""
    total = np.zeros((len(entries), n_boot))
    count = np.zeros(len(entries))
    usable = np.ones(n_boot, dtype=bool)
    index = {key: i for i, key in enumerate(entries)}
    for s in scores:
        ranked = s.table.loc[np.isfinite(s.table["estimate"].to_numpy(dtype=float))]
        keys = list(zip(ranked["feature_set"], ranked["model"], strict=True))
        if not keys:
            continue
        values = np.vstack([s.replicates[k] for k in keys])  # (entries of task, n_boot)
        usable &= np.isfinite(values).all(axis=0)
        # NaN columns are unusable anyway; 0 only keeps rankdata from returning NaN.
        ranks = rankdata(-np.nan_to_num(values, nan=0.0), method="average", axis=0)
        rows = [index[k] for k in keys]
        total[rows] += ranks
        count[rows] += 1
    means = np.full_like(total, np.nan)
    np.divide(total, count[:, None], out=means, where=count[:, None] > 0)
    return means, usable & bool((count > 0).any())


# The columns of rank_entries' table before its per-task ``rank:<task>`` columns.
RANKING_COLUMNS = (
    "feature_set",
    "model",
    "protocol",
    "mean_rank",
    "rank_sd",
    "rank_lo",
    "rank_hi",
    "n_tasks",
)


def rank_entries(scores: Sequence[TaskScores]) -> pd.DataFrame:
    """Rank entries within every task and aggregate the ranks over tasks.

    Within a task the entries with an estimate are ranked by it (1 = best, ties share the
    average rank). Per entry: ``mean_rank`` and ``rank_sd`` (ddof 1) over the tasks where it is
    ranked, ``n_tasks``, one ``rank:<task>`` column per task, and ``rank_lo``/``rank_hi``: the
    2.5/97.5 percentiles over bootstrap replicates of its mean rank, where replicate b ranks
    the entries' replicate-b values task by task (replicates in which some ranked entry's value
    is undefined are skipped; ``attrs["n_boot_ok"]`` counts the rest). Sorted by mean_rank then
    display name.
    """
    names, n_boot = _check_scores(scores)
    entries: dict[Entry, str] = {}
    rank_columns: dict[Entry, dict[str, float]] = {}
    for name, s in zip(names, scores, strict=True):
        table = s.table
        estimate = table["estimate"].to_numpy(dtype=float)
        ranked = np.isfinite(estimate)
        ranks = np.full(len(table), np.nan)
        ranks[ranked] = rankdata(-estimate[ranked], method="average")
        for i, (fs, model, protocol) in enumerate(
            zip(table["feature_set"], table["model"], table["protocol"], strict=True)
        ):
            key = (str(fs), str(model))
            entries.setdefault(key, str(protocol))
            rank_columns.setdefault(key, {})[f"rank:{name}"] = ranks[i]
    keys = list(entries)
    boot, ok = _replicate_mean_ranks(scores, keys, n_boot)
    rows = []
    for i, key in enumerate(keys):
        ranks = np.array([rank_columns[key].get(f"rank:{n}", np.nan) for n in names])
        ranks = ranks[np.isfinite(ranks)]
        lo, hi = (
            np.quantile(boot[i, ok], [0.025, 0.975])
            if ok.any() and np.isfinite(boot[i]).all()
            else (np.nan, np.nan)
        )
        rows.append(
            {"feature_set": key[0], "model": key[1], "protocol": entries[key]}
            | {"mean_rank": float(ranks.mean()) if ranks.size else float("nan")}
            | {"rank_sd": float(np.std(ranks, ddof=1)) if ranks.size > 1 else float("nan")}
            | {"rank_lo": float(lo), "rank_hi": float(hi), "n_tasks": int(ranks.size)}
            | {f"rank:{n}": rank_columns[key].get(f"rank:{n}", np.nan) for n in names}
        )
    out = pd.DataFrame(rows, columns=[*RANKING_COLUMNS, *(f"rank:{n}" for n in names)])
    out["_name"] = [
        entry_name(fs, m) for fs, m in zip(out["feature_set"], out["model"], strict=True)
    ]
    out = out.sort_values(["mean_rank", "_name"], na_position="last", kind="stable")
    out = out.drop(columns="_name").reset_index(drop=True)
    out.attrs["n_boot_ok"] = int(ok.sum())
    return out


# --------------------------------------------------------------------------- fold metrics

_METRIC_KEYS = ["task", "feature_set", "model", "protocol", "metric"]


def fold_metric_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd (ddof 1) and count of each metric over (seed, fold), from tidy metric rows.

    One row per (task, feature_set, model, protocol, metric). NaN values (undefined metrics)
    are left out of the mean, sd and n; sd is NaN with fewer than two values.

    Raises:
        BenchInputError: missing columns, non-numeric values or duplicated rows (all listed).
    """
    source = "(metric rows)"
    required = [*_METRIC_KEYS, "seed", "fold", "value"]
    if not isinstance(metrics, pd.DataFrame):
        raise BenchInputError([f"expected a pandas DataFrame, got {type(metrics).__name__}"])
    missing = [c for c in required if c not in metrics.columns]
    if missing:
        raise BenchInputError([f"missing column(s): {missing}"], source)
    problems = []
    values = pd.to_numeric(metrics["value"], errors="coerce")
    non_numeric = values.isna() & metrics["value"].notna()
    if non_numeric.any():
        problems.append(f"value is not numeric in {int(non_numeric.sum())} row(s)")
    dup = metrics.duplicated(["task", "feature_set", "model", "seed", "fold", "metric"])
    if dup.any():
        problems.append(f"{int(dup.sum())} duplicated (task, entry, seed, fold, metric) row(s)")
    if problems:
        raise BenchInputError(problems, source)
    frame = metrics[_METRIC_KEYS].astype(str).assign(value=values.astype(float))
    grouped = frame.groupby(_METRIC_KEYS, sort=True)["value"]
    out = grouped.agg(mean="mean", sd=lambda v: v.std(ddof=1), n="count").reset_index()
    out["n"] = out["n"].astype(np.int64)
    return out.reindex(columns=[*_METRIC_KEYS, "mean", "sd", "n"])
