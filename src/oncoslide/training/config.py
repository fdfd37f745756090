"""The validated configuration of one training run (one config maps to one run)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from oncoslide.errors import ConfigError

# Fields that change how a run is executed or displayed but never its numbers: they are left
# out of the run key, so a resumed run may change them.
EXECUTION_ONLY_FIELDS = frozenset(
    {"progress", "cache_gb", "num_threads", "accelerator", "prefetch"}
)


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
        4, ge=1, description="discrete-time bins (quantiles of training event times)"
    )
    nll_alpha: float = Field(0.0, ge=0.0, le=1.0)
    cox_ties: Literal["efron", "breslow"] = "efron"

    # classification
    class_weights: Literal["balanced", "none"] = "balanced"

    # cross-validation
    folds: int = Field(5, ge=2)
    seed: int = 0
    repeats: int = Field(1, ge=1, description="repeated CV with seeds seed, seed+1, ...")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    site_preserving: bool = False

    # optimisation
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1, description="patient bags per optimisation step")
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

    # evaluation
    n_boot: int = Field(1000, ge=0, description="bootstrap replicates for confidence intervals")

    # execution only (not part of the run key)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    cache_gb: float = Field(8.0, gt=0, description="in-memory feature cache limit")
    cache_dtype: Literal["stored", "float16"] = Field(
        "stored", description="keep features as stored, or as float16 (half the memory)"
    )
    prefetch: bool = True
    num_threads: int | None = Field(None, ge=1)
    progress: bool = True

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
        return self

    @property
    def is_survival(self) -> bool:
        return self.task == "survival"

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.repeats)]

    def run_key(self) -> str:
        """A short hash of every field that can change the results."""
        payload = self.model_dump(exclude=set(EXECUTION_ONLY_FIELDS))
        blob = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
