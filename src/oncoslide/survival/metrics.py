"""Survival metrics: Harrell's and Uno's C, time-dependent AUC and the (integrated) Brier score.

The definitions follow scikit-survival's (``sksurv.metrics``) so numbers are comparable with
the literature, but the code is our own and vectorised for bootstrap use. See docs/metrics.md
for the conventions (tie handling, truncation, the evaluation grid) and the few deliberate
deviations (undefined metrics are NaN instead of an exception; inverse-probability-of-censoring
weights are only demanded at the times a formula actually uses).

Survival targets are structured arrays as produced by :func:`oncoslide.survival.make_survival`
or scikit-survival. Their two fields are found by NAME, never by position
(:func:`oncoslide.survival.target.survival_fields`: ``event``/``status``/``fstat``/``cens``/...
for the indicator, ``time``/``futime``/``duration``/... for the time, else the one boolean field
is the indicator), so ``("time", "event")`` reads like ``("event", "time")``. Event codes must be
exactly 0/1 or bool (True/1 = event) and every time finite and >= 0 (0 is allowed); a metric
collects every problem of its inputs and raises one :class:`MetricInputError` listing them.

Empty and all-censored inputs (one rule for every metric): a test set without events, n = 0
included, is a sample on which the metrics are undefined, not malformed input. No metric raises
for it alone: Harrell's and Uno's C are NaN with zero pair counts, the td-AUC is NaN at every
time and its mean NaN, the Brier score is NaN at every time and the IBS NaN (scikit-survival
raises for such test sets), and :func:`survival_metrics` returns NaN for all of them. No censoring
weight is then needed, so even an empty training set is accepted. :func:`kaplan_meier` returns
S = 1 at the observed times (empty arrays for n = 0); :func:`evaluation_times`, which places its
grid at event-time quantiles, raises :class:`TimeGridError` (no events) in both cases. An empty
training set leaves the censoring survival G unknown at every time: a metric that needs a weight
raises :class:`CensoringSupportError`. An all-censored training set is ordinary (G is its
empirical censoring survival, reaching 0 at its last time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from oncoslide._checks import as_events, as_vector
from oncoslide.errors import ConfigError
from oncoslide.survival.target import read_survival

__all__ = [
    "DEFAULT_QUANTILES",
    "CensoringSupportError",
    "ConcordanceResult",
    "MetricInputError",
    "TimeGridError",
    "brier_score",
    "concordance_index_censored",
    "concordance_index_ipcw",
    "cumulative_dynamic_auc",
    "evaluation_times",
    "integrated_brier_score",
    "kaplan_meier",
    "survival_metrics",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.intp]

DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


# --------------------------------------------------------------------------- errors


class MetricInputError(ConfigError):
    """The inputs of a metric are malformed (shapes, lengths, non-finite values, bad options)."""


class CensoringSupportError(MetricInputError):
    """The censoring distribution cannot weight a time a metric needs.

    Raised when the Kaplan-Meier estimate of the censoring survival G(t), fitted on the training
    targets, is zero at a needed time, or when a needed time lies beyond the last training time
    while G is still positive there (G is unknown beyond the training follow-up).
    """


class TimeGridError(MetricInputError):
    """Evaluation times lie outside the test follow-up, or too few valid times remain."""


class ConcordanceResult(NamedTuple):
    """A concordance index with the pair counts behind it (as scikit-survival reports them).

    ``concordant + discordant + tied_risk`` is the number of comparable pairs; ``tied_time`` is
    the number of those comparable pairs whose two times are equal (an event and a censoring).
    """

    cindex: float
    concordant: int
    discordant: int
    tied_risk: int
    tied_time: int


# --------------------------------------------------------------------------- validation


def _raise_if(
    problems: list[str], where: str, error: type[MetricInputError] = MetricInputError
) -> None:
    """Raise one error listing every collected problem, if any."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise error(f"{where}: invalid input:\n{lines}")


def _vector(
    x: ArrayLike, name: str, problems: list[str], *, nonnegative: bool = False
) -> FloatArray:
    """A finite 1-D float64 array (>= 0 with ``nonnegative``); empty when unusable (problems
    recorded)."""
    arr = as_vector(x, name, problems, nonnegative=nonnegative)
    return np.empty(0) if arr is None else arr


def _events(x: ArrayLike, name: str, problems: list[str]) -> BoolArray:
    """Event indicators as a 1-D bool array; empty when unusable (problems recorded)."""
    arr = as_events(x, name, problems)
    return np.empty(0, dtype=bool) if arr is None else arr


