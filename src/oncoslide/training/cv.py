"""Leakage-free cross-validation of a MIL model on a cohort: the main training job.

For every seed and fold: fit the fold's preprocessing on its training part, train with
Lightning (early stopping and checkpoint choice on the validation part carved from training),
then predict the test part once. Each finished fold is written atomically to
``folds/seed<S>-fold<K>/`` with a ``done.json`` marker, so an interrupted run resumes where it
stopped. The run's tables (splits, predictions, metrics, summary) are assembled at the end.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, overload

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from torch.utils.data import DataLoader

from oncoslide._io import write_json, write_table
from oncoslide._log import get_logger, number, run_log
from oncoslide._threads import apply_num_threads, describe_threads
from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.exclusions import pretrain_slides_of, read_exclusions
from oncoslide.cohort.fingerprint import DataRecord, data_record
from oncoslide.cohort.omics import Omics
from oncoslide.cohort.splits import (
    audit_splits,
    fold_parts,
    load_splits,
    make_splits,
    save_splits,
)
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.features.schema import FeatureContract
from oncoslide.models import MODELS, MILModel, create_model
from oncoslide.study import DataPaths, record_data_paths
from oncoslide.training.choose import (
    apply_choice,
    check_model_values,
    choice_score,
    combinations,
    criterion,
    describe,
    is_better,
)
from oncoslide.training.config import TrainConfig
from oncoslide.training.data import (
    BackgroundBatches,
    BagDataset,
    BalancedSampler,
    EpochShuffleSampler,
    ShardedBatches,
    collate_bags,
    length_sorted_order,
)
from oncoslide.training.details import patient_details, with_details
from oncoslide.training.feature_stats import FeatureStats, with_tissues
from oncoslide.training.model_folder import initialise_from, save_model_folder, versions
from oncoslide.training.module import TARGET_KEYS, MILModule
from oncoslide.training.progress import EpochLog, FoldProgress, make_progress, quiet_lightning
from oncoslide.training.run_folder import FoldFolder, RunFolder
from oncoslide.training.side_inputs import SideScaler, check_side_inputs, part_side_arrays
from oncoslide.training.summary import summarise_run
from oncoslide.training.tasks import (
    FoldTask,
    TaskSpec,
    fit_fold_task,
    resolve_task,
    split_inputs,
    task_model_kwargs,
    task_patients,
)

_LOG = get_logger("training")


@dataclass
class CVResult:
    """The tables of a finished cross-validation run (also on disk in ``out_dir``)."""

    out_dir: Path
    config: TrainConfig
    task: TaskSpec
    splits: pd.DataFrame
    predictions: pd.DataFrame
    metrics: pd.DataFrame
    summary: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    cache_stats: dict[str, float] = field(default_factory=dict)


def cross_validate(
    cohort: Cohort,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    splits: pd.DataFrame | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    cache: FeatureCache | None = None,
    side: Mapping[str, Omics] | None = None,
    slides_dir: str | Path | None = None,
) -> CVResult:
    """Run (or resume) cross-validation and write the run folder.

    Args:
        cohort: a validated cohort with feature files.
        config: the run configuration.
        out_dir: run folder; an existing folder of the same run resumes, of another run is
            refused unless ``overwrite``.
        splits: optional precomputed split table (audited against the task's patients).
        cache: a feature cache to share with other runs in the same process.
        side: per-patient tables the model declares (e.g. ``{"omics": load_omics(...)}``).
        slides_dir: the folder of the slides behind the features, recorded with the paths of
            the cohort table, features and side tables (``paths.json``) for later commands.
    """
    out = Path(out_dir)
    console = console or Console(quiet=not config.progress)
    if cohort.feature_dim is None:
        raise ConfigError("the cohort was loaded without feature files; pass features_dir")
    # a wrong model name or keyword fails here, before any folder is written
    check_side_inputs(config.model, side or {})
    task = resolve_task(cohort, config)
    config = resolve_expert_exclusion(config, task_patients(cohort, task))
    create_model(
        config.model,
        in_dim=cohort.feature_dim,
        n_outputs=len(task.classes) or 1,
        **unfitted_model_kwargs(config, side),
        **task_model_kwargs(config.model, task),
    )
    check_choices(cohort, task, config, side)  # each candidate model keyword builds
    patients = task_patients(cohort, task)
    notes = []
    n_left_out = len(cohort.patient_ids) - len(patients)
    if n_left_out:
        notes.append(
            f"{n_left_out} patients lack {', '.join(task.target_columns)} and are left out"
        )
    if len(patients) < 2 * config.folds:
        raise ConfigError(
            f"{len(patients)} patients with targets are too few for {config.folds} folds"
        )

    seen = pretraining_patients(config, cohort) & set(patients)
    if seen:
        if len(seen) == len(patients):
            raise ConfigError(
                f"the --init encoder {config.init} was pre-trained on every one of the "
                f"{len(patients)} patients: none is left to score (train it on other patients, "
                "or evaluate on another cohort)"
            )
        notes.append(
            f"{len(seen)} patients were pre-trained on by the --init encoder: they train when "
            "their split says so but are never scored as test patients"
        )
    _check_scoreable(cohort, task, config, patients)
    data = run_data_record(cohort, task, config, patients, side)
    run = RunFolder(out)
    run.prepare(config.run_key(), overwrite, data, config=config)
    # run.log: every invocation appends (a resumed run continues its log), terminal or not
    with run_log(out, "cross-validation"):
        splits = _resolve_splits(out, cohort, task, config, patients, splits)
        _check_test_parts(cohort, task, splits)
        save_splits(run.splits, splits)
        run.write_payload(_resolved_config(cohort, config, task, notes, side, data), data)
        record_data_paths(out, DataPaths.of(cohort, side, slides_dir))

        threads = apply_num_threads(config.num_threads)
        own_cache = cache is None
        if cache is None:
            cache = FeatureCache(
                max_bytes=int(config.cache_gb * 2**30),
                dtype=None if config.cache_dtype == "stored" else config.cache_dtype,
            )
        seeds = sorted(splits["seed"].unique())
        folds = sorted(splits["fold"].unique())
        total = len(seeds) * len(folds)
        n_done = sum(run.fold(int(s), int(k)).is_done for s in seeds for k in folds)
        _LOG.info(
            "%s · %s (%s): %d patients, %d folds x %d seed(s), %d fold(s) already done -> %s",
            config.model, task.name, task.kind, len(patients), len(folds), len(seeds), n_done, out,
            extra={"event": "start", "folds": total, "done": n_done},
        )  # fmt: skip
        _LOG.info(describe_threads(threads), extra={"event": "threads", "threads": threads})
        for note in notes:
            _LOG.info("note: %s", note, extra={"event": "note"})
        progress = make_progress(console, enabled=config.progress)
        try:
            with progress, quiet_lightning():
                label = escape(f"{config.model} · {task.name}") + f" · {threads} thread(s)"
                overall = progress.add_task(label, total=total)
                for i, (seed, fold) in enumerate(
                    ((int(s), int(k)) for s in seeds for k in folds), 1
                ):
                    fdir = run.fold(seed, fold)
                    if not fdir.is_done:
                        outcome = _run_fold(
                            cohort, task, config, splits, seed, fold, fdir, cache, progress, side
                        )
                        _log_fold(outcome, task, i, total)
                    progress.advance(overall)
        finally:
            stats = dataclasses.asdict(cache.stats)
            if own_cache:
                cache.close()

        predictions, metrics = run.collect(seeds, folds)
        if config.choose:  # every fold's combinations and validation scores
            write_table(run.choices, run.collect_choices(seeds, folds))
        summary = summarise_run(out, task, seeds, folds, n_boot=config.n_boot, seed=config.seed)
        run.write_tables(predictions, metrics, summary)
        _log_summary(summary, out)
    return CVResult(out, config, task, splits, predictions, metrics, summary, notes, stats)


def _log_fold(outcome: FoldOutcome, task: TaskSpec, index: int, total: int) -> None:
    info = outcome.info
    scores = ", ".join(f"{m} {number(outcome.metrics.get(m))}" for m in task.metric_names)
    chosen = int(info["chosen_epoch"])  # -1: no epoch had a validation score
    training = f"{int(info['epochs_run'])} epoch(s)" + (
        f", chosen epoch {chosen + 1}" if chosen >= 0 else ""
    )
    if outcome.choice:
        training += f", chosen on validation {describe(outcome.choice)}"
    _LOG.info(
        "seed %d fold %d done (%d/%d): %s; %s, %.0f s",
        outcome.seed, outcome.fold, index, total, scores, training, info["seconds"],
        extra={
            "event": "fold", "seed": outcome.seed, "fold": outcome.fold, "index": index,
            "total": total, "metrics": dict(outcome.metrics), "seconds": info["seconds"],
        },
    )  # fmt: skip


def _log_summary(summary: pd.DataFrame, out: Path) -> None:
    parts = []
    for row in summary.itertuples():
        ci = "" if row.n_boot == 0 else f" [{number(row.ci_lower)}, {number(row.ci_upper)}]"
        parts.append(f"{row.metric} {number(row.mean)}{ci}")
    _LOG.info("finished: %s -> %s", ", ".join(parts), out, extra={"event": "finished"})


# ---------------------------------------------------------------------------- run folder


def _resolve_splits(
    out: Path,
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    patients: list[str],
    given: pd.DataFrame | None,
) -> pd.DataFrame:
    path = out / "splits.csv"
    strata, sites = split_inputs(cohort, task, patients, site_preserving=config.site_preserving)
    if given is not None:
        splits = given.loc[:, ["patient_id", "seed", "fold", "part"]].copy()
        splits["patient_id"] = splits["patient_id"].astype(str)
        audit_splits(
            splits,
            patient_ids=patients,
            sites=None if sites is None else dict(zip(patients, sites, strict=True)),
        )
    elif path.exists():
        # a resumed run re-audits its saved splits, sites included: the file may have changed
        splits = load_splits(path, patient_ids=patients)
        audit_splits(
            splits,
            patient_ids=patients,
            sites=None if sites is None else dict(zip(patients, sites, strict=True)),
        )
    else:
        splits = make_splits(
            patients,
            n_folds=config.folds,
            seeds=config.seeds,
            strata=strata,
            sites=sites,
            val_fraction=config.val_fraction,
        )
    return splits


def _check_scoreable(
    cohort: Cohort, task: TaskSpec, config: TrainConfig, patients: Sequence[str]
) -> None:
    """Refuse, before anything is written, a cohort whose folds could not all be scored."""
    if not task.is_survival:
        return
    y = cohort.survival(list(patients))
    n_events = int(y["event"].sum())
    if n_events == 0:
        raise ConfigError(
            f"no patient has an event: all {len(patients)} are censored, so no test part "
            "could have a comparable pair (every metric would be NaN)"
        )
    if n_events < config.folds:
        raise ConfigError(
            f"{n_events} events are too few for {config.folds} folds: a test part without an "
            "event has no comparable pair (its metrics would be NaN); use --folds "
            f"{max(2, n_events)} or fewer, or a larger cohort"
        )


def _check_test_parts(cohort: Cohort, task: TaskSpec, splits: pd.DataFrame) -> None:
    """Every test part must hold a comparable pair: an event with a later time (survival), or
    two classes (classification). Otherwise its metrics are NaN and the summary misleads."""
    bad = []
    tests = splits[splits["part"] == "test"]
    for (seed, fold), rows in tests.groupby(["seed", "fold"]):
        pids = list(rows["patient_id"])
        if task.is_survival:
            y = cohort.survival(pids)
            times, events = y["time"], y["event"]
            ok = any(bool((times > t).any()) for t in times[events])
            what = "no event with a later time"
        else:
            ok = len(set(cohort.labels(task.name, pids))) >= 2
            what = "only one class"
        if not ok:
            bad.append(f"seed {seed} fold {fold} ({len(pids)} patients, {what})")
    if bad:
        raise ConfigError(
            f"{len(bad)} test part(s) have no comparable pair, so their metrics would be NaN: "
            f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; use fewer folds or a "
            "larger cohort"
        )


def run_data_record(
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    patients: Sequence[str],
    side: Mapping[str, Omics] | None = None,
) -> DataRecord:
    """What a run reads: each patient's targets (and site, for site-preserving splits), each
    feature file, each side table."""
    columns = [*task.target_columns, *(["site"] if config.site_preserving else [])]
    return data_record(cohort, patients, columns, side=side)


def _resolved_config(
    cohort: Cohort,
    config: TrainConfig,
    task: TaskSpec,
    notes: list[str],
    side: Mapping[str, Omics] | None = None,
    data: DataRecord | None = None,
) -> dict[str, object]:
    return {
        "run_key": config.run_key(),
        "data_key": None if data is None else data.key,
        "config": config.model_dump(),
        "task": {"name": task.name, "kind": task.kind, "classes": list(task.classes)},
        "cohort": {
            "patients": len(cohort.patient_ids),
            "slides": len(cohort.slides),
            "feature_dim": cohort.feature_dim,
        },
        "side_inputs": {
            name: {"patients": len(table), "columns": len(table.genes)}
            for name, table in (side or {}).items()
        },
        "notes": notes,
        "versions": versions(),
    }


# ---------------------------------------------------------------------------- one fold


def _loader(
    ds: BagDataset,
    config: TrainConfig,
    order: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size or config.batch_size,
        sampler=list(order) if order is not None else None,
        collate_fn=collate_bags,
        num_workers=0,
        pin_memory=torch.cuda.is_available(),
    )


# Bags per forward pass when predicting (see _predict).
PREDICT_BATCH = 1


@dataclass
class FoldOutcome:
    """One trained fold: the test part's logits, metrics and what training did."""

    seed: int
    fold: int
    test_ids: list[str]  # the evaluated test patients (exclusions removed)
    fit_ids: list[str]  # training + validation patients
    logits: torch.Tensor  # aligned with test_ids
    fold_task: FoldTask
    metrics: dict[str, float]
    history: list[dict[str, float]]
    info: dict[str, float]
    excluded: list[str] = field(default_factory=list)
    model: MILModel | None = None  # the chosen weights, on the CPU, in eval mode
    contract: FeatureContract | None = None
    parts: dict[str, list[str]] = field(default_factory=dict)
    # of the training part, for test-time adaptation: computed when a model folder is written
    # (feature_stats_source), so benchmark cells that keep no model never pay for it
    feature_stats: FeatureStats | None = None
    feature_stats_source: Callable[[], FeatureStats] | None = field(default=None, repr=False)
    details: pd.DataFrame | None = None  # per test patient (models that describe_patients)
    choice: dict[str, Any] = field(default_factory=dict)  # values chosen on validation
    choices: pd.DataFrame | None = None  # every combination's validation scores (choose)

    def training_feature_stats(self) -> FeatureStats | None:
        """The training part's feature statistics (computed on first use, then kept)."""
        if self.feature_stats is None and self.feature_stats_source is not None:
            self.feature_stats = self.feature_stats_source()
            self.feature_stats_source = None
        return self.feature_stats

    def save_model(self, path: Path, config: TrainConfig) -> Path:
        """Write the fold's self-describing model folder (see training.model_folder)."""
        if self.model is None or self.contract is None:
            raise ConfigError("this fold outcome holds no model to save")
        run_key = config.run_key()  # the run's, grid included (a --fit-all folder resumes)
        grid = {"choose": dict(config.choose)} if self.choice else {}
        if self.choice:  # the chosen values, so that the folder reloads without the grid
            config = apply_choice(config, self.choice)
        # the keywords the model was built with (e.g. exclude=auto resolved to cancer names)
        config = config.model_copy(update={"model_kwargs": self.fold_task.config.model_kwargs})
        return save_model_folder(
            path,
            self.model,
            self.fold_task,
            config,
            self.contract,
            parts={k: self.parts[k] for k in ("train", "val") if k in self.parts},
            info={"seed": self.seed, "fold": self.fold, **self.info, **grid},
            feature_stats=self.training_feature_stats(),
            run_key=run_key,
        )

    def prediction_frame(self, cohort: Cohort, task: TaskSpec) -> pd.DataFrame:
        """One row per evaluated test patient: ids, predictions, then the targets."""
        preds = pd.DataFrame({"patient_id": self.test_ids, "seed": self.seed, "fold": self.fold})
        preds = pd.concat([preds, self.fold_task.prediction_frame(self.logits)], axis=1)
        if task.is_survival:
            y = cohort.survival(self.test_ids)
            preds["time"] = y["time"]
            preds["event"] = y["event"].astype(int)
        else:
            idx = self.fold_task.label_index(cohort, self.test_ids)
            preds["label"] = [task.classes[i] for i in idx]
        return with_details(preds, self.details)


def _run_fold(
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    splits: pd.DataFrame,
    seed: int,
    fold: int,
    fdir: FoldFolder,
    cache: FeatureCache,
    progress: Progress | None,
    side: Mapping[str, Omics] | None,
) -> FoldOutcome:
    outcome = train_fold(
        cohort,
        task,
        config,
        splits,
        seed,
        fold,
        fdir.path,
        cache,
        progress,
        side=side,
        log_label=f"seed {seed} fold {fold}",
    )
    _write_fold(fdir, cohort, task, config, outcome)
    return outcome


def train_fold(
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    splits: pd.DataFrame,
    seed: int,
    fold: int,
    work_dir: Path,
    cache: FeatureCache,
    progress: Progress | None = None,
    *,
    exclude_from_test: frozenset[str] = frozenset(),
    side: Mapping[str, Omics] | None = None,
    log_label: str | None = None,
) -> FoldOutcome:
    """Train one fold and predict its test part once; writes only checkpoints in ``work_dir``.

    ``exclude_from_test`` patients (e.g. seen while pre-training an encoder) still train when
    their split says so, but are neither predicted nor scored as test patients. ``side`` holds
    the per-patient tables the model declares (see :mod:`oncoslide.training.side_inputs`):
    training-only ones reach the training part's batches and no other. With ``log_label``
    (e.g. ``"seed 0 fold 2"``) every epoch is logged (:class:`~.progress.EpochLog`).

    With ``config.choose`` every combination of the grid is trained and the best on the
    validation part predicts the test part (:func:`_train_fold_choosing`).
    """
    if config.choose:
        return _train_fold_choosing(
            cohort, task, config, splits, seed, fold, work_dir, cache, progress,
            exclude_from_test=exclude_from_test, side=side, log_label=log_label,
        )  # fmt: skip
    fitted = _fit_fold(
        cohort, task, config, splits, seed, fold, work_dir, cache, progress,
        exclude_from_test=exclude_from_test, side=side, log_label=log_label,
    )  # fmt: skip
    return _finish_fold(fitted, cohort, task, cache, side)


def _fit_fold(
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    splits: pd.DataFrame,
    seed: int,
    fold: int,
    work_dir: Path,
    cache: FeatureCache,
    progress: Progress | None = None,
    *,
    exclude_from_test: frozenset[str] = frozenset(),
    side: Mapping[str, Omics] | None = None,
    log_label: str | None = None,
    choice_label: str = "",
) -> _Fitted:
    """Train one fold's model with its checkpoint chosen on the validation part; the test
    part's outcomes are not read (:func:`_finish_fold` predicts it). ``choice_label`` names
    the combination of a grid in progress output."""
    assert cohort.feature_dim is not None  # checked by the callers
    fdir = work_dir
    # a fold interrupted earlier may have left a checkpoint: it must not be mistaken for ours
    shutil.rmtree(fdir / "checkpoints", ignore_errors=True)
    started = time.perf_counter()
    parts = fold_parts(splits, seed, fold)
    train_ids, val_ids = parts["train"], parts["val"]
    # patients an --init encoder pre-trained on are never test patients (by construction)
    exclude_from_test = exclude_from_test | pretraining_patients(config, cohort)
    excluded = [p for p in parts["test"] if p in exclude_from_test]
    test_ids = [p for p in parts["test"] if p not in exclude_from_test]
    fold_seed = seed * 1000 + fold
    # the patients this task's splits hold (a benchmark's cohort may hold other tasks' too).
    # Resolved before seeding: the model's initialisation must not depend on whether
    # `exclude` came resolved (train) or as "auto" (a benchmark cell, --fit-all), whatever
    # resolving it reads
    config = resolve_expert_exclusion(config, splits["patient_id"].astype(str).unique().tolist())
    pl.seed_everything(fold_seed, workers=True, verbose=False)

    declared = check_side_inputs(config.model, side or {})
    ftask = fit_fold_task(task, config, cohort, train_ids, side=side)
    contract = FeatureContract.of(cache.get(cohort.slide_paths(train_ids[0])[0]))
    model = create_model(
        config.model,
        in_dim=cohort.feature_dim,
        n_outputs=ftask.n_outputs,
        **ftask.model_kwargs(),
    )
    _check_experts(model, contract, val_ids + test_ids)
    meta = MODELS.metadata(config.model)
    aux_weights = _aux_weights(config, meta)
    transfer: dict[str, object] = {}
    if config.init:
        transfer = initialise_from(model, config.model, config.init, contract)
    if config.freeze:
        transfer["frozen"] = model.freeze(config.freeze)
    # statistics a model fits to the training part before its first step (e.g. ROUPKT's
    # standardised expert risks): the training patients' bags only, read lazily. Optional, as
    # lr_scales is: a registered model need not derive from MILModel
    fit_to_training = getattr(model, "fit_to_training", None)
    if fit_to_training is not None:
        fit_to_training(training_bags(cohort, train_ids, cache))
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    datasets: dict[str, BagDataset] = {
        name: BagDataset(
            cohort,
            ids,
            cache,
            ftask.targets(cohort, ids),
            max_patches=config.max_patches if name == "train" else None,
            seed=fold_seed,
            side=part_side_arrays(ftask.side_scalers, side or {}, declared, ids, name),
        )
        for name, ids in _parts(train_ids, val_ids, test_ids)
        if name != "test"  # built once a model is kept (_finish_fold)
    }
    source_choice = _choose_on_validation(model, ftask, datasets["val"], config)
    sampler: EpochShuffleSampler | BalancedSampler
    if config.sampler == "balanced":
        strata = ftask.sampler_strata(cohort, train_ids)
        sampler = BalancedSampler(datasets["train"], strata, seed=fold_seed)
    else:
        sampler = EpochShuffleSampler(datasets["train"], seed=fold_seed)
    if config.prefetch:
        # the first epoch's order, then validation and test: reads overlap the first steps
        cache.prefetch(
            datasets["train"].slide_paths(sampler.order(0))
            + datasets["val"].slide_paths()
            + [str(p) for pid in test_ids for p in cohort.slide_paths(pid)]
        )
    world = config.devices * config.num_nodes  # a multiple of it divides the accumulation
    train_loader = BackgroundBatches(
        DataLoader(
            datasets["train"],
            batch_sampler=ShardedBatches(sampler, config.batch_size),
            collate_fn=collate_bags,
            num_workers=0,
            pin_memory=torch.cuda.is_available(),
        )
    )
    has_val = len(val_ids) > 0
    val_loader = (
        _loader(datasets["val"], config, length_sorted_order(datasets["val"])) if has_val else None
    )

    module = MILModule(
        model,
        ftask,
        config,
        steps_per_epoch=len(train_loader),
        aux_weights=aux_weights,
        uses_slide_index=bool(meta.get("uses_slide_index", False)),
        uses_targets=bool(meta.get("uses_targets", False)),
        # worker processes hand their history back through this file
        history_path=fdir / "history.json" if world > 1 else None,
    )
    callbacks: list[pl.Callback] = []
    if progress is not None and world == 1:
        total = config.epochs * len(train_loader)
        label = f"  seed {seed} fold {fold}" + escape(choice_label)
        callbacks.append(FoldProgress(progress, label, total))
    if log_label is not None:
        score_name = "c_index" if task.is_survival else "auc"  # FoldTask.validation_score
        callbacks.append(
            EpochLog(log_label + choice_label, config.epochs, score_name, seed=seed, fold=fold)
        )
    monitor, mode = ("val_loss", "min") if config.monitor == "loss" else ("val_score", "max")
    checkpoint_cb = None
    if has_val and config.checkpoint == "best":
        checkpoint_cb = ModelCheckpoint(
            dirpath=fdir / "checkpoints",
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_weights_only=True,
            enable_version_counter=False,
        )
        callbacks.append(checkpoint_cb)
    if has_val and config.early_stopping_patience:
        callbacks.append(
            EarlyStopping(monitor=monitor, mode=mode, patience=config.early_stopping_patience)
        )
    gpu = config.accelerator == "gpu" or (
        config.accelerator == "auto" and torch.cuda.is_available()
    )
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator="gpu" if gpu else "cpu",
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=_strategy(config, world),
        deterministic=True if not gpu else "warn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint_cb is not None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        gradient_clip_val=config.grad_clip,
        accumulate_grad_batches=config.accumulate_grad_batches // world,
        use_distributed_sampler=False,
        default_root_dir=fdir,
        limit_val_batches=1.0 if has_val else 0,
    )
    fit_started = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    fit_seconds = time.perf_counter() - fit_started
    epochs_run = trainer.current_epoch
    if world > 1:
        # the workers trained; their last weights are back in `module`, the rest is on disk
        epochs_run = module.restore_history()
        trainer = _single_process_trainer(gpu, fdir)
    best = fdir / "checkpoints" / "best.ckpt"
    if checkpoint_cb is not None and best.exists():
        state = torch.load(best, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        chosen_epoch = _best_epoch(
            module.history, mode, "val_loss" if mode == "min" else "val_score"
        )
    else:
        chosen_epoch = epochs_run - 1
    return _Fitted(
        config=config, seed=seed, fold=fold, started=started, fold_seed=fold_seed,
        train_ids=train_ids, val_ids=val_ids, test_ids=test_ids, excluded=excluded,
        declared=declared, ftask=ftask, contract=contract, trainer=trainer, module=module,
        datasets=datasets, fit_seconds=fit_seconds, epochs_run=epochs_run, world=world,
        chosen_epoch=chosen_epoch, n_params=n_params, n_trainable=n_trainable,
        transfer=transfer, source_choice=source_choice,
    )  # fmt: skip


@dataclass
class _Fitted:
    """A fold's trained model before its test part is read (see :func:`_fit_fold`)."""

    config: TrainConfig
    seed: int
    fold: int
    started: float
    fold_seed: int
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    excluded: list[str]
    declared: Any
    ftask: FoldTask
    contract: FeatureContract
    trainer: pl.Trainer
    module: MILModule
    datasets: dict[str, BagDataset]
    fit_seconds: float
    epochs_run: int
    world: int
    chosen_epoch: int
    n_params: int
    n_trainable: int
    transfer: dict[str, object]
    source_choice: dict[str, Any]


def _finish_fold(
    f: _Fitted,
    cohort: Cohort,
    task: TaskSpec,
    cache: FeatureCache,
    side: Mapping[str, Omics] | None,
) -> FoldOutcome:
    """Predict the test part once with a fitted fold model and score it."""
    ftask, trainer, module, config = f.ftask, f.trainer, f.module, f.config
    test_ds = BagDataset(
        cohort,
        f.test_ids,
        cache,
        ftask.targets(cohort, f.test_ids),
        max_patches=None,
        seed=f.fold_seed,
        side=part_side_arrays(ftask.side_scalers, side or {}, f.declared, f.test_ids, "test"),
    )

    # the test part is touched here, once
    test_logits = _predict(trainer, module, test_ds, config)
    # details (e.g. routing weights) of the same test bags
    details = patient_details(cast(MILModel, module.model), config.model, test_ds.__getitem__,
                              len(test_ds))  # fmt: skip
    # training outputs as test outputs are computed: full bags (no patch sampling), eval mode;
    # survival: the training risks; classification: the decision rates of predict --adapt
    full_train = BagDataset(
        cohort,
        f.train_ids,
        cache,
        f.datasets["train"].targets,
        max_patches=None,
        seed=f.fold_seed,
        # as the test part is predicted: without training-only inputs
        side=part_side_arrays(ftask.side_scalers, side or {}, f.declared, f.train_ids, "predict"),
    )
    train_logits = _predict(trainer, module, full_train, config)
    if task.is_survival:
        ftask.fit_training_risks(train_logits, cohort.survival(f.train_ids))
    metrics = (
        ftask.metrics(test_logits, cohort, f.test_ids, fit_ids=f.train_ids + f.val_ids)
        if f.test_ids
        else {}
    )
    trained = cast(MILModel, module.model).cpu().eval()
    # every patch of the training part (no validation or test patient), for predict --adapt
    train_paths = [path for pid in f.train_ids for path in cohort.slide_paths(pid)]
    rates = None
    if not task.is_survival and len(train_logits):
        chosen = train_logits.float().argmax(dim=-1).cpu().numpy()
        rates = np.bincount(chosen, minlength=train_logits.shape[-1]) / len(chosen)

    def feature_stats() -> FeatureStats:
        stats = FeatureStats.of(cache.get(path).features for path in train_paths)
        # label-free tissue clusters of the same patches (predict --adapt-align tissues)
        stats = with_tissues(stats, _CachedSlides(cache, train_paths))
        return stats if rates is None else dataclasses.replace(stats, decision_rates=rates)

    return FoldOutcome(
        seed=f.seed,
        fold=f.fold,
        test_ids=f.test_ids,
        fit_ids=f.train_ids + f.val_ids,
        logits=test_logits,
        fold_task=ftask,
        metrics=metrics,
        history=module.history,
        info={
            "seconds": time.perf_counter() - f.started,
            "fit_seconds": f.fit_seconds,
            "train_patches": module.train_patches,
            "epochs_run": f.epochs_run,
            "processes": f.world,
            "chosen_epoch": f.chosen_epoch,
            "n_train": len(f.train_ids),
            "n_val": len(f.val_ids),
            "n_test": len(f.test_ids),
            "n_excluded": len(f.excluded),
            "n_parameters": f.n_params,
            "trainable_share": f.n_trainable / max(1, f.n_params),
            **{k: v for k, v in f.transfer.items() if isinstance(v, int | float)},
            **f.source_choice,
        },
        excluded=f.excluded,
        model=trained,
        contract=f.contract,
        parts={"train": list(f.train_ids), "val": list(f.val_ids), "test": list(f.test_ids)},
        feature_stats_source=feature_stats,
        details=details,
    )


def _train_fold_choosing(
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    splits: pd.DataFrame,
    seed: int,
    fold: int,
    work_dir: Path,
    cache: FeatureCache,
    progress: Progress | None,
    *,
    exclude_from_test: frozenset[str],
    side: Mapping[str, Omics] | None,
    log_label: str | None,
) -> FoldOutcome:
    """``config.choose``: every combination of the grid is trained on the fold's training part
    with its checkpoint chosen on the validation part, exactly as a plain run with those values
    fixed (same seeding); the one with the best validation score (the quantity the checkpoint
    choice monitors, at the chosen epoch; ties: the first) is kept and alone predicts the test
    part. Every combination's scores go to ``FoldOutcome.choices``."""
    started = time.perf_counter()
    config = resolve_expert_exclusion(config, splits["patient_id"].astype(str).unique().tolist())
    check_choices(cohort, task, config, side)
    combos = combinations(config.choose)
    key, mode = criterion(config.monitor)
    where = log_label or f"{config.model} · seed {seed} fold {fold}"
    rows: list[dict[str, Any]] = []
    best: _Fitted | None = None
    best_score: float | None = None
    best_index = 0
    for i, combo in enumerate(combos):
        text = describe(combo)
        _LOG.info("%s: combination %d/%d: %s", where, i + 1, len(combos), text,
                  extra={"event": "choice", "seed": seed, "fold": fold, "combination": i})  # fmt: skip
        fitted = _fit_fold(
            cohort, task, apply_choice(config, combo), splits, seed, fold, work_dir, cache,
            progress, exclude_from_test=exclude_from_test, side=side, log_label=log_label,
            choice_label=f" · {text}",
        )  # fmt: skip
        if not fitted.val_ids:
            raise ConfigError(
                f"seed {seed} fold {fold} has no validation part: choose needs one "
                "(val_fraction > 0, or splits with a val part)"
            )
        val_loss, val_score = choice_score(fitted.module.history, fitted.chosen_epoch)
        score = val_loss if key == "val_loss" else val_score
        rows.append(
            {"seed": seed, "fold": fold, "combination": i, **combo, "val_loss": val_loss,
             "val_score": val_score, "chosen_epoch": fitted.chosen_epoch,
             "epochs_run": fitted.epochs_run, "kept": False}
        )  # fmt: skip
        _LOG.info("%s: %s: val loss %s, val score %s (epoch %d)", where, text, number(val_loss, 4),
                  number(val_score), fitted.chosen_epoch + 1,
                  extra={"event": "choice_done", "seed": seed, "fold": fold, "combination": i,
                         "val_loss": val_loss, "val_score": val_score})  # fmt: skip
        if is_better(score, best_score, mode):
            best, best_score, best_index = fitted, score, i
        del fitted  # only the best so far stays in memory
    assert best is not None
    rows[best_index]["kept"] = True
    chosen = combos[best_index]
    _LOG.info("%s: %s chosen on validation (%s %s)", where, describe(chosen), key,
              number(best_score, 4), extra={"event": "chosen", "seed": seed, "fold": fold})  # fmt: skip
    outcome = _finish_fold(best, cohort, task, cache, side)
    outcome.choice = dict(chosen)
    outcome.choices = pd.DataFrame(rows)
    outcome.info.update(
        {f"chosen_{k}": v for k, v in chosen.items()}
        | {"choice_index": best_index, "n_combinations": len(combos)}
        | {f"choice{r['combination']}_{key}": r[key] for r in rows}
    )
    outcome.info["seconds"] = time.perf_counter() - started  # every combination's training
    return outcome


def check_choices(
    cohort: Cohort, task: TaskSpec, config: TrainConfig, side: Mapping[str, Omics] | None
) -> None:
    """Every candidate model keyword of ``config.choose`` must build the model (one error lists
    each refused candidate); nothing to check without a grid."""
    if not config.choose:
        return
    assert cohort.feature_dim is not None
    in_dim = cohort.feature_dim

    def build(kwargs: dict[str, Any]) -> object:
        return create_model(
            config.model,
            in_dim=in_dim,
            n_outputs=len(task.classes) or 1,
            **{**unfitted_model_kwargs(config, side), **task_model_kwargs(config.model, task),
               **kwargs},
        )  # fmt: skip

    check_model_values(config, build)


def unfitted_model_kwargs(
    config: TrainConfig, side: Mapping[str, Omics] | None
) -> dict[str, object]:
    """The model's keywords with the side layout of the whole tables (no selection): only to
    check, before any training, that the model can be built."""
    kwargs: dict[str, object] = dict(config.model_kwargs)
    if MODELS.metadata(config.model).get("side_layout"):
        kwargs["side_layout"] = {
            name: SideScaler.fit(name, table, list(table.patient_ids)).layout()
            for name, table in (side or {}).items()
        }
    return kwargs


def _strategy(config: TrainConfig, world: int) -> str | DDPStrategy:
    """One process: Lightning's default. Several: DDP with spawned workers (Lightning's
    ddp_spawn): the command runs once, each worker reads its own feature files and trains, and
    the main process keeps the results and writes the outputs."""
    return "auto" if world == 1 else _SpawnedDDP(start_method="spawn")


class _SpawnedDDP(DDPStrategy):
    """ddp_spawn whose workers close their process group before they exit.

    Left open, the gloo group is destroyed during interpreter shutdown, where its threads can
    abort the worker ("terminate called without an active exception", SIGABRT) after training
    finished well: about one run in four on two CPU workers.
    """

    def teardown(self) -> None:
        super().teardown()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if sys.exc_info()[0] is None:  # a failed rank would never reach the barrier
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _single_process_trainer(gpu: bool, work_dir: Path) -> pl.Trainer:
    """Predictions after multi-process training run in the main process."""
    return pl.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=work_dir,
    )


