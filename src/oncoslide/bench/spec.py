"""The benchmark description: one YAML file, validated with pydantic (one spec maps to one run).

A benchmark crosses **tasks** (what to predict on which patients, and how to split them) with
**feature sets** (one per patch encoder: a folder of feature files, and the patients that
encoder saw in pre-training) and **models** (an aggregator and its protocol). Example::

    name: bench-demo
    cohort: data/cohort.csv            # relative paths are relative to this file
    folds: 5
    seeds: [0]
    feature_sets:
      - {name: uni, features: feats/uni, exclude: uni_pretraining_patients.csv}
      - {name: lite0, features: feats/lite0}
    tasks:
      - {name: os, kind: survival}
      - {name: msi, kind: binary, target: msi}
      - {name: os-external, kind: survival,
         split: {policy: train_test, test_filter: {cohort: [SIM-C]}}}
      - {name: msi-new-site, kind: binary, target: msi, split: leave-one-site-out}
    models:
      - {name: abmil, protocol: mil, train: {epochs: 10}}
      - {name: linear, protocol: linear}

See docs/bench.md for every field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from oncoslide._io import read_mapping_file
from oncoslide.errors import ConfigError
from oncoslide.training.config import TrainConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
# TrainConfig fields a benchmark sets itself: the task comes from the task, the split from the
# benchmark's split table, and the seed from the cell.
BENCH_OWNED_TRAIN_FIELDS = frozenset(
    {"task", "model", "model_kwargs", "time_col", "event_col", "folds", "seed", "repeats"}
)
FilterValues = list[str | int | float | bool]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSetSpec(_Strict):
    """One encoder's features for the cohort's slides: patch features (a bag per slide) or
    slide embeddings (one vector per slide, from a slide encoder)."""

    name: str = Field(pattern=NAME_PATTERN)
    features: Path = Field(
        description="patch level: folder of per-slide feature files; slide level: folder of "
        "per-slide embedding files or a table with slide_id and one column per dimension"
    )
    level: Literal["patch", "slide"] = Field(
        "patch",
        description="slide: one embedding per slide (linear protocol only; mil models skip it)",
    )
    exclude: Path | None = Field(
        None,
        description="patients seen in this encoder's pre-training, removed from its test parts: "
        "a table with a patient_id or slide_id column, an encoder folder (pretrain_slides.csv) "
        "or a slide-embedding folder (its manifest)",
    )
    pretraining: Literal["exclude", "keep"] = Field(
        "exclude",
        description="slide embeddings whose manifest names the encoder's pre-training slides: "
        "exclude (default) keeps those patients out of test parts; keep scores them "
        "(transductive label-free pre-training on the evaluated cohort: report it as such)",
    )
    stamp_mpp: float | None = Field(None, gt=0)
    description: str = ""

    @model_validator(mode="after")
    def _level(self) -> FeatureSetSpec:
        if self.level == "slide" and self.stamp_mpp is not None:
            raise ValueError("stamp_mpp applies to patch features only")
        return self


class SplitSpec(_Strict):
    """How a task's patients are split: K-fold CV, a fixed train/test split, or one fold per
    site whose test part is that site (leave-one-site-out)."""

    policy: Literal["kfold", "train_test", "leave_one_site_out"] = "kfold"
    folds: int | None = Field(None, ge=2, description="K-fold only; default: the benchmark's")
    site_preserving: bool = False
    test_filter: dict[str, FilterValues] | None = Field(
        None, description="train_test only: patients matching this filter form the test set"
    )

    @model_validator(mode="before")
    @classmethod
    def _spelling(cls, data: Any) -> Any:
        # `policy: leave-one-site-out` reads as leave_one_site_out
        if isinstance(data, dict) and isinstance(data.get("policy"), str):
            return {**data, "policy": data["policy"].replace("-", "_")}
        return data

    @property
    def uses_sites(self) -> bool:
        """The split keeps sites apart (site-preserving K-fold or leave-one-site-out)."""
        return self.site_preserving or self.policy == "leave_one_site_out"

    @model_validator(mode="after")
    def _consistent(self) -> SplitSpec:
        if self.policy == "leave_one_site_out":
            if self.folds is not None:
                raise ValueError("leave_one_site_out has one fold per site; folds does not apply")
            if self.test_filter is not None:
                raise ValueError("test_filter applies to train_test splits only")
            return self
        if self.policy == "train_test":
            if not self.test_filter:
                raise ValueError("a train_test split needs test_filter (e.g. {cohort: [X]})")
            if self.folds is not None:
                raise ValueError("folds applies to kfold splits only")
        elif self.test_filter is not None:
            raise ValueError("test_filter applies to train_test splits only")
        return self


class TaskSpecEntry(_Strict):
    """A prediction task on the cohort table."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["survival", "binary", "multiclass"]
    target: str | None = Field(None, description="label column (classification)")
    time: str = "time"
    event: str = "event"
    filter: dict[str, FilterValues] | None = Field(
        None, description="keep patients whose column values are in the given lists"
    )
    split: SplitSpec = Field(default_factory=lambda: SplitSpec.model_validate({}))
    min_events_per_fold: int = Field(2, ge=1, description="survival: events per test part")
    min_per_class_per_fold: int = Field(1, ge=1, description="classification: per test part")
    omics: Path | None = Field(
        None, description="expression table keyed by patient_id, for models that use omics"
    )
    gene_groups: Path | None = Field(None, description="gene groups of omics: JSON, CSV or GMT")
    mutations: Path | None = Field(None, description="0/1 mutation table keyed by patient_id")
    hierarchy: Path | None = Field(
        None,
        description="label tree (YAML, coarse -> fine) over a classification target's classes: "
        "metrics at both levels; read by models such as hmil",
    )

    @model_validator(mode="before")
    @classmethod
    def _split_shorthand(cls, data: Any) -> Any:
        # `split: leave-one-site-out` (a policy name alone) means {policy: leave-one-site-out}
        if isinstance(data, dict) and isinstance(data.get("split"), str):
            return {**data, "split": {"policy": data["split"]}}
        return data

    @model_validator(mode="after")
    def _target(self) -> TaskSpecEntry:
        if self.kind == "survival" and self.target is not None:
            raise ValueError("survival tasks take time/event columns, not target")
        if self.kind != "survival" and not self.target:
            raise ValueError(f"{self.kind} tasks need target: <label column>")
        if self.kind == "survival" and self.hierarchy is not None:
            raise ValueError("a label tree (hierarchy) applies to classification tasks only")
        return self

    @property
    def target_columns(self) -> tuple[str, ...]:
        return (self.time, self.event) if self.kind == "survival" else (str(self.target),)

    @model_validator(mode="after")
    def _groups_need_omics(self) -> TaskSpecEntry:
        if self.gene_groups is not None and self.omics is None:
            raise ValueError("gene_groups describes the omics table: give omics too")
        return self