def _target(y: Any, name: str, problems: list[str]) -> tuple[BoolArray, FloatArray]:
    """Read a structured survival target into (event, time) by field name, recording every
    problem (unreadable fields, event codes other than 0/1, non-finite or negative times)."""
    result = read_survival(y, name, problems)
    return (np.empty(0, dtype=bool), np.empty(0)) if result is None else result


def _check_tol(tied_tol: float, problems: list[str]) -> None:
    if not (np.isfinite(tied_tol) and tied_tol >= 0):
        problems.append(f"tied_tol must be finite and >= 0, got {tied_tol!r}")


def _check_length(n_expected: int, arr: np.ndarray, name: str, problems: list[str]) -> None:
    if arr.ndim >= 1 and arr.shape[0] != n_expected:
        problems.append(f"{name} has {arr.shape[0]} rows but the test target has {n_expected}")


def _grid(times: ArrayLike, problems: list[str], *, increasing: bool) -> FloatArray:
    """Validate evaluation times; sort and de-duplicate them unless ``increasing`` is demanded."""
    own: list[str] = []
    arr = _vector(np.atleast_1d(times), "times", own, nonnegative=True)
    if not own and arr.size == 0:
        own.append("times must not be empty")
    # Columns of a 2-D estimate belong to times positionally: never reorder them silently.
    if not own and increasing and arr.size > 1 and not (np.diff(arr) > 0).all():
        own.append("times must be strictly increasing when the estimate has one column per time")
    problems.extend(own)
    return arr if increasing or own else np.unique(arr)


def _check_follow_up(times: FloatArray, test_time: FloatArray, where: str) -> None:
    """Evaluation times must lie in [min test time, max test time), as in scikit-survival."""
    lo, hi = float(test_time.min()), float(test_time.max())
    bad = times[(times < lo) | (times >= hi)]
    if bad.size:
        raise TimeGridError(
            f"{where}: evaluation times {bad.tolist()} lie outside the test follow-up [{lo}, {hi})"
        )


# --------------------------------------------------------------------------- Kaplan-Meier


def _counts(time: FloatArray, event: BoolArray) -> tuple[FloatArray, IntArray, IntArray, IntArray]:
    """Unique times with their event count, censoring count and number at risk just before."""
    uniq, inverse = np.unique(time, return_inverse=True)
    n_events = np.bincount(inverse, weights=event, minlength=uniq.size).astype(np.intp)
    n_total = np.bincount(inverse, minlength=uniq.size).astype(np.intp)
    at_risk = time.size - np.concatenate(([0], np.cumsum(n_total)[:-1]))
    return uniq, n_events, n_total - n_events, at_risk


def kaplan_meier(
    time: ArrayLike, event: ArrayLike, *, reverse: bool = False
) -> tuple[FloatArray, FloatArray]:
    """Kaplan-Meier survival curve evaluated at the unique observed times.

    Args:
        time: observed times (event or censoring), shape (n,).
        event: event indicators (bool or 0/1), shape (n,).
        reverse: estimate the *censoring* survival G(t) = P(C > t) instead. At a time shared by
            events and censorings the events are taken to come first, so they leave the
            censoring risk set before the censorings are counted (scikit-survival's
            convention).

    Returns:
        ``(unique_times, survival)``: the right-continuous step function takes the value
        ``survival[k]`` on ``[unique_times[k], unique_times[k + 1])`` and 1 before the first time.
        Without events it is 1 at every observed time; with no observation both arrays are
        empty (nothing is known).

    Raises:
        MetricInputError: mismatched lengths, non-finite or negative times, bad event codes.
    """
    problems: list[str] = []
    t = _vector(time, "time", problems, nonnegative=True)
    e = _events(event, "event", problems)
    if not problems and t.size != e.size:
        problems.append(f"time has {t.size} values but event has {e.size}")
    _raise_if(problems, "kaplan_meier")
    uniq, n_events, n_censored, at_risk = _counts(t, e)
    if reverse:
        hits, risk = n_censored, at_risk - n_events
    else:
        hits, risk = n_events, at_risk
    # 0/0 (nobody left at risk, nothing happening) contributes a factor of 1.
    ratio = np.divide(hits, risk, out=np.zeros(uniq.size), where=hits > 0)
    return uniq, np.cumprod(1.0 - ratio)