def _parts(
    train: list[str], val: list[str], test: list[str]
) -> tuple[tuple[Literal["train", "val", "test"], list[str]], ...]:
    return (("train", train), ("val", val), ("test", test))


def _check_experts(model: MILModel, contract: FeatureContract, held_out: Sequence[str]) -> None:
    """A model built on other trained models (ROUPKT's experts) must not have seen a patient
    this fold validates or tests on, and must read the same features."""
    seen = getattr(model, "seen_patients", None)
    if not callable(seen):
        return
    held = set(map(str, held_out))
    leaks = {name: sorted(ids & held) for name, ids in seen().items() if ids & held}
    if leaks:
        parts = [f"{name} ({len(ids)}, e.g. {ids[0]})" for name, ids in leaks.items()]
        raise ConfigError(
            "experts trained on patients this fold validates or tests on would leak their "
            f"outcomes: {'; '.join(parts)}; leave them out (--model-arg exclude=[...])"
        )
    theirs = getattr(model, "zoo_contract", None)
    if isinstance(theirs, FeatureContract):
        problems = theirs.mismatches(contract)
        if problems:
            raise ConfigError("the experts were trained on other features: " + "; ".join(problems))


def resolve_expert_exclusion(config: TrainConfig, patients: Sequence[str]) -> TrainConfig:
    """``exclude="auto"`` of a model built on a zoo (``needs_experts``): leave out every zoo model
    trained on one of ``patients`` (the task's), named explicitly in the returned configuration
    so that the run key and the saved model folders hold the list, not the word."""
    kwargs = dict(config.model_kwargs)
    if kwargs.get("exclude") != "auto" or not MODELS.metadata(config.model).get("needs_experts"):
        return config
    if kwargs.get("experts") is None:
        raise ConfigError(f"{config.model}: exclude=auto needs experts=ZOO_FOLDER")
    from oncoslide.transfer.zoo import load_zoo

    zoo = load_zoo(kwargs["experts"])
    ours = set(map(str, patients))
    kwargs["exclude"] = [
        cancer
        for cancer in zoo.cancers
        if ours & set(zoo.patients(cancer)["patient_id"].astype(str))
    ]
    _LOG.info("%s: experts left out as they saw this task's patients: %s", config.model,
              ", ".join(kwargs["exclude"]) or "none")  # fmt: skip
    return config.model_copy(update={"model_kwargs": kwargs})


