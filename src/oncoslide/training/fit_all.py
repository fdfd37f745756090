"""Train one model on every eligible patient and write it as a self-describing model folder.

``oncoslide train ... --fit-all --out model/`` is the model a user applies to new cohorts
(``oncoslide predict``), starts other trainings from (``--init``) or puts in a model zoo. There
is no test part: the validation part is carved from the patients as in cross-validation
(stratified, site-disjoint with ``site_preserving``), and early stopping and checkpoint choice
use it. Its honest performance estimate is the cross-validation of the same configuration.
With a ``choose`` grid, every combination trains on the training part and the one with the
best score on that validation part (carved from all patients) is kept; ``choices.csv`` lists
them, and the model folder's config holds the chosen values.

The folder holds the model folder files (model.json, weights.pt, patients.csv; see
:mod:`oncoslide.training.model_folder`) plus ``splits.csv`` (train / validation),
``history.csv``, ``data.json`` (the data record) and ``paths.json`` (where that data was).
Running the same command again on a finished folder does nothing; another configuration in the
same folder is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console

from oncoslide._io import check_folder_target, write_json, write_table
from oncoslide._log import get_logger, run_log
from oncoslide._threads import apply_num_threads, describe_threads
from oncoslide.cohort.fingerprint import check_recorded_data
from oncoslide.cohort.omics import Omics
from oncoslide.cohort.splits import carve_validation
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.study import DataPaths, record_data_paths
from oncoslide.training.config import TrainConfig, other_run_text
from oncoslide.training.model_folder import (
    MODEL_FILE,
    TrainedModel,
    is_model_folder,
    load_model_folder,
)
from oncoslide.training.progress import make_progress, quiet_lightning
from oncoslide.training.tasks import resolve_task, split_inputs, task_patients

# the data record of the model's training data (see oncoslide.cohort.fingerprint)
DATA_FILE = "data.json"

_LOG = get_logger("training")


@dataclass(frozen=True)
class FitAllResult:
    out_dir: Path
    model: TrainedModel
    splits: pd.DataFrame
    history: pd.DataFrame
    resumed: bool = False


def fit_all(
    cohort: Cohort,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    console: Console | None = None,
    cache: FeatureCache | None = None,
    side: Mapping[str, Omics] | None = None,
    slides_dir: str | Path | None = None,
) -> FitAllResult:
    """Train on every patient with the task's targets; write the model folder ``out_dir``.

    ``side`` holds the per-patient tables the model declares (e.g. ``{"omics": ...}``);
    ``slides_dir`` is recorded with the data paths (``paths.json``) for later commands.
    """
    from oncoslide.training.cv import run_data_record, train_fold

    out = check_folder_target(out_dir)
    if cohort.feature_dim is None:
        raise ConfigError("the cohort was loaded without feature files; pass features_dir")
    task = resolve_task(cohort, config)
    patients = task_patients(cohort, task)
    if len(patients) < 4:
        raise ConfigError(f"{len(patients)} patients with targets are too few to train on")
    if task.is_survival and not cohort.survival(patients)["event"].any():
        raise ConfigError(
            f"no patient has an event: all {len(patients)} are censored, so there is nothing "
            "to learn a survival model from"
        )
    data = run_data_record(cohort, task, config, patients, side)
    if is_model_folder(out):
        try:
            stored = json.loads((out / MODEL_FILE).read_text())
            previous = stored.get("run_key")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot read {out / MODEL_FILE}: {exc}") from None
        if previous == config.run_key() and not overwrite:
            check_recorded_data(out / DATA_FILE, data, what="model")
            record_data_paths(out, DataPaths.of(cohort, side, slides_dir))
            with run_log(out, "fit on all patients"):
                _LOG.info("already trained: nothing to do", extra={"event": "finished"})
            return FitAllResult(
                out,
                load_model_folder(out),
                pd.read_csv(out / "splits.csv", dtype={"patient_id": str}),
                pd.read_csv(out / "history.csv"),
                resumed=True,
            )
        if not overwrite:
            what = other_run_text(stored.get("config"), config, previous)
            raise ConfigError(
                f"{out} holds another model {what}; choose a new --out or pass --overwrite"
            )
    strata, sites = split_inputs(cohort, task, patients, site_preserving=config.site_preserving)
    splits = carve_validation(
        patients,
        strata=strata,
        sites=sites,
        val_fraction=config.val_fraction,
        seed=config.seed,
    )
    console = console or Console(quiet=not config.progress)
    threads = apply_num_threads(config.num_threads)
    own = cache is None
    cache = cache or FeatureCache(
        max_bytes=int(config.cache_gb * 2**30),
        dtype=None if config.cache_dtype == "stored" else config.cache_dtype,
    )
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    progress = make_progress(console, enabled=config.progress)
    n_val = int((splits["part"] == "val").sum())
    with run_log(out, "fit on all patients"):
        _LOG.info(
            "%s · %s (%s) on all patients: %d train, %d validation -> %s",
            config.model, task.name, task.kind, len(splits) - n_val, n_val, out,
            extra={"event": "start"},
        )  # fmt: skip
        _LOG.info(describe_threads(threads), extra={"event": "threads", "threads": threads})
        try:
            with progress, quiet_lightning():
                outcome = train_fold(
                    cohort,
                    task,
                    config,
                    splits,
                    config.seed,
                    0,
                    work,
                    cache,
                    progress,
                    side=side,
                    log_label="all patients",
                )
                outcome.training_feature_stats()  # read while the cache is open
        finally:
            if own:
                cache.close()
        history = pd.DataFrame(outcome.history)
        write_json(out / DATA_FILE, data.to_dict())
        record_data_paths(out, DataPaths.of(cohort, side, slides_dir))
        write_table(out / "splits.csv", splits)
        write_table(out / "history.csv", history)
        if outcome.choices is not None:  # a choose grid: every combination's validation scores
            write_table(out / "choices.csv", outcome.choices)
        outcome.info["fit_all"] = 1
        outcome.save_model(out, config)
        shutil.rmtree(work, ignore_errors=True)
        _LOG.info(
            "finished: %d epoch(s), %.0f s -> %s",
            outcome.info["epochs_run"], outcome.info["seconds"], out,
            extra={"event": "finished"},
        )  # fmt: skip
    return FitAllResult(out, load_model_folder(out), splits, history)