class _StepFunction:
    """A right-continuous Kaplan-Meier step function that refuses to extrapolate."""

    def __init__(self, times: FloatArray, values: FloatArray, what: str) -> None:
        self.times, self.values, self.what = times, values, what

    def __call__(self, t: FloatArray) -> FloatArray:
        t = np.asarray(t, dtype=np.float64)
        if self.times.size == 0:  # fitted on nothing: unknown everywhere
            if t.size:
                raise CensoringSupportError(
                    f"{self.what} is unknown: there are no training targets, but it is needed "
                    f"at {np.unique(t).tolist()[:5]}"
                )
            return np.ones(0)
        beyond = t > self.times[-1]
        # Past the last observed time the curve is known only if it already reached 0.
        if beyond.any() and self.values[-1] > 0:
            raise CensoringSupportError(
                f"{self.what} is unknown after the last training time {self.times[-1]}, but it "
                f"is needed at {np.unique(t[beyond]).tolist()[:5]}; evaluate at earlier times "
                "(e.g. pass tau, or use evaluation_times())"
            )
        idx = np.searchsorted(self.times, t, side="right") - 1
        out = np.where(idx >= 0, self.values[np.maximum(idx, 0)], 1.0)
        out[beyond] = 0.0
        return out


def _censoring_survival(event: BoolArray, time: FloatArray) -> _StepFunction:
    """The censoring survival G(t) = P(C > t), Kaplan-Meier on the training targets."""
    times, values = kaplan_meier(time, event, reverse=True)
    return _StepFunction(times, values, "the censoring survival G(t)")


def _ipcw(cens: _StepFunction, event: BoolArray, time: FloatArray, needed: BoolArray) -> FloatArray:
    """Weights 1/G(t_i) for the ``needed`` samples (events), 0 elsewhere; G must be positive."""
    weights = np.zeros(time.size)
    g = cens(time[needed])
    if (g <= 0).any():
        bad = np.unique(time[needed][g <= 0])
        raise CensoringSupportError(
            f"the censoring survival G(t) estimated on the training targets is zero at event "
            f"time(s) {bad.tolist()[:5]}; truncate earlier (tau or an earlier evaluation grid)"
        )
    weights[needed] = 1.0 / g
    return weights


# --------------------------------------------------------------------------- concordance


def _prefix_less(a: IntArray, p: IntArray, v: IntArray) -> IntArray:
    """For each query q: ``#{k < p[q] : a[k] < v[q]}``, for a permutation ``a`` of 0..n-1.

    A merge-sort tree built level by level with numpy: at level l the array is cut into blocks
    of 2**l, each block sorted (as one sort of ``block * n + a``). The prefix [0, p) is the union
    of one block per set bit of p, so every level answers its queries with one searchsorted.
    Time O(n log^2 n) in C loops, no Python loop over samples.
    """
    n = a.size
    out = np.zeros(p.size, dtype=np.intp)
    positions = np.arange(n, dtype=np.intp)
    level = 0
    while (1 << level) <= n:
        use = ((p >> level) & 1).astype(bool)
        if use.any():
            keys = np.sort((positions >> level) * n + a)
            block = (p[use] >> level) - 1  # the block of 2**level ending at the bit's cut
            hits = np.searchsorted(keys, block * n + v[use], side="left")
            out[use] += hits - block * (1 << level)
        level += 1
    return out


# Below this many (event, subject) pairs the dense pairwise computation beats the tree: the tree
# pays a fixed numpy-call overhead per level, which dominates for bootstrap-sized samples.
_DENSE_MAX_PAIRS = 20_000


def _pair_counts(
    event: BoolArray, time: FloatArray, risk: FloatArray, tied_tol: float
) -> tuple[IntArray, IntArray, IntArray, IntArray, int]:
    """Per event sample: indices, comparable, concordant and tied-risk pair counts; tied times."""
    if int(event.sum()) * time.size <= _DENSE_MAX_PAIRS:
        return _pair_counts_dense(event, time, risk, tied_tol)
    return _pair_counts_tree(event, time, risk, tied_tol)


def _pair_counts_dense(
    event: BoolArray, time: FloatArray, risk: FloatArray, tied_tol: float
) -> tuple[IntArray, IntArray, IntArray, IntArray, int]:
    """:func:`_pair_counts` by an explicit (n_events, n) comparison matrix, for small samples."""
    events, start, tied_time = _comparable_suffix(event, time)
    order = np.lexsort((~event, time))
    in_suffix = np.arange(time.size) >= start[:, None]
    diff = risk[order] - risk[events][:, None]  # partner minus event, partners in time order
    # |diff| <= tol is a tie; diff < -tol is exactly "lower and not tied" (concordant).
    concordant = (in_suffix & (diff < -tied_tol)).sum(axis=1)
    at_most = (in_suffix & (diff <= tied_tol)).sum(axis=1)
    return events, time.size - start, concordant, at_most - concordant, tied_time


