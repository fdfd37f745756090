"""A small simulated survival world with a trained ABMIL run and its explanation, shared by the
prototype and patient-report tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from oncoslide.cohort.table import Cohort, load_cohort
from oncoslide.report.prototypes import ExplainConfig, ExplainResult, explain_run
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import cross_validate, make_config

# One cancer (so each tumour morphology is one prototype), small bags, 32-d features. The
# prototype centres sit 6 noise-sd apart instead of the default 4: at 4 the true centres
# themselves put only ~71% of the patches in their own prototype, so no clustering could reach
# the 0.8 purity asked for; at 6 they put ~90% (checked in the test).
WORLD: dict[str, Any] = {
    "n_patients": 150,
    "n_cohorts": 1,
    "patches_median": 60,
    "patches_min": 20,
    "patches_max": 200,
    "feature_dim": 32,
    "prototype_separation": 6.0,
}


@dataclass
class ExplainedWorld:
    sim: Path
    run: Path
    cohort: Cohort
    explained: ExplainResult


def make_explained_world(root: Path, seed: int = 0, k: int = 8) -> ExplainedWorld:
    cfg = make_simulation_config("demo", {**WORLD, "seed": seed})
    sim = simulate_cohort(root / "sim", cfg).out_dir
    cohort = load_cohort(sim / "cohort.csv", sim / "features")
    config = make_config(
        task="survival",
        model="abmil",
        folds=3,
        epochs=30,
        batch_size=8,
        early_stopping_patience=None,
        progress=False,
        n_boot=20,
        num_threads=1,
        model_kwargs={"hidden_dim": 32, "attn_dim": 16},
    )
    run = root / "run"
    cross_validate(cohort, config, run)
    explained = explain_run(run, cohort, settings=ExplainConfig(n_prototypes=k))
    return ExplainedWorld(sim, run, cohort, explained)


@pytest.fixture(scope="session")
def explained_world(tmp_path_factory: pytest.TempPathFactory) -> ExplainedWorld:
    return make_explained_world(tmp_path_factory.mktemp("explained-world"))
