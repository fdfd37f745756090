"""Side inputs: per-patient tables (expression, mutations) a model consumes next to its bags.

A model declares them in its registry metadata (``side_inputs={"omics": "train"}``):

- ``"train"``: privileged information, seen in training steps only. Validation and test
  patients' rows are never looked up: the datasets of those parts are built without them, so no
  such row can reach an array (a test plants sentinel values in those rows to check it).
- ``"always"``: a test-time input too (fusion baselines), for every part.

Each input is standardised per column with a mean and scale fitted on the training part's
patients that have it (the fold's fitted state, saved with the model); patients without a row
get zeros and ``present = False``, so a model can mask what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from oncoslide.cohort.omics import Omics
from oncoslide.errors import ConfigError
from oncoslide.models import MODELS

When = Literal["train", "always"]


def declared_side_inputs(model: str) -> dict[str, When]:
    """The side inputs a registered model consumes, and when (checked)."""
    declared = dict(MODELS.metadata(model).get("side_inputs", {}))
    bad = {k: v for k, v in declared.items() if v not in ("train", "always")}
    if bad:
        raise ConfigError(f"model {model!r} declares side inputs with unknown timing: {bad}")
    return declared  # type: ignore[return-value]


def check_side_inputs(model: str, tables: Mapping[str, Omics]) -> dict[str, When]:
    """Every declared input must be given; given ones the model does not use are an error."""
    declared = declared_side_inputs(model)
    problems = [
        f"model {model!r} needs the side input {name!r} (e.g. --omics)"
        for name in declared
        if name not in tables
    ]
    problems += [
        f"side input {name!r} is given but model {model!r} does not use it "
        f"(it uses: {', '.join(declared) or 'none'})"
        for name in tables
        if name not in declared
    ]
    if problems:
        raise ConfigError("; ".join(problems))
    return declared


@dataclass(frozen=True)
class SideScaler:
    """Per-column standardisation of one side input, fitted on training-part patients.

    ``columns`` are the columns the model sees (all, or those a gene selection kept on the
    training part); ``groups`` maps each gene group to the positions of its kept genes in
    ``columns`` (one group ``all`` when the table defines none).
    """

    name: str
    columns: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    selection: str = "none"

    @classmethod
    def fit(
        cls,
        name: str,
        table: Omics,
        train_ids: Sequence[str],
        *,
        keep: Sequence[str] | None = None,
        selection: str = "none",
    ) -> SideScaler:
        rows = [p for p in train_ids if p in table.values.index]
        if not rows:
            raise ConfigError(f"side input {name!r}: no training patient has a row")
        columns = [str(c) for c in (keep if keep is not None else table.values.columns)]
        x = table.values.loc[rows, columns].to_numpy(dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[~(scale > 0)] = 1.0  # constant columns stay constant (0 after centring)
        position = {c: i for i, c in enumerate(columns)}
        groups = {
            g: tuple(position[str(gene)] for gene in genes if str(gene) in position)
            for g, genes in table.groups.items()
        } or {"all": tuple(range(len(columns)))}
        return cls(name, tuple(columns), mean, scale, groups, selection)

    def arrays(self, table: Omics, patient_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, G) standardised float32 rows and (n,) presence for ``patient_ids``."""
        present = np.array([p in table.values.index for p in patient_ids], dtype=bool)
        out = np.zeros((len(patient_ids), len(self.columns)), dtype=np.float32)
        if present.any():
            ids = [p for p, ok in zip(patient_ids, present, strict=True) if ok]
            x = table.values.loc[ids, list(self.columns)].to_numpy(dtype=np.float64)
            out[present] = ((x - self.mean) / self.scale).astype(np.float32)
        return out, present

    def layout(self) -> dict[str, Any]:
        """What a model needs to build itself for this input: its width and group positions."""
        return {
            "n_columns": len(self.columns),
            "groups": {g: list(v) for g, v in self.groups.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "columns": list(self.columns),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "groups": {g: list(v) for g, v in self.groups.items()},
            "selection": self.selection,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SideScaler:
        columns = tuple(map(str, data["columns"]))
        groups = {str(g): tuple(int(i) for i in v) for g, v in dict(data.get("groups", {})).items()}
        return cls(
            str(data["name"]),
            columns,
            np.asarray(data["mean"], dtype=np.float64),
            np.asarray(data["scale"], dtype=np.float64),
            groups or {"all": tuple(range(len(columns)))},
            str(data.get("selection", "none")),
        )


def welch_selection(
    table: Omics,
    train_ids: Sequence[str],
    *,
    survival: tuple[np.ndarray, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    p_threshold: float = 0.05,
    min_genes: int = 16,
) -> tuple[list[str], np.ndarray]:
    """Genes that separate the training part's outcome groups (G-HANet's per-fold selection).

    Survival (``survival=(time, event)`` of ``train_ids``): Welch's t-test per gene between
    high-risk patients (an event at or before the median event time of the training part) and
    low-risk ones (followed beyond it); patients censored earlier belong to neither. Labels: a
    Welch t-test between two classes, a one-way ANOVA F-test between more. Genes with
    p < ``p_threshold`` are kept in table order; when fewer than ``min_genes`` pass, the
    ``min_genes`` smallest p-values are. Only training patients with a row are read.

    Returns the kept genes and every gene's p-value (1 where a test is undefined).
    """
    from scipy import stats

    rows = [i for i, p in enumerate(train_ids) if p in table.values.index]
    ids = [train_ids[i] for i in rows]
    x = table.values.loc[ids].to_numpy(dtype=np.float64)
    genes = [str(c) for c in table.values.columns]
    if survival is not None:
        time, event = (np.asarray(a)[rows] for a in survival)
        event = event.astype(bool)
        if not event.any():
            raise ConfigError("gene selection needs events in the training part")
        cut = float(np.median(time[event]))
        parts = [x[event & (time <= cut)], x[time > cut]]
    elif labels is not None:
        lab = np.asarray(labels)[rows]
        parts = [x[lab == c] for c in np.unique(lab)]
    else:
        raise ConfigError("gene selection needs survival targets or labels")
    parts = [p for p in parts if len(p) >= 2]
    if len(parts) < 2:
        raise ConfigError(
            "gene selection needs at least 2 training patients with omics in each outcome group"
        )
    with np.errstate(all="ignore"):
        if len(parts) == 2:
            pvalues = stats.ttest_ind(parts[0], parts[1], equal_var=False, axis=0).pvalue
        else:
            pvalues = stats.f_oneway(*parts, axis=0).pvalue
    pvalues = np.where(np.isfinite(pvalues), pvalues, 1.0)
    kept = np.flatnonzero(pvalues < p_threshold)
    if len(kept) < min(min_genes, len(genes)):
        kept = np.sort(np.argsort(pvalues, kind="stable")[: min(min_genes, len(genes))])
    return [genes[i] for i in kept], pvalues


def part_side_arrays(
    scalers: Mapping[str, SideScaler],
    tables: Mapping[str, Omics],
    when: Mapping[str, When],
    patient_ids: Sequence[str],
    part: Literal["train", "val", "test", "predict"],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The side arrays a part's dataset may hold: training-only inputs for ``train`` only."""
    out = {}
    for name, scaler in scalers.items():
        if part != "train" and when.get(name) == "train":
            continue  # privileged: the rows of these patients are never read
        out[name] = scaler.arrays(tables[name], patient_ids)
    return out
