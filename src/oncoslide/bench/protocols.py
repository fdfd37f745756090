"""Benchmark cells: what one cell is, its config key, and the two protocols that run it.

One cell = one fold of one seed of one model on one task and one feature set. Its key hashes the
resolved config (task, split digest, feature set, model, protocol settings, seed, fold), so a
benchmark re-run after adding an encoder or a model only runs the cells it lacks.

Protocols (fixed per benchmark, never tuned on a test part):

- ``mil``: a registry aggregator fine-tuned on patch features through the same Lightning path
  as ``oncoslide train`` (:func:`oncoslide.training.cv.train_fold`): early stopping and
  checkpoint choice on the validation part carved from the training part.
- ``linear``: frozen patient embeddings (mean / max / mean+max pooling of every patch of a
  patient, or the mean of its slides' embeddings for a slide-level feature set) with, for classification, a standardised logistic regression (C = 0.5, balanced
  class weights, as Patho-Bench) fitted on train + validation; for survival an elastic-net Cox
  model (l1_ratio 0.5) whose penalty is chosen on the validation part, then refitted on
  train + validation.

Survival cells of both protocols write ``risk_threshold`` with their predictions: the median
predicted risk of the fold's training part (without the validation part), which splits the test
patients into high / low risk groups (:func:`oncoslide.report.plots.risk_groups`) with no
information from the test part.

Patients on the feature set's exclusion list still train when their split says so, but are
never predicted or scored as test patients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide._threads import apply_num_threads
from oncoslide.bench.resolve import BenchTask, FeatureSet, ResolvedBench
from oncoslide.bench.spec import ModelSpec
from oncoslide.bench.store import DETAIL_PREFIX, CellRecord, cell_key
from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.fingerprint import data_record
from oncoslide.cohort.splits import fold_parts
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.training.side_inputs import declared_side_inputs
from oncoslide.training.tasks import label_str

CELL_VERSION = 1


@dataclass(frozen=True)
class Cell:
    """One unit of benchmark work, identified by the hash of its resolved config."""

    task: str
    feature_set: str
    model: str
    protocol: str
    seed: int
    fold: int
    key: str
    config: dict[str, Any]
    # digest of the cell's data (targets, feature file contents, side tables): a stored cell
    # whose data_key differs ran on other data and runs again. Not part of the key.
    data_key: str = ""

    @property
    def label(self) -> str:
        return (
            f"{self.task} · {self.feature_set} · {self.model} · seed {self.seed} fold {self.fold}"
        )


def cell_config(
    bench: ResolvedBench, task: BenchTask, fs: FeatureSet, model: ModelSpec, seed: int, fold: int
) -> dict[str, Any]:
    """Everything that can change a cell's numbers, as plain JSON-able data."""
    model_part: dict[str, Any] = model.model_dump(mode="json")
    # an init folder is keyed by its content (a moved folder keeps the keys, new weights do
    # not); cells without one stay as they were before the field existed
    model_part.pop("init", None)
    if model.protocol == "mil":
        train = _train_config(bench, task, model, seed, len(task.folds))
        # settings added since the first release join the key only when set (see TrainConfig)
        model_part["train"] = {
            k: v for k, v in train.keyed_settings(mode="json").items() if k != "n_boot"
        }
        if model.init is not None:
            model_part["train"].pop("init", None)
            model_part["init"] = init_digest(bench.spec.path(model.init))
        for unused in ("pooling", "C", "l1_ratio", "n_alphas"):
            model_part.pop(unused, None)
        # a grid is keyed in train (TrainConfig.choose); entries without one keep their keys
        model_part.pop("choose", None)
    else:
        for unused in ("model", "kwargs", "train", "choose"):
            model_part.pop(unused, None)
        if fs.level == "slide":
            model_part.pop("pooling", None)
    feature_set: dict[str, Any] = {
        "name": fs.name,
        "features": str(fs.spec.features),
        "stamp_mpp": fs.spec.stamp_mpp,
        "exclude": fs.exclude_digest,
    }
    # keys of cells without these stay as they were before the fields existed
    if fs.level != "patch":
        feature_set["level"] = fs.level
    if fs.missing:
        feature_set["missing"] = _digest(fs.missing)
    task_part = task.spec.model_dump(mode="json")
    # a label tree keys its cells by the tree itself; cells without one stay as they were
    task_part.pop("hierarchy", None)
    if task.target.tree:
        task_part["hierarchy"] = {c: list(f) for c, f in task.target.tree}
    # side tables are part of a cell's data only for models that read them (and, added since
    # the first release, they leave the keys of other cells as they were)
    uses = declared_side_inputs(model.registry_name) if model.protocol == "mil" else {}
    for name, used in (("omics", "omics"), ("gene_groups", "omics"), ("mutations", "mutations")):
        if task_part.get(name) is None or used not in uses:
            task_part.pop(name, None)
    return {
        "version": CELL_VERSION,
        "task": {**task_part, "splits": task.split_digest()},
        "feature_set": feature_set,
        "model": model_part,
        "seed": int(seed),
        "fold": int(fold),
    }


