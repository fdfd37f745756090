"""Classification metrics for molecular-status tasks: ROC AUC and balanced accuracy.

Labels may be any hashable values (strings, ints). Probabilities are (n,) for the positive class
of a binary task or (n, C) with column k belonging to ``classes[k]``. A metric that is undefined
on the given sample (e.g. AUC with a single class present) is NaN, never an exception; malformed
input raises :class:`~oncoslide.survival.metrics.MetricInputError`. See docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import roc_auc_score

from oncoslide.survival.metrics import MetricInputError

__all__ = ["balanced_accuracy", "classification_metrics", "roc_auc"]


def _labels(y_true: ArrayLike, where: str) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise MetricInputError(f"{where}: y_true must be 1-D, got shape {y.shape}")
    return y


def _not_in(values: np.ndarray, classes: np.ndarray) -> list[object]:
    """Distinct values missing from classes, by Python equality (safe across label dtypes)."""
    known = set(classes.tolist())
    return sorted({v for v in np.unique(values).tolist() if v not in known}, key=repr)


def _resolve_classes(
    y: np.ndarray, classes: Sequence[object] | np.ndarray | None, where: str
) -> np.ndarray:
    """The class list: the given one (checked to cover y_true) or the sorted labels of y_true."""
    if classes is None:
        return np.unique(y)
    cls = np.asarray(classes)
    problems = []
    if cls.ndim != 1 or cls.size == 0:
        problems.append("classes must be a non-empty 1-D sequence")
    elif np.unique(cls).size != cls.size:
        problems.append(f"classes has duplicates: {cls.tolist()}")
    else:
        unknown = _not_in(y, cls)
        if unknown:
            problems.append(f"y_true has labels not in classes: {unknown[:10]}")
    if problems:
        raise MetricInputError(f"{where}: " + "; ".join(problems))
    return cls


def _scores(prob: ArrayLike, n: int, where: str) -> NDArray[np.float64]:
    try:
        p = np.asarray(prob, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(f"{where}: probabilities must be numeric") from exc
    problems = []
    if p.ndim not in (1, 2):
        problems.append(f"probabilities must be (n,) or (n, C), got shape {p.shape}")
    elif p.shape[0] != n:
        problems.append(f"probabilities have {p.shape[0]} rows but y_true has {n}")
    if not np.isfinite(p).all():
        problems.append("probabilities have non-finite values")
    if problems:
        raise MetricInputError(f"{where}: " + "; ".join(problems))
    return p


def _binary_auc(positive: np.ndarray, score: NDArray[np.float64]) -> float:
    """AUC of one positive-vs-rest split; NaN when one side is empty."""
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, score))


def roc_auc(
    y_true: ArrayLike, prob: ArrayLike, classes: Sequence[object] | np.ndarray | None = None
) -> float:
    """ROC AUC: binary, or the macro average of one-vs-rest AUCs for more classes.

    Args:
        y_true: true labels, (n,).
        prob: (n,) probability (or any score) of the positive class ``classes[1]``; or (n, C)
            scores with column k for ``classes[k]`` (C = 2 uses column 1).
        classes: the class order; default the sorted unique labels of ``y_true``.

    Returns:
        The AUC; NaN when fewer than two classes are present in ``y_true``. In the multiclass
        case classes absent from ``y_true`` are left out of the macro average (their one-vs-rest
        AUC is undefined).

    Raises:
        MetricInputError: mismatched lengths, non-finite scores, labels missing from
            ``classes``, or a column count that does not match the classes.
    """
    where = "roc_auc"
    y = _labels(y_true, where)
    p = _scores(prob, y.size, where)
    cls = _resolve_classes(y, classes, where)
    if p.ndim == 2 and p.shape[1] != cls.size:
        raise MetricInputError(
            f"{where}: probabilities have {p.shape[1]} columns but there are {cls.size} classes "
            f"({cls.tolist()[:10]}); pass classes explicitly"
        )
    if p.ndim == 1 and cls.size > 2:
        raise MetricInputError(f"{where}: {cls.size} classes need (n, C) probabilities")
    if np.unique(y).size < 2:
        return float("nan")
    if p.ndim == 1 or cls.size == 2:
        score = p if p.ndim == 1 else p[:, 1]
        return _binary_auc(y == cls[-1], score)
    aucs = [_binary_auc(y == c, p[:, k]) for k, c in enumerate(cls)]
    defined = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(defined)) if defined else float("nan")


def _predictions(y: np.ndarray, prob_or_pred: ArrayLike, cls: np.ndarray, where: str) -> np.ndarray:
    """Predicted labels from probabilities (argmax / > 0.5) or from labels passed through."""
    raw = np.asarray(prob_or_pred)
    if raw.ndim == 2:
        p = _scores(raw, y.size, where)
        if p.shape[1] != cls.size:
            raise MetricInputError(
                f"{where}: probabilities have {p.shape[1]} columns but there are {cls.size} classes"
            )
        return cls[np.argmax(p, axis=1)]
    if raw.ndim != 1 or raw.shape[0] != y.size:
        raise MetricInputError(f"{where}: predictions must be (n,) or (n, C) with n = {y.size}")
    unknown = _not_in(raw, cls)
    if not unknown:
        return raw  # already labels
    if raw.dtype.kind == "f" and cls.size == 2:
        p = _scores(raw, y.size, where)
        if (p < 0).any() or (p > 1).any():
            raise MetricInputError(f"{where}: positive-class probabilities must lie in [0, 1]")
        # Strictly above 1/2, as argmax over (1 - p, p) picks the first class on a tie.
        return np.where(p > 0.5, cls[1], cls[0])
    raise MetricInputError(f"{where}: predictions contain labels not in classes: {unknown[:10]}")


def balanced_accuracy(
    y_true: ArrayLike,
    prob_or_pred: ArrayLike,
    classes: Sequence[object] | np.ndarray | None = None,
) -> float:
    """Balanced accuracy: the mean recall over the classes present in ``y_true``.

    Args:
        y_true: true labels, (n,).
        prob_or_pred: (n, C) probabilities (prediction = argmax), (n,) predicted labels, or, for
            two classes, (n,) probabilities of ``classes[1]`` (prediction: p > 0.5).
        classes: class order; default the sorted unique labels of ``y_true``.

    Returns:
        The balanced accuracy (sklearn's definition, without adjustment); NaN for an empty input.
    """
    where = "balanced_accuracy"
    y = _labels(y_true, where)
    cls = _resolve_classes(y, classes, where)
    if y.size == 0:
        return float("nan")
    pred = _predictions(y, prob_or_pred, cls, where)
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls))


def classification_metrics(
    y_true: ArrayLike, prob: ArrayLike, classes: Sequence[object] | np.ndarray
) -> dict[str, float]:
    """``{"auc": roc_auc, "balanced_accuracy": ...}`` from (n, C) probabilities."""
    return {
        "auc": roc_auc(y_true, prob, classes),
        "balanced_accuracy": balanced_accuracy(y_true, prob, classes),
    }
