"""What a task asks of a model: targets, loss, predictions and metrics, fitted per fold.

Everything fitted from data here (time bins, class weights, the Breslow baseline) is fitted on
the training part of a fold only; the test part is used once, for the final predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from oncoslide.cohort.label_tree import LabelTree, parse_label_tree
from oncoslide.cohort.omics import Omics
from oncoslide.cohort.splits import survival_strata
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.evaluation.classification import classification_metrics
from oncoslide.evaluation.hierarchy import (
    COARSE_METRICS,
    coarse_probabilities,
    hierarchical_metrics,
    tree_decision,
)
from oncoslide.models import MODELS
from oncoslide.models.heads import class_probs, discrete_risk, discrete_survival
from oncoslide.survival.bins import TimeBins
from oncoslide.survival.breslow import BreslowEstimator
from oncoslide.survival.losses import cox_ph_loss, discrete_time_nll
from oncoslide.survival.metrics import concordance_index_censored, survival_metrics
from oncoslide.training.config import TrainConfig
from oncoslide.training.data import BagTargets
from oncoslide.training.side_inputs import SideScaler, welch_selection

SURVIVAL_METRICS = ("c_index", "c_index_uno", "td_auc", "ibs")
CLASSIFICATION_METRICS = ("auc", "balanced_accuracy")


@dataclass(frozen=True)
class TaskSpec:
    """A prediction task on a cohort: survival, or classification of a label column."""

    name: str
    kind: Literal["survival", "binary", "multiclass"]
    classes: tuple[str, ...] = ()
    time_col: str = "time"
    event_col: str = "event"
    # a label tree over the classes (coarse -> fine, the classes being the fine level): metrics
    # and predictions at both levels (see oncoslide.evaluation.hierarchy)
    tree: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def is_survival(self) -> bool:
        return self.kind == "survival"

    def tree_parent(self) -> tuple[tuple[str, ...], np.ndarray]:
        """The coarse classes and, per class of the task, the index of its coarse class."""
        return LabelTree(tree=self.tree).parent_index(self.classes)

    @property
    def target_columns(self) -> tuple[str, ...]:
        return (self.time_col, self.event_col) if self.is_survival else (self.name,)

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.is_survival:
            return SURVIVAL_METRICS
        return CLASSIFICATION_METRICS + (COARSE_METRICS if self.tree else ())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "classes": list(self.classes),
            "time_col": self.time_col,
            "event_col": self.event_col,
        }
        if self.tree:  # only then: model folders without a tree stay as they were
            out["tree"] = {c: list(f) for c, f in self.tree}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(
            name=str(data["name"]),
            kind=data["kind"],
            classes=tuple(str(c) for c in data.get("classes", ())),
            time_col=str(data.get("time_col", "time")),
            event_col=str(data.get("event_col", "event")),
            tree=tuple((str(c), tuple(map(str, f))) for c, f in data.get("tree", {}).items()),
        )


def resolve_task(cohort: Cohort, config: TrainConfig) -> TaskSpec:
    """The task a config names, checked against the cohort's columns and values."""
    uses_tree = bool(MODELS.metadata(config.model).get("uses_label_tree", False))
    if uses_tree and config.hierarchy is None:
        raise ConfigError(
            f"model {config.model!r} needs a label tree over the task's classes: "
            "--hierarchy tree.yaml (coarse class -> fine classes)"
        )
    if config.is_survival and config.hierarchy is not None:
        raise ConfigError("a label tree (--hierarchy) applies to classification tasks only")
    if config.is_survival:
        missing = [c for c in (config.time_col, config.event_col) if c not in cohort.patients]
        if missing:
            raise ConfigError(f"survival task needs columns {missing} in the cohort table")
        return TaskSpec(
            "survival", "survival", time_col=config.time_col, event_col=config.event_col
        )
    col = config.task
    if col not in cohort.patients.columns and col in cohort.slides.columns:
        raise ConfigError(
            f"column {col!r} was not loaded as a patient-level label: "
            f"load the cohort with label_cols=({col!r},)"
        )
    if col not in cohort.patients.columns:
        raise ConfigError(
            f"task {col!r} is neither 'survival' nor a column of the cohort table "
            f"(columns: {', '.join(map(str, cohort.patients.columns))})"
        )
    ids = cohort.patients_with(col)
    values = cohort.labels(col, ids)
    classes = tuple(sorted({label_str(v) for v in values}))
    if len(classes) < 2:
        raise ConfigError(f"label column {col!r} has {len(classes)} class(es); need at least 2")
    if len(classes) > 50:
        raise ConfigError(
            f"label column {col!r} has {len(classes)} distinct values; is it a continuous column?"
        )
    kind: Literal["binary", "multiclass"] = "binary" if len(classes) == 2 else "multiclass"
    tree: tuple[tuple[str, tuple[str, ...]], ...] = ()
    if config.hierarchy is not None:
        tree = _cohort_tree(cohort, config.hierarchy, col, values, classes)
    return TaskSpec(col, kind, classes=classes, tree=tree)


