"""Per-patient details a model gives beside its predictions (e.g. ROUPKT's router weights).

A model that declares ``describes_patients=True`` in its registry metadata has a method
``patient_details(features, mask) -> {name: (B,) tensor}``. The training path (cross-validation
test parts, benchmark cells) and ``oncoslide predict`` then write one column
``detail_<name>`` per name beside the patient's predictions, computed with the same weights,
on the same whole bag, in eval mode, one bag per forward pass (as predictions are made).
Nothing here knows what a detail means: the model names its columns.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from oncoslide.bench.store import DETAIL_PREFIX
from oncoslide.errors import ConfigError
from oncoslide.models import MODELS, MILModel
from oncoslide.training.data import collate_bags

__all__ = [
    "DETAIL_PREFIX",
    "describes_patients",
    "detail_columns",
    "patient_details",
    "with_details",
]


def describes_patients(model_name: str) -> bool:
    """Whether the registered model gives per-patient details (registry metadata)."""
    return bool(MODELS.metadata(model_name).get("describes_patients", False))


def detail_columns(frame: pd.DataFrame) -> list[str]:
    """The detail columns of a prediction table, in their order."""
    return [c for c in frame.columns if isinstance(c, str) and c.startswith(DETAIL_PREFIX)]


def patient_details(
    model: MILModel,
    model_name: str,
    items: Callable[[int], dict[str, object]],
    n: int,
) -> pd.DataFrame | None:
    """The details of ``n`` bags (``items(i)``, as a BagDataset gives them), one row per bag
    in index order, columns ``detail_<name>``; None for models that give none."""
    if not describes_patients(model_name):
        return None
    describe = getattr(model, "patient_details", None)
    if not callable(describe):
        raise ConfigError(
            f"model {model_name!r} declares describes_patients but has no patient_details method"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: dict[str, np.ndarray] = {}
    try:
        with torch.no_grad():
            for i in range(n):  # one bag per pass, as predictions are made
                batch = collate_bags([items(i)])
                values = describe(batch["features"].to(device), batch["mask"].to(device))
                for name, value in values.items():
                    column = rows.setdefault(str(name), np.full(n, np.nan))
                    column[i] = float(value.reshape(-1)[0])
    finally:
        model.train(was_training)
    return pd.DataFrame({f"{DETAIL_PREFIX}{k}": v for k, v in rows.items()})


def with_details(frame: pd.DataFrame, details: pd.DataFrame | None) -> pd.DataFrame:
    """``frame`` (rows aligned with ``details``) with the detail columns appended."""
    if details is None or not len(details.columns):
        return frame
    if len(details) != len(frame):
        raise ConfigError(f"{len(details)} rows of details for {len(frame)} predictions")
    clash = sorted(set(details.columns) & set(frame.columns))
    if clash:
        raise ConfigError(f"detail columns {clash} clash with prediction columns")
    return pd.concat([frame.reset_index(drop=True), details.reset_index(drop=True)], axis=1)