def _comparable_suffix(event: BoolArray, time: FloatArray) -> tuple[IntArray, IntArray, int]:
    """Event indices, where their comparable partners start in (time, event-first) order, and
    the number of comparable pairs tied in time.

    Sorted by time with events before censorings at equal times, the comparable partners of an
    event (later times, or censored at its time) are exactly the suffix after the events at its
    time.
    """
    events = np.flatnonzero(event)
    time_sorted = np.sort(time)
    t_ev = time[events]
    t_ev_sorted = np.sort(t_ev)
    n_earlier = np.searchsorted(time_sorted, t_ev, side="left")
    n_events_same = np.searchsorted(t_ev_sorted, t_ev, "right") - np.searchsorted(t_ev_sorted, t_ev)
    n_same = np.searchsorted(time_sorted, t_ev, side="right") - n_earlier
    return events, n_earlier + n_events_same, int((n_same - n_events_same).sum())


def _pair_counts_tree(
    event: BoolArray, time: FloatArray, risk: FloatArray, tied_tol: float
) -> tuple[IntArray, IntArray, IntArray, IntArray, int]:
    """:func:`_pair_counts` in O(n log^2 n) for large samples.

    A pair (i, j) is comparable when i has an event and t_j > t_i, or t_j == t_i and j is
    censored. Sorting by (time, event before censoring) turns the comparable partners of every
    event into a suffix of that order, so counting concordant partners is a "how many values
    below x in a suffix" query answered for all events at once by :func:`_prefix_less`.
    """
    n = time.size
    events, start, tied_time = _comparable_suffix(event, time)
    comparable = n - start  # the partners of event k are order[start[k]:]
    order = np.lexsort((~event, time))
    risk_order = np.argsort(risk, kind="stable")
    risk_sorted = risk[risk_order]
    rank = np.empty(n, dtype=np.intp)
    rank[risk_order] = np.arange(n)
    ranks_in_time_order = rank[order]

    # rank < lo  <=>  risk - x < -tol (concordant) ;  rank < hi  <=>  risk - x <= tol, with
    # the differences rounded exactly as the dense path (and scikit-survival) round them.
    x = risk[events]
    lo = _count_true_prefix(risk_sorted, x, lambda r, xq: r - xq < -tied_tol)
    hi = _count_true_prefix(risk_sorted, x, lambda r, xq: r - xq <= tied_tol)
    before = _prefix_less(
        ranks_in_time_order, np.concatenate((start, start)), np.concatenate((lo, hi))
    )
    below = lo - before[: events.size]
    at_most = hi - before[events.size :]
    return events, comparable, below, at_most - below, tied_time


def _count_true_prefix(
    sorted_values: FloatArray,
    queries: FloatArray,
    predicate: Callable[[FloatArray, FloatArray], BoolArray],
) -> IntArray:
    """For each query q: how many ``sorted_values`` v satisfy ``predicate(v, q)``.

    ``predicate`` must be true on a prefix of the sorted values (monotone in v, as
    ``v - q < c`` is: rounding is monotone). A vectorised bisection, so the count follows the
    predicate as the floating-point hardware evaluates it: a searchsorted on a shifted threshold
    (``v < q - c``) rounds ``q - c`` instead of ``v - q`` and disagrees with the dense path
    within an ulp of the tolerance.
    """
    lo = np.zeros(queries.size, dtype=np.intp)
    hi = np.full(queries.size, sorted_values.size, dtype=np.intp)
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        probe = np.minimum(mid, sorted_values.size - 1)
        true = predicate(sorted_values[probe], queries)
        lo = np.where(active & true, mid + 1, lo)
        hi = np.where(active & ~true, mid, hi)


def _concordance(
    event: BoolArray, time: FloatArray, risk: FloatArray, weights: FloatArray, tied_tol: float
) -> ConcordanceResult:
    """Weighted concordance: each pair is weighted by the weight of its event sample."""
    events, comparable, concordant, tied, tied_time = _pair_counts(event, time, risk, tied_tol)
    w = weights[events]
    numerator = float(np.dot(w, concordant + 0.5 * tied))
    denominator = float(np.dot(w, comparable))
    n_comparable = int(comparable.sum())
    n_concordant, n_tied = int(concordant.sum()), int(tied.sum())
    # No comparable pair (or all of them weighted 0): the index is undefined.
    cindex = numerator / denominator if denominator > 0 else float("nan")
    return ConcordanceResult(
        cindex, n_concordant, n_comparable - n_concordant - n_tied, n_tied, tied_time
    )