def _cohort_tree(
    cohort: Cohort,
    hierarchy: Mapping[str, Any],
    col: str,
    values: np.ndarray,
    classes: tuple[str, ...],
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The label tree checked against the cohort, restricted to the classes it has."""
    from oncoslide.cohort.label_tree import LabelTreeError

    tree = parse_label_tree(hierarchy)
    pairs: list[tuple[object, object]] = []
    if tree.levels is not None:
        coarse_col = tree.levels[0]
        for table in (cohort.patients, cohort.slides):
            if coarse_col in table.columns and col in table.columns:
                rows = table[[coarse_col, col]].dropna()
                pairs = list(zip(rows[coarse_col], rows[col], strict=True))
                break
    problems = tree.cohort_problems(values, task=col, coarse_pairs=pairs)
    if not problems:
        tree = tree.restricted(classes)
        if len(tree.tree) < 2:
            problems.append(
                f"the cohort's classes of {col!r} lie under {len(tree.tree)} coarse class(es) of "
                "the tree; a label tree needs at least 2"
            )
    if problems:
        raise LabelTreeError(problems, f"for task {col!r}")
    return tree.tree


def label_str(value: object) -> str:
    """Labels as strings; 1.0, 1 and True name the same class."""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def task_patients(cohort: Cohort, task: TaskSpec) -> list[str]:
    """Patients with every target value the task needs (others are left out and reported)."""
    return sorted(cohort.patients_with(*task.target_columns))


def split_inputs(
    cohort: Cohort, task: TaskSpec, patients: Sequence[str], *, site_preserving: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """What splits balance and keep apart: strata (the label, or event x time quantile for
    survival) and, for site-preserving splits, each patient's site."""
    sites = None
    if site_preserving:
        if "site" not in cohort.patients.columns:
            raise ConfigError("site-preserving splits need a 'site' column (or TCGA barcodes)")
        sites = cohort.patients.loc[list(patients), "site"].astype(str).to_numpy()
    if task.is_survival:
        y = cohort.survival(list(patients))
        return survival_strata(y["time"], y["event"]), sites
    return np.asarray(cohort.labels(task.name, list(patients))), sites


@dataclass
class FoldTask:
    """A task fitted on one fold's training part: output size, loss, conversions, metrics."""

    task: TaskSpec
    config: TrainConfig
    n_outputs: int
    bins: TimeBins | None = None
    class_weight: Tensor | None = None
    breslow: BreslowEstimator | None = field(default=None, repr=False)
    # the median predicted risk of the training part: high / low risk groups split here
    risk_threshold: float | None = None
    # per side input: the standardisation fitted on the training part
    side_scalers: dict[str, SideScaler] = field(default_factory=dict)

    # -- fitted state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything fitted on the training part, JSON-ready (saved with a trained model)."""
        return {
            "n_outputs": self.n_outputs,
            "bins": None if self.bins is None else self.bins.to_dict(),
            "class_weight": None if self.class_weight is None else self.class_weight.tolist(),
            "risk_threshold": self.risk_threshold,
            "breslow": None if self.breslow is None else self.breslow.to_dict(),
            "side_scalers": {k: v.to_dict() for k, v in self.side_scalers.items()},
        }

    @classmethod
    def from_state_dict(
        cls, task: TaskSpec, config: TrainConfig, state: dict[str, Any]
    ) -> FoldTask:
        """A fold task as it was fitted, without its training data."""
        weight = state.get("class_weight")
        return cls(
            task,
            config,
            n_outputs=int(state["n_outputs"]),
            bins=None if state.get("bins") is None else TimeBins.from_dict(state["bins"]),
            class_weight=None if weight is None else torch.tensor(weight, dtype=torch.float32),
            breslow=(
                None
                if state.get("breslow") is None
                else BreslowEstimator.from_dict(state["breslow"])
            ),
            risk_threshold=state.get("risk_threshold"),
            side_scalers={
                k: SideScaler.from_dict(v) for k, v in state.get("side_scalers", {}).items()
            },
        )

    # -- targets ----------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """The model's keyword arguments: the run's, plus the fold's side-input layout (width
        and gene-group positions after selection) for models that declare ``side_layout``, and
        the task's kind for models that declare ``target_task``."""
        kwargs = dict(self.config.model_kwargs)
        if MODELS.metadata(self.config.model).get("side_layout"):
            kwargs["side_layout"] = {k: v.layout() for k, v in self.side_scalers.items()}
        kwargs.update(task_model_kwargs(self.config.model, self.task))
        encoder_init = MODELS.metadata(self.config.model).get("encoder_init")
        if callable(encoder_init) and self.config.init:
            # the architecture of the --init encoder folder (its weights come in initialise_from)
            kwargs.setdefault("encoder", encoder_init(self.config.init))
        return kwargs

    def targets(self, cohort: Cohort, patient_ids: Sequence[str]) -> BagTargets:
        if self.task.is_survival:
            y = cohort.survival(list(patient_ids))
            time = y["time"].astype(np.float64)
            event = y["event"].astype(np.float64)
            bin_index = self.bins.transform(time) if self.bins is not None else None
            return BagTargets(time=time, event=event, bin_index=bin_index)
        return BagTargets(label=self.label_index(cohort, patient_ids))

    def sampler_strata(self, cohort: Cohort, patient_ids: Sequence[str]) -> np.ndarray:
        """Strata a balanced sampler equalises: time bin x event (survival), class otherwise.

        Cox models have no bins of their own: quartiles of the training part's event times
        serve (the part given here is the training part).
        """
        if not self.task.is_survival:
            return self.label_index(cohort, patient_ids)
        y = cohort.survival(list(patient_ids))
        bins = self.bins
        if bins is None:
            bins = TimeBins.quantile(y["time"], y["event"], n_bins=4)
        return bins.transform(y["time"]) * 2 + y["event"].astype(np.int64)

    def label_index(self, cohort: Cohort, patient_ids: Sequence[str]) -> np.ndarray:
        values = cohort.labels(self.task.name, list(patient_ids))
        lookup = {c: i for i, c in enumerate(self.task.classes)}
        return np.asarray([lookup[label_str(v)] for v in values], dtype=np.int64)

    # -- loss ---------------------------------------------------------------------------------
    def loss(
        self, logits: Tensor, batch: dict[str, Tensor], sample_weight: Tensor | None = None
    ) -> Tensor:
        """The task loss of a batch; ``sample_weight`` (B,) re-weights its patients (a
        model's curriculum, classification only)."""
        if sample_weight is not None:
            if self.task.is_survival:
                raise ConfigError("per-patient loss weights apply to classification tasks only")
            weight = None if self.class_weight is None else self.class_weight.to(logits.device)
            per = F.cross_entropy(logits, batch["label"], weight=weight, reduction="none")
            w = sample_weight.to(per.dtype)
            cw = weight[batch["label"]] if weight is not None else torch.ones_like(per)
            return (w * per).sum() / (w * cw).sum().clamp_min(1e-12)
        if self.task.is_survival:
            if self.config.survival_loss == "cox":
                return cox_ph_loss(
                    logits[:, 0], batch["time"], batch["event"], ties=self.config.cox_ties
                )
            return discrete_time_nll(
                logits, batch["bin_index"], batch["event"], alpha=self.config.nll_alpha
            )
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        return F.cross_entropy(logits, batch["label"], weight=weight)

    # -- predictions ------------------------------------------------------------------------
    def risk(self, logits: Tensor) -> np.ndarray:
        if self.config.survival_loss == "cox":
            return logits[:, 0].double().cpu().numpy()
        return discrete_risk(logits.double()).cpu().numpy()

    def prediction_frame(self, logits: Tensor) -> pd.DataFrame:
        """Columns written to predictions.parquet for these logits."""
        if self.task.is_survival:
            frame = pd.DataFrame({"risk": self.risk(logits)})
            if self.risk_threshold is not None:
                frame["risk_threshold"] = self.risk_threshold
            if self.bins is not None and self.config.survival_loss == "nll":
                surv = discrete_survival(logits.double()).cpu().numpy()
                for k in range(surv.shape[1]):
                    frame[f"surv_bin{k}"] = surv[:, k]
            return frame
        probs = class_probs(logits.double()).cpu().numpy()
        frame = pd.DataFrame({f"prob_{c}": probs[:, i] for i, c in enumerate(self.task.classes)})
        if self.task.tree:
            # both levels; never named prob_*, which readers take for the task's classes
            coarse, parent = self.task.tree_parent()
            pc = coarse_probabilities(probs, parent)
            for i, c in enumerate(coarse):
                frame[f"coarse_prob_{c}"] = pc[:, i]
            pred_coarse, pred_fine = tree_decision(probs, parent)
            frame["pred_coarse"] = [coarse[i] for i in pred_coarse]
            frame["pred_fine"] = [self.task.classes[i] for i in pred_fine]
        return frame

    def survival_function(self, logits: Tensor) -> Callable[[np.ndarray], np.ndarray] | None:
        """Predicted S(t) at given times, for the integrated Brier score."""
        if self.config.survival_loss == "cox":
            if self.breslow is None:
                return None
            risk = self.risk(logits)
            breslow = self.breslow
            return lambda times: breslow.survival_function(risk, times)
        assert self.bins is not None
        surv = discrete_survival(logits.double()).cpu().numpy()
        bins = self.bins
        return lambda times: bins.survival_at(surv, times)

    def fit_training_risks(self, logits: Tensor, y_train: np.ndarray) -> None:
        """State fitted on the training part's predicted risks (full bags, eval mode, as the
        test part is predicted): the risk-group threshold and, for Cox models, the Breslow
        baseline hazard."""
        risk = self.risk(logits)
        self.risk_threshold = float(np.median(risk))
        if self.config.survival_loss == "cox":
            self.breslow = BreslowEstimator().fit(risk, y_train["time"], y_train["event"])

    # -- metrics ------------------------------------------------------------------------------
    def metrics(
        self,
        logits: Tensor,
        cohort: Cohort,
        test_ids: Sequence[str],
        fit_ids: Sequence[str],
    ) -> dict[str, float]:
        """Test-part metrics. ``fit_ids`` (train + val) set the censoring distribution."""
        if self.task.is_survival:
            y_test = cohort.survival(list(test_ids))
            y_fit = cohort.survival(list(fit_ids))
            out = survival_metrics(
                y_fit, y_test, self.risk(logits), surv_fn=self.survival_function(logits)
            )
            return {m: float(out.get(m, np.nan)) for m in SURVIVAL_METRICS}
        probs = class_probs(logits.double()).cpu().numpy()
        labels = self.label_index(cohort, test_ids)
        if self.task.tree:
            out = hierarchical_metrics(labels, probs, self.task.tree_parent()[1])
        else:
            out = classification_metrics(labels, probs, classes=list(range(len(self.task.classes))))
        return {m: float(out[m]) for m in self.task.metric_names}

    def validation_score(self, logits: Tensor, batch_targets: dict[str, Tensor]) -> float:
        """The model-selection metric on the validation part (higher is better)."""
        if self.task.is_survival:
            risk = self.risk(logits)
            return concordance_index_censored(
                batch_targets["event"].cpu().numpy().astype(bool),
                batch_targets["time"].cpu().numpy(),
                risk,
            ).cindex
        probs = class_probs(logits.double()).cpu().numpy()
        labels = batch_targets["label"].cpu().numpy()
        return float(
            classification_metrics(labels, probs, classes=list(range(len(self.task.classes))))[
                "auc"
            ]
        )

    def full_loss(self, logits: Tensor, targets: dict[str, Tensor]) -> float:
        """The loss over a whole part at once (Cox: every pair of the part is compared)."""
        with torch.no_grad():
            return float(self.loss(logits, targets))