@dataclass(frozen=True)
class TrainingBags:
    """The whole bags of the training part, one patient at a time and without outcomes, for
    :meth:`~oncoslide.models.MILModel.fit_to_training`. Each pass reads the bags anew (from the
    feature cache), so a model may iterate more than once (fit, then measure under the fit)."""

    cohort: Cohort
    train_ids: Sequence[str]
    cache: FeatureCache

    def __len__(self) -> int:
        return len(self.train_ids)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for pid in self.train_ids:
            bag = load_bag(self.cohort, pid, self.cache)
            item = {"index": 0, "features": bag.features, "coords": bag.coords,
                    "slide_index": bag.slide_index}  # fmt: skip
            batch = collate_bags([item])
            yield {"patient_id": str(pid), "features": batch["features"],
                   "mask": batch["mask"], "coords": batch["coords"]}  # fmt: skip


def training_bags(cohort: Cohort, train_ids: Sequence[str], cache: FeatureCache) -> TrainingBags:
    """The training part's bags for :meth:`~oncoslide.models.MILModel.fit_to_training` (read
    only as the model iterates; each iteration reads them again)."""
    return TrainingBags(cohort, list(train_ids), cache)


def _choose_on_validation(
    model: MILModel, ftask: FoldTask, val: BagDataset, config: TrainConfig
) -> dict[str, Any]:
    """For models that declare ``chooses_on_validation`` (the transfer baselines' source model):
    score every candidate, unchanged, on the fold's validation part and keep the best. The test
    part is never read. Returns what to record in the fold's info ({} for other models)."""
    if not MODELS.metadata(config.model).get("chooses_on_validation"):
        return {}
    chooser = cast(Any, model)  # ZooSource-like: candidates, use_source, zero_shot_logits
    names = [str(n) for n in chooser.candidates()]
    if len(names) > 1 and len(val) == 0:
        raise ConfigError(
            f"{config.model} chooses among {len(names)} candidates on the validation part, and "
            "this fold has none: set val_fraction > 0 or name one (--model-arg source=...)"
        )
    scores: dict[str, float] = {}
    if len(names) > 1:
        loader = _loader(val, config, length_sorted_order(val), batch_size=PREDICT_BATCH)
        was_training = model.training
        model.eval()
        for name in names:
            chooser.use_source(name)
            logits, targets = [], []
            with torch.no_grad():
                for batch in loader:
                    logits.append(chooser.zero_shot_logits(batch["features"], batch["mask"]))
                    targets.append({k: batch[k] for k in TARGET_KEYS if k in batch})
            merged = {k: torch.cat([t[k] for t in targets]) for k in targets[0]}
            score = ftask.validation_score(torch.cat(logits), merged)
            scores[name] = score if np.isfinite(score) else -math.inf
        model.train(was_training)
    best = max(names, key=lambda n: scores.get(n, 0.0))  # ties: the zoo's order
    chooser.use_source(best)
    _LOG.info("%s: source %s chosen on validation (%s)", config.model, best,
              ", ".join(f"{n} {v:.3f}" for n, v in scores.items()) or "the only candidate")  # fmt: skip
    choice: dict[str, Any] = {"source": best}
    return choice | {f"val_score_{n}": v for n, v in scores.items()}