def concordance_index_censored(
    event: ArrayLike, time: ArrayLike, risk: ArrayLike, tied_tol: float = 1e-8
) -> ConcordanceResult:
    """Harrell's concordance index for right-censored data.

    A pair is comparable when the shorter time is an event; an event and a censoring at the same
    time are comparable too (the censored subject outlived the event), two events at the same
    time are not. A comparable pair is concordant when the event has the higher risk; risks
    within ``tied_tol`` count 1/2. O(n log^2 n) and vectorised.

    Args:
        event: event indicators (bool or 0/1), shape (n,).
        time: event or censoring times, shape (n,).
        risk: predicted risk scores, higher = earlier event, shape (n,).
        tied_tol: risks whose absolute difference is at most this are tied.

    Returns:
        :class:`ConcordanceResult`; ``cindex`` is NaN (with zero counts where applicable) when
        there is no comparable pair, e.g. no events or no samples.

    Raises:
        MetricInputError: mismatched lengths, non-finite values, negative times, bad event codes
            or tolerance.
    """
    problems: list[str] = []
    e = _events(event, "event", problems)
    t = _vector(time, "time", problems, nonnegative=True)
    r = _vector(risk, "risk", problems)
    _check_tol(tied_tol, problems)
    if not problems and not (e.size == t.size == r.size):
        problems.append(f"lengths differ: event {e.size}, time {t.size}, risk {r.size}")
    _raise_if(problems, "concordance_index_censored")
    return _concordance(e, t, r, np.ones(t.size), float(tied_tol))


def concordance_index_ipcw(
    survival_train: np.ndarray,
    survival_test: np.ndarray,
    risk: ArrayLike,
    tau: float | None = None,
    tied_tol: float = 1e-8,
) -> ConcordanceResult:
    """Uno's concordance index: Harrell's pairs weighted by 1/G(t_i)^2.

    G is the Kaplan-Meier censoring survival fitted on ``survival_train``. With ``tau``, only
    pairs whose event happens strictly before ``tau`` carry weight (the others still appear in
    the counts, as in scikit-survival), and G is only needed before ``tau``. A test set without
    events (or without samples) gives NaN with zero counts and needs no weight at all.

    Raises:
        MetricInputError: malformed inputs.
        CensoringSupportError: G is zero, or unknown (beyond the training follow-up, or no
            training targets), at the time of a weighted event; choose ``tau`` inside the
            training follow-up.
    """
    problems: list[str] = []
    e_train, t_train = _target(survival_train, "survival_train", problems)
    n_known = len(problems)
    event, time = _target(survival_test, "survival_test", problems)
    r = _vector(risk, "risk", problems)
    if len(problems) == n_known:  # both parsed: their lengths can be compared
        _check_length(time.size, r, "risk", problems)
    _check_tol(tied_tol, problems)
    if tau is not None and not (np.isfinite(tau) and tau > 0):
        problems.append(f"tau must be a finite positive time, got {tau!r}")
    _raise_if(problems, "concordance_index_ipcw")
    needed = event if tau is None else event & (time < tau)
    ipcw = _ipcw(_censoring_survival(e_train, t_train), event, time, needed)
    return _concordance(event, time, r, np.square(ipcw), float(tied_tol))


# --------------------------------------------------------------------------- time-dependent AUC


def _auc_sorted(
    risk: FloatArray, case_weight: FloatArray, control: FloatArray, tied_tol: float
) -> FloatArray:
    """Weighted AUC of cases vs controls for one risk vector and k case/control definitions.

    ``case_weight`` and ``control`` are (n, k). Risks are grouped into runs whose consecutive
    sorted values differ by at most ``tied_tol`` (the thresholds of scikit-survival's ROC); a
    case beats the controls of every lower group and half of those in its own group. This is
    exactly the trapezoidal area under the ROC curve through those thresholds.
    """
    order = np.argsort(-risk, kind="stable")
    r = risk[order]
    starts = np.flatnonzero(np.concatenate(([True], np.abs(np.diff(r)) > tied_tol)))
    cases_g = np.add.reduceat(case_weight[order], starts, axis=0)
    controls_g = np.add.reduceat(control[order], starts, axis=0)
    total_cases = cases_g.sum(axis=0)
    total_controls = controls_g.sum(axis=0)
    lower_controls = total_controls - np.cumsum(controls_g, axis=0)
    area = (cases_g * (lower_controls + 0.5 * controls_g)).sum(axis=0)
    denominator = total_cases * total_controls
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, area / np.where(denominator > 0, denominator, 1.0), np.nan)


