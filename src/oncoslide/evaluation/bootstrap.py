"""Percentile bootstrap confidence intervals that respect cross-validation groups.

Cross-validated predictions come in groups (one per fold, or per (seed, fold)), each scored by
its own model. Risk scores of different models live on different scales, so pooling them into
one ranking would measure something no model does. Here the point estimate is the mean over
groups of the metric computed within each group; each bootstrap replicate resamples patients,
recomputes every group's metric on its resampled patients and averages. The interval is the
(alpha/2, 1 - alpha/2) percentile interval of those averages.

How a replicate resamples depends on whether the groups name their patients
(``GroupData.patients``):

* **Named patients: one draw of patients shared by every group.** Each replicate draws the
  patients of all groups together with replacement, as a multinomial count per patient (the
  benchmark's draws, :func:`oncoslide.bench.stats.bootstrap_counts`, so equal patients and seeds
  give equal draws there and here), and every group takes its own drawn patients as often as they
  were drawn. This is the right unit for repeated cross-validation, where each patient is a test
  patient once per seed: the seeds' groups see the same draw, so R repetitions of the same
  predictions give the one-repetition interval instead of one about sqrt(R) times narrower, as
  independent draws per group would (they treat the repetitions as new patients).
* **Unnamed rows: independent draws within every group.** Each group resamples its own rows
  with replacement (its size fixed), independently of the other groups; right when the groups
  hold different patients (the folds of a single cross-validation, or separate cohorts).

A metric sees one group at a time through a small, generic interface::

    def metric_fn(data: Mapping[str, np.ndarray], context: Mapping[str, Any]) -> float

where ``data`` holds the group's per-patient arrays with their rows resampled (all arrays with
the same row indices, so a structured survival target and its risk scores stay paired) and
``context`` holds the group's fixed, never resampled objects (e.g. the training targets for the
censoring distribution, or the evaluation time grid). See docs/metrics.md for examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from oncoslide.survival.metrics import MetricInputError

__all__ = ["BootstrapCI", "GroupData", "GroupMetric", "bootstrap_ci", "grouped_bootstrap_ci"]

GroupMetric = Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], float]


@dataclass(frozen=True)
class GroupData:
    """The predictions of one model (one fold / one (seed, fold)) for bootstrapping.

    Attributes:
        arrays: per-patient arrays, all with the same number of rows (patients); the rows are
            resampled together. E.g. ``{"y": survival_test, "risk": risk}``.
        context: fixed objects the metric needs but that are not resampled, e.g.
            ``{"survival_train": y_train, "times": grid}``.
        name: a label for messages, e.g. ``"seed0/fold3"``.
        patients: optional patient ids, one per row (unique within the group; compared as
            text). When every group names its patients the bootstrap draws patients once per
            replicate for all groups together (see the module docstring).
    """

    arrays: Mapping[str, Any]
    context: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    patients: Sequence[Any] | np.ndarray | None = None

    def __post_init__(self) -> None:
        arrays = {key: np.asarray(value) for key, value in dict(self.arrays).items()}
        label = f"group {self.name!r}" if self.name else "group"
        if not arrays:
            raise MetricInputError(f"{label}: needs at least one per-patient array")
        lengths = {key: (a.shape[0] if a.ndim else -1) for key, a in arrays.items()}
        if len(set(lengths.values())) != 1 or min(lengths.values()) < 1:
            raise MetricInputError(
                f"{label}: per-patient arrays must be non-empty with equal row counts, got {lengths}"
            )
        object.__setattr__(self, "arrays", arrays)
        object.__setattr__(self, "context", dict(self.context))
        if self.patients is not None:
            ids = np.asarray([str(p) for p in np.asarray(self.patients).ravel()])
            n = next(iter(lengths.values()))
            if ids.size != n or np.ndim(self.patients) != 1:
                raise MetricInputError(f"{label}: {ids.size} patient ids for {n} rows")
            unique, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise MetricInputError(
                    f"{label}: patient ids must be unique, repeated: {list(unique[counts > 1][:5])}"
                )
            object.__setattr__(self, "patients", ids)

    @property
    def n(self) -> int:
        """Number of patients (rows) in the group."""
        return int(next(iter(self.arrays.values())).shape[0])

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The per-patient arrays restricted to (possibly repeated) row indices ``idx``."""
        return {key: value[idx] for key, value in self.arrays.items()}


class BootstrapCI(NamedTuple):
    """A point estimate with its percentile bootstrap interval.

    ``n_boot_ok`` counts the replicates in which at least one group's metric was defined
    (each averages the groups defined in it; the others are skipped); ``n_groups`` counts the groups whose metric was defined on their full data
    (groups where it was not are left out of both the estimate and the replicates).
    """

    estimate: float
    lower: float
    upper: float
    n_boot_ok: int
    n_boot: int = 0
    n_groups: int = 0


