"""Self-describing trained models: everything needed to apply a model to any cohort.

A model folder (``oncoslide train --fit-all --out model/``, and ``folds/seed<S>-fold<K>/model/``
in every cross-validation run) holds::

    model.json     format and version; the model (registry name, keyword arguments, input and
                   output sizes); the task (kind, classes, survival columns); the resolved
                   training config; everything fitted on the training part (time bins, class
                   weights, the risk-group threshold, the Breslow baseline); the feature
                   contract (encoder, weights fingerprint, dimension, patch size, µm/px);
                   provenance (run key, seed, fold, epochs, versions)
    weights.pt     the model's state dict (torch.save; loads with weights_only=True)
    patients.csv   patient_id, part (train / val): who the model saw
    feature_stats.npz  mean, sd and covariance of the training part's patch features and, for
                   classification, the share of training patients predicted as each class
                   (read by test-time adaptation, ``predict --adapt``)

Loading needs no training data: :func:`load_model_folder` rebuilds the model, its fitted task
(predictions in the same units as the run's) and the contract that ``predict`` checks.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

import oncoslide
from oncoslide._io import atomic_path, write_json, write_table
from oncoslide.errors import ConfigError
from oncoslide.features.schema import FeatureContract
from oncoslide.models import MILModel, create_model
from oncoslide.training.config import TrainConfig
from oncoslide.training.feature_stats import FeatureStats
from oncoslide.training.tasks import FoldTask, TaskSpec

MODEL_FORMAT = "oncoslide-model"
MODEL_VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
PATIENTS_FILE = "patients.csv"


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A model rebuilt from its folder, in eval mode, with what was fitted alongside it."""

    path: Path
    model: MILModel
    config: TrainConfig
    task: TaskSpec
    fold_task: FoldTask
    contract: FeatureContract
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.model)

    def patients(self) -> pd.DataFrame:
        """The patients the model was trained on (patient_id, part)."""
        return read_model_patients(self.path)


def read_model_patients(folder: str | Path) -> pd.DataFrame:
    """The patients a model folder's model was trained on (patient_id, part), read without
    loading the model (e.g. to leave out zoo models that saw a task's patients)."""
    file = Path(folder) / PATIENTS_FILE
    if not file.exists():
        return pd.DataFrame({"patient_id": [], "part": []})
    return pd.read_csv(file, dtype={"patient_id": str})


def versions() -> dict[str, str]:
    return {
        "oncoslide": oncoslide.__version__,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save_model_folder(
    path: str | Path,
    model: MILModel,
    fold_task: FoldTask,
    config: TrainConfig,
    contract: FeatureContract,
    *,
    parts: dict[str, Sequence[str]],
    info: dict[str, Any],
    feature_stats: FeatureStats | None = None,
    run_key: str | None = None,
) -> Path:
    """Write a model folder (atomically, file by file; model.json last).

    ``feature_stats``: the training part's patch-feature statistics (``feature_stats.npz``,
    read by test-time adaptation). ``run_key``: the key of the run that trained it (default:
    ``config``'s; a run that chose values on validation records the key of its grid).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if feature_stats is not None:
        feature_stats.save(out)
    # through a Python file: a full disk is then an OSError (ENOSPC) that names the cause;
    # torch's own file writer reports it as a RuntimeError without the reason
    with atomic_path(out / WEIGHTS_FILE, suffix=".pt.tmp") as tmp, tmp.open("wb") as fh:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, fh)
    rows = [(pid, part) for part, ids in parts.items() for pid in ids]
    write_table(out / PATIENTS_FILE, pd.DataFrame(rows, columns=["patient_id", "part"]))
    digest = hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    write_json(
        out / MODEL_FILE,
        {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "model": {
                "name": config.model,
                "kwargs": fold_task.model_kwargs(),
                "in_dim": model.in_dim,
                "n_outputs": model.n_outputs,
                "embed_dim": model.embed_dim,
            },
            "task": fold_task.task.to_dict(),
            "config": config.model_dump(mode="json"),
            "run_key": run_key or config.run_key(),
            "fitted": fold_task.state_dict(),
            "features": contract.to_dict(),
            "weights_sha256": digest,
            "info": info,
            "versions": versions(),
        },
    )
    return out


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


def load_model_folder(path: str | Path) -> TrainedModel:
    """Rebuild a trained model from its folder.

    Raises:
        ConfigError: not a model folder, an unknown format version, or weights that do not fit
            the described model.
    """
    folder = Path(path)
    if not is_model_folder(folder):
        raise ConfigError(
            f"{folder} is not a model folder (no {MODEL_FILE}); make one with "
            "`oncoslide train ... --fit-all --out FOLDER`, or name a run folder with --seed and "
            "--fold"
        )
    try:
        meta = json.loads((folder / MODEL_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {folder / MODEL_FILE}: {exc}") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        raise ConfigError(
            f"{folder / MODEL_FILE} is not a version-{MODEL_VERSION} {MODEL_FORMAT} file "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
        )
    config = TrainConfig.model_validate(meta["config"])
    task = TaskSpec.from_dict(meta["task"])
    fold_task = FoldTask.from_state_dict(task, config, meta["fitted"])
    spec = meta["model"]
    model = create_model(
        spec["name"], in_dim=int(spec["in_dim"]), n_outputs=int(spec["n_outputs"]), **spec["kwargs"]
    )
    try:
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(
            f"the weights in {folder / WEIGHTS_FILE} do not fit model {spec['name']!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return TrainedModel(
        path=folder,
        model=model,
        config=config,
        task=task,
        fold_task=fold_task,
        contract=FeatureContract.from_dict(meta["features"]),
        info=dict(meta.get("info", {})),
    )


def initialise_from(
    model: MILModel, model_name: str, folder: str | Path, contract: FeatureContract
) -> dict[str, Any]:
    """Copy a trained model's weights into ``model`` (fine-tuning transfer).

    Parameters with the same name and shape are copied; others (e.g. a head with another
    number of outputs for a new task) keep their fresh initialisation and are listed. The
    source must be the same registered model, trained on features of the same contract.
    A slide-encoder folder (``oncoslide pretrain ... --out``) initialises models that take one
    (``load_encoder``, e.g. ``slide-finetune``).
    """
    if (Path(folder) / "encoder.json").is_file():
        load_encoder = getattr(model, "load_encoder", None)
        if load_encoder is None:
            raise ConfigError(
                f"--init {folder} is a pre-trained slide encoder: fine-tune it with "
                "--model slide-finetune"
            )
        return dict(load_encoder(folder, contract))
    source = load_model_folder(folder)
    if source.name != model_name:
        raise ConfigError(
            f"--init {folder} holds a {source.name!r} model; this run trains {model_name!r}"
        )
    problems = source.contract.mismatches(contract)
    if problems:
        raise ConfigError(f"--init {folder} was trained on other features: " + "; ".join(problems))
    theirs = source.model.state_dict()
    own = model.state_dict()
    copied = [k for k, v in own.items() if k in theirs and theirs[k].shape == v.shape]
    if not copied:
        raise ConfigError(f"no parameter of {folder} fits this model (different sizes)")
    model.load_state_dict({**own, **{k: theirs[k] for k in copied}})
    return {
        "init": str(folder),
        "init_weights_sha256": json.loads((Path(folder) / MODEL_FILE).read_text())[
            "weights_sha256"
        ],
        "init_copied": len(copied),
        "init_fresh": [k for k in own if k not in copied],
    }
