"""Leakage-free cross-validation of a MIL model on a cohort: the main training job.

For every seed and fold: fit the fold's preprocessing on its training part, train with
Lightning (early stopping and checkpoint choice on the validation part carved from training),
then predict the test part once. Each finished fold is written atomically to
``folds/seed<S>-fold<K>/`` with a ``done.json`` marker, so an interrupted run resumes where it
stopped. The run's tables (splits, predictions, metrics, summary) are assembled at the end.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader

import oncoslide
from oncoslide._io import write_json, write_table
from oncoslide.cohort.splits import (
    audit_splits,
    fold_parts,
    load_splits,
    make_splits,
    save_splits,
    survival_strata,
)
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.models import create_model
from oncoslide.training.config import TrainConfig
from oncoslide.training.data import (
    BackgroundBatches,
    BagDataset,
    EpochShuffleSampler,
    collate_bags,
    length_sorted_order,
)
from oncoslide.training.module import MILModule
from oncoslide.training.progress import FoldProgress, make_progress, quiet_lightning
from oncoslide.training.summary import summarise_run
from oncoslide.training.tasks import FoldTask, TaskSpec, fit_fold_task, resolve_task, task_patients


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


def fold_dir(out_dir: Path, seed: int, fold: int) -> Path:
    return out_dir / "folds" / f"seed{seed}-fold{fold}"


def cross_validate(
    cohort: Cohort,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    splits: pd.DataFrame | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    cache: FeatureCache | None = None,
) -> CVResult:
    """Run (or resume) cross-validation and write the run folder.

    Args:
        cohort: a validated cohort with feature files.
        config: the run configuration.
        out_dir: run folder; an existing folder of the same run resumes, of another run is
            refused unless ``overwrite``.
        splits: optional precomputed split table (audited against the task's patients).
        cache: a feature cache to share with other runs in the same process.
    """
    out = Path(out_dir)
    console = console or Console(quiet=not config.progress)
    if cohort.feature_dim is None:
        raise ConfigError("the cohort was loaded without feature files; pass features_dir")
    # a wrong model name or keyword fails here, before any folder is written
    create_model(config.model, in_dim=cohort.feature_dim, n_outputs=1, **config.model_kwargs)
    task = resolve_task(cohort, config)
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

    _prepare_out_dir(out, config, overwrite)
    splits = _resolve_splits(out, cohort, task, config, patients, splits)
    write_json(out / "config.json", _resolved_config(cohort, config, task, notes))

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    own_cache = cache is None
    if cache is None:
        cache = FeatureCache(
            max_bytes=int(config.cache_gb * 2**30),
            dtype=None if config.cache_dtype == "stored" else config.cache_dtype,
        )
    seeds = sorted(splits["seed"].unique())
    folds = sorted(splits["fold"].unique())
    progress = make_progress(console, enabled=config.progress)
    try:
        with progress, quiet_lightning():
            overall = progress.add_task(
                f"{config.model} · {task.name}", total=len(seeds) * len(folds)
            )
            for seed in seeds:
                for fold in folds:
                    fdir = fold_dir(out, int(seed), int(fold))
                    if not (fdir / "done.json").exists():
                        _run_fold(
                            cohort,
                            task,
                            config,
                            splits,
                            int(seed),
                            int(fold),
                            fdir,
                            cache,
                            progress,
                        )
                    progress.advance(overall)
    finally:
        stats = dataclasses.asdict(cache.stats)
        if own_cache:
            cache.close()

    predictions, metrics = _collect(out, seeds, folds)
    summary = summarise_run(out, task, seeds, folds, n_boot=config.n_boot, seed=config.seed)
    write_table(out / "predictions.parquet", predictions)
    write_table(out / "metrics.csv", metrics)
    write_table(out / "summary.csv", summary)
    return CVResult(out, config, task, splits, predictions, metrics, summary, notes, stats)


# ---------------------------------------------------------------------------- run folder


def _prepare_out_dir(out: Path, config: TrainConfig, overwrite: bool) -> None:
    cfg_path = out / "config.json"
    if cfg_path.exists():
        previous = json.loads(cfg_path.read_text()).get("run_key")
        if previous != config.run_key():
            if not overwrite:
                raise ConfigError(
                    f"{out} holds another run (run key {previous}, this one {config.run_key()}); "
                    "choose a new --out or pass --overwrite"
                )
        elif not overwrite:
            return  # same run: resume
        for name in ("folds", "splits.csv", "predictions.parquet", "metrics.csv", "summary.csv"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _resolve_splits(
    out: Path,
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    patients: list[str],
    given: pd.DataFrame | None,
) -> pd.DataFrame:
    path = out / "splits.csv"
    sites = None
    if config.site_preserving:
        if "site" not in cohort.patients.columns:
            raise ConfigError("site-preserving splits need a 'site' column (or TCGA barcodes)")
        sites = cohort.patients.loc[patients, "site"].astype(str).to_numpy()
    if given is not None:
        splits = given.loc[:, ["patient_id", "seed", "fold", "part"]].copy()
        splits["patient_id"] = splits["patient_id"].astype(str)
        audit_splits(
            splits,
            patient_ids=patients,
            sites=None if sites is None else dict(zip(patients, sites, strict=True)),
        )
    elif path.exists():
        splits = load_splits(path, patient_ids=patients)
    else:
        if task.is_survival:
            y = cohort.survival(patients)
            strata = survival_strata(y["time"], y["event"])
        else:
            strata = cohort.labels(task.name, patients)
        splits = make_splits(
            patients,
            n_folds=config.folds,
            seeds=config.seeds,
            strata=strata,
            sites=sites,
            val_fraction=config.val_fraction,
        )
    save_splits(path, splits)
    return splits


def _resolved_config(
    cohort: Cohort, config: TrainConfig, task: TaskSpec, notes: list[str]
) -> dict[str, object]:
    return {
        "run_key": config.run_key(),
        "config": config.model_dump(),
        "task": {"name": task.name, "kind": task.kind, "classes": list(task.classes)},
        "cohort": {
            "patients": len(cohort.patient_ids),
            "slides": len(cohort.slides),
            "feature_dim": cohort.feature_dim,
        },
        "notes": notes,
        "versions": {
            "oncoslide": oncoslide.__version__,
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


# ---------------------------------------------------------------------------- one fold


def _loader(ds: BagDataset, config: TrainConfig, order: Sequence[int] | None = None) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=config.batch_size,
        sampler=list(order) if order is not None else None,
        collate_fn=collate_bags,
        num_workers=0,
        pin_memory=torch.cuda.is_available(),
    )


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
        return preds


def _run_fold(
    cohort: Cohort,
    task: TaskSpec,
    config: TrainConfig,
    splits: pd.DataFrame,
    seed: int,
    fold: int,
    fdir: Path,
    cache: FeatureCache,
    progress: Progress | None,
) -> None:
    outcome = train_fold(cohort, task, config, splits, seed, fold, fdir, cache, progress)
    _write_fold(fdir, cohort, task, outcome)


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
) -> FoldOutcome:
    """Train one fold and predict its test part once; writes only checkpoints in ``work_dir``.

    ``exclude_from_test`` patients (e.g. seen while pre-training an encoder) still train when
    their split says so, but are neither predicted nor scored as test patients.
    """
    assert cohort.feature_dim is not None  # checked by the callers
    fdir = work_dir
    started = time.perf_counter()
    parts = fold_parts(splits, seed, fold)
    train_ids, val_ids = parts["train"], parts["val"]
    excluded = [p for p in parts["test"] if p in exclude_from_test]
    test_ids = [p for p in parts["test"] if p not in exclude_from_test]
    fold_seed = seed * 1000 + fold
    pl.seed_everything(fold_seed, workers=True, verbose=False)

    ftask = fit_fold_task(task, config, cohort, train_ids)
    model = create_model(
        config.model,
        in_dim=cohort.feature_dim,
        n_outputs=ftask.n_outputs,
        **config.model_kwargs,
    )
    datasets = {
        name: BagDataset(
            cohort,
            ids,
            cache,
            ftask.targets(cohort, ids),
            max_patches=config.max_patches if name == "train" else None,
            seed=fold_seed,
        )
        for name, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids))
    }
    sampler = EpochShuffleSampler(datasets["train"], seed=fold_seed)
    if config.prefetch:
        # the first epoch's order, then validation and test: reads overlap the first steps
        cache.prefetch(
            datasets["train"].slide_paths(sampler.order(0))
            + datasets["val"].slide_paths()
            + datasets["test"].slide_paths()
        )
    train_loader = BackgroundBatches(
        DataLoader(
            datasets["train"],
            batch_size=config.batch_size,
            sampler=sampler,
            collate_fn=collate_bags,
            num_workers=0,
            pin_memory=torch.cuda.is_available(),
        )
    )
    has_val = len(val_ids) > 0
    val_loader = (
        _loader(datasets["val"], config, length_sorted_order(datasets["val"])) if has_val else None
    )

    module = MILModule(model, ftask, config, steps_per_epoch=len(train_loader))
    callbacks: list[pl.Callback] = []
    if progress is not None:
        total = config.epochs * len(train_loader)
        callbacks.append(FoldProgress(progress, f"  seed {seed} fold {fold}", total))
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
        devices=1,
        deterministic=True if not gpu else "warn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint_cb is not None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        gradient_clip_val=config.grad_clip,
        use_distributed_sampler=False,
        default_root_dir=fdir,
        limit_val_batches=1.0 if has_val else 0,
    )
    fit_started = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    fit_seconds = time.perf_counter() - fit_started
    if checkpoint_cb is not None and checkpoint_cb.best_model_path:
        state = torch.load(checkpoint_cb.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        chosen_epoch = _best_epoch(
            module.history, mode, "val_loss" if mode == "min" else "val_score"
        )
    else:
        trainer.save_checkpoint(fdir / "checkpoints" / "last.ckpt", weights_only=True)
        chosen_epoch = trainer.current_epoch - 1

    # the test part is touched here, once
    test_logits = _predict(trainer, module, datasets["test"], config)
    if task.is_survival and config.survival_loss == "cox":
        train_logits = _predict(trainer, module, datasets["train"], config)
        ftask.fit_breslow(train_logits, cohort.survival(train_ids))
    metrics = ftask.metrics(test_logits, cohort, test_ids, fit_ids=train_ids + val_ids)
    return FoldOutcome(
        seed=seed,
        fold=fold,
        test_ids=test_ids,
        fit_ids=train_ids + val_ids,
        logits=test_logits,
        fold_task=ftask,
        metrics=metrics,
        history=module.history,
        info={
            "seconds": time.perf_counter() - started,
            "fit_seconds": fit_seconds,
            "train_patches": module.train_patches,
            "epochs_run": trainer.current_epoch,
            "chosen_epoch": chosen_epoch,
            "n_train": len(train_ids),
            "n_val": len(val_ids),
            "n_test": len(test_ids),
            "n_excluded": len(excluded),
        },
        excluded=excluded,
    )


def _best_epoch(history: list[dict[str, float]], mode: str, key: str) -> int:
    scored = [(h[key], int(h["epoch"])) for h in history if key in h]
    if not scored:
        return -1
    best = min(scored) if mode == "min" else max(scored, key=lambda t: (t[0], -t[1]))
    return best[1]


def _predict(
    trainer: pl.Trainer, module: MILModule, ds: BagDataset, config: TrainConfig
) -> torch.Tensor:
    """Logits of every patient of ``ds`` in dataset order (full bags, eval mode)."""
    loader = _loader(ds, config, length_sorted_order(ds))
    outputs = cast(list[dict[str, torch.Tensor]], trainer.predict(module, loader))
    index = torch.cat([o["index"] for o in outputs])
    logits = torch.cat([o["logits"] for o in outputs])
    ordered = torch.empty_like(logits)
    ordered[index] = logits
    return ordered


def _write_fold(fdir: Path, cohort: Cohort, task: TaskSpec, outcome: FoldOutcome) -> None:
    write_table(fdir / "predictions.parquet", outcome.prediction_frame(cohort, task))
    rows = [
        {"seed": outcome.seed, "fold": outcome.fold, "metric": m, "value": outcome.metrics[m]}
        for m in task.metric_names
    ]
    write_table(fdir / "metrics.csv", pd.DataFrame(rows))
    write_table(fdir / "history.csv", pd.DataFrame(outcome.history))
    _write_eval(
        fdir, cohort, task, outcome.fold_task, outcome.test_ids, outcome.fit_ids, outcome.logits
    )
    # written last: its presence means the fold is complete
    write_json(fdir / "done.json", {"seed": outcome.seed, "fold": outcome.fold, **outcome.info})


def _write_eval(
    fdir: Path,
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

    payload: dict[str, np.ndarray] = {}
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
    with atomic_path(fdir / "eval.npz", suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **payload)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- assembly


def _collect(
    out: Path, seeds: Sequence[int], folds: Sequence[int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    preds, metrics = [], []
    for seed in seeds:
        for fold in folds:
            fdir = fold_dir(out, int(seed), int(fold))
            preds.append(pd.read_parquet(fdir / "predictions.parquet"))
            metrics.append(pd.read_csv(fdir / "metrics.csv"))
    predictions = pd.concat(preds, ignore_index=True).sort_values(["seed", "fold", "patient_id"])
    metric_table = pd.concat(metrics, ignore_index=True)
    return predictions.reset_index(drop=True), metric_table.reset_index(drop=True)