def _mean_auc(auc: FloatArray, times: FloatArray, event: BoolArray, time: FloatArray) -> float:
    """AUC(t) averaged with the weights -dS(t) of the test Kaplan-Meier, as scikit-survival."""
    if times.size == 1:
        return float(auc[0])
    km_times, km_surv = kaplan_meier(time, event)
    s = _StepFunction(km_times, km_surv, "the test survival")(times)
    drop = -np.diff(np.concatenate(([1.0], s)))
    total = 1.0 - s[-1]
    return float(np.dot(auc, drop) / total) if total > 0 else float("nan")


def cumulative_dynamic_auc(
    survival_train: np.ndarray,
    survival_test: np.ndarray,
    risk: ArrayLike,
    times: ArrayLike,
    tied_tol: float = 1e-8,
) -> tuple[FloatArray, float]:
    """Cumulative/dynamic time-dependent AUC with inverse-probability-of-censoring weights.

    At time t the cases are the events with t_i <= t (weight 1/G(t_i)), the controls the
    subjects with t_i > t (weight 1). ``risk`` is (n,) for one score at all times or (n, T)
    with column j scored at ``times[j]`` (then ``times`` must be strictly increasing; a 1-D
    ``risk`` accepts any order and the result is for the sorted unique times).

    Returns:
        ``(auc, mean_auc)``: AUC per time (NaN where there is no case or no control), and their
        mean weighted by the test Kaplan-Meier decrements -dS(t), divided by 1 - S(t_last).
        A test set without events (n = 0 included) has no case: NaN everywhere.

    Raises:
        MetricInputError: malformed inputs.
        TimeGridError: a time outside [min test time, max test time) (not checked for n = 0).
        CensoringSupportError: G zero or unknown at an event time <= max(times).
    """
    problems: list[str] = []
    e_train, t_train = _target(survival_train, "survival_train", problems)
    n_known = len(problems)
    event, time = _target(survival_test, "survival_test", problems)
    test_ok = len(problems) == n_known
    _check_tol(tied_tol, problems)
    r = np.asarray(risk, dtype=np.float64) if _is_numeric(risk) else None
    if r is None or r.ndim not in (1, 2):
        problems.append("risk must be a numeric (n,) or (n, n_times) array")
        r = None
    elif not np.isfinite(r).all():
        problems.append("risk has non-finite values")
    n_known = len(problems)
    grid = _grid(times, problems, increasing=r is not None and r.ndim == 2)
    grid_ok = len(problems) == n_known
    if r is not None and test_ok:
        _check_length(time.size, r, "risk", problems)
    if r is not None and r.ndim == 2 and grid_ok and r.shape[1] != grid.size:
        problems.append(f"risk has {r.shape[1]} columns but there are {grid.size} times")
    _raise_if(problems, "cumulative_dynamic_auc")
    assert r is not None  # for the type checker: problems were raised above otherwise
    if time.size:
        _check_follow_up(grid, time, "cumulative_dynamic_auc")
    if not event.any():  # no case at any time (n = 0 included): undefined, no weight needed
        return np.full(grid.size, np.nan), float("nan")

    # Only events that can be cases (t_i <= last time) need a censoring weight.
    cens = _censoring_survival(e_train, t_train)
    ipcw = _ipcw(cens, event, time, event & (time <= grid[-1]))
    case = (time[:, None] <= grid[None, :]) & event[:, None]
    case_weight = case * ipcw[:, None]
    control = (time[:, None] > grid[None, :]).astype(np.float64)
    if r.ndim == 1:
        auc = _auc_sorted(r, case_weight, control, tied_tol)
    else:
        auc = np.array(
            [
                _auc_sorted(r[:, j], case_weight[:, j : j + 1], control[:, j : j + 1], tied_tol)[0]
                for j in range(grid.size)
            ]
        )
    return auc, _mean_auc(auc, grid, event, time)


def _is_numeric(x: Any) -> bool:
    try:
        np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- Brier score


