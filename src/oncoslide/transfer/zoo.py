"""A model zoo: one self-describing survival model per cancer (CROPKT's "off-the-shelf" models).

``build_zoo(cohort, config, out, by="cohort")`` trains, for every cancer that meets the
inclusion rule (default >= 200 patients and an event rate >= 5 %), a cross-validated run (its
out-of-fold C-index with a bootstrap interval, and the fold models) and one model on all of the
cancer's patients (``--fit-all``)::

    ZOO/
      zoo.json                 format, version, grouping column, inclusion rule, feature
                               contract, and one entry per cancer (patients, events, CV C-index)
      <cancer>/cv/             the cancer's cross-validation run folder
      <cancer>/model/          the model trained on all its patients (a model folder)

Every model of a zoo was trained on features of one contract (encoder, dimension, patch grid):
a zoo refuses cohorts with other features (checked by :func:`load_zoo` users through
:func:`oncoslide.training.predict.check_contract`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide._io import check_folder_target, write_json
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.features.schema import FeatureContract
from oncoslide.training.config import TrainConfig
from oncoslide.training.model_folder import TrainedModel, load_model_folder, read_model_patients

ZOO_FORMAT = "oncoslide-zoo"
ZOO_VERSION = 1
ZOO_FILE = "zoo.json"

__all__ = ["ZOO_FORMAT", "ZOO_VERSION", "Zoo", "ZooEntry", "build_zoo", "load_zoo", "safe_name"]


def safe_name(value: str) -> str:
    """A folder name for a cancer label (letters, digits, '-', '_', '.')."""
    out = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(value))
    return out or "_"


@dataclass(frozen=True)
class ZooEntry:
    cancer: str
    folder: str  # relative to the zoo
    n_patients: int
    n_events: int
    c_index: float
    lower: float
    upper: float


@dataclass(frozen=True)
class Zoo:
    path: Path
    by: str
    contract: FeatureContract
    entries: tuple[ZooEntry, ...]
    rule: dict[str, Any]

    def model(self, cancer: str) -> TrainedModel:
        return load_model_folder(self.path / self.entry(cancer).folder / "model")

    def patients(self, cancer: str) -> pd.DataFrame:
        """The patients the cancer's model was trained on (patient_id, part), read without
        loading the model."""
        return read_model_patients(self.path / self.entry(cancer).folder / "model")

    def cv_run(self, cancer: str) -> Path:
        return self.path / self.entry(cancer).folder / "cv"

    def entry(self, cancer: str) -> ZooEntry:
        for e in self.entries:
            if e.cancer == cancer:
                return e
        raise ConfigError(
            f"the zoo {self.path} has no model of {cancer!r}; it has "
            f"{', '.join(e.cancer for e in self.entries)}"
        )

    @property
    def cancers(self) -> list[str]:
        return [e.cancer for e in self.entries]


def out_of_fold(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per patient of a CV run's predictions: its risk averaged over the seeds."""
    columns = ["patient_id", "time", "event", "risk"]
    return predictions[columns].groupby("patient_id", as_index=False).mean()


def cindex_interval(frame: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Harrell's C of ``frame`` (time, event, risk) with a percentile bootstrap interval over
    its patients; NaN without an event."""
    from oncoslide.evaluation.bootstrap import bootstrap_ci
    from oncoslide.survival.metrics import concordance_index_censored

    e = frame["event"].to_numpy().astype(bool)
    t = frame["time"].to_numpy(dtype=float)
    r = frame["risk"].to_numpy(dtype=float)
    if not e.any():
        return float("nan"), float("nan"), float("nan")
    ci = bootstrap_ci(
        lambda idx: concordance_index_censored(e[idx], t[idx], r[idx]).cindex,
        len(frame),
        n_boot=n_boot,
        seed=seed,
    )
    return ci.estimate, ci.lower, ci.upper


def cancer_groups(cohort: Cohort, by: str) -> dict[str, list[str]]:
    """Patients of each value of the patient-level column ``by``."""
    if by not in cohort.patients.columns:
        raise ConfigError(
            f"the cohort has no column {by!r} to group cancers by; patient-level columns: "
            f"{', '.join(map(str, cohort.patients.columns))}"
        )
    values = cohort.patients[by]
    groups: dict[str, list[str]] = {}
    for pid, value in zip(cohort.patients.index, values, strict=True):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        groups.setdefault(str(value), []).append(str(pid))
    return dict(sorted(groups.items()))


def build_zoo(
    cohort: Cohort,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    by: str = "cohort",
    min_patients: int = 200,
    min_event_rate: float = 0.05,
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> tuple[Zoo, list[str]]:
    """Train the zoo (see the module docstring); returns it and notes on left-out cancers.

    ``config`` is the survival training configuration used for every cancer (its ``folds``
    for the CV runs). Runs resume like ``oncoslide train`` (keyed by settings and data).
    """
    from oncoslide.training import cross_validate
    from oncoslide.training.fit_all import fit_all
    from oncoslide.training.predict import cohort_contract

    if not config.is_survival:
        raise ConfigError("a zoo holds survival models: use task 'survival'")
    out = check_folder_target(out_dir)
    groups = cancer_groups(cohort, by)
    notes, entries = [], []
    for cancer, ids in groups.items():
        sub = cohort.subset(ids)
        y = sub.survival(sub.patients_with(sub.time_col, sub.event_col))
        n, events = len(y), int(y["event"].sum())
        if n < min_patients or events < min_event_rate * n:
            notes.append(
                f"{cancer}: {n} patients, {events} events: below the inclusion rule "
                f"(>= {min_patients} patients, event rate >= {min_event_rate:.0%}); left out"
            )
            continue
        if on_step is not None:
            on_step(cancer)
        folder = safe_name(cancer)
        run = cross_validate(sub, config, out / folder / "cv", overwrite=overwrite)
        fit_all(sub, config, out / folder / "model", overwrite=overwrite)
        oof = out_of_fold(run.predictions)
        c, lo, hi = cindex_interval(oof, config.n_boot or 200, config.seed)
        entries.append(ZooEntry(cancer, folder, n, events, c, lo, hi))
    if not entries:
        raise ConfigError(
            "no cancer meets the inclusion rule: " + "; ".join(notes) if notes else "no cancer"
        )
    cache = FeatureCache()
    try:
        contract = cohort_contract(cohort, cache)
    finally:
        cache.close()
    rule = {"min_patients": min_patients, "min_event_rate": min_event_rate}
    write_json(
        out / ZOO_FILE,
        {
            "format": ZOO_FORMAT,
            "version": ZOO_VERSION,
            "by": by,
            "rule": rule,
            "features": contract.to_dict(),
            "models": [e.__dict__ for e in entries],
            "notes": notes,
        },
    )
    return load_zoo(out), notes


def load_zoo(path: str | os.PathLike[str]) -> Zoo:
    """Read a zoo folder written by :func:`build_zoo`."""
    root = Path(path)
    file = root / ZOO_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{root} is not a model zoo: cannot read {file} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ZOO_FORMAT:
        raise ConfigError(f"{file} is not an {ZOO_FORMAT} file")
    if meta.get("version") != ZOO_VERSION:
        raise ConfigError(
            f"{file} is a version-{meta.get('version')} zoo; this oncoslide reads version "
            f"{ZOO_VERSION}"
        )
    entries = tuple(
        ZooEntry(**{k: m[k] for k in ZooEntry.__dataclass_fields__}) for m in meta["models"]
    )
    return Zoo(
        root,
        str(meta["by"]),
        FeatureContract.from_dict(meta["features"]),
        entries,
        dict(meta.get("rule", {})),
    )
