"""Evaluation: classification metrics and grouped bootstrap confidence intervals."""

from oncoslide.evaluation.bootstrap import (
    BootstrapCI,
    GroupData,
    GroupMetric,
    bootstrap_ci,
    grouped_bootstrap_ci,
)
from oncoslide.evaluation.classification import (
    balanced_accuracy,
    classification_metrics,
    roc_auc,
)

__all__ = [
    "BootstrapCI",
    "GroupData",
    "GroupMetric",
    "balanced_accuracy",
    "bootstrap_ci",
    "classification_metrics",
    "grouped_bootstrap_ci",
    "roc_auc",
]
