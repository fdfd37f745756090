"""Training on several processes (Lightning DDP, spawned CPU workers) gives the one-process
result: an optimiser step consumes accumulate_grad_batches batches wherever they run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.training import cross_validate, make_config

# A fixed schedule: no validation-based choice, no dropout (each process draws its own), whole
# bags; 20 training patients per fold in batches of 5 = 4 batches, 2 per optimiser step.
FIXED = dict(
    task="survival",
    survival_loss="nll",
    epochs=2,
    folds=2,
    batch_size=5,
    val_fraction=0.0,
    checkpoint="last",
    early_stopping_patience=None,
    max_patches=None,
    accumulate_grad_batches=2,
    model_kwargs={"dropout": 0.0},
    n_boot=0,
    progress=False,
)


def test_two_processes_give_the_one_process_result(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    one = cross_validate(cohort, make_config(**FIXED), tmp_path / "one")
    two = cross_validate(cohort, make_config(**FIXED, devices=2), tmp_path / "two")
    assert two.config.run_key() == one.config.run_key()  # the same run, wherever it ran
    a = one.predictions.set_index(["fold", "patient_id"])["risk"]
    b = two.predictions.set_index(["fold", "patient_id"])["risk"].loc[a.index]
    # floating-point rounding of the gradient all-reduce only (documented tolerance 1e-5)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=0, atol=1e-5)
    metrics = one.metrics.merge(two.metrics, on=["seed", "fold", "metric"])
    np.testing.assert_allclose(metrics["value_y"], metrics["value_x"], atol=1e-4)
    history = (tmp_path / "two" / "folds" / "seed0-fold0" / "history.csv").read_text()
    assert history.count("\n") == 1 + FIXED["epochs"]  # the workers' history came back
    # the first worker writes the epoch lines into the parent's run.log (handlers are not
    # inherited by spawned processes), the parent the fold lines
    log = (tmp_path / "two" / "run.log").read_text()
    for fold in range(FIXED["folds"]):
        for epoch in range(1, FIXED["epochs"] + 1):
            assert log.count(f"seed 0 fold {fold} epoch {epoch}/{FIXED['epochs']}:") == 1, log
        assert f"seed 0 fold {fold} done" in log


def test_processes_must_divide_the_accumulated_batches() -> None:
    with pytest.raises(ConfigError, match="multiple of 2"):
        make_config(**{**FIXED, "accumulate_grad_batches": 1}, devices=2)
    with pytest.raises(ConfigError, match="multiple of 4"):
        make_config(**{**FIXED, "accumulate_grad_batches": 2}, devices=2, num_nodes=2)
