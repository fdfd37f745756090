"""A small benchmark on the tiny simulated cohort: real and shuffled features, two tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from oncoslide.bench.shuffle import shuffle_features


@pytest.fixture(scope="session")
def bench_data(tiny_cohort: Path) -> Path:
    """The tiny cohort plus a shuffled copy of its feature set (symbolic links)."""
    shuffled = tiny_cohort / "features-shuffled"
    if not shuffled.exists():
        shuffle_features(tiny_cohort / "cohort.csv", tiny_cohort / "features", shuffled, seed=0)
    return tiny_cohort


def _small_spec(data: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "tiny",
        "cohort": str(data / "cohort.csv"),
        "folds": 3,
        "seeds": [0],
        "feature_sets": [
            {"name": "real", "features": str(data / "features")},
            {"name": "shuffled", "features": str(data / "features-shuffled")},
        ],
        "tasks": [
            {"name": "os", "kind": "survival"},
            {"name": "msi", "kind": "binary", "target": "msi"},
        ],
        "models": [
            {"name": "linear", "protocol": "linear"},
            {
                "name": "meanpool",
                "protocol": "mil",
                "model": "mean",
                "train": {"epochs": 2, "batch_size": 8, "early_stopping_patience": None},
            },
        ],
        "n_boot": 200,
    }
    spec.update(overrides)
    return spec


def _write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def small_spec() -> Callable[..., dict[str, Any]]:
    """``small_spec(data, **overrides)``: a spec dict (3 folds, 2 feature sets, 2 tasks)."""
    return _small_spec


@pytest.fixture
def write_spec() -> Callable[[Path, dict[str, Any]], Path]:
    return _write_spec