def _check_options(n_boot: int, alpha: float) -> None:
    problems = []
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        problems.append(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (0 < alpha < 1):
        problems.append(f"alpha must lie in (0, 1), got {alpha!r}")
    if problems:
        raise MetricInputError("bootstrap: " + "; ".join(problems))


def _evaluate(
    metric_fn: GroupMetric,
    group: GroupData,
    data: Mapping[str, np.ndarray],
    skip_errors: tuple[type[BaseException], ...],
) -> float:
    """The metric as a float; non-finite values and the listed exception types become NaN."""
    try:
        value = float(metric_fn(data, group.context))
    except skip_errors:
        return float("nan")
    return value if np.isfinite(value) else float("nan")


def grouped_bootstrap_ci(
    groups: Sequence[GroupData],
    metric_fn: GroupMetric,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    skip_errors: tuple[type[BaseException], ...] = (),
) -> BootstrapCI:
    """Mean-over-groups metric with a patient-level percentile bootstrap interval.

    Args:
        groups: one :class:`GroupData` per model (fold or (seed, fold)). Either every group
            names its patients (one patient draw per replicate, shared by all groups: a group
            takes each of its drawn patients as often as drawn) or none does (independent
            within-group draws).
        metric_fn: ``(data, context) -> float``; NaN (or a non-finite value) means undefined.
        n_boot: number of bootstrap replicates.
        alpha: 1 - confidence level (0.05 gives a 95% interval).
        seed: seed of the resampling; equal seeds give identical results. With named patients
            the seed drives the one shared patient draw; otherwise every group draws from its
            own child stream, so a group's resamples do not depend on the others.
        skip_errors: exception types from ``metric_fn`` treated as "undefined" (NaN), e.g.
            ``(CensoringSupportError, TimeGridError)``; any other exception propagates.

    Returns:
        :class:`BootstrapCI`. Each replicate averages the groups whose metric is defined in
        it: a group whose resample leaves its metric undefined (no comparable pair, a listed
        exception) or that draws none of its patients is left out of that replicate, as a
        class absent from a draw leaves a macro AUC. Replicates in which no group is defined
        are skipped (``n_boot_ok`` counts the others). If no replicate (or no group) is
        usable the interval (and estimate) is NaN.
    """
    _check_options(n_boot, alpha)
    if len(groups) == 0:
        raise MetricInputError("bootstrap: at least one group is needed")
    for g in groups:
        if not isinstance(g, GroupData):
            raise MetricInputError(f"bootstrap: groups must be GroupData, got {type(g).__name__}")
    named = [g.patients is not None for g in groups]
    if any(named) and not all(named):
        unnamed = [g.name or str(k) for k, g in enumerate(groups) if g.patients is None]
        raise MetricInputError(
            "bootstrap: either every group names its patients or none does; "
            f"no patient ids for group(s) {unnamed[:5]}"
        )
    point = np.array([_evaluate(metric_fn, g, g.arrays, skip_errors) for g in groups])
    used = [k for k in range(len(groups)) if np.isfinite(point[k])]
    if not used:
        return BootstrapCI(float("nan"), float("nan"), float("nan"), 0, n_boot, 0)

    replicates = np.empty((n_boot, len(used)))
    if all(named):
        counts = _shared_patient_counts(groups, n_boot, seed)
        for col, k in enumerate(used):
            group, rows = groups[k], np.arange(groups[k].n)
            for b in range(n_boot):
                # each drawn patient of the group as often as it was drawn
                idx = np.repeat(rows, counts[k][b])
                replicates[b, col] = (
                    _evaluate(metric_fn, group, group.take(idx), skip_errors)
                    if idx.size
                    else float("nan")
                )
        return _summarise(float(point[used].mean()), replicates, alpha, n_boot, len(used))

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(groups))]
    for col, k in enumerate(used):
        group = groups[k]
        # All resamples of a group at once: one (n_boot, n) index matrix.
        draws = streams[k].integers(0, group.n, size=(n_boot, group.n))
        for b in range(n_boot):
            replicates[b, col] = _evaluate(metric_fn, group, group.take(draws[b]), skip_errors)
    return _summarise(float(point[used].mean()), replicates, alpha, n_boot, len(used))


def _shared_patient_counts(groups: Sequence[GroupData], n_boot: int, seed: int) -> list[np.ndarray]:
    """Per group, the (n_boot, n) multiplicities of its rows' patients in one shared draw.

    The draw resamples the union of all groups' patients (sorted ids), as the benchmark's
    statistics do, so a patient tested in several groups (several seeds) has the same
    multiplicity in all of them.
    """
    # imported here: oncoslide.bench.stats itself imports oncoslide.evaluation
    from oncoslide.bench.stats import bootstrap_counts

    ids = [np.asarray(g.patients) for g in groups]
    patients = np.unique(np.concatenate(ids))
    counts = bootstrap_counts(patients.size, n_boot, seed)
    return [counts[:, np.searchsorted(patients, group_ids)] for group_ids in ids]


def _summarise(
    estimate: float, replicates: np.ndarray, alpha: float, n_boot: int, n_groups: int
) -> BootstrapCI:
    # a group undefined in a replicate is left out of that replicate's mean; dropping the whole
    # replicate instead would keep only the draws in which every small group has (say) an
    # event, a biased and on small folds tiny subset of the replicates
    defined = np.isfinite(replicates)
    ok = defined.any(axis=1)
    if not ok.any():
        return BootstrapCI(estimate, float("nan"), float("nan"), 0, n_boot, n_groups)
    means = np.where(defined, replicates, 0.0)[ok].sum(axis=1) / defined[ok].sum(axis=1)
    lower, upper = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(estimate, float(lower), float(upper), int(ok.sum()), n_boot, n_groups)


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    skip_errors: tuple[type[BaseException], ...] = (),
) -> BootstrapCI:
    """Percentile bootstrap interval for one group of ``n`` patients.

    ``metric_fn(idx)`` computes the metric on the rows ``idx`` (an int array; ``arange(n)`` for
    the point estimate, resampled-with-replacement indices for the replicates).
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise MetricInputError(f"bootstrap: n must be a positive integer, got {n!r}")
    group = GroupData({"index": np.arange(n)})
    return grouped_bootstrap_ci(
        [group],
        lambda data, _context: metric_fn(data["index"]),
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
        skip_errors=skip_errors,
    )