def task_model_kwargs(model: str, task: TaskSpec) -> dict[str, Any]:
    """What the task tells the models that ask: the tree and its class order (models that
    declare ``uses_label_tree``, on a task with a tree), the task's kind (``target_task``)."""
    meta = MODELS.metadata(model)
    out: dict[str, Any] = {}
    if meta.get("uses_label_tree") and task.tree:
        out.update(tree={c: list(f) for c, f in task.tree}, classes=list(task.classes))
    if meta.get("target_task"):
        out["target_task"] = task.kind
    return out


def fit_fold_task(
    task: TaskSpec,
    config: TrainConfig,
    cohort: Cohort,
    train_ids: Sequence[str],
    side: Mapping[str, Omics] | None = None,
) -> FoldTask:
    """Fit the fold's preprocessing on its training part only (the leakage fix of METHODS.md).

    ``side`` tables get their standardisation fitted on the training patients that have them.
    """
    fold = _fit_targets(task, config, cohort, train_ids)
    selection = omics_selection(config)
    scalers = {}
    for name, table in (side or {}).items():
        keep = None
        if name == "omics" and selection == "welch":
            ids = list(train_ids)
            if task.is_survival:
                y = cohort.survival(ids)
                kw: dict[str, Any] = {"survival": (y["time"], y["event"])}
            else:
                kw = {"labels": np.asarray(cohort.labels(task.name, ids))}
            keep, _ = welch_selection(
                table, ids, p_threshold=config.omics_p, min_genes=config.omics_min_genes, **kw
            )
        scalers[name] = SideScaler.fit(
            name, table, train_ids, keep=keep, selection=selection if keep else "none"
        )
    fold.side_scalers = scalers
    return fold


