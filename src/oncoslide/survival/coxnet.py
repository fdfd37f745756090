"""Elastic-net Cox regression on frozen embeddings (the benchmark's "linear" survival protocol).

The estimator minimises, over coefficients ``b`` on the (optionally standardised) features,

    -(1/n) * log PL(b)  +  alpha * (l1_ratio * ||b||_1 + 0.5 * (1 - l1_ratio) * ||b||_2^2)

where ``PL`` is Cox's partial likelihood with Breslow's handling of tied times (every subject
whose time is >= an event time is in that event's risk set, tied events share one denominator).
This is exactly the objective of scikit-survival's ``CoxnetSurvivalAnalysis`` (and glmnet's
Cox family up to glmnet's factor 2), so ``alpha`` values are interchangeable with it when the
features are prepared the same way: ``standardize=True`` here equals ``StandardScaler`` (mean,
population sd) followed by ``CoxnetSurvivalAnalysis(normalize=False)``. Note that sksurv's own
``normalize=True`` divides by the column *L2 norm* (sd * sqrt(n)), which rescales the penalty
differently and is not what ``standardize`` does.

Solver (numpy/scipy only): a proximal Newton method. Each outer iteration builds the exact
Hessian of the partial likelihood on a working set (the non-zero coefficients plus the worst
violators of the optimality conditions, so that it at most doubles), solves the resulting
elastic-net quadratic
with FISTA (restarted, with a cheap step-size check) and, once its sign pattern settles, an
exact linear solve on the support; a backtracking line search on the true objective makes
every step a descent step. Convergence is declared when the largest violation of the
Karush-Kuhn-Tucker conditions over *all* features is at most ``tol``, so features left out
of a working set are checked, never assumed to be zero. Risk-set sums are cumulative sums
over time-sorted data, so one gradient costs two matrix-vector products. Warm starts along a
decreasing ``alpha`` path (:func:`fit_select_alpha`) keep the working sets small.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from oncoslide._checks import as_events, as_matrix, as_vector
from oncoslide.errors import ConfigError
from oncoslide.survival.metrics import concordance_index_censored

__all__ = ["ElasticNetCox", "alpha_max", "alpha_path", "fit_select_alpha"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

# A column whose sd is below this fraction of its magnitude is treated as constant: its
# coefficient is fixed at 0 (dividing by a rounding-error sd would blow it up).
_CONSTANT_RTOL = 1e-12
# Inner (quadratic subproblem) iteration cap; the outer loop keeps making progress when an
# inner solve stops early, so this only bounds the time one subproblem can take.
_QP_MAX_ITER = 5000
# How often (in FISTA iterations) the inner solver checks its optimality conditions, and
# the initial interval between its attempts at an exact solve on the support.
_QP_CHECK_EVERY = 10
_QP_POLISH_EVERY = 50
_ARMIJO = 1e-4
# Active-set corrections per exact-solve attempt in the quadratic subproblem.
_POLISH_ROUNDS = 4
# Consecutive outer iterations without a measurable decrease before giving up.
_MAX_STALLS = 3
# Least number of zero coefficients that may enter the working set per outer iteration.
_MIN_NEW = 10


# --------------------------------------------------------------------------- validation


def _raise_if(problems: list[str], where: str) -> None:
    """Raise one ConfigError listing every collected problem, if any."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{where}: invalid input:\n{lines}")


