"""The validated configuration of one training run (one config maps to one run)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from oncoslide.errors import ConfigError

# Fields that change how a run is executed or displayed but never its numbers (multi-process
# training gives the one-process result up to floating-point rounding): they are left out of the
# run key, so a resumed run may change them.
EXECUTION_ONLY_FIELDS = frozenset(
    {
        "progress",
        "cache_gb",
        "num_threads",
        "accelerator",
        "prefetch",
        "devices",
        "num_nodes",
        "strategy",
    }
)
# The fields of the first release: always part of the run key. Fields added since join the key
# only when set away from their default, so adding a setting never changes the keys of stored
# runs and benchmark cells (a test keeps this list and the keys honest).
KEYED_V1_FIELDS = frozenset(
    {
        "task", "model", "model_kwargs", "time_col", "event_col", "survival_loss", "n_bins",
        "nll_alpha", "cox_ties", "class_weights", "folds", "seed", "repeats", "val_fraction",
        "site_preserving", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
        "max_patches", "early_stopping_patience", "monitor", "checkpoint", "grad_clip", "n_boot",
        "cache_dtype",
    }
)  # fmt: skip


class TrainConfig(BaseModel):
    """Everything that determines a cross-validated training run.

    ``task`` is ``"survival"`` or the name of a label column (classification). The same config
    and data give the same ``metrics.csv`` on CPU.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(description="'survival' or a label column for classification")
    model: str = Field("abmil", description="model registry name (see `oncoslide models`)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)

    # survival
    time_col: str = "time"
    event_col: str = "event"
    survival_loss: Literal["cox", "nll"] = Field(
        "cox", description="Cox partial likelihood over each minibatch, or discrete-time NLL"
    )
    n_bins: int = Field(
        4, ge=1, description="discrete-time bins (quantiles of training event times, or fixed)"
    )
    bin_scheme: Literal["quantile", "fixed"] = Field(
        "quantile",
        description="time bins: quantiles of the training part's event times, or n_bins bins "
        "of bin_width days (the last open-ended), as CROPKT's 32 one-year bins",
    )
    bin_width: float = Field(365.0, gt=0, description="days per bin of the fixed scheme")
    nll_alpha: float = Field(0.0, ge=0.0, le=1.0)
    cox_ties: Literal["efron", "breslow"] = "efron"

    # classification
    class_weights: Literal["balanced", "none"] = "balanced"
    hierarchy: dict[str, Any] | None = Field(
        None,
        description="label tree over the task's classes (coarse -> fine): a YAML/JSON file or "
        "{levels: [coarse_col, fine_col], tree: {coarse: [fine, ...]}}; metrics at both levels, "
        "read by models such as hmil",
    )

    # cross-validation
    folds: int = Field(5, ge=2)
    seed: int = 0
    repeats: int = Field(1, ge=1, description="repeated CV with seeds seed, seed+1, ...")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    site_preserving: bool = False

    # optimisation
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1, description="patient bags per optimisation step")
    accumulate_grad_batches: int = Field(
        1, ge=1, description="batches whose gradients add up before each optimiser step"
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle",
        description="training order: a seeded shuffle, or draws balanced over time bin x "
        "censoring (survival) or class (classification)",
    )
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    max_patches: int | None = Field(
        4096, ge=1, description="random patches per bag in training steps (None: all)"
    )
    early_stopping_patience: int | None = Field(5, ge=1)
    monitor: Literal["loss", "metric"] = "loss"
    checkpoint: Literal["best", "last"] = "best"
    grad_clip: float | None = Field(None, gt=0)
    aux_weights: dict[str, float] = Field(
        default_factory=dict,
        description="weights of a model's auxiliary loss terms (default: the model's own)",
    )
    choose: dict[str, Any] = Field(
        default_factory=dict,
        description="candidate values chosen per fold on the validation part: {name: [v1, v2, "
        "...]} for model keywords and the training settings lr, weight_decay, warmup_epochs, "
        "epochs, batch_size, max_patches, grad_clip, optimizer, sampler (every combination is "
        "trained; the best on validation predicts the test part)",
    )

    # side inputs (omics)
    omics_selection: Literal["auto", "none", "welch"] = Field(
        "auto",
        description="gene selection on each fold's training part: welch (Welch's t-test between "
        "high- and low-risk patients, or between classes; p < omics_p), none, or auto (the "
        "model's own choice: welch for ghanet)",
    )
    omics_p: float = Field(0.05, gt=0, le=1, description="p-value threshold of the selection")
    omics_min_genes: int = Field(
        16, ge=1, description="genes kept at least (the smallest p-values) when few pass"
    )

    # transfer
    init: str | None = Field(
        None, description="start from the weights of this model folder (fine-tuning transfer)"
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parameter groups kept fixed: encoder (all but the head), projection, "
        "aggregator, head, or a top-level module name",
    )

    # evaluation
    n_boot: int = Field(1000, ge=0, description="bootstrap replicates for confidence intervals")

    # execution only (not part of the run key)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    cache_gb: float = Field(8.0, gt=0, description="in-memory feature cache limit")
    cache_dtype: Literal["stored", "float16"] = Field(
        "stored", description="keep features as stored, or as float16 (half the memory)"
    )
    prefetch: bool = True
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads (default: OMP_NUM_THREADS, else the cores this process "
        "may use)",
    )
    progress: bool = True
    devices: int = Field(1, ge=1, description="processes (one per GPU, or CPU processes)")
    num_nodes: int = Field(1, ge=1, description="machines (Lightning multi-node)")
    strategy: Literal["auto", "ddp"] = Field(
        "auto",
        description="multi-process strategy for devices x num_nodes > 1: ddp (the default), with "
        "spawned worker processes so that the command itself runs once",
    )

    @field_validator("hierarchy", mode="before")
    @classmethod
    def _load_hierarchy(cls, v: object) -> object:
        # a path is read here, so that the run key holds the tree itself, not where it lay
        from oncoslide.cohort.label_tree import LabelTreeError, load_label_tree, parse_label_tree

        if v is None:
            return None
        try:
            tree = load_label_tree(v) if isinstance(v, str | os.PathLike) else parse_label_tree(v)
        except LabelTreeError as exc:
            raise ValueError(str(exc)) from None
        out: dict[str, Any] = {"tree": tree.to_dict()}
        if tree.levels is not None:
            out["levels"] = list(tree.levels)
        return out

    @field_validator("choose", mode="before")
    @classmethod
    def _choose_numbers(cls, v: object) -> object:
        # YAML 1.1 reads 1e-4 as a string: candidates are numbers when they read as numbers
        from oncoslide.training.choose import as_number

        if isinstance(v, dict):
            return {
                k: [as_number(x) for x in c] if isinstance(c, list) else c for k, c in v.items()
            }
        return v

    @field_validator("choose")
    @classmethod
    def _choose_valid(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from oncoslide.training.choose import choose_problems

        problems = choose_problems(
            v,
            model=info.data.get("model"),
            model_kwargs=info.data.get("model_kwargs", {}),
            val_fraction=info.data.get("val_fraction"),
        )
        if problems:  # every problem on a line of its own
            n = len(problems)
            lines = "".join(f"\n      - {p}" for p in problems)
            raise ValueError(f"{n} problem{'s' if n != 1 else ''}:{lines}")
        return v

    @field_validator("task")
    @classmethod
    def _task_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("task must be 'survival' or a label column name")
        return v.strip()

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.checkpoint == "best" and self.val_fraction == 0:
            raise ValueError(
                "checkpoint='best' needs a validation part (val_fraction > 0); "
                "use checkpoint='last' to train on a fixed schedule"
            )
        world = self.devices * self.num_nodes
        if self.accumulate_grad_batches % world:
            raise ValueError(
                f"{world} training processes need accumulate_grad_batches to be a multiple of "
                f"{world} (now {self.accumulate_grad_batches}): an optimiser step consumes that "
                "many batches of batch_size bags wherever they run, so the result does not "
                "depend on the number of processes"
            )
        return self

    @property
    def is_survival(self) -> bool:
        return self.task == "survival"

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.repeats)]

    def keyed_settings(self, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """The settings that can change the results (see KEYED_V1_FIELDS)."""
        payload = self.model_dump(mode=mode, exclude=set(EXECUTION_ONLY_FIELDS))
        keyed = {
            k: v
            for k, v in payload.items()
            if k in KEYED_V1_FIELDS
            or v != type(self).model_fields[k].get_default(call_default_factory=True)
        }
        # a model whose defaults changed declares a revision (registry metadata): runs and
        # benchmark cells of the old defaults are then not taken for the new ones; models
        # without one keep their keys
        revision = _model_revision(self.model)
        if revision is not None:
            keyed["model_revision"] = revision
        return keyed

    def run_key(self) -> str:
        """A short hash of every field that can change the results."""
        blob = json.dumps(self.keyed_settings(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_revision(name: str) -> int | None:
    from oncoslide.models import MODELS

    try:
        revision = MODELS.metadata(name).get("revision")
    except (ConfigError, KeyError):  # an unknown name is reported where the model is built
        return None
    return None if revision is None else int(revision)


def make_config(**kwargs: Any) -> TrainConfig:
    """Build a TrainConfig, turning pydantic's errors into one ConfigError listing them all."""
    try:
        return TrainConfig(**kwargs)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"{loc}: {err['msg']}")
        raise ConfigError(
            "invalid training configuration:\n" + "\n".join(f"  - {line}" for line in lines)
        ) from None


def setting_changes(stored: object, config: TrainConfig) -> list[str]:
    """The settings that differ between a stored config (the ``config`` entry of a run's
    config.json or a model's model.json) and ``config``: ``"epochs 20 -> 5"`` items, stored
    value first. Execution-only fields are left out (they never make another run).

    A stored config that no longer validates is compared on the fields it records, so a message
    can still name what changed; an empty list means no field can be named.
    """
    if not isinstance(stored, dict):
        return []
    requested = config.model_dump(mode="json", exclude=set(EXECUTION_ONLY_FIELDS))
    try:
        old = TrainConfig.model_validate(stored).model_dump(
            mode="json", exclude=set(EXECUTION_ONLY_FIELDS)
        )
    except ValidationError:  # damaged or from another version: the fields it does record
        old = {k: v for k, v in stored.items() if k in requested}
    return [
        f"{name} {_shown(old[name])} -> {_shown(requested[name])}"
        for name in sorted(old)
        if old[name] != requested[name]
    ]


def _shown(value: object) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def other_run_text(stored: object, config: TrainConfig, stored_key: object) -> str:
    """What makes a stored run another run than ``config``, for "FOLDER holds another run"
    messages: the settings that differ, else (nothing to compare) the two run keys."""
    changes = setting_changes(stored, config)
    if not changes:
        return f"(run key {stored_key}, this one {config.run_key()})"
    shown = "; ".join(changes[:_MAX_CHANGES_SHOWN])
    rest = len(changes) - _MAX_CHANGES_SHOWN
    more = f"; and {rest} more" if rest > 0 else ""
    return f"with other settings (stored -> requested: {shown}{more})"


_MAX_CHANGES_SHOWN = 8