def _aux_weights(config: TrainConfig, meta: Mapping[str, object]) -> dict[str, float]:
    """The model's declared auxiliary losses with their weights (the run's override them)."""
    declared = dict(cast(Mapping[str, float], meta.get("aux_losses", {})))
    unknown = sorted(set(config.aux_weights) - set(declared))
    if unknown:
        raise ConfigError(
            f"model {config.model!r} has no auxiliary loss {unknown}; it declares "
            f"{', '.join(declared) or 'none'}"
        )
    return {k: float(v) for k, v in {**declared, **config.aux_weights}.items()}


class _CachedSlides(Sequence[tuple[np.ndarray, np.ndarray]]):
    """Slides as (features, coords), read through the cache on each access: a bounded cache
    re-reads evicted files rather than this holding every training slide in memory."""

    def __init__(self, cache: FeatureCache, paths: Sequence[Path]) -> None:
        self.cache, self.paths = cache, list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[np.ndarray, np.ndarray]]: ...
    def __getitem__(
        self, i: int | slice
    ) -> tuple[np.ndarray, np.ndarray] | Sequence[tuple[np.ndarray, np.ndarray]]:
        if isinstance(i, slice):
            return _CachedSlides(self.cache, self.paths[i])
        slide = self.cache.get(self.paths[i])
        return slide.features, slide.coords


