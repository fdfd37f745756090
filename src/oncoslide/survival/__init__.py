"""Survival targets, time bins, metrics and the Breslow baseline (numpy only).

The torch losses live in :mod:`oncoslide.survival.losses` (imported on its own so that table
validation and metrics never pay for importing torch).
"""

from oncoslide.survival.bins import TimeBins
from oncoslide.survival.breslow import BreslowEstimator
from oncoslide.survival.coxnet import ElasticNetCox, alpha_max, alpha_path, fit_select_alpha
from oncoslide.survival.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    evaluation_times,
    integrated_brier_score,
    kaplan_meier,
    survival_metrics,
)
from oncoslide.survival.target import make_survival, split_survival

__all__ = [
    "BreslowEstimator",
    "ElasticNetCox",
    "TimeBins",
    "alpha_max",
    "alpha_path",
    "brier_score",
    "concordance_index_censored",
    "concordance_index_ipcw",
    "cumulative_dynamic_auc",
    "evaluation_times",
    "fit_select_alpha",
    "integrated_brier_score",
    "kaplan_meier",
    "make_survival",
    "split_survival",
    "survival_metrics",
]
