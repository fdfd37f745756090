"""Predictions and metrics at both levels of a label tree (coarse -> fine).

The rule that keeps the two levels from ever contradicting the tree, for any model:

- coarse probabilities are the sums of their children's fine probabilities;
- the predicted coarse class is the argmax of the coarse probabilities, and the predicted fine
  class is the most probable fine class *among the children of that coarse class* (top-down).

So the predicted fine class's parent is always the predicted coarse class. Fine-level balanced
accuracy uses this top-down decision (it equals the plain argmax whenever the argmax fine class
lies in the argmax coarse class); AUCs use the probabilities of each level.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from oncoslide.evaluation.classification import balanced_accuracy, roc_auc

#: Metric names of a classification task with a label tree, beyond ``auc`` and
#: ``balanced_accuracy`` (which are the fine level's).
COARSE_METRICS = ("auc_coarse", "balanced_accuracy_coarse")


def coarse_probabilities(probs: ArrayLike, parent: ArrayLike) -> NDArray[np.float64]:
    """(n, C_fine) fine probabilities -> (n, C_coarse): each coarse class sums its children."""
    p = np.asarray(probs, dtype=np.float64)
    par = np.asarray(parent, dtype=np.int64)
    out = np.zeros((p.shape[0], int(par.max()) + 1 if par.size else 0))
    np.add.at(out.T, par, p.T)
    return out


def tree_decision(
    probs: ArrayLike, parent: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Top-down predictions (coarse index, fine index) per row; the fine class always lies
    under the coarse one. Ties go to the first class, as ``argmax`` does."""
    p = np.asarray(probs, dtype=np.float64)
    par = np.asarray(parent, dtype=np.int64)
    coarse = np.argmax(coarse_probabilities(p, par), axis=1)
    inside = par[None, :] == coarse[:, None]
    fine = np.argmax(np.where(inside, p, -np.inf), axis=1)
    return coarse.astype(np.int64), fine.astype(np.int64)


def hierarchical_metric(
    metric: str, labels: ArrayLike, probs: ArrayLike, parent: ArrayLike
) -> float:
    """One of :func:`hierarchical_metrics` (computing only what it needs: the bootstrap calls
    this once per replicate)."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    par = np.asarray(parent, dtype=np.int64)
    n_fine, n_coarse = p.shape[1], int(par.max()) + 1
    if metric == "auc":
        return roc_auc(y, p, classes=list(range(n_fine)))
    if metric == "balanced_accuracy":
        return balanced_accuracy(y, tree_decision(p, par)[1], classes=list(range(n_fine)))
    if metric == "auc_coarse":
        return roc_auc(par[y], coarse_probabilities(p, par), classes=list(range(n_coarse)))
    if metric == "balanced_accuracy_coarse":
        return balanced_accuracy(par[y], tree_decision(p, par)[0], classes=list(range(n_coarse)))
    raise ValueError(f"unknown hierarchical metric {metric!r}")


def hierarchical_metrics(
    labels: ArrayLike, probs: ArrayLike, parent: ArrayLike
) -> dict[str, float]:
    """Fine-level ``auc`` / ``balanced_accuracy`` (top-down decision) and the coarse level's
    ``auc_coarse`` / ``balanced_accuracy_coarse``, from fine label indices and probabilities."""
    return {
        m: hierarchical_metric(m, labels, probs, parent)
        for m in ("auc", "balanced_accuracy", *COARSE_METRICS)
    }


def tree_consistent(
    pred_coarse: ArrayLike, pred_fine: ArrayLike, parent: ArrayLike
) -> NDArray[np.bool_]:
    """Per row: does the predicted fine class lie under the predicted coarse class?"""
    par = np.asarray(parent, dtype=np.int64)
    return np.asarray(par[np.asarray(pred_fine, dtype=np.int64)] == np.asarray(pred_coarse))


__all__ = [
    "COARSE_METRICS",
    "coarse_probabilities",
    "hierarchical_metric",
    "hierarchical_metrics",
    "tree_consistent",
    "tree_decision",
]