def pretraining_patients(config: TrainConfig, cohort: Cohort) -> frozenset[str]:
    """The cohort's patients whose slides the ``--init`` slide encoder was pre-trained on
    (its ``pretrain_slides.csv``); none for other inits or encoders that predate the list."""
    if config.init is None:
        return frozenset()
    folder = Path(config.init)
    if not (folder / "encoder.json").is_file() or pretrain_slides_of(folder) is None:
        return frozenset()
    return read_exclusions(folder, cohort).patients


def _best_epoch(history: list[dict[str, float]], mode: str, key: str) -> int:
    scored = [(h[key], int(h["epoch"])) for h in history if key in h]
    if not scored:
        return -1
    best = min(scored) if mode == "min" else max(scored, key=lambda t: (t[0], -t[1]))
    return best[1]


def _predict(
    trainer: pl.Trainer, module: MILModule, ds: BagDataset, config: TrainConfig
) -> torch.Tensor:
    """Logits of every patient of ``ds`` in dataset order (full bags, eval mode).

    One bag per forward pass: a patient's prediction then never depends on which other bags
    shared its batch (matrix products of other sizes round differently), so a saved model
    reproduces it exactly on any cohort (``oncoslide predict``).
    """
    if len(ds) == 0:
        return torch.empty(0, module.fold_task.n_outputs)
    loader = _loader(ds, config, length_sorted_order(ds), batch_size=PREDICT_BATCH)
    outputs = cast(list[dict[str, torch.Tensor]], trainer.predict(module, loader))
    index = torch.cat([o["index"] for o in outputs])
    logits = torch.cat([o["logits"] for o in outputs])
    ordered = torch.empty_like(logits)
    ordered[index] = logits
    return ordered


