"""Figures for reports: Kaplan-Meier curves of risk groups and metric heat maps.

Every figure is a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas; pyplot is never
used, so nothing here touches (or leaks into) pyplot's global figure state or the user's backend.
Curves are drawn from lifelines' fitted estimates rather than with lifelines' own plotting helpers,
because those go through pyplot.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oncoslide.errors import ConfigError

GROUPS = ("high", "low")
_GROUP_COLOURS = {"high": "#c0392b", "low": "#2471a3"}
_ENTRY_COLUMNS = ("task", "feature_set", "model")
_RISK_COLUMNS = ("patient_id", "fold", "time", "event", "risk")
# the median predicted risk of the fold's training part, written with the predictions
THRESHOLD_COLUMN = "risk_threshold"


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