class ModelSpec(_Strict):
    """A model and its protocol; names are unique within a benchmark."""

    name: str = Field(pattern=NAME_PATTERN)
    protocol: Literal["mil", "linear"] = "mil"
    # mil
    model: str | None = Field(None, description="registry name (default: name)")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig overrides on top of the benchmark's"
    )
    choose: dict[str, Any] = Field(
        default_factory=dict,
        description="candidate values chosen per fold on the validation part, e.g. "
        "{top_k: [1, 2, 5], lr: [1e-4, 5e-4]} (TrainConfig.choose)",
    )
    init: Path | None = Field(
        None,
        description="a slide-encoder folder (oncoslide pretrain) or a model folder whose "
        "weights start every cell (train --init); relative to the spec; cells are keyed by "
        "its content, not its path",
    )
    # linear (Patho-Bench style, fixed: never tuned on test folds)
    pooling: Literal["mean", "max", "meanmax"] = "mean"
    C: float = Field(0.5, gt=0, description="logistic regression inverse penalty")
    l1_ratio: float = Field(0.5, gt=0, le=1, description="elastic-net Cox mixing")
    n_alphas: int = Field(10, ge=1, description="Cox penalties tried on the validation part")

    @model_validator(mode="after")
    def _protocol_fields(self) -> ModelSpec:
        if self.protocol == "linear" and (self.model or self.kwargs or self.train or self.choose):
            raise ValueError("model, kwargs, train and choose apply to the mil protocol only")
        if self.protocol == "linear" and self.init is not None:
            raise ValueError("init applies to the mil protocol only")
        if self.init is not None and "init" in self.train:
            raise ValueError("give init once: the entry's init, not train.init")
        return self

    @property
    def registry_name(self) -> str:
        return self.model or self.name


class BenchSpec(_Strict):
    """A whole benchmark. Paths are resolved against ``base_dir`` (the YAML file's folder)."""

    name: str = Field(pattern=NAME_PATTERN)
    cohort: Path
    feature_sets: list[FeatureSetSpec] = Field(min_length=1)
    tasks: list[TaskSpecEntry] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    folds: int = Field(5, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    train: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig overrides for every mil model"
    )
    n_boot: int = Field(1000, ge=100)
    keep_models: bool = Field(
        False,
        description="keep every mil cell's model folder in OUT/models/<cell key>/ (for "
        "heatmaps, predict and transfer)",
    )
    bad_features: Literal["drop", "error"] = Field(
        "drop",
        description="patch feature files that are missing, unreadable or empty: drop those "
        "slides from that feature set (reported) or refuse to run",
    )
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _unique_and_valid(self) -> BenchSpec:
        problems = cross_problems(self.model_dump(mode="python"))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def path(self, p: Path) -> Path:
        """A spec path resolved against the spec's folder."""
        return p if p.is_absolute() else (self.base_dir / p)

    def train_config(self, model: ModelSpec, **fields: Any) -> TrainConfig:
        """The TrainConfig of a mil model for one cell (``fields`` set task, seed, ...)."""
        # the entry's choose (its grid) wins over a train.choose
        grid = {"choose": dict(model.choose)} if model.choose else {}
        if model.init is not None:  # resolved against the spec's folder
            fields = {**fields, "init": str(self.path(model.init))}
        return TrainConfig(
            model=model.registry_name,
            model_kwargs=dict(model.kwargs),
            val_fraction=self.val_fraction,
            progress=False,
            **{**self.train, **model.train, **grid, **fields},
        )


