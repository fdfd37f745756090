"""How a model that reads omics at test time copes when test patients lack them.

:func:`missing_omics_evaluation` takes one trained fold model (a model folder), the cohort and
omics table it was trained with, and scores the fold's test patients (the cohort's patients with
targets that the model never saw: not in its ``patients.csv``) several times, each time with a
share of their omics rows hidden::

    result = missing_omics_evaluation("run/folds/seed0-fold0/model", cohort, omics)
    result.scores        # missing_share, metric, value, n_patients, n_hidden (tidy)
    result.predictions   # patient_id, missing_share, omics_hidden, omics_present, outputs

Hidden patients are a seeded random draw among the test patients that have a row; the draws are
nested (the patients hidden at 50 % are also hidden at 100 %), so the shares differ only by the
rows they hide. A hidden row is removed from the table before prediction, exactly as a patient
without omics (zeros, ``present = False``); the model's own rule for missing omics then applies
(see :mod:`oncoslide.models.omics_baselines`). Metrics are the fold's (``FoldTask.metrics``),
with the model's training and validation patients as the censoring reference, as in the run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from oncoslide.cohort.omics import Omics
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.training.model_folder import TrainedModel, load_model_folder
from oncoslide.training.predict import check_contract, predict_logits, prediction_side
from oncoslide.training.side_inputs import declared_side_inputs
from oncoslide.training.tasks import task_patients

DEFAULT_SHARES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class MissingOmicsResult:
    """Scores (tidy: one row per share and metric) and the predictions behind them."""

    scores: pd.DataFrame
    predictions: pd.DataFrame
    test_ids: list[str]


def hidden_patients(with_omics: Sequence[str], share: float, seed: int) -> list[str]:
    """The ``round(share * n)`` patients hidden at ``share``: a prefix of one seeded
    permutation of the sorted ids, so the sets grow with the share (nested)."""
    ids = sorted(with_omics)
    order = np.random.default_rng(seed).permutation(len(ids))
    k = int(np.floor(share * len(ids) + 0.5))  # round half up (Python's round goes to even)
    return sorted(ids[i] for i in order[:k])


def missing_omics_evaluation(
    model: str | os.PathLike[str] | TrainedModel,
    cohort: Cohort,
    omics: Omics,
    *,
    shares: Sequence[float] = DEFAULT_SHARES,
    seed: int = 0,
    test_ids: Sequence[str] | None = None,
    cache: FeatureCache | None = None,
) -> MissingOmicsResult:
    """Score a fold model's test patients with 0 %, 50 % and 100 % (``shares``) of their omics
    hidden (see the module docstring).

    Args:
        model: a model folder (e.g. ``run/folds/seed0-fold0/model``) or a loaded model.
        cohort: the cohort with feature files and targets (the training cohort: the model's
            training patients set the censoring distribution of the survival metrics).
        omics: the omics table the model was trained with.
        shares: shares of the test patients with omics whose rows are hidden, in [0, 1].
        seed: seed of the hidden draw.
        test_ids: the patients to score (default: every cohort patient with targets that the
            model did not see in training or validation).

    Raises:
        ConfigError: a model that does not read omics at test time, no test patient, a share
            outside [0, 1], or anything :func:`~oncoslide.training.predict.predict_cohort`
            refuses.
    """
    trained = model if isinstance(model, TrainedModel) else load_model_folder(Path(model))
    if declared_side_inputs(trained.name).get("omics") != "always":
        raise ConfigError(
            f"model {trained.name!r} does not read omics at test time: hiding test omics cannot "
            "change its predictions"
        )
    bad = [s for s in shares if not 0.0 <= float(s) <= 1.0]
    if bad or not shares:
        raise ConfigError(f"shares must be a non-empty list of values in [0, 1], got {shares!r}")
    if cohort.feature_dim is None:
        raise ConfigError("load the cohort with its feature files to predict")
    seen = trained.patients()
    seen_ids = set(seen["patient_id"].astype(str))
    if test_ids is None:
        test_ids = [p for p in task_patients(cohort, trained.task) if p not in seen_ids]
    test_ids = list(test_ids)
    if not test_ids:
        raise ConfigError(
            f"no test patient: the model in {trained.path} saw every patient of this cohort "
            "with targets (a --fit-all model has no test part)"
        )
    fit_ids = [p for p in seen["patient_id"].astype(str) if p in set(cohort.patient_ids)]
    with_omics = [p for p in test_ids if p in omics.values.index]
    own = cache is None
    cache = cache or FeatureCache()
    scores, predictions = [], []
    try:
        check_contract(trained, cohort, cache)
        for share in shares:
            hidden = hidden_patients(with_omics, float(share), seed)
            table = Omics(values=omics.values.drop(index=hidden), groups=omics.groups)
            arrays = prediction_side(trained, {"omics": table}, test_ids)
            logits, _ = predict_logits(trained, cohort, test_ids, cache, arrays)
            metrics = trained.fold_task.metrics(logits, cohort, test_ids, fit_ids=fit_ids)
            scores += [
                {
                    "missing_share": float(share),
                    "metric": name,
                    "value": float(value),
                    "n_patients": len(test_ids),
                    "n_hidden": len(hidden),
                }
                for name, value in metrics.items()
            ]
            frame = trained.fold_task.prediction_frame(logits)
            hidden_set = set(hidden)
            frame.insert(0, "omics_present", arrays["omics"][1])
            frame.insert(0, "omics_hidden", [p in hidden_set for p in test_ids])
            frame.insert(0, "missing_share", float(share))
            frame.insert(0, "patient_id", test_ids)
            predictions.append(frame)
    finally:
        if own:
            cache.close()
    return MissingOmicsResult(
        scores=pd.DataFrame(scores),
        predictions=pd.concat(predictions, ignore_index=True),
        test_ids=test_ids,
    )


__all__ = ["DEFAULT_SHARES", "MissingOmicsResult", "hidden_patients", "missing_omics_evaluation"]
