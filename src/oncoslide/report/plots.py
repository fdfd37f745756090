"""Figures for reports: Kaplan-Meier curves of risk groups, ROC curves and reliability
(calibration) plots of classifiers, and metric heat maps.

Every figure is a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas; pyplot is never
used, so nothing here touches (or leaks into) pyplot's global figure state or the user's backend.
Curves are drawn from lifelines' fitted estimates rather than with lifelines' own plotting helpers,
because those go through pyplot.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray

from oncoslide.errors import ConfigError

GROUPS = ("high", "low")
_GROUP_COLOURS = {"high": "#c0392b", "low": "#2471a3"}
_ENTRY_COLUMNS = ("task", "feature_set", "model")
_RISK_COLUMNS = ("patient_id", "fold", "time", "event", "risk")
# the median predicted risk of the fold's training part, written with the predictions
THRESHOLD_COLUMN = "risk_threshold"
# reliability plots: equal-width bins of the predicted probability on [0, 1]
CALIBRATION_BINS = 10
_CLASSIFICATION_COLUMNS = ("seed", "fold", "label")

FloatArray = NDArray[np.float64]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # explicit Agg canvas: rendering never depends on the global backend
    return fig


# ------------------------------------------------------------------------------ risk groups


def _risk_frame_problems(preds: pd.DataFrame) -> list[str]:
    """Every reason ``preds`` cannot be split into risk groups (empty when it can)."""
    missing = [c for c in _RISK_COLUMNS if c not in preds.columns]
    if missing:
        return [f"missing columns: {', '.join(missing)}"]
    problems: list[str] = []
    if preds.empty:
        problems.append("the prediction frame has no rows")
    for column in (*_ENTRY_COLUMNS, "seed"):
        if column in preds.columns and preds[column].nunique(dropna=False) > 1:
            values = ", ".join(map(str, sorted(preds[column].astype(str).unique())))
            problems.append(f"more than one {column} ({values}): pass one entry and one seed")
    risk = pd.to_numeric(preds["risk"], errors="coerce")
    time = pd.to_numeric(preds["time"], errors="coerce")
    event = pd.to_numeric(preds["event"], errors="coerce")
    if not np.isfinite(risk.to_numpy(dtype=float)).all():
        problems.append("risk has missing or non-finite values")
    if time.isna().any() or (time < 0).any():
        problems.append("time has missing or negative values")
    if not event.isin((0, 1)).all():
        problems.append("event must be 0 or 1 for every patient")
    duplicated = preds["patient_id"][preds["patient_id"].duplicated()]
    if len(duplicated):
        shown = ", ".join(map(str, duplicated.unique()[:5]))
        problems.append(f"patients appear more than once: {shown}")
    if THRESHOLD_COLUMN in preds.columns:
        problems += _threshold_problems(preds)
    return problems


def _threshold_problems(preds: pd.DataFrame) -> list[str]:
    """A training threshold must be one finite value per fold (or missing for the whole fold)."""
    threshold = pd.to_numeric(preds[THRESHOLD_COLUMN], errors="coerce")
    problems = []
    if np.isinf(threshold.to_numpy(dtype=float)).any():
        problems.append(f"{THRESHOLD_COLUMN} has infinite values")
    bad = []
    for fold, values in threshold.groupby(preds["fold"], sort=True):
        present = values.dropna()
        if len(present) and (len(present) < len(values) or present.nunique() > 1):
            bad.append(str(fold))
    if bad:
        problems.append(
            f"{THRESHOLD_COLUMN} must be one value for every patient of a fold (or missing for "
            f"all of them): not so in fold {', '.join(bad)}"
        )
    return problems


def risk_groups(preds: pd.DataFrame) -> pd.DataFrame:
    """Split the test patients of one entry and one seed into "high" and "low" risk groups.

    Each patient is compared with a threshold of its own fold, fixed without its test part: the
    fold's ``risk_threshold`` column, the median predicted risk of that fold's *training* part
    (written by the training code and the benchmark's protocols, one value per fold). A risk
    above the threshold is "high"; a risk at or below it (ties included) is "low". Thresholds are
    per fold because each fold's model has its own risk scale.

    Fallback, for predictions written before ``risk_threshold`` existed (the column absent, or
    missing for a whole fold): that fold is split at the median risk of its own *test* patients,
    as older versions did. That median is computed from the test part itself, so those groups
    are always balanced and look somewhat better separated than groups split at a threshold
    fixed in advance; ``threshold_source`` says which rule each patient got.

    Returns a frame with columns patient_id, fold, time, event, risk, group, threshold (the value
    the patient's risk was compared with) and threshold_source (``"train"`` or ``"test"``), in
    the input order. Raises :class:`ConfigError` listing every problem when the frame is not a
    single-entry, single-seed survival prediction frame, or its thresholds are not one finite
    value per fold.
    """
    problems = _risk_frame_problems(preds)
    if problems:
        raise ConfigError("cannot form risk groups: " + "; ".join(problems))
    out = preds.loc[:, list(_RISK_COLUMNS)].reset_index(drop=True)
    out["time"] = out["time"].astype(float)
    out["event"] = out["event"].astype(float)
    out["risk"] = out["risk"].astype(float)
    fold_median = out.groupby("fold")["risk"].transform("median")
    if THRESHOLD_COLUMN in preds.columns:
        trained = pd.to_numeric(preds[THRESHOLD_COLUMN], errors="coerce").to_numpy(dtype=float)
    else:
        trained = np.full(len(out), np.nan)
    from_training = np.isfinite(trained)
    threshold = np.where(from_training, trained, fold_median.to_numpy(dtype=float))
    out["group"] = np.where(out["risk"].to_numpy() > threshold, "high", "low")
    out["threshold"] = threshold
    out["threshold_source"] = np.where(from_training, "train", "test")
    return out


# ------------------------------------------------------------------------------ Kaplan-Meier


def _logrank_p(groups: pd.DataFrame) -> float:
    """Log-rank p-value of high vs low; NaN when a group is empty (nothing to compare)."""
    high = groups[groups["group"] == "high"]
    low = groups[groups["group"] == "low"]
    if high.empty or low.empty:
        return math.nan
    result = logrank_test(
        high["time"].to_numpy(float),
        low["time"].to_numpy(float),
        event_observed_A=high["event"].to_numpy(float),
        event_observed_B=low["event"].to_numpy(float),
    )
    return float(result.p_value)


def _format_p(p: float) -> str:
    if math.isnan(p):
        return "log-rank p = n/a"
    if p < 1e-4:
        return f"log-rank p = {p:.1e}"
    return f"log-rank p = {p:.4f}"


def _draw_group(ax: Axes, fitter: KaplanMeierFitter, data: pd.DataFrame, colour: str) -> None:
    """Step curve, shaded 95% band and censoring ticks of one fitted group."""
    surv = fitter.survival_function_.iloc[:, 0]
    band = fitter.confidence_interval_survival_function_
    times = surv.index.to_numpy(float)
    ax.step(times, surv.to_numpy(float), where="post", color=colour, label=fitter._label)
    ax.fill_between(
        times,
        band.iloc[:, 0].to_numpy(float),
        band.iloc[:, 1].to_numpy(float),
        step="post",
        color=colour,
        alpha=0.2,
        linewidth=0,
    )
    censored = data.loc[data["event"] == 0, "time"].to_numpy(float)
    if censored.size:
        at = fitter.survival_function_at_times(censored).to_numpy(float)
        ax.plot(censored, at, linestyle="none", marker="|", markersize=6, color=colour)


def _draw_at_risk(ax: Axes, table_ax: Axes, groups: pd.DataFrame, present: list[str]) -> None:
    """Numbers at risk (time >= t) of each group at the survival axes' x ticks."""
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    table_ax.set_xlim(lo, hi)
    table_ax.set_ylim(-0.5, len(present) - 0.5)
    table_ax.set_yticks(range(len(present)), [f"{g} risk" for g in present], fontsize=8)
    table_ax.set_xticks([])
    table_ax.tick_params(axis="y", length=0, pad=14)  # keep labels clear of the t = 0 counts
    table_ax.set_title("number at risk", fontsize=8, loc="left")
    for side in ("top", "right", "bottom", "left"):
        table_ax.spines[side].set_visible(False)
    for row, group in enumerate(present):
        times = groups.loc[groups["group"] == group, "time"].to_numpy(float)
        for t in ticks:
            n = int((times >= t).sum())
            table_ax.text(t, row, str(n), ha="center", va="center", fontsize=8)
    table_ax.invert_yaxis()


def km_figure(
    groups: pd.DataFrame, title: str, *, figsize: tuple[float, float] = (5.6, 4.4)
) -> tuple[Figure, float]:
    """Kaplan-Meier curves (95% bands, censoring ticks, numbers at risk) of the risk groups.

    ``groups`` is the output of :func:`risk_groups`. Returns the figure and the log-rank p-value
    of high vs low (NaN when one group is empty, e.g. when every risk is tied). A smaller
    ``figsize`` (inches) keeps the same font sizes, so thumbnails stay legible.
    """
    missing = [c for c in ("time", "event", "group") if c not in groups.columns]
    if missing:
        raise ConfigError(f"risk groups lack columns: {', '.join(missing)}")
    p_value = _logrank_p(groups)
    fig = _new_figure(*figsize)
    grid = fig.add_gridspec(2, 1, height_ratios=(4, 1), hspace=0.35)
    ax = fig.add_subplot(grid[0])
    present = [g for g in GROUPS if (groups["group"] == g).any()]
    for group in present:
        data = groups[groups["group"] == group]
        fitter = KaplanMeierFitter(label=f"{group} risk (n={len(data)})")
        fitter.fit(data["time"].to_numpy(float), data["event"].to_numpy(float))
        _draw_group(ax, fitter, data, _GROUP_COLOURS[group])
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.set_ylabel("survival probability")
    ax.set_xlabel("time")
    ax.set_title(f"{title}\n{_format_p(p_value)}", fontsize=9)
    if present:
        ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    _draw_at_risk(ax, fig.add_subplot(grid[1]), groups, present)
    return fig, p_value


# ------------------------------------------------------------------------------ classification


def _classification_problems(preds: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    """Every reason ``preds`` is not one entry's classification predictions (empty when it is)."""
    if len(classes) < 2 or len(set(classes)) != len(classes):
        return [f"classes must be at least 2 distinct labels, got {list(classes)}"]
    columns = [*_CLASSIFICATION_COLUMNS, *(f"prob_{c}" for c in classes)]
    missing = [c for c in columns if c not in preds.columns]
    if missing:
        return [f"missing columns: {', '.join(missing)}"]
    problems: list[str] = []
    for column in _ENTRY_COLUMNS:
        if column in preds.columns and preds[column].nunique(dropna=False) > 1:
            values = ", ".join(map(str, sorted(preds[column].astype(str).unique())))
            problems.append(f"more than one {column} ({values}): pass one entry")
    probs = preds[[f"prob_{c}" for c in classes]].apply(pd.to_numeric, errors="coerce")
    values = probs.to_numpy(dtype=float)
    if not np.isfinite(values).all():
        problems.append("probabilities have missing or non-finite values")
    elif (values < 0).any() or (values > 1).any():
        problems.append("probabilities must lie in [0, 1]")
    labels = preds["label"]
    if labels.isna().any():
        problems.append(f"label is missing in {int(labels.isna().sum())} row(s)")
    unknown = sorted(set(labels.dropna().astype(str)) - {str(c) for c in classes})
    if unknown:
        problems.append(f"labels not in classes {list(classes)}: {unknown[:10]}")
    return problems


def _check_classification(preds: pd.DataFrame, classes: Sequence[str], what: str) -> None:
    problems = _classification_problems(preds, [str(c) for c in classes])
    if problems:
        raise ConfigError(f"cannot draw {what}: " + "; ".join(problems))


def _roc_vertices(positive: np.ndarray, score: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The ROC curve of one split of positives vs the rest: (0, 0), then one vertex per distinct
    score, highest first. Tied scores move along a diagonal, which the trapezoid rule credits
    1/2 per tied pair, exactly as the Mann-Whitney AUC (and scikit-learn) does."""
    order = np.argsort(-score, kind="stable")
    s, pos = score[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last row of each distinct score
    tp = np.cumsum(pos)[last].astype(float)
    fp = np.cumsum(~pos)[last].astype(float)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def _limits(fpr: FloatArray, tpr: FloatArray, grid: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The TPR of a piecewise-linear ROC curve just left and just right of every grid FPR.

    A curve can rise vertically at one FPR (several vertices share it), so it has two values
    there: the lowest (reached from the left) and the highest (left to the right). Between its
    own vertices the curve is the straight segment from the highest TPR at one vertex FPR to the
    lowest at the next.
    """
    ux, first = np.unique(fpr, return_index=True)  # fpr is sorted: first = lowest TPR there
    last = np.r_[first[1:] - 1, fpr.size - 1]
    lo, hi = tpr[first], tpr[last]
    k = np.searchsorted(ux, grid, side="right") - 1
    exact = ux[k] == grid
    nxt = np.minimum(k + 1, ux.size - 1)
    span = ux[nxt] - ux[k]
    frac = np.where(exact | (span <= 0), 0.0, (grid - ux[k]) / np.where(span > 0, span, 1.0))
    between = hi[k] + frac * (lo[nxt] - hi[k])
    return np.where(exact, lo[k], between), np.where(exact, hi[k], between)


@dataclass(frozen=True)
class RocCurve:
    """An entry's ROC curve averaged over its (seed, fold) test parts.

    ``fpr`` and ``tpr`` are the vertices in drawing order (from (0, 0) to (1, 1)); ``n_cells`` is
    the number of (seed, fold) test parts averaged (those in which the AUC is defined); the
    curve is empty when there is none.
    """

    fpr: FloatArray
    tpr: FloatArray
    n_cells: int

    @property
    def auc(self) -> float:
        """The area under the curve (trapezoid rule); NaN for an empty curve."""
        if self.n_cells == 0:
            return math.nan
        return float(np.sum(np.diff(self.fpr) * (self.tpr[1:] + self.tpr[:-1]) / 2.0))

    def frame(self) -> pd.DataFrame:
        """The vertices as a table: point (drawing order), fpr, tpr."""
        return pd.DataFrame({"point": np.arange(self.fpr.size), "fpr": self.fpr, "tpr": self.tpr})


def mean_roc_curve(preds: pd.DataFrame, classes: Sequence[str]) -> RocCurve:
    """The ROC curve of one entry: the average of its (seed, fold) curves, whose area is the mean
    over (seed, fold) of the AUC, i.e. the benchmark's estimate on the same rows.

    Each fold has its own model and so its own score scale: pooling the scores of different
    folds into one ranking would draw a curve of a classifier that never existed (and whose
    area is not the benchmark's estimate). So a curve is drawn within every (seed, fold) and the
    curves are averaged vertically, at every false-positive rate where any of them has a vertex
    (just left and just right of it). Every curve is linear between those rates, so the average
    is exact and its area equals the mean of the curves' areas.

    Binary tasks (two ``classes``): the positive class is ``classes[-1]``, scored by its
    ``prob_<class>``. Multiclass: each (seed, fold)'s curve is the macro average of its
    one-vs-rest curves (class k vs the rest, scored by ``prob_<k>``) over the classes present in
    that test part, so its area is the macro one-vs-rest AUC. A (seed, fold) with fewer than two
    classes present has no AUC and is left out, as the benchmark's statistics do.

    ``preds`` holds one entry's rows (any number of seeds and folds) with columns seed, fold,
    label and ``prob_<class>`` for every class. Raises :class:`ConfigError` listing every
    problem otherwise.
    """
    classes = [str(c) for c in classes]
    _check_classification(preds, classes, "ROC curves")
    curves: list[tuple[float, FloatArray, FloatArray]] = []  # (weight, fpr, tpr)
    n_cells = 0
    for _, cell in preds.groupby(["seed", "fold"], sort=True):
        labels = cell["label"].astype(str).to_numpy()
        present = [c for c in classes if (labels == c).any()]
        if len(present) < 2:
            continue
        n_cells += 1
        split = [classes[-1]] if len(classes) == 2 else present
        for c in split:
            score = cell[f"prob_{c}"].to_numpy(dtype=float)
            fpr, tpr = _roc_vertices(labels == c, score)
            curves.append((1.0 / len(split), fpr, tpr))
    if not n_cells:
        return RocCurve(np.empty(0), np.empty(0), 0)
    grid = np.unique(np.concatenate([fpr for _, fpr, _ in curves]))
    left, right = np.zeros(grid.size), np.zeros(grid.size)
    for weight, fpr, tpr in curves:
        lo, hi = _limits(fpr, tpr, grid)
        left += weight * lo / n_cells
        right += weight * hi / n_cells
    x = np.repeat(grid, 2)
    y = np.column_stack([left, right]).ravel()
    # every curve starts at (0, 0) and ends at (1, 1); the weighted sums only up to rounding
    y[0], y[-1] = 0.0, 1.0
    keep = np.r_[True, (np.diff(x) != 0) | (np.diff(y) != 0)]  # no repeated vertices
    return RocCurve(x[keep], y[keep], n_cells)


@dataclass(frozen=True)
class Calibration:
    """A reliability table: predicted probability in bins vs the observed frequency.

    ``bins``: one row per bin (``bin``, ``lower``, ``upper``, ``n``, ``mean_predicted``,
    ``observed``; the last two NaN for empty bins). ``target`` says what was binned.
    ``ece``: expected calibration error, the n-weighted mean over non-empty bins of
    |mean_predicted - observed|. ``brier``: the mean over patients of the squared error of the
    probabilities (binary: (p - y)^2; multiclass: the sum over classes).
    """

    bins: pd.DataFrame
    target: str
    ece: float
    brier: float
    n: int


def calibration_bins(
    preds: pd.DataFrame, classes: Sequence[str], n_bins: int = CALIBRATION_BINS
) -> Calibration:
    """Reliability of one entry's probabilities, pooled over its folds and seeds.

    Unlike risk scores, probabilities are on one absolute scale in every fold, so the test
    predictions of all folds (and seeds) are pooled. Bins have equal width: bin i holds
    ``i / n_bins <= p < (i + 1) / n_bins`` (the last one also p = 1). Binary tasks bin the
    probability of the positive class ``classes[-1]`` against the share of positives;
    multiclass tasks bin the top-label confidence (the largest probability) against the share
    of patients whose most probable class is their class (ties go to the first class).

    ``preds`` holds one entry's rows with columns seed, fold, label and ``prob_<class>`` for
    every class; raises :class:`ConfigError` listing every problem otherwise.
    """
    classes = [str(c) for c in classes]
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    _check_classification(preds, classes, "a reliability plot")
    labels = preds["label"].astype(str).to_numpy()
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    onehot = (labels[:, None] == np.asarray(classes)[None, :]).astype(float)
    if len(classes) == 2:
        target = f"P({classes[-1]})"
        predicted, observed = probs[:, 1], onehot[:, 1]
        brier = float(np.mean((predicted - observed) ** 2)) if labels.size else math.nan
    else:
        target = "top-label confidence"
        top = np.argmax(probs, axis=1)
        predicted = probs[np.arange(labels.size), top]
        observed = onehot[np.arange(labels.size), top]
        brier = float(np.mean(((probs - onehot) ** 2).sum(axis=1))) if labels.size else math.nan
    edges = np.arange(n_bins + 1) / n_bins  # k / n exactly, not accumulated steps
    index = np.clip(np.searchsorted(edges, predicted, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=predicted, minlength=n_bins)
    hits = np.bincount(index, weights=observed, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(counts > 0, sums / counts, np.nan)
        frequency = np.where(counts > 0, hits / counts, np.nan)
    bins = pd.DataFrame(
        {
            "bin": np.arange(n_bins),
            "lower": edges[:-1],
            "upper": edges[1:],
            "n": counts,
            "mean_predicted": mean_predicted,
            "observed": frequency,
        }
    )
    filled = counts > 0
    gap = np.abs(mean_predicted[filled] - frequency[filled])
    ece = float(np.sum(counts[filled] * gap) / counts.sum()) if labels.size else math.nan
    return Calibration(bins, target, ece, brier, int(labels.size))


@dataclass(frozen=True)
class ClassifierCurves:
    """What one entry contributes to a classification figure: its legend name, ROC curve and
    reliability table."""

    name: str
    roc: RocCurve
    calibration: Calibration


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def classification_figure(
    entries: Sequence[ClassifierCurves],
    title: str,
    *,
    figsize: tuple[float, float] = (8.4, 3.9),
    colours: Sequence[str] | None = None,
) -> Figure:
    """ROC curves (left) and reliability diagrams (right) of several entries on one figure.

    The ROC legend gives each entry's AUC (the area of its averaged curve, see
    :func:`mean_roc_curve`), the reliability legend its ECE and Brier score; an entry without a
    defined AUC is listed with ``n/a``. ``colours`` (one per entry) keeps an entry's colour equal
    across figures.
    """
    if not entries:
        raise ConfigError("a classification figure needs at least one entry")
    palette = list(colours) if colours is not None else []
    default = [f"C{i % 10}" for i in range(len(entries))]
    colours = palette if len(palette) == len(entries) else default
    fig = _new_figure(*figsize)
    roc_ax, cal_ax = fig.subplots(1, 2)
    for ax in (roc_ax, cal_ax):
        ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=0.8)
        # a little room beyond [0, 1]: segments along the frame (e.g. at FPR 1) stay visible
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    for entry, colour in zip(entries, colours, strict=True):
        roc, cal = entry.roc, entry.calibration
        roc_ax.plot(
            roc.fpr,
            roc.tpr,
            color=colour,
            linewidth=1.4,
            label=f"{entry.name} (AUC {_fmt(roc.auc)})",
        )
        filled = cal.bins[cal.bins["n"] > 0]
        cal_ax.plot(
            filled["mean_predicted"],
            filled["observed"],
            color=colour,
            marker="o",
            markersize=3.5,
            linewidth=1.2,
            label=f"{entry.name} (ECE {_fmt(cal.ece)}, Brier {_fmt(cal.brier)})",
        )
    roc_ax.set_xlabel("false positive rate")
    roc_ax.set_ylabel("true positive rate")
    roc_ax.set_title("ROC (mean over folds)", fontsize=9)
    targets = sorted({e.calibration.target for e in entries})
    cal_ax.set_xlabel(f"predicted {', '.join(targets)}")
    cal_ax.set_ylabel("observed frequency")
    n_bins = len(entries[0].calibration.bins)
    cal_ax.set_title(f"reliability ({n_bins} equal-width bins)", fontsize=9)
    for ax in (roc_ax, cal_ax):
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ heat map


def heatmap_figure(matrix: pd.DataFrame, title: str) -> Figure:
    """Annotated heat map of a task x entry matrix of estimates (NaN cells are left blank)."""
    if matrix.empty:
        raise ConfigError("the heat map matrix is empty")
    values = matrix.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    fig = _new_figure(max(4.0, 1.1 * n_cols + 2.5), max(2.5, 0.55 * n_rows + 2.2))
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:  # a flat matrix still needs a non-degenerate colour range
        vmin, vmax = vmin - 0.05, vmax + 0.05
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto"
    )
    ax.set_xticks(range(n_cols), [str(c) for c in matrix.columns], rotation=35, ha="right")
    ax.set_yticks(range(n_rows), [str(r) for r in matrix.index])
    midpoint = (vmin + vmax) / 2
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            text = "–" if not np.isfinite(v) else f"{v:.3f}"
            colour = "black" if np.isfinite(v) and v > midpoint else "white"
            if not np.isfinite(v):
                colour = "grey"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ encoding


def figure_png_base64(fig: Figure, dpi: int = 100) -> str:
    """The figure as a base64-encoded PNG (ASCII text, ready for a ``data:image/png`` URI)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
