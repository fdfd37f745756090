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
from dataclasses import dataclass
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
    """Per-column standardisation of one side input, fitted on training-part patients."""

    name: str
    columns: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, name: str, table: Omics, train_ids: Sequence[str]) -> SideScaler:
        rows = [p for p in train_ids if p in table.values.index]
        if not rows:
            raise ConfigError(f"side input {name!r}: no training patient has a row")
        x = table.values.loc[rows].to_numpy(dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[~(scale > 0)] = 1.0  # constant columns stay constant (0 after centring)
        return cls(name, tuple(map(str, table.values.columns)), mean, scale)

    def arrays(self, table: Omics, patient_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, G) standardised float32 rows and (n,) presence for ``patient_ids``."""
        present = np.array([p in table.values.index for p in patient_ids], dtype=bool)
        out = np.zeros((len(patient_ids), len(self.columns)), dtype=np.float32)
        if present.any():
            ids = [p for p, ok in zip(patient_ids, present, strict=True) if ok]
            x = table.values.loc[ids, list(self.columns)].to_numpy(dtype=np.float64)
            out[present] = ((x - self.mean) / self.scale).astype(np.float32)
        return out, present

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "columns": list(self.columns),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SideScaler:
        return cls(
            str(data["name"]),
            tuple(map(str, data["columns"])),
            np.asarray(data["mean"], dtype=np.float64),
            np.asarray(data["scale"], dtype=np.float64),
        )


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
