"""The layout of an ``oncoslide train`` run folder, written and read in this one place.

::

    RUN/
      config.json            run key, resolved config, task, cohort, data, versions
      data.json              the data record: digests of every patient's targets and every
                             feature file used (a resume on other data is refused)
      paths.json             where that data was: absolute paths of the cohort table, features,
                             side tables and slides (heatmap finds them again; not keyed)
      splits.csv             patient_id, seed, fold, part (train / val / test)
      predictions.parquet    one row per test patient per (seed, fold)
      metrics.csv            tidy rows: seed, fold, metric, value
      summary.csv            metric, mean, std, n_folds, 95% bootstrap interval
      choices.csv            with a ``choose`` grid: seed, fold, combination, its values,
                             val_loss, val_score (at its chosen epoch), kept
      run.log                a line per epoch and fold, appended by every invocation
                             (oncoslide._log.run_log)
      folds/seed<S>-fold<K>/
        model/               the fold's self-describing model folder (model.json, weights.pt)
        checkpoints/         Lightning's best.ckpt or last.ckpt
        predictions.parquet, metrics.csv, history.csv, eval.npz, choices.csv (a grid)
        done.json            written last: the fold is complete

A ``--fit-all`` model folder is the ``model/`` layout at the top of its folder, with the
training history and the train / validation split beside it (see
:mod:`oncoslide.training.model_folder`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from oncoslide._io import check_folder_target, write_json, write_table
from oncoslide.cohort.fingerprint import DataRecord, check_recorded_data
from oncoslide.errors import ConfigError
from oncoslide.training.config import TrainConfig, other_run_text

# What a new run in a used folder replaces (with --overwrite).
RUN_OUTPUTS = (
    "folds",
    "splits.csv",
    "predictions.parquet",
    "metrics.csv",
    "summary.csv",
    "choices.csv",
    "data.json",
    "paths.json",
)


@dataclass(frozen=True)
class FoldFolder:
    """One (seed, fold) of a run."""

    path: Path
    seed: int
    fold: int

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def checkpoint(self) -> Path | None:
        """The chosen checkpoint (best on validation, else the last), None before training."""
        for name in ("best.ckpt", "last.ckpt"):
            if (self.checkpoints / name).exists():
                return self.checkpoints / name
        return None

    @property
    def done(self) -> Path:
        return self.path / "done.json"

    @property
    def is_done(self) -> bool:
        return self.done.exists()

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.parquet"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def history(self) -> Path:
        return self.path / "history.csv"

    @property
    def eval(self) -> Path:
        return self.path / "eval.npz"

    @property
    def choices(self) -> Path:
        """Every combination of a ``choose`` grid with its validation scores."""
        return self.path / "choices.csv"


@dataclass(frozen=True)
class RunFolder:
    """An ``oncoslide train`` run folder (see the module docstring for its layout)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def splits(self) -> Path:
        return self.path / "splits.csv"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.parquet"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.csv"

    @property
    def choices(self) -> Path:
        return self.path / "choices.csv"

    def fold(self, seed: int, fold: int) -> FoldFolder:
        return FoldFolder(self.path / "folds" / f"seed{int(seed)}-fold{int(fold)}", seed, fold)

    # -- reading --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``ConfigError`` unless this is a run folder (config.json and splits.csv)."""
        missing = [p.name for p in (self.config, self.splits) if not p.exists()]
        if missing:
            raise ConfigError(
                f"{self.path} is not an `oncoslide train` run folder: "
                + "; ".join(f"{n} is missing" for n in missing)
            )

    def read_payload(self) -> dict[str, Any]:
        """The whole config.json (run key, config, task, cohort, versions)."""
        try:
            payload = json.loads(self.config.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {self.config}: {exc}") from None
        except ValueError as exc:  # a truncated or hand-edited file
            raise ConfigError(f"cannot read {self.config}: not valid JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise ConfigError(
                f"cannot read {self.config}: it holds a JSON {type(payload).__name__}, "
                "not the mapping `oncoslide train` writes"
            )
        return payload

    def read(self) -> tuple[TrainConfig, pd.DataFrame]:
        """The run's settings and splits."""
        self.check()
        payload = self.read_payload()
        if "config" not in payload:
            raise ConfigError(f"cannot read {self.config}: it has no 'config' (the run's settings)")
        try:
            config = TrainConfig.model_validate(payload["config"])
        except ValidationError as exc:  # one line: the file is named, the fields listed
            fields = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(
                f"cannot read {self.config}: invalid run settings ({fields})"
            ) from None
        splits = pd.read_csv(self.splits, dtype={"patient_id": str})
        return config, splits

    def collect(
        self, seeds: Sequence[int], folds: Sequence[int]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Every fold's predictions and metric rows, concatenated."""
        preds, metrics = [], []
        for seed in seeds:
            for fold in folds:
                f = self.fold(int(seed), int(fold))
                preds.append(pd.read_parquet(f.predictions))
                metrics.append(pd.read_csv(f.metrics))
        predictions = pd.concat(preds, ignore_index=True).sort_values(
            ["seed", "fold", "patient_id"]
        )
        metric_table = pd.concat(metrics, ignore_index=True)
        return predictions.reset_index(drop=True), metric_table.reset_index(drop=True)

    def collect_choices(self, seeds: Sequence[int], folds: Sequence[int]) -> pd.DataFrame:
        """Every fold's ``choices.csv`` (runs with a ``choose`` grid), concatenated."""
        frames = [
            pd.read_csv(f.choices)
            for f in (self.fold(int(s), int(k)) for s in seeds for k in folds)
            if f.choices.exists()
        ]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # -- writing --------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.path / "data.json"

    def prepare(
        self,
        run_key: str,
        overwrite: bool,
        data: DataRecord | None = None,
        config: TrainConfig | None = None,
    ) -> None:
        """Create the folder, resume the same run on the same data, or refuse (or replace,
        with ``overwrite``) another run or the same run on other data. With ``config`` (the
        requested run's), a refusal names the settings that differ from the stored run's."""
        check_folder_target(self.path)
        if self.config.exists():
            try:
                payload = self.read_payload()
            except ConfigError:
                if not overwrite:
                    raise
                payload = {}  # a damaged config.json is replaced with the run
            previous = payload.get("run_key") if isinstance(payload, dict) else None
            if previous != run_key:
                if not overwrite:
                    if config is not None and config.run_key() == run_key:
                        stored = payload.get("config") if isinstance(payload, dict) else None
                        what = other_run_text(stored, config, previous)
                    else:
                        what = f"(run key {previous}, this one {run_key})"
                    raise ConfigError(
                        f"{self.path} holds another run {what}; choose a new --out or pass "
                        "--overwrite"
                    )
            elif not overwrite:
                check_recorded_data(self.data, data, what="run")
                return  # same run on the same data: resume
            for name in RUN_OUTPUTS:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def write_payload(self, payload: dict[str, Any], data: DataRecord | None = None) -> None:
        if data is not None:
            write_json(self.data, data.to_dict())
        write_json(self.config, payload)

    def write_tables(
        self, predictions: pd.DataFrame, metrics: pd.DataFrame, summary: pd.DataFrame
    ) -> None:
        write_table(self.predictions, predictions)
        write_table(self.metrics, metrics)
        write_table(self.summary, summary)