def init_digest(folder: Path) -> str:
    """Digest of an ``init`` folder's content: its description (``encoder.json`` of a slide
    encoder, ``model.json`` of a model folder) and its weights file."""
    from oncoslide.pretrain.folder import WEIGHTS_FILE as ENCODER_WEIGHTS
    from oncoslide.training.model_folder import MODEL_FILE, WEIGHTS_FILE

    for meta, weights in (("encoder.json", ENCODER_WEIGHTS), (MODEL_FILE, WEIGHTS_FILE)):
        if (folder / meta).is_file() and (folder / weights).is_file():
            h = hashlib.sha256((folder / meta).read_bytes())
            h.update((folder / weights).read_bytes())
            return h.hexdigest()[:20]
    raise ConfigError(
        f"init {folder}: neither a slide-encoder folder (encoder.json, {ENCODER_WEIGHTS}) nor a "
        f"model folder ({MODEL_FILE}, {WEIGHTS_FILE})"
    )


def applies(model: ModelSpec, fs: FeatureSet) -> bool:
    """Whether a model runs on a feature set: mil models need patch features (bags)."""
    return not (model.protocol == "mil" and fs.level == "slide")


def _digest(ids: frozenset[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def plan_cells(bench: ResolvedBench) -> list[Cell]:
    """Every cell of the benchmark, grouped by feature set (keeps a worker's cache warm).

    Models that do not apply to a feature set (mil on slide embeddings) have no cells there.
    """
    cells = []
    models = {m.name: m for m in bench.spec.models}
    data_keys: dict[tuple[str, str, bool], str] = {}
    for fs in bench.feature_sets.values():
        for task in bench.tasks.values():
            for model in models.values():
                if not applies(model, fs):
                    continue
                reads_side = model.protocol == "mil" and bool(
                    declared_side_inputs(model.registry_name)
                )
                memo = (fs.name, task.name, reads_side)
                if memo not in data_keys:
                    data_keys[memo] = cell_data_key(task, fs, side=reads_side)
                for seed in task.seeds:
                    for fold in task.folds:
                        config = cell_config(bench, task, fs, model, seed, fold)
                        cells.append(
                            Cell(
                                task.name,
                                fs.name,
                                model.name,
                                model.protocol,
                                seed,
                                fold,
                                cell_key(config),
                                config,
                                data_keys[memo],
                            )
                        )
    return cells


def cell_data_key(task: BenchTask, fs: FeatureSet, *, side: bool) -> str:
    """Digest of what a cell of ``task`` on ``fs`` reads: every used patient's targets (and
    site, for site-preserving splits), every feature file's content (patch features) or every
    slide's embedding (slide level), and the side tables when the model reads them."""
    cohort = _task_cohort(fs.cohort, task)
    patients = [p for p in task.patients if p not in fs.missing and p in cohort.patients.index]
    columns = [*task.target.target_columns]
    split = task.spec.split
    if (split.policy == "kfold" and split.site_preserving) or split.policy == "leave_one_site_out":
        columns.append("site")
    record = data_record(cohort, patients, columns, side=task.side if side else None)
    emb = fs.slide_embeddings
    if emb is None:
        return record.key
    slides = [s for s in cohort.slides["slide_id"] if s in set(emb.slide_ids)]
    h = hashlib.sha256(record.key.encode())
    for sid in sorted(slides):
        h.update(sid.encode())
        h.update(np.ascontiguousarray(emb.vectors([sid])).tobytes())
    return h.hexdigest()[:16]


def _train_config(bench: ResolvedBench, task: BenchTask, model: ModelSpec, seed: int, n_folds: int):
    target = task.target
    return bench.spec.train_config(
        model,
        task="survival" if target.is_survival else target.name,
        time_col=target.time_col,
        event_col=target.event_col,
        seed=seed,
        folds=max(2, n_folds),
    )


def _task_cohort(cohort: Cohort, task: BenchTask) -> Cohort:
    t = task.target
    if t.is_survival and (cohort.time_col, cohort.event_col) != (t.time_col, t.event_col):
        return dataclasses.replace(cohort, time_col=t.time_col, event_col=t.event_col)
    return cohort


class CellRunner:
    """Runs cells in one process, keeping feature files and slide embeddings in memory."""

    def __init__(
        self,
        bench: ResolvedBench,
        *,
        work_dir: str | Path | None = None,
        cache_gb: float = 4.0,
        num_threads: int | None = None,
    ) -> None:
        self.bench = bench
        self.work_dir = Path(work_dir) if work_dir is not None else None
        # kept fold models (keep_models) go beside the work folder: OUT/models/<cell key>/
        self.models_dir = self.work_dir.parent / "models" if self.work_dir is not None else None
        self.cache = FeatureCache(max_bytes=int(cache_gb * 2**30))
        self.num_threads = num_threads
        self._embeddings: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def close(self) -> None:
        self.cache.close()

    def run(self, cell: Cell) -> CellRecord:
        """Train and score one cell; raises typed errors for bad data."""
        # None: the default for one process (usable cores, or OMP_NUM_THREADS, e.g. Ray's)
        apply_num_threads(self.num_threads)
        started = time.perf_counter()
        task = self.bench.tasks[cell.task]
        fs = self.bench.feature_sets[cell.feature_set]
        model = next(m for m in self.bench.spec.models if m.name == cell.model)
        cohort = _task_cohort(fs.cohort, task)
        # patients without usable features in this set neither train nor test
        splits = task.splits
        if fs.missing:
            splits = splits.loc[~splits["patient_id"].isin(fs.missing)]
        parts = fold_parts(splits, cell.seed, cell.fold)
        n_missing = int(
            task.splits.loc[
                (task.splits["seed"] == cell.seed) & (task.splits["fold"] == cell.fold),
                "patient_id",
            ]
            .isin(fs.missing)
            .sum()
        )
        excluded = [p for p in parts["test"] if p in fs.excluded]
        if len(excluded) == len(parts["test"]):
            raise ConfigError(
                f"{cell.label}: no test patient left (exclusion list or unusable features)"
            )
        if model.protocol == "mil":
            preds, metrics, info = self._run_mil(cell, task, fs, cohort, model, splits)
        else:
            preds, metrics, info = self._run_linear(cell, task, fs, cohort, model, parts)
        info = {
            **info,
            "n_missing": n_missing,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "n_test": len(preds),
            "n_excluded": len(excluded),
            "excluded": sorted(excluded),
        }
        return CellRecord(
            cell_key=cell.key,
            task=cell.task,
            feature_set=cell.feature_set,
            model=cell.model,
            protocol=cell.protocol,
            seed=cell.seed,
            fold=cell.fold,
            config=cell.config,
            metrics=metrics,
            predictions=preds,
            seconds=time.perf_counter() - started,
            info=info,
        )

    # ---------------------------------------------------------------------------- mil
    def _run_mil(
        self,
        cell: Cell,
        task: BenchTask,
        fs: FeatureSet,
        cohort: Cohort,
        model: ModelSpec,
        splits: pd.DataFrame,
    ) -> tuple[pd.DataFrame, dict[str, float], dict[str, Any]]:
        from oncoslide.training.cv import train_fold

        config = _train_config(self.bench, task, model, cell.seed, len(task.folds))
        declared = declared_side_inputs(config.model)
        with self._scratch(cell) as tmp:
            outcome = train_fold(
                cohort,
                task.target,
                config,
                splits,
                cell.seed,
                cell.fold,
                Path(tmp),
                self.cache,
                exclude_from_test=fs.excluded,
                # a model gets the task's side tables it declares (a missing one is an error)
                side={k: v for k, v in task.side.items() if k in declared},
            )
        if self.bench.spec.keep_models and self.models_dir is not None:
            outcome.save_model(self.models_dir / cell.key, config)
        frame = outcome.prediction_frame(cohort, task.target)
        preds = _contract_frame(frame, task)
        metrics = {m: float(outcome.metrics[m]) for m in task.target.metric_names}
        # numbers only (a transfer baseline also records the name of its chosen source)
        info = {k: float(v) for k, v in outcome.info.items() if isinstance(v, int | float)}
        return preds, metrics, info

    @contextlib.contextmanager
    def _scratch(self, cell: Cell) -> Iterator[Path]:
        """The cell's scratch folder, ``work/cell-<key>/``: emptied first (a killed earlier
        attempt leaves it behind) and removed after. The driver holds the cell's lock."""
        if self.work_dir is None:
            with tempfile.TemporaryDirectory(prefix=f"cell-{cell.key[:8]}-") as tmp:
                yield Path(tmp)
            return
        folder = self.work_dir / f"cell-{cell.key}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ---------------------------------------------------------------------------- linear
    def embeddings(self, fs: FeatureSet, pooling: str, patients: list[str]) -> np.ndarray:
        """Frozen embeddings of ``patients`` (computed once per feature set and pooling).

        Patch features are pooled over every patch of the patient's slides; slide embeddings
        are averaged over the patient's slides.
        """
        if fs.slide_embeddings is not None:
            pooling = "slides"
        store = self._embeddings.setdefault((fs.name, pooling), {})
        if fs.slide_embeddings is not None:
            missing = [p for p in patients if p not in store]
            if missing:
                slides = fs.cohort.slides
                by_patient = slides.groupby("patient_id", sort=False)["slide_id"]
                for pid, ids in by_patient:
                    if pid in store:
                        continue
                    store[str(pid)] = fs.slide_embeddings.vectors(list(ids)).mean(axis=0)
            return np.stack([store[p] for p in patients]).astype(np.float64)
        for pid in patients:
            if pid not in store:
                feats = load_bag(fs.cohort, pid, self.cache).features.astype(np.float32)
                if pooling == "mean":
                    store[pid] = feats.mean(axis=0)
                elif pooling == "max":
                    store[pid] = feats.max(axis=0)
                else:
                    store[pid] = np.concatenate([feats.mean(axis=0), feats.max(axis=0)])
        return np.stack([store[p] for p in patients]).astype(np.float64)

    def _run_linear(
        self,
        cell: Cell,
        task: BenchTask,
        fs: FeatureSet,
        cohort: Cohort,
        model: ModelSpec,
        parts: dict[str, list[str]],
    ) -> tuple[pd.DataFrame, dict[str, float], dict[str, Any]]:
        train_ids, val_ids = parts["train"], parts["val"]
        test_ids = [p for p in parts["test"] if p not in fs.excluded]
        fit_ids = train_ids + val_ids
        x_train = self.embeddings(fs, model.pooling, train_ids)
        x_val = self.embeddings(fs, model.pooling, val_ids)
        x_test = self.embeddings(fs, model.pooling, test_ids)
        frame = pd.DataFrame({"patient_id": test_ids})
        info: dict[str, Any] = {"n_train": len(train_ids), "n_val": len(val_ids)}
        if task.target.is_survival:
            from oncoslide.survival.breslow import BreslowEstimator
            from oncoslide.survival.coxnet import fit_select_alpha
            from oncoslide.survival.metrics import survival_metrics

            y_tr, y_val = cohort.survival(train_ids), cohort.survival(val_ids)
            y_fit, y_test = cohort.survival(fit_ids), cohort.survival(test_ids)
            cox, alpha, _ = fit_select_alpha(
                x_train,
                y_tr["time"],
                y_tr["event"],
                x_val,
                y_val["time"],
                y_val["event"],
                l1_ratio=model.l1_ratio,
                n_alphas=model.n_alphas,
            )
            risk = np.asarray(cox.predict(x_test), dtype=np.float64)
            fit_risk = np.asarray(cox.predict(np.concatenate([x_train, x_val])), dtype=np.float64)
            breslow = BreslowEstimator().fit(fit_risk, y_fit["time"], y_fit["event"])
            out = survival_metrics(
                y_fit, y_test, risk, surv_fn=lambda t: breslow.survival_function(risk, t)
            )
            metrics = {m: float(out.get(m, np.nan)) for m in task.target.metric_names}
            frame["time"] = y_test["time"].astype(float)
            frame["event"] = y_test["event"].astype(float)
            frame["label"] = None
            frame["risk"] = risk
            # the risk-group threshold: fixed on the training part (as the mil protocol does)
            frame["risk_threshold"] = float(np.median(fit_risk[: len(train_ids)]))
            coef = cox.coef_ if cox.coef_ is not None else np.zeros(0)
            info.update(alpha=float(alpha), nonzero=int(np.count_nonzero(coef)))
        else:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            from oncoslide.evaluation.classification import classification_metrics

            classes = task.classes
            lookup = {c: i for i, c in enumerate(classes)}

            def labels(ids: list[str]) -> np.ndarray:
                return np.array(
                    [lookup[label_str(v)] for v in cohort.labels(task.target.name, ids)]
                )

            y_fit = labels(fit_ids)
            if len(np.unique(y_fit)) < len(classes):
                raise ConfigError(f"{cell.label}: the training part lacks some classes")
            clf = make_pipeline(
                StandardScaler(),
                LogisticRegression(C=model.C, class_weight="balanced", max_iter=5000),
            )
            clf.fit(np.concatenate([x_train, x_val]), y_fit)
            probs = np.zeros((len(test_ids), len(classes)))
            probs[:, clf.classes_] = clf.predict_proba(x_test)
            y_test = labels(test_ids)
            if task.target.tree:  # both levels (oncoslide.evaluation.hierarchy)
                from oncoslide.evaluation.hierarchy import hierarchical_metrics

                out = hierarchical_metrics(y_test, probs, task.target.tree_parent()[1])
            else:
                out = classification_metrics(y_test, probs, classes=list(range(len(classes))))
            metrics = {m: float(out[m]) for m in task.target.metric_names}
            frame["time"] = np.nan
            frame["event"] = np.nan
            frame["label"] = [classes[i] for i in y_test]
            for i, c in enumerate(classes):
                frame[f"prob_{c}"] = probs[:, i]
        return frame, metrics, info


def _contract_frame(frame: pd.DataFrame, task: BenchTask) -> pd.DataFrame:
    """A fold's prediction frame in the store's contract (ids, targets, then outputs; survival
    keeps the training part's median risk, ``risk_threshold``, when the fold computed it)."""
    out = pd.DataFrame({"patient_id": frame["patient_id"].astype(str)})
    if task.target.is_survival:
        out["time"] = frame["time"].astype(float)
        out["event"] = frame["event"].astype(float)
        out["label"] = None
        out["risk"] = frame["risk"].astype(float)
        if "risk_threshold" in frame.columns:
            out["risk_threshold"] = frame["risk_threshold"].astype(float)
    else:
        out["time"] = np.nan
        out["event"] = np.nan
        out["label"] = frame["label"].astype(str)
        for c in task.classes:
            out[f"prob_{c}"] = frame[f"prob_{c}"].astype(float)
    for c in frame.columns:  # per-patient details of models that give them (detail_<name>)
        if isinstance(c, str) and c.startswith(DETAIL_PREFIX):
            out[c] = frame[c].astype(float)
    return out.reset_index(drop=True)


__all__ = ["CELL_VERSION", "Cell", "CellRunner", "applies", "cell_config", "plan_cells"]