def omics_selection(config: TrainConfig) -> str:
    """The run's gene selection: its own setting, or the model's declared default."""
    if config.omics_selection != "auto":
        return config.omics_selection
    return str(MODELS.metadata(config.model).get("omics_selection", "none"))


def _fit_targets(
    task: TaskSpec, config: TrainConfig, cohort: Cohort, train_ids: Sequence[str]
) -> FoldTask:
    if task.is_survival:
        if config.survival_loss == "cox":
            return FoldTask(task, config, n_outputs=1)
        if config.bin_scheme == "fixed":
            bins = TimeBins.fixed(config.bin_width, config.n_bins)
        else:
            y = cohort.survival(list(train_ids))
            bins = TimeBins.quantile(y["time"], y["event"], n_bins=config.n_bins)
        return FoldTask(task, config, n_outputs=len(bins.edges) - 1, bins=bins)
    fold = FoldTask(task, config, n_outputs=len(task.classes))
    if config.class_weights == "balanced":
        labels = fold.label_index(cohort, train_ids)
        counts = np.bincount(labels, minlength=len(task.classes)).astype(np.float64)
        if (counts == 0).any():
            absent = [task.classes[i] for i in np.flatnonzero(counts == 0)]
            raise ConfigError(f"training part lacks classes {absent} of task {task.name!r}")
        weight = counts.sum() / (len(counts) * counts)
        fold.class_weight = torch.tensor(weight, dtype=torch.float32)
    return fold


__all__ = [
    "CLASSIFICATION_METRICS",
    "SURVIVAL_METRICS",
    "FoldTask",
    "TaskSpec",
    "fit_fold_task",
    "label_str",
    "resolve_task",
    "split_inputs",
    "task_model_kwargs",
    "task_patients",
]