def cross_problems(raw: dict[str, Any]) -> list[str]:
    """Checks across fields, on the raw mapping (so they run even when some fields are bad)."""
    problems = []

    def items(key: str) -> list[dict[str, Any]]:
        value = raw.get(key)
        return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []

    for what, key in (("feature set", "feature_sets"), ("task", "tasks"), ("model", "models")):
        names = [str(i.get("name")) for i in items(key) if "name" in i]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            problems.append(f"{what} names must be unique: {dups}")
    seeds = raw.get("seeds")
    if isinstance(seeds, list) and len(set(map(str, seeds))) != len(seeds):
        problems.append(f"seeds must be unique: {seeds}")
    common = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    assert isinstance(common, dict)
    owned = sorted(set(common) & BENCH_OWNED_TRAIN_FIELDS)
    if owned:
        problems.append(f"train: {owned} are set by the benchmark itself")
    slide_sets = [str(f.get("name")) for f in items("feature_sets") if f.get("level") == "slide"]
    if (
        slide_sets
        and items("models")
        and all(m.get("protocol", "mil") == "mil" for m in items("models"))
    ):
        problems.append(
            f"slide-level feature set(s) {slide_sets} need a model with protocol: linear "
            "(mil models train on patch features and skip them)"
        )
    for m in items("models"):
        if m.get("protocol", "mil") == "mil":
            own = m.get("train") if isinstance(m.get("train"), dict) else {}
            assert isinstance(own, dict)
            own = {**own, **({"choose": m["choose"]} if m.get("choose") else {})}
            # a grid's names are the registry model's keywords: checked against that model
            model_part = {"model": str(m.get("model") or m.get("name"))}
            if isinstance(m.get("kwargs"), dict):
                model_part["model_kwargs"] = m["kwargs"]
            problems += _train_problems(str(m.get("name")), {**common, **own}, model_part)
    return problems


def _train_problems(
    model: str, overrides: dict[str, Any], model_part: dict[str, Any] | None = None
) -> list[str]:
    problems = []
    owned = sorted(set(overrides) & BENCH_OWNED_TRAIN_FIELDS)
    if owned:
        problems.append(f"model {model}: train fields {owned} are set by the benchmark itself")
    rest = {k: v for k, v in overrides.items() if k not in BENCH_OWNED_TRAIN_FIELDS}
    if "choose" in rest:  # only a grid reads the model (its keywords); others stay as they were
        rest.update(model_part or {})
    try:
        TrainConfig(task="survival", **rest)
    except ValidationError as exc:
        problems += [
            f"model {model}: train.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors()
        ]
    return problems


def load_spec(path: str | os.PathLike[str]) -> BenchSpec:
    """Read and validate a benchmark YAML file; every problem is listed in one ConfigError."""
    path = Path(path)
    raw = read_mapping_file(path, "benchmark spec", "settings (name, cohort, tasks, ...)")
    return spec_from_dict(raw, base_dir=path.parent, source=str(path))


def spec_from_dict(
    raw: dict[str, Any], *, base_dir: str | os.PathLike[str] = ".", source: str = "spec"
) -> BenchSpec:
    """Validate a spec given as a dictionary (paths relative to ``base_dir``)."""
    if "base_dir" in raw:
        raise ConfigError(f"{source}: base_dir is not a spec field")
    try:
        return BenchSpec(**raw, base_dir=Path(base_dir).resolve())
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "spec"
            msg = str(err["msg"]).removeprefix("Value error, ")
            if loc == "spec":
                lines += msg.split("; ")
            else:
                lines.append(f"{loc}: {msg}")
        # checks across fields did not run when a field failed: run them on the raw mapping
        lines += [p for p in cross_problems(raw) if p not in lines]
        n = len(lines)
        raise ConfigError(
            f"{source} has {n} problem{'s' if n != 1 else ''}:\n"
            + "\n".join(f"  - {line}" for line in lines)
        ) from None


__all__ = [
    "BenchSpec",
    "FeatureSetSpec",
    "ModelSpec",
    "SplitSpec",
    "TaskSpecEntry",
    "load_spec",
    "spec_from_dict",
]
