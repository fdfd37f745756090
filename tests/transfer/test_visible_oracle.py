"""The oracle restricted to what slides show across a pair of cancers (the report's ceiling of
the matrix-vs-planted Spearman), against hand calculations on a tiny hand-made world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oncoslide.transfer.report import load_world, visible_oracle

NAMES = ["aggressiveness", "immune", "molecular", "stromal"]
# two cancers of family 0 (X, Y), one of family 1 (W); 4 patients each, all with events
Z_AGGR, Z_STR = [2.0, -2.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]  # orthogonal, mean 0
TIMES = {"X": [1.0, 2.0, 3.0, 4.0], "Y": [1.0, 4.0, 2.0, 3.0], "W": [4.0, 3.0, 2.0, 1.0]}
COEFS = {"X": [1.0, 0, 0, 0], "Y": [1.0, 0, 0, 1.0], "W": [0, 0, 0, 1.0]}
FAMILY = {"X": 0, "Y": 0, "W": 1}


def _truth() -> dict[str, Any]:
    patients = []
    for cancer in ("X", "Y", "W"):
        tumour = "FAM1/tumour" if FAMILY[cancer] == 0 else "FAM2/tumour"
        for i in range(4):
            patients.append(
                {
                    "patient_id": f"{cancer}{i}",
                    "cohort": cancer,
                    "z": [Z_AGGR[i], 0.0, 0.0, Z_STR[i], 0.5],  # a fifth, nuisance latent
                    "event_time": TIMES[cancer][i],
                    "censor_time": 100.0,
                    # shares that move linearly with the latent each prototype expresses
                    "mix_realised": {"stroma": 0.3 + 0.1 * Z_STR[i], tumour: 0.3 + 0.1 * Z_AGGR[i]},
                }
            )
    prototypes = [
        {"name": "stroma", "cohort": None, "loadings": [0, 0, 0, 1.0, 0.3], "state_latent": None},
        {"name": "FAM1/tumour", "cohort": None, "family": 0, "loadings": [1.0, 0, 0, 0, 0],
         "state_latent": None},
        {"name": "FAM2/tumour", "cohort": None, "family": 1, "loadings": [1.0, 0, 0, 0, 0],
         "state_latent": None},
    ]  # fmt: skip
    unit = {c: np.asarray(v) / np.linalg.norm(v) for c, v in COEFS.items()}
    return {
        "patients": patients,
        "prototypes": prototypes,
        "prognosis": {
            "latents": NAMES,
            "families": FAMILY,
            "hazard_coefs": {c: dict(zip(NAMES, v, strict=True)) for c, v in COEFS.items()},
            "similarity": {a: {b: float(unit[a] @ unit[b]) for b in COEFS} for a in COEFS},
        },
    }


def test_visible_oracle_by_hand(tmp_path: Path) -> None:
    table = visible_oracle(_truth())
    assert table is not None and len(table) == 6
    v = table.set_index(["source", "target"])
    # same family: all prototypes shared, aggressiveness and stroma visible
    assert v.at[("X", "Y"), "shared_prototypes"] == "FAM1/tumour;stroma"
    assert v.at[("X", "Y"), "visible_latents"] == "aggressiveness;stromal"
    # X's risk z_aggr on Y: deaths at 1, 2, 3, 4 have z_aggr 2, 1, -1, -2: all concordant
    assert v.at[("X", "Y"), "visible_c_index"] == pytest.approx(1.0)
    assert v.at[("X", "Y"), "readout_c_index"] == pytest.approx(1.0)  # shares read z exactly
    # across families only stroma is shared: X's only latent (aggressiveness) is invisible, its
    # visible risk is constant (every pair tied: C = 1/2)
    assert v.at[("X", "W"), "shared_prototypes"] == "stroma"
    assert v.at[("X", "W"), "visible_latents"] == "stromal"
    assert v.at[("X", "W"), "visible_c_index"] == pytest.approx(0.5)
    # W's risk z_stromal on X (deaths at 1..4, z_str 1, 1, -1, -1): of the 6 pairs, 4
    # concordant, 2 tied -> 5/6, visible and read from the stroma share alike
    assert v.at[("W", "X"), "visible_c_index"] == pytest.approx(5 / 6)
    assert v.at[("W", "X"), "readout_c_index"] == pytest.approx(5 / 6)
    # Y (aggressiveness + stroma) on W: only z_str counts; W dies at 1..4 in order z_str -1,
    # -1, 1, 1 (patients 3, 2, 1, 0): 4 discordant, 2 tied -> 1/6
    assert v.at[("Y", "W"), "visible_c_index"] == pytest.approx(1 / 6)
    # through load_world
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(_truth()))
    world = load_world(path)
    assert world.visible is not None and len(world.visible) == 6
    # without patients (an older truth), no table
    truth = _truth()
    del truth["patients"]
    assert visible_oracle(truth) is None
    truth = _truth()
    del truth["patients"][0]["mix_realised"]
    assert visible_oracle(truth) is None


@pytest.mark.slow
def test_pan_cancer_ceilings_allow_the_issue_spearman(tmp_path: Path) -> None:
    """Issue 13 asks Spearman >= 0.7 between the recovered matrix and the planted similarity
    (40 off-diagonal pairs of a zoo of the cancers with >= 100 patients; recovered 0.57). What
    the slides carry across each pair allows it on the untouched preset (seed 0, measured
    2026-12-01: 0.90 on the visible latents, 0.80 read from the shared morphologies), so the
    preset does not rule the check out (docs/transfer.md, "Why")."""
    from scipy import stats

    from oncoslide.simulate import make_simulation_config, simulate_cohort

    sim = simulate_cohort(tmp_path / "pan", make_simulation_config("pan-cancer"))
    truth = json.loads(sim.truth.read_text())
    table = visible_oracle(truth)
    assert table is not None
    sizes = truth["prognosis"]["cohort_sizes"]
    pairs = table[table["source"].map(sizes) >= 100]
    assert len(pairs) == 40
    planted = [truth["prognosis"]["similarity"][s][t] for s, t in zip(pairs["source"],
                                                                      pairs["target"], strict=True)]  # fmt: skip
    visible = stats.spearmanr(planted, pairs["visible_c_index"]).statistic
    readout = stats.spearmanr(planted, pairs["readout_c_index"]).statistic
    print(f"ceilings: visible latents {visible:.3f}, read from shared morphologies {readout:.3f}")
    assert visible >= 0.7 and readout >= 0.7