def _check_survival_data(
    X: ArrayLike, time: ArrayLike, event: ArrayLike, where: str, part: str = ""
) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
    """Validate one (X, time, event) triple, listing all of its problems at once."""
    sfx = f"_{part}" if part else ""
    problems: list[str] = []
    x = as_matrix(X, f"X{sfx}", problems)
    t = as_vector(time, f"time{sfx}", problems, nonnegative=True)
    e = as_events(event, f"event{sfx}", problems)
    if x is not None and t is not None and e is not None:
        if not x.shape[0] == t.size == e.size:
            problems.append(
                f"lengths differ: X{sfx} has {x.shape[0]} rows, time{sfx} {t.size} values, "
                f"event{sfx} {e.size} values"
            )
        elif x.shape[0] < 2:
            problems.append(f"X{sfx} needs at least 2 rows (patients), got {x.shape[0]}")
    if x is not None and x.shape[1] == 0:
        problems.append(f"X{sfx} has no feature columns")
    if e is not None and e.size and not e.any():
        problems.append(f"event{sfx} has no events (all censored): the Cox model is undefined")
    _raise_if(problems, where)
    assert x is not None and t is not None and e is not None  # guaranteed by _raise_if
    return x, t, e


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_hyper(alpha: float, l1_ratio: float, max_iter: int, tol: float, where: str) -> None:
    """Validate the estimator's hyper-parameters, listing all problems at once."""
    problems: list[str] = []
    if not (_is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        problems.append(f"alpha must be a finite number > 0, got {alpha!r}")
    if not (_is_real(l1_ratio) and 0.0 <= l1_ratio <= 1.0):
        problems.append(f"l1_ratio must be in [0, 1], got {l1_ratio!r}")
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        problems.append(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (_is_real(tol) and math.isfinite(tol) and tol > 0):
        problems.append(f"tol must be a finite number > 0, got {tol!r}")
    _raise_if(problems, where)


# --------------------------------------------------------------------------- Cox partial likelihood


class _CoxData:
    """Time-sorted design and the tie structure that the Breslow risk sets need.

    Rows are sorted by *decreasing* time, so the risk set {j: t_j >= t_i} of row i is a prefix
    ending at the last row tied with i: a cumulative sum read at ``last[i]`` gives its sum, and
    a reversed cumulative sum read at ``first[i]`` sums over the events with t <= t_i.
    """

    def __init__(self, X: FloatArray, time: FloatArray, event: NDArray[np.bool_]) -> None:
        order = np.argsort(-time, kind="stable")
        self.X = np.ascontiguousarray(X[order])
        self.n = int(time.size)
        self.event = event[order].astype(np.float64)
        neg = -time[order]
        self.first = np.searchsorted(neg, neg, side="left")
        self.last = np.searchsorted(neg, neg, side="right") - 1
        # one row per distinct event time (tied events share a risk set), weighted by the count
        ev_last, counts = np.unique(self.last[self.event > 0], return_counts=True)
        self.event_groups = ev_last
        self.event_group_sqrt = np.sqrt(counts.astype(np.float64))

    def _risk_sums(self, eta: FloatArray) -> tuple[FloatArray, FloatArray]:
        """exp(eta - max) and the matching risk-set sums S_i (same shift)."""
        e = np.exp(eta - eta.max())
        S = np.maximum(np.cumsum(e)[self.last], np.finfo(np.float64).tiny)
        return e, S

    def loss(self, eta: FloatArray) -> float:
        """-(1/n) log partial likelihood (Breslow) at linear predictor ``eta`` (sorted rows)."""
        c = float(eta.max())
        _, S = self._risk_sums(eta)
        return float(-(self.event @ (eta - c - np.log(S))) / self.n)

    def loss_grad(self, eta: FloatArray) -> tuple[float, FloatArray]:
        """Loss and its gradient with respect to ``eta``."""
        c = float(eta.max())
        e, S = self._risk_sums(eta)
        loss = float(-(self.event @ (eta - c - np.log(S))) / self.n)
        # A_j = sum over events i with t_i <= t_j of 1 / S_i (the Breslow cumulative hazard
        # increments at unit risk); d loss / d eta_j = (exp(eta_j) A_j - event_j) / n.
        A = np.cumsum((self.event / S)[::-1])[::-1][self.first]
        return loss, (e * A - self.event) / self.n

    def hessian(self, eta: FloatArray, cols: IntArray) -> FloatArray:
        """Exact Hessian of the loss with respect to the coefficients of ``cols``.

        H = (1/n) sum_i over events [X' diag(p_i) X - (X' p_i)(X' p_i)'], p_i the softmax of
        eta over the risk set of i; the first terms add up to X' diag(exp(eta) * A) X.
        """
        e, S = self._risk_sums(eta)
        A = np.cumsum((self.event / S)[::-1])[::-1][self.first]
        XW = self.X[:, cols]
        H = XW.T @ ((e * A)[:, None] * XW)
        means = np.cumsum(e[:, None] * XW, axis=0)[self.event_groups]
        means *= (self.event_group_sqrt / S[self.event_groups])[:, None]
        H -= means.T @ means
        H /= self.n
        return H


def _kkt_violation(grad: FloatArray, b: FloatArray, lam1: float, lam2: float) -> FloatArray:
    """Per-coordinate distance of -grad(smooth) from the penalty's subdifferential."""
    g = grad + lam2 * b
    return np.where(b != 0, np.abs(g + lam1 * np.sign(b)), np.maximum(np.abs(g) - lam1, 0.0))


def _soft(v: FloatArray, t: float) -> FloatArray:
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)


# --------------------------------------------------------------------------- quadratic subproblem


def _qp_violation(r: FloatArray, b: FloatArray, lam1: float) -> float:
    """Largest KKT violation of min 1/2 b'Qb - c'b + lam1 |b|_1, with r = c - Qb."""
    if b.size == 0:
        return 0.0
    v = np.where(b != 0, np.abs(r - lam1 * np.sign(b)), np.maximum(np.abs(r) - lam1, 0.0))
    return float(v.max())


def _solve_pd(A: FloatArray, rhs: FloatArray) -> FloatArray:
    """Solve with a symmetric positive (semi-)definite matrix; the caller checks the result.

    Near-singular systems (a lasso support larger than the rank of the data) only warn in
    scipy; the candidate is verified against the optimality conditions anyway, so the warning
    would be noise for the user.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return np.asarray(scipy.linalg.solve(A, rhs, assume_a="pos", check_finite=False))


def _qp_polish(
    Q: FloatArray, c: FloatArray, lam1: float, b: FloatArray, tol: float
) -> FloatArray | None:
    """Exact solve with the support and signs of ``b``, corrected a few times.

    A primal active-set correction: coefficients whose sign flips are dropped, zeros that
    violate the optimality conditions join with the sign their gradient asks for, and the
    linear system is solved again. Near the solution this finishes in one or two solves.
    Returns the last candidate (None if no solve succeeded); the caller checks optimality.
    """
    support = b != 0
    sign = np.sign(b)
    out: FloatArray | None = None
    for _ in range(_POLISH_ROUNDS):
        S = np.flatnonzero(support)
        if S.size == 0:
            return out
        try:
            bs = _solve_pd(Q[np.ix_(S, S)], c[S] - lam1 * sign[S])
        except (np.linalg.LinAlgError, ValueError):
            return out
        if not np.all(np.isfinite(bs)):
            return out
        flipped = np.sign(bs) != sign[S]
        if flipped.any():
            support[S[flipped]] = False
            continue
        out = np.zeros_like(b)
        out[S] = bs
        r = c - Q @ out
        excess = np.where(support, 0.0, np.abs(r) - lam1)
        entering = excess > tol
        if not entering.any():
            return out
        support |= entering
        sign = np.where(entering, np.sign(r), sign)
    return out


def _lipschitz(Q: FloatArray) -> float:
    """Largest eigenvalue of a PSD matrix, estimated by a few power iterations."""
    v = np.asarray(np.random.default_rng(0).standard_normal(Q.shape[0]), dtype=np.float64)
    lam = 0.0
    for _ in range(20):
        w = Q @ v
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            return 1.0
        v = w / lam
    return lam


def _segment_min(r: FloatArray, x: FloatArray, d: FloatArray, Qd: FloatArray, lam1: float) -> float:
    """Exact minimiser over t in [0, 1] of the QP objective along x + t d (r = c - Qx).

    The objective is convex and piecewise quadratic in t, with kinks where a coordinate
    crosses zero; its derivative is increasing, so the minimiser lies in the first piece
    whose right-end derivative is non-negative.
    """
    a1 = -float(r @ d)
    a2 = float(d @ Qd)
    start_sign = np.where(x != 0, np.sign(x), np.sign(d))
    base = lam1 * float(start_sign @ d)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(d != 0, -x / d, np.inf)
    crossing = (x != 0) & (tau > 0) & (tau < 1)
    order = np.argsort(tau[crossing], kind="stable")
    knots = np.concatenate([tau[crossing][order], [1.0]])
    # derivative of the L1 part on each piece: every crossing adds 2 lam1 |d_j|
    slopes = base + np.concatenate([[0.0], np.cumsum(2.0 * lam1 * np.abs(d[crossing][order]))])
    right = a1 + a2 * knots + slopes
    k = int(np.argmax(right >= 0)) if (right >= 0).any() else knots.size - 1
    lo = 0.0 if k == 0 else float(knots[k - 1])
    if a2 <= 0:
        return float(knots[k]) if right[k] < 0 else lo
    return float(np.clip(-(a1 + slopes[k]) / a2, lo, knots[k]))


def _solve_qp(Q: FloatArray, c: FloatArray, lam1: float, b0: FloatArray, tol: float) -> FloatArray:
    """Approximately minimise 1/2 b'Qb - c'b + lam1 ||b||_1 (Q positive semi-definite).

    FISTA with adaptive restart; the step size starts from a power-iteration estimate and is
    doubled whenever the (exact, since the model is quadratic) curvature check fails. When
    the sign pattern has not changed between two checks, an exact solve on the support is
    tried: it ends the loop if it satisfies the optimality conditions to ``tol``, and
    otherwise the iterate moves to the best point on the segment towards it (with the
    momentum reset) and the next attempt waits twice as long.
    """
    L = 1.05 * _lipschitz(Q)
    x = b0.copy()
    Qx = Q @ x
    y, Qy = x.copy(), Qx.copy()
    theta = 1.0
    last_sign: NDArray[np.float64] | None = None
    wait = next_polish = _QP_POLISH_EVERY
    for it in range(1, _QP_MAX_ITER + 1):
        grad = Qy - c
        while True:
            xn = _soft(y - grad / L, lam1 / L)
            Qxn = Q @ xn
            step = xn - y
            # the model is exactly quadratic: the step is valid iff its curvature is <= L
            if step @ (Qxn - Qy) <= L * (step @ step) * (1 + 1e-12):
                break
            L *= 2.0
        restart = bool(step @ (xn - x) > 0)  # momentum points uphill (O'Donoghue & Candes)
        if it % _QP_CHECK_EVERY == 0 and _qp_violation(c - Qxn, xn, lam1) <= tol:
            return xn
        if it >= next_polish:
            sign = np.sign(xn)
            if last_sign is not None and np.array_equal(sign, last_sign):
                exact = _qp_polish(Q, c, lam1, xn, tol)
                if exact is not None:
                    Qe = Q @ exact
                    if _qp_violation(c - Qe, exact, lam1) <= tol:
                        return exact
                    d, Qd = exact - xn, Qe - Qxn
                    t = _segment_min(c - Qxn, xn, d, Qd, lam1)
                    xn, Qxn, restart = xn + t * d, Qxn + t * Qd, True
                wait *= 2  # a failed attempt: the support is not settled yet
            next_polish = it + wait
            last_sign = sign
        if restart:
            theta = 1.0
        theta_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * theta * theta))
        mom = (theta - 1.0) / theta_next
        y = xn + mom * (xn - x)
        Qy = Qxn + mom * (Qxn - Qx)
        x, Qx, theta = xn, Qxn, theta_next
    return x


# --------------------------------------------------------------------------- proximal Newton


@dataclass(frozen=True)
class _Solution:
    coef: FloatArray
    n_iter: int
    converged: bool
    kkt: float


def _objective(data: _CoxData, eta: FloatArray, b: FloatArray, lam1: float, lam2: float) -> float:
    return data.loss(eta) + lam1 * float(np.abs(b).sum()) + 0.5 * lam2 * float(b @ b)


def _working_set(b: FloatArray, viol: FloatArray) -> IntArray:
    """The non-zero coefficients plus the worst violators among the zeros.

    At most ``max(_MIN_NEW, number of non-zeros)`` zeros enter per iteration, so the working
    set at most doubles: adding every violator at once from a poor iterate makes the quadratic
    model wildly over-shoot when features are strongly correlated.
    """
    support = b != 0
    candidates = np.flatnonzero(~support & (viol > 0))
    limit = max(_MIN_NEW, int(support.sum()))
    if candidates.size > limit:
        candidates = candidates[np.argsort(-viol[candidates], kind="stable")[:limit]]
    return np.union1d(np.flatnonzero(support), candidates)


def _solve(
    data: _CoxData,
    lam1: float,
    lam2: float,
    b0: FloatArray | None,
    tol: float,
    max_iter: int,
) -> _Solution:
    """Minimise loss(Xb) + lam1 ||b||_1 + lam2/2 ||b||^2 by proximal Newton on working sets."""
    X = data.X
    if X.shape[1] == 0:  # every column was constant: nothing to fit
        return _Solution(np.zeros(0), 0, True, 0.0)
    b = np.zeros(X.shape[1]) if b0 is None else b0.astype(np.float64, copy=True)
    eta = X @ b
    kkt = best_kkt = math.inf
    stalls = 0
    for it in range(1, max_iter + 1):
        _, g_eta = data.loss_grad(eta)
        grad = X.T @ g_eta
        viol = _kkt_violation(grad, b, lam1, lam2)
        kkt = float(viol.max())
        if kkt <= tol:
            return _Solution(b, it - 1, True, kkt)
        # At the rounding floor (a tol below attainable precision) steps still "pass" the line
        # search but neither the objective nor the optimality gap moves: stop instead of
        # spinning until max_iter. Genuine progress halves the gap or lowers the objective.
        if kkt < 0.5 * best_kkt:
            best_kkt, stalls = kkt, 0
        elif stalls >= _MAX_STALLS:
            break
        W = _working_set(b, viol) if lam1 > 0 else np.arange(X.shape[1])
        H = data.hessian(eta, W)
        bW = b[W]
        c = H @ bW - grad[W]
        H[np.diag_indices_from(H)] += lam2
        # inexact Newton: the subproblem only needs to be a fraction more accurate than the
        # current iterate, tightening as we converge (superlinear local rate)
        inner_tol = max(0.25 * tol, min(0.1 * kkt, kkt**1.5))
        if lam1 > 0:
            new = _solve_qp(H, c, lam1, bW, inner_tol)
        else:  # pure ridge: the subproblem is a linear system
            new = _solve_pd(H, c)
        d = new - bW
        # predicted decrease of the objective along d (directional derivative bound)
        # (the L1 change is summed per coordinate: a difference of two large sums would bury
        # the tiny decreases of the last Newton steps in rounding noise)
        decrease = float(grad[W] @ d + lam2 * (bW @ d)) + lam1 * float(
            np.sum(np.abs(new) - np.abs(bW))
        )
        f0 = _objective(data, eta, b, lam1, lam2)
        # a predicted change below what float64 resolves in f0 cannot be verified by a line
        # search; there the Newton model is accurate and the full step is taken
        unresolvable = abs(decrease) <= 16 * np.finfo(np.float64).eps * max(1.0, abs(f0))
        if not (unresolvable or decrease < 0):
            break  # the subproblem found no descent: we are at the solver's precision
        Xd = X[:, W] @ d
        t = 1.0
        while t > 1e-10:
            bt = b.copy()
            bt[W] = bW + t * d
            eta_t = eta + t * Xd
            f_t = _objective(data, eta_t, bt, lam1, lam2)
            if unresolvable or f_t <= f0 + _ARMIJO * t * decrease:
                break
            t *= 0.5
        else:
            break
        stalls = stalls + 1 if f0 - f_t <= 1e-13 * max(1.0, abs(f0)) else 0
        b, eta = bt, eta_t
    else:
        _, g_eta = data.loss_grad(eta)
        kkt = float(_kkt_violation(X.T @ g_eta, b, lam1, lam2).max())
        return _Solution(b, max_iter, kkt <= tol, kkt)
    return _Solution(b, it - 1, kkt <= tol, kkt)  # every break happens before a step


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class _Scaling:
    """Training-set column centring/scaling; constant columns are dropped (coefficient 0)."""

    mean: FloatArray
    scale: FloatArray
    keep: NDArray[np.bool_]

    @classmethod
    def fit(cls, X: FloatArray, standardize: bool) -> _Scaling:
        mean = X.mean(axis=0)
        sd = X.std(axis=0)
        keep = sd > _CONSTANT_RTOL * np.maximum(1.0, np.abs(mean))
        scale = np.where(keep, sd, 1.0) if standardize else np.ones_like(sd)
        return cls(mean=mean, scale=scale, keep=keep)

    def transform(self, X: FloatArray) -> FloatArray:
        """Centred (and scaled) kept columns; centring leaves the Cox objective unchanged."""
        return (X[:, self.keep] - self.mean[self.keep]) / self.scale[self.keep]


def _prepare(
    X: FloatArray, time: FloatArray, event: NDArray[np.bool_], standardize: bool
) -> tuple[_Scaling, _CoxData]:
    scaling = _Scaling.fit(X, standardize)
    return scaling, _CoxData(scaling.transform(X), time, event)


def _alpha_max(data: _CoxData, l1_ratio: float) -> float:
    """Smallest alpha whose solution is all zeros: max_j |d loss / d b_j at 0| / l1_ratio."""
    if data.X.shape[1] == 0:
        return 0.0
    _, g_eta = data.loss_grad(np.zeros(data.n))
    return float(np.abs(data.X.T @ g_eta).max()) / l1_ratio


# --------------------------------------------------------------------------- estimator


class ElasticNetCox:
    """Cox proportional-hazards regression with an elastic-net penalty (Breslow ties).

    Minimises ``-(1/n) log PL(b) + alpha * (l1_ratio ||b||_1 + 0.5 (1 - l1_ratio) ||b||_2^2)``
    on standardised features (training mean and population sd) when ``standardize`` is true,
    else on the raw features; the result is reported on the original feature scale.

    Args:
        alpha: penalty strength (> 0); same scale as scikit-survival's Coxnet alphas.
        l1_ratio: L1 share of the penalty in [0, 1] (1 = lasso, 0 = ridge).
        standardize: centre and scale each feature by its training mean and sd first.
            Constant columns get coefficient 0 either way.
        max_iter: maximum number of proximal-Newton iterations.
        tol: convergence threshold on the largest violation of the optimality conditions
            (gradient units of the objective above, on the standardised scale).

    Attributes (after :meth:`fit`):
        coef_: (d,) coefficients on the original feature scale.
        offset_: ``mean_ @ coef_``, subtracted by :meth:`predict` so risks are centred on
            the training mean (a constant shift, irrelevant to a Cox model).
        mean_, scale_: the training column means and the divisors used (1 when not scaling).
        n_iter_: proximal-Newton iterations used.
        converged_: whether the optimality conditions hold to ``tol``.
        kkt_violation_: the final largest optimality-condition violation.
        n_features_in_: number of features seen in ``fit``.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        l1_ratio: float = 0.5,
        *,
        standardize: bool = True,
        max_iter: int = 1000,
        tol: float = 1e-7,
    ) -> None:
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention)."""
        return {
            "alpha": self.alpha,
            "l1_ratio": self.l1_ratio,
            "standardize": self.standardize,
            "max_iter": self.max_iter,
            "tol": self.tol,
        }

    def set_params(self, **params: Any) -> ElasticNetCox:
        """Set constructor parameters (scikit-learn convention)."""
        for key, value in params.items():
            if key not in self.get_params():
                raise ConfigError(f"ElasticNetCox has no parameter {key!r}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ElasticNetCox({args})"

    def fit(self, X: ArrayLike, time: ArrayLike, event: ArrayLike) -> ElasticNetCox:
        """Fit on features ``X`` (n, d), times (n,) >= 0 and event indicators (n,).

        Raises:
            ConfigError: bad hyper-parameters, mismatched shapes, non-finite features,
                negative or non-finite times, bad event codes, or no events at all.
        """
        return self._fit(X, time, event, init_coef=None)

    def _fit(
        self, X: ArrayLike, time: ArrayLike, event: ArrayLike, init_coef: FloatArray | None
    ) -> ElasticNetCox:
        _check_hyper(self.alpha, self.l1_ratio, self.max_iter, self.tol, "ElasticNetCox")
        x, t, e = _check_survival_data(X, time, event, "ElasticNetCox.fit")
        scaling, data = _prepare(x, t, e, self.standardize)
        b0 = None
        if init_coef is not None:  # original-scale warm start -> solver scale
            b0 = (init_coef * scaling.scale)[scaling.keep]
        lam1 = float(self.alpha) * float(self.l1_ratio)
        lam2 = float(self.alpha) * (1.0 - float(self.l1_ratio))
        sol = _solve(data, lam1, lam2, b0, float(self.tol), int(self.max_iter))
        self._set_solution(scaling, sol)
        return self

    def _set_solution(self, scaling: _Scaling, sol: _Solution) -> None:
        coef = np.zeros(scaling.mean.size)
        coef[scaling.keep] = sol.coef / scaling.scale[scaling.keep]
        self.coef_ = coef
        self.mean_ = scaling.mean
        self.scale_ = scaling.scale
        self.offset_ = float(scaling.mean @ coef)
        self.n_iter_ = sol.n_iter
        self.converged_ = sol.converged
        self.kkt_violation_ = sol.kkt
        self.n_features_in_ = int(scaling.mean.size)

    def predict(self, X: ArrayLike) -> FloatArray:
        """Risk scores (the linear predictor, centred on the training mean); higher = worse.

        Raises:
            ConfigError: the model is not fitted, or X is not finite (n, n_features_in_).
        """
        if not hasattr(self, "coef_"):
            raise ConfigError("ElasticNetCox.predict: the model is not fitted; call fit first")
        problems: list[str] = []
        x = as_matrix(X, "X", problems)
        if x is not None and x.shape[1] != self.n_features_in_:
            problems.append(
                f"X has {x.shape[1]} feature columns but the model was fitted on "
                f"{self.n_features_in_}"
            )
        _raise_if(problems, "ElasticNetCox.predict")
        assert x is not None  # guaranteed by _raise_if
        return np.asarray(x @ self.coef_ - self.offset_, dtype=np.float64)


# --------------------------------------------------------------------------- path and selection


def _check_path_args(l1_ratio: float, n_alphas: int, min_ratio: float, where: str) -> None:
    problems: list[str] = []
    if not (_is_real(l1_ratio) and 0.0 < l1_ratio <= 1.0):
        problems.append(
            f"l1_ratio must be in (0, 1] for an alpha path (alpha_max is infinite for a pure "
            f"ridge), got {l1_ratio!r}"
        )
    if not (isinstance(n_alphas, (int, np.integer)) and n_alphas >= 1):
        problems.append(f"n_alphas must be an integer >= 1, got {n_alphas!r}")
    if not (_is_real(min_ratio) and 0.0 < min_ratio < 1.0):
        problems.append(f"min_ratio must be in (0, 1), got {min_ratio!r}")
    _raise_if(problems, where)


def _path_from_data(data: _CoxData, l1_ratio: float, n_alphas: int, min_ratio: float) -> FloatArray:
    amax = _alpha_max(data, l1_ratio)
    if not amax > 0:
        raise ConfigError(
            "alpha_path: every feature has zero gradient at b = 0 (constant features?); "
            "no penalty path exists"
        )
    if n_alphas == 1:
        return np.array([amax])
    return np.asarray(np.geomspace(amax, amax * min_ratio, n_alphas), dtype=np.float64)


def alpha_max(
    X: ArrayLike,
    time: ArrayLike,
    event: ArrayLike,
    *,
    l1_ratio: float = 0.5,
    standardize: bool = True,
) -> float:
    """The smallest alpha at which every coefficient of :class:`ElasticNetCox` is zero.

    ``max_j |d(-(1/n) log PL)/d b_j at b = 0| / l1_ratio`` on the features as the estimator
    sees them (standardised when ``standardize``), as in scikit-survival and glmnet.

    Raises:
        ConfigError: invalid data (see :meth:`ElasticNetCox.fit`) or ``l1_ratio`` outside
            (0, 1].
    """
    _check_path_args(l1_ratio, 1, 0.5, "alpha_max")
    x, t, e = _check_survival_data(X, time, event, "alpha_max")
    _, data = _prepare(x, t, e, standardize)
    return _alpha_max(data, float(l1_ratio))


def alpha_path(
    X: ArrayLike,
    time: ArrayLike,
    event: ArrayLike,
    *,
    l1_ratio: float = 0.5,
    n_alphas: int = 10,
    min_ratio: float = 0.01,
    standardize: bool = True,
) -> FloatArray:
    """Log-spaced penalties from :func:`alpha_max` down to ``min_ratio * alpha_max``.

    The first value gives the all-zero model; the values decrease by a constant factor.

    Raises:
        ConfigError: invalid data (see :meth:`ElasticNetCox.fit`), ``l1_ratio`` outside
            (0, 1], ``n_alphas`` < 1, ``min_ratio`` outside (0, 1), or no usable feature.
    """
    _check_path_args(l1_ratio, n_alphas, min_ratio, "alpha_path")
    x, t, e = _check_survival_data(X, time, event, "alpha_path")
    _, data = _prepare(x, t, e, standardize)
    return _path_from_data(data, float(l1_ratio), int(n_alphas), float(min_ratio))


def fit_select_alpha(
    X_train: ArrayLike,
    time_train: ArrayLike,
    event_train: ArrayLike,
    X_val: ArrayLike,
    time_val: ArrayLike,
    event_val: ArrayLike,
    *,
    l1_ratio: float = 0.5,
    n_alphas: int = 10,
    min_ratio: float = 0.01,
    standardize: bool = True,
) -> tuple[ElasticNetCox, float, list[float]]:
    """Choose alpha on a validation part, then refit on training + validation.

    Fits the whole :func:`alpha_path` of the training part with warm starts, scores each
    alpha by Harrell's C-index of its risks on the validation part (ties go to the larger
    alpha, i.e. the sparser model), and refits an :class:`ElasticNetCox` with the chosen alpha
    on the union of both parts. Only the two parts passed in are ever seen: carve the
    validation part from the training patients, never from the test fold.

    Returns:
        (refitted model, chosen alpha, validation C-index per alpha of the path in order).

    Raises:
        ConfigError: invalid data in either part, mismatched feature counts, a validation
            part with no comparable pair (no event), or invalid path arguments.
    """
    where = "fit_select_alpha"
    _check_path_args(l1_ratio, n_alphas, min_ratio, where)
    xt, tt, et = _check_survival_data(X_train, time_train, event_train, where, "train")
    xv, tv, ev = _check_survival_data(X_val, time_val, event_val, where, "val")
    if xt.shape[1] != xv.shape[1]:
        _raise_if([f"X_train has {xt.shape[1]} features but X_val has {xv.shape[1]}"], where)
    scaling, data = _prepare(xt, tt, et, standardize)
    alphas = _path_from_data(data, float(l1_ratio), int(n_alphas), float(min_ratio))
    xv_scaled = scaling.transform(xv)
    model = ElasticNetCox(l1_ratio=l1_ratio, standardize=standardize)
    scores: list[float] = []
    coefs: list[FloatArray] = []
    b: FloatArray | None = None
    for alpha in alphas:
        lam1, lam2 = alpha * l1_ratio, alpha * (1.0 - l1_ratio)
        sol = _solve(data, lam1, lam2, b, model.tol, model.max_iter)
        b = sol.coef
        coefs.append(b)
        risk = xv_scaled @ b
        scores.append(float(concordance_index_censored(ev, tv, risk).cindex))
    if all(math.isnan(s) for s in scores):
        raise ConfigError(
            f"{where}: the validation part has no comparable pair (it needs an event before "
            "another patient's time); cannot score alphas"
        )
    best = int(np.nanargmax(np.asarray(scores)))  # first maximum = largest alpha on ties
    chosen = float(alphas[best])
    init = np.zeros(xt.shape[1])
    init[scaling.keep] = coefs[best] / scaling.scale[scaling.keep]
    model.set_params(alpha=chosen)
    model._fit(np.vstack([xt, xv]), np.concatenate([tt, tv]), np.concatenate([et, ev]), init)
    return model, chosen, scores