def _write_fold(
    fdir: FoldFolder, cohort: Cohort, task: TaskSpec, config: TrainConfig, outcome: FoldOutcome
) -> None:
    outcome.save_model(fdir.model_dir, config)
    # the model folder replaces Lightning's checkpoint (same weights, self-describing)
    shutil.rmtree(fdir.checkpoints, ignore_errors=True)
    write_table(fdir.predictions, outcome.prediction_frame(cohort, task))
    rows = [
        {"seed": outcome.seed, "fold": outcome.fold, "metric": m, "value": outcome.metrics[m]}
        for m in task.metric_names
    ]
    write_table(fdir.metrics, pd.DataFrame(rows))
    write_table(fdir.history, pd.DataFrame(outcome.history))
    if outcome.choices is not None:
        write_table(fdir.choices, outcome.choices)
    _write_eval(
        fdir.eval,
        cohort,
        task,
        outcome.fold_task,
        outcome.test_ids,
        outcome.fit_ids,
        outcome.logits,
    )
    # written last: its presence means the fold is complete
    write_json(fdir.done, {"seed": outcome.seed, "fold": outcome.fold, **outcome.info})


def _write_eval(
    target: Path,
    cohort: Cohort,
    task: TaskSpec,
    ftask: FoldTask,
    test_ids: list[str],
    fit_ids: list[str],
    logits: torch.Tensor,
) -> None:
    """What the bootstrap needs to recompute every metric of this fold (eval.npz)."""
    from oncoslide._io import atomic_path
    from oncoslide.survival.metrics import TimeGridError, evaluation_times

    # the patients of the rows, so that the summary's bootstrap can draw patients across folds
    payload: dict[str, np.ndarray] = {"patient_id": np.asarray(test_ids, dtype=str)}
    if task.is_survival:
        y_test, y_fit = cohort.survival(test_ids), cohort.survival(fit_ids)
        payload.update(
            test_time=y_test["time"],
            test_event=y_test["event"],
            fit_time=y_fit["time"],
            fit_event=y_fit["event"],
            risk=ftask.risk(logits),
        )
        try:
            grid = evaluation_times(y_fit, y_test)
        except TimeGridError:
            grid = np.empty(0)
        payload["grid"] = grid
        surv_fn = ftask.survival_function(logits)
        if surv_fn is not None and grid.size:
            payload["surv"] = np.asarray(surv_fn(grid), dtype=np.float64)
    else:
        from oncoslide.models.heads import class_probs

        payload.update(
            label=ftask.label_index(cohort, test_ids),
            probs=class_probs(logits.double()).cpu().numpy(),
        )
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **payload)  # type: ignore[arg-type]