def brier_score(
    survival_train: np.ndarray,
    survival_test: np.ndarray,
    estimate: ArrayLike,
    times: ArrayLike,
) -> tuple[FloatArray, FloatArray]:
    """Time-dependent Brier score with inverse-probability-of-censoring weights (Graf et al.).

    BS(t) = mean_i [ S_i(t)^2 * 1(t_i <= t, event) / G(t_i) + (1 - S_i(t))^2 * 1(t_i > t) / G(t) ]
    where S_i(t) = ``estimate[i, j]`` is the predicted probability of surviving beyond
    ``times[j]``. Where G is zero the term gets weight 0 (scikit-survival's convention).

    Args:
        estimate: predicted survival probabilities, (n, T); (n,) is accepted for one time.
        times: strictly increasing evaluation times, (T,), inside [min, max) of the test times.

    Returns:
        ``(times, scores)``. A test set without events (n = 0 included) scores NaN at every
        time, like the other metrics (scikit-survival refuses such test sets).

    Raises:
        MetricInputError: malformed inputs (also probabilities outside [0, 1]).
        TimeGridError: a time outside the test follow-up (not checked for n = 0).
        CensoringSupportError: G unknown (beyond the training follow-up, or no training
            targets) at a needed time.
    """
    problems: list[str] = []
    e_train, t_train = _target(survival_train, "survival_train", problems)
    n_known = len(problems)
    event, time = _target(survival_test, "survival_test", problems)
    n_test = time.size if len(problems) == n_known else None
    grid = _grid(times, problems, increasing=True)
    est = _probabilities(estimate, grid.size, n_test, problems)
    _raise_if(problems, "brier_score")
    if time.size:
        _check_follow_up(grid, time, "brier_score")
    if not event.any():
        return grid, np.full(grid.size, np.nan)
    return grid, _brier(e_train, t_train, event, time, est, grid)


def _probabilities(
    estimate: ArrayLike, n_times: int, n: int | None, problems: list[str]
) -> FloatArray:
    """Validate predicted survival probabilities as an (n, n_times) array (``n`` None: the test
    target is unusable, its length unknown)."""
    if not _is_numeric(estimate):
        problems.append("estimate must be numeric")
        return np.empty((0, 0))
    est = np.asarray(estimate, dtype=np.float64)
    if est.ndim == 1 and n_times == 1:
        est = est.reshape(-1, 1)
    if est.ndim != 2:
        problems.append(f"estimate must be (n_samples, n_times), got shape {est.shape}")
        return est
    if n is not None and est.shape[0] != n:
        problems.append(f"estimate has {est.shape[0]} rows but the test target has {n}")
    if n_times and est.shape[1] != n_times:
        problems.append(f"estimate has {est.shape[1]} columns but there are {n_times} times")
    if not np.isfinite(est).all():
        problems.append("estimate has non-finite values")
    elif est.size and (est.min() < -1e-9 or est.max() > 1 + 1e-9):
        problems.append("estimate must hold survival probabilities in [0, 1]")
    return est


def _brier(
    e_train: BoolArray,
    t_train: FloatArray,
    event: BoolArray,
    time: FloatArray,
    est: FloatArray,
    grid: FloatArray,
) -> FloatArray:
    cens = _censoring_survival(e_train, t_train)
    g_grid = cens(grid)
    needed = event & (time <= grid[-1])
    g_obs = np.ones(time.size)
    g_obs[needed] = cens(time[needed])
    # A zero censoring survival means no information: weight 0 (scikit-survival uses 1/inf).
    inv_grid = np.divide(1.0, g_grid, out=np.zeros_like(g_grid), where=g_grid > 0)
    inv_obs = np.divide(1.0, g_obs, out=np.zeros_like(g_obs), where=g_obs > 0)
    case = (time[:, None] <= grid[None, :]) & event[:, None]
    control = time[:, None] > grid[None, :]
    terms = np.square(est) * case * inv_obs[:, None] + np.square(1.0 - est) * control * inv_grid
    return terms.mean(axis=0)


def integrated_brier_score(
    survival_train: np.ndarray,
    survival_test: np.ndarray,
    estimate: ArrayLike,
    times: ArrayLike,
) -> float:
    """Integrated Brier score: trapezoid integral of BS(t) over ``times`` divided by their span.

    NaN when the test set has no events (n = 0 included), as :func:`brier_score`.

    Raises:
        TimeGridError: fewer than two times, or times outside the test follow-up.
        (and the errors of :func:`brier_score`)
    """
    grid, scores = brier_score(survival_train, survival_test, estimate, times)
    if grid.size < 2:
        raise TimeGridError("integrated_brier_score: at least two evaluation times are needed")
    return float(np.trapezoid(scores, grid) / (grid[-1] - grid[0]))


# --------------------------------------------------------------------------- evaluation grid


