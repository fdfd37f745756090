"""A small benchmark on the tiny simulated cohort: real and shuffled features, two tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
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


# ------------------------------------------------------------------ entries on different patients

UNEVEN_SPECIAL = 24  # patients 0..23 (8 per fold): scored by "full" only
UNEVEN_SEED1_ONLY = ("p030", "p031", "p032")  # also missing from "part", in seed 1 only


def _uneven_frame(kind: str, missing: str) -> pd.DataFrame:
    """Two entries of one task (90 patients, 3 folds, seeds 0 and 1) scored on different patients.

    ``full · lin`` is scored on every patient; ``part · lin`` lacks the 24 "special" patients
    (an exclusion list) and, in seed 1 only, three more. On the special patients ``full`` is
    perfect (``missing="easy"``: the earliest events have the highest risks, positives score 1)
    or perfectly wrong (``"hard"``). On the common patients ``part`` has the stronger signal when
    the missing patients are easy and ``full`` when they are hard, so scoring each entry on its
    own patients ranks the two entries the other way round than scoring both on the common ones.
    ``kind`` is ``"survival"`` (task ``os``) or ``"binary"`` (task ``msi``, classes MSI < MSS).
    """
    assert kind in ("survival", "binary") and missing in ("easy", "hard")
    rng = np.random.default_rng(21)
    n = 90
    pid = np.array([f"p{i:03d}" for i in range(n)])
    special = np.arange(n) < UNEVEN_SPECIAL
    x = rng.normal(size=n)
    strong, weak = (0.3, 0.0) if kind == "binary" else (2.0, 0.15)
    strength = (
        {"full": weak, "part": strong} if missing == "easy" else {"full": strong, "part": weak}
    )
    sign = 1.0 if missing == "easy" else -1.0
    if kind == "survival":
        t_event, t_cens = rng.exponential(np.exp(-x)), rng.exponential(1.5, size=n)
        time = 0.05 + np.minimum(t_event, t_cens)
        event = (t_event <= t_cens).astype(float)
        time[special] = rng.uniform(0.001, 0.04, size=special.sum())  # the earliest events
        event[special] = 1.0
    else:
        positive = x + rng.normal(scale=0.5, size=n) > 0
    parts = []
    for seed in (0, 1):
        fold = np.random.default_rng(50 + seed).permutation(np.arange(n) % 3)
        for fs in ("full", "part"):
            score = strength[fs] * x + rng.normal(size=n)
            frame = pd.DataFrame(
                {
                    "cell_key": [f"{fs}/{seed}/{k}" for k in fold],
                    "task": "os" if kind == "survival" else "msi",
                    "feature_set": fs,
                    "model": "lin",
                    "protocol": "linear",
                    "seed": seed,
                    "fold": fold,
                    "patient_id": pid,
                }
            )
            if kind == "survival":
                if fs == "full":  # ordered by time: all concordant (easy) or discordant (hard)
                    score[special] = sign * (100.0 - time[special])
                frame = frame.assign(time=time, event=event, label=None, risk=score)
            else:
                p_mss = 1.0 / (1.0 + np.exp(-score))
                if fs == "full":
                    p_mss[special] = np.where(positive[special] == (sign > 0), 1.0, 0.0)
                label = np.where(positive, "MSS", "MSI")
                frame = frame.assign(
                    time=np.nan, event=np.nan, label=label, prob_MSI=1 - p_mss, prob_MSS=p_mss
                )
            if fs == "part":
                drop = special | (np.isin(pid, UNEVEN_SEED1_ONLY) & (seed == 1))
                frame = frame.loc[~drop]
            parts.append(frame)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture
def uneven_frame() -> Callable[[str, str], pd.DataFrame]:
    """``uneven_frame(kind, missing)``: two entries scored on different patients (see above)."""
    return _uneven_frame
