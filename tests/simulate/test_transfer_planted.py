"""Slow: on the pan-cancer preset, a model trained on one cancer transfers as the truth says.

ABMIL is trained (5-fold CV, the project's one training path) on cancer SIM-A only, its five
fold models are applied unchanged to every other cancer, and the targets' C-indices are ranked
against the planted prognostic similarity of SIM-A to them (truth.json). The ranking must follow
the similarity (Spearman >= 0.6): high within SIM-A's family, near or below 0.5 where reversed.
About three minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines.utils import concordance_index
from scipy import stats

from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.table import load_cohort
from oncoslide.features.cache import FeatureCache
from oncoslide.report.attention import load_fold_model
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import cross_validate, make_config

pytestmark = pytest.mark.slow


def test_abmil_transfer_across_cancers_follows_the_planted_similarity(tmp_path: Path) -> None:
    sim = simulate_cohort(tmp_path / "pan", make_simulation_config("pan-cancer"))
    table = pd.read_csv(sim.cohort_table)
    source = "SIM-A"
    table[table["cohort"] == source].to_csv(tmp_path / "source.csv", index=False)
    config = make_config(task="survival", model="abmil", progress=False, n_boot=0, epochs=12)
    cache = FeatureCache()
    run = cross_validate(
        load_cohort(tmp_path / "source.csv", sim.features_dir),
        config,
        tmp_path / "run",
        cache=cache,
    )
    assert run.summary.set_index("metric").loc["c_index", "mean"] > 0.65  # learnt on the source

    everyone = load_cohort(sim.cohort_table, sim.features_dir)
    targets = sorted(set(table["cohort"]) - {source})
    patients = table[table["cohort"].isin(targets)].groupby("patient_id", sort=True).first()
    risk = np.zeros(len(patients))
    for fold in range(config.folds):
        fold_model = load_fold_model(tmp_path / "run", everyone, seed=0, fold=fold)
        scores = []
        with torch.no_grad():
            for pid in patients.index:
                bag = load_bag(everyone, pid, cache)
                features = torch.tensor(np.asarray(bag.features, dtype=np.float32))[None]
                out = fold_model.model(features, torch.ones(features.shape[:2], dtype=torch.bool))
                frame = fold_model.fold_task.prediction_frame(out.logits)
                scores.append(float(frame["risk"].iloc[0]))
        risk += stats.rankdata(scores)  # an ensemble of the fold models, by rank
    cache.close()

    c_index = {}
    for target in targets:
        rows = (patients["cohort"] == target).to_numpy()
        part = patients[rows]
        c_index[target] = concordance_index(part["time"], -risk[rows], part["event"])
    similarity = json.loads(sim.truth.read_text())["prognosis"]["similarity"][source]
    planted = [similarity[t] for t in targets]
    rho = stats.spearmanr(planted, [c_index[t] for t in targets]).statistic
    assert rho >= 0.6, (c_index, similarity)
    same_family = [t for t in targets if similarity[t] > 0.85]
    reversed_ = [t for t in targets if similarity[t] < -0.2]
    assert same_family and reversed_
    assert min(c_index[t] for t in same_family) > max(c_index[t] for t in reversed_)
    assert np.mean([c_index[t] for t in reversed_]) < 0.55