def evaluation_times(
    survival_train: np.ndarray,
    survival_test: np.ndarray,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> FloatArray:
    """A time grid every metric here accepts: quantiles of the test event times, restricted.

    The candidates are the ``quantiles`` (linear interpolation) of the test set's event times.
    A candidate is kept when it lies strictly inside the test follow-up (min < t < max) and
    strictly below ``t_G``, the last training time at which the censoring Kaplan-Meier G is
    still positive, so that every IPCW weight up to it exists. Kept times are sorted, unique.

    Raises:
        MetricInputError: malformed inputs or quantiles outside [0, 1].
        TimeGridError: no test events (n = 0 included), or fewer than two valid times remain
            (e.g. with an empty training set, whose censoring survival is unknown everywhere).
    """
    problems: list[str] = []
    e_train, t_train = _target(survival_train, "survival_train", problems)
    event, time = _target(survival_test, "survival_test", problems)
    n_known = len(problems)
    q = _vector(np.atleast_1d(np.asarray(quantiles, dtype=object)), "quantiles", problems)
    if len(problems) == n_known and (q.size == 0 or (q < 0).any() or (q > 1).any()):
        problems.append("quantiles must be a non-empty sequence of values in [0, 1]")
    _raise_if(problems, "evaluation_times")
    if not event.any():
        raise TimeGridError("evaluation_times: the test set has no events")
    candidates = np.quantile(time[event], q)
    cens_times, cens_surv = kaplan_meier(t_train, e_train, reverse=True)
    t_g = float(cens_times[cens_surv > 0][-1]) if (cens_surv > 0).any() else -np.inf
    keep = (candidates > time.min()) & (candidates < time.max()) & (candidates < t_g)
    grid = np.unique(candidates[keep])
    if grid.size < 2:
        raise TimeGridError(
            f"evaluation_times: only {grid.size} valid time(s) among the event-time quantiles "
            f"(test follow-up ({time.min()}, {time.max()}), censoring support below {t_g})"
        )
    return grid


# --------------------------------------------------------------------------- convenience

SurvivalEstimate = Callable[[FloatArray], ArrayLike] | ArrayLike


def survival_metrics(
    survival_train: np.ndarray,
    survival_test: np.ndarray,
    risk: ArrayLike,
    surv_fn: SurvivalEstimate | None = None,
    times: ArrayLike | None = None,
    tau: float | None = None,
) -> dict[str, float]:
    """All survival metrics of one test set: ``c_index``, ``c_index_uno``, ``td_auc`` (+ ``ibs``).

    Args:
        survival_train: training targets (for the censoring distribution).
        survival_test: test targets.
        risk: risk scores of the test subjects, (n,).
        surv_fn: survival probabilities for the IBS: a callable ``times -> (n, len(times))``,
            or a precomputed (n, len(times)) array aligned with an explicitly given ``times``.
            Without it the result has no ``ibs`` key.
        times: evaluation grid for td-AUC and IBS; default :func:`evaluation_times`.
        tau: truncation of Uno's C; default the last time of the grid.

    Returns:
        A dict of floats. A metric that is undefined on this sample (no events, n = 0 included,
        no comparable pair, no valid grid, censoring weights that do not exist) is NaN instead
        of an error.

    Raises:
        MetricInputError: malformed inputs (lengths, non-finite or negative values, shapes).
    """
    problems: list[str] = []
    _target(survival_train, "survival_train", problems)
    event, time = _target(survival_test, "survival_test", problems)
    if surv_fn is not None and not callable(surv_fn) and times is None:
        problems.append("a precomputed survival array needs the times its columns belong to")
    _raise_if(problems, "survival_metrics")
    out = {"c_index": concordance_index_censored(event, time, risk).cindex}
    grid: FloatArray | None
    try:
        grid = evaluation_times(survival_train, survival_test) if times is None else None
    except TimeGridError:
        grid = None
    if times is not None:
        grid = np.asarray(times, dtype=np.float64)
    if tau is None and grid is not None and grid.size:
        tau = float(np.max(grid))
    out["c_index_uno"] = _or_nan(
        lambda: concordance_index_ipcw(survival_train, survival_test, risk, tau=tau).cindex
    )
    out["td_auc"] = (
        float("nan")
        if grid is None
        else _or_nan(lambda: cumulative_dynamic_auc(survival_train, survival_test, risk, grid)[1])
    )
    if surv_fn is not None:
        out["ibs"] = (
            float("nan") if grid is None else _ibs(survival_train, survival_test, surv_fn, grid)
        )
    return out


def _or_nan(compute: Callable[[], float]) -> float:
    """Run a metric; the sample-dependent failures (grid, censoring support) become NaN."""
    try:
        return float(compute())
    except (TimeGridError, CensoringSupportError):
        return float("nan")


def _ibs(
    survival_train: np.ndarray,
    survival_test: np.ndarray,
    surv_fn: SurvivalEstimate,
    grid: FloatArray,
) -> float:
    estimate = surv_fn(grid) if callable(surv_fn) else surv_fn
    return _or_nan(lambda: integrated_brier_score(survival_train, survival_test, estimate, grid))
