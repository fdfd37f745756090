"""Slow: a --fit-all model applied to patients it never saw scores within the cross-validation
interval of the same configuration (the CV estimate is honest about new patients)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index

from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import SimulationConfig, simulate_cohort
from oncoslide.training import cross_validate, make_config
from oncoslide.training.fit_all import fit_all
from oncoslide.training.predict import predict_cohort

pytestmark = pytest.mark.slow


def test_fit_all_then_predict_lands_in_the_cv_interval(tmp_path: Path) -> None:
    sim = simulate_cohort(
        tmp_path / "sim",
        SimulationConfig(
            n_patients=600, feature_dim=32, within_prototype_rank=4, patches_median=40,
            patches_min=15, patches_max=400, n_genes=24, seed=11,
        ),
    )  # fmt: skip
    table = pd.read_csv(sim.cohort_table)
    patients = np.array(sorted(table["patient_id"].unique()))
    held_out = set(np.random.default_rng(0).choice(patients, size=300, replace=False))
    table[~table["patient_id"].isin(held_out)].to_csv(tmp_path / "train.csv", index=False)
    table[table["patient_id"].isin(held_out)].to_csv(tmp_path / "new.csv", index=False)
    train = load_cohort(tmp_path / "train.csv", sim.features_dir)
    new = load_cohort(tmp_path / "new.csv", sim.features_dir)
    config = make_config(task="survival", model="abmil", epochs=12, n_boot=500, progress=False)

    cv = cross_validate(train, config, tmp_path / "cv").summary.set_index("metric").loc["c_index"]
    model = fit_all(train, config, tmp_path / "model").model
    preds = predict_cohort(model, new, tmp_path / "pred", embeddings=False).predictions
    c = concordance_index(preds["time"], -preds["risk"], preds["event"])
    assert cv["ci_lower"] <= c <= cv["ci_upper"], (c, cv.to_dict())
    assert c > 0.6  # and it learnt the planted signal
