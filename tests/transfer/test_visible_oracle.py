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
    preset does not rule the check out (docs/transfer.md, "Why"). With coefficients learned
    from each source's own patients instead of the true ones, a perfect reader of the shares
    falls to 0.689 and one of the shares and cells' states to 0.652 on this world (measured
    2026-12-02; over 14 worlds 0.790 and 0.763), while the reader of shares and states whose
    effects are each learned alone (unadjusted) keeps 0.766 (over 14 worlds 0.841, every one
    >= 0.7): pinned here, the world and the fits being deterministic."""
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
    learned = stats.spearmanr(planted, pairs["learned_c_index"]).statistic
    states = stats.spearmanr(planted, pairs["learned_states_c_index"]).statistic
    marginal = stats.spearmanr(planted, pairs["learned_marginal_c_index"]).statistic
    print(f"ceilings: visible latents {visible:.3f}, read from shared morphologies {readout:.3f}, "
          f"learned from the sources' patients {learned:.3f} (with cell states {states:.3f}; "
          f"each effect learned alone {marginal:.3f})")  # fmt: skip
    assert visible >= 0.7 and readout >= 0.7
    assert learned == pytest.approx(0.689, abs=0.002)
    assert states == pytest.approx(0.652, abs=0.002)
    assert marginal == pytest.approx(0.766, abs=0.002)


def _learning_truth() -> dict[str, Any]:
    """S and T of family 0 (tumour cells whose state carries aggressiveness), U of family 1;
    6 patients each, deaths at 1..6. S's shares are constant and its z_aggr falls with time;
    U's stroma share falls with time; T has both varying."""
    tumour = {"S": "FAM1/tumour", "T": "FAM1/tumour", "U": "FAM2/tumour"}
    z_aggr = {"S": [3, 2, 1, -1, -2, -3], "T": [2, 3, -1, 1, -2, -3], "U": [0, 1, 0, -1, 1, -1]}
    stroma = {"S": [0.3] * 6, "T": [0.6, 0.5, 0.4, 0.45, 0.3, 0.2],
              "U": [0.45, 0.4, 0.35, 0.3, 0.25, 0.2]}  # fmt: skip
    patients = [
        {
            "patient_id": f"{cancer}{i}",
            "cohort": cancer,
            "z": [float(z_aggr[cancer][i]), 0.0, 0.0, 0.0],
            "event_time": float(i + 1),
            "censor_time": 100.0,
            "mix_realised": {"stroma": stroma[cancer][i], tumour[cancer]: 0.5},
        }
        for cancer in ("S", "T", "U")
        for i in range(6)
    ]
    coefs = {"S": [1.0, 0, 0, 0], "T": [1.0, 0, 0, 0], "U": [0, 0, 0, 1.0]}
    prototypes = [
        {"name": "stroma", "cohort": None, "loadings": [0, 0, 0, 1.0], "state_latent": None},
        {"name": "FAM1/tumour", "cohort": None, "family": 0, "loadings": [0.5, 0, 0, 0],
         "state_latent": "aggressiveness"},
        {"name": "FAM2/tumour", "cohort": None, "family": 1, "loadings": [0.5, 0, 0, 0],
         "state_latent": None},
    ]  # fmt: skip
    return {
        "patients": patients,
        "prototypes": prototypes,
        "prognosis": {
            "latents": NAMES,
            "families": {"S": 0, "T": 0, "U": 1},
            "hazard_coefs": {c: dict(zip(NAMES, v, strict=True)) for c, v in coefs.items()},
            "similarity": {a: {b: float(np.dot(coefs[a], coefs[b])) for b in coefs} for a in coefs},
        },
    }


def test_learned_readers_by_hand() -> None:
    """The readers whose coefficients come from the source's own patients: only what varies
    among them can be learned, a state is read only where its prototype is, and the sign
    learned decides each target's C-index (computed by hand over the 15 pairs of 6 deaths)."""
    v = visible_oracle(_learning_truth())
    assert v is not None
    v = v.set_index(["source", "target"])
    # S's shares are constant: nothing to learn from them, every target's risk is tied
    assert v.at[("S", "T"), "learned_c_index"] == pytest.approx(0.5)
    assert v.at[("S", "U"), "learned_c_index"] == pytest.approx(0.5)
    # S's tumour cells' state (z_aggr, falling with time) is learned; T (same family) shows it:
    # T's z_aggr 2, 3, -1, 1, -2, -3 at deaths 1..6 -> 13 concordant, 2 discordant
    assert v.at[("S", "T"), "learned_states_c_index"] == pytest.approx(13 / 15)
    # U (another family) has no FAM1/tumour: the state is not read there
    assert v.at[("S", "U"), "learned_states_c_index"] == pytest.approx(0.5)
    # U learns "more stroma, earlier death"; T's stroma 0.6, 0.5, 0.4, 0.45, 0.3, 0.2 -> 14/15;
    # U's tumour carries no state, so both readers agree; S's stroma is constant -> 1/2
    assert v.at[("U", "T"), "learned_c_index"] == pytest.approx(14 / 15)
    assert v.at[("U", "T"), "learned_states_c_index"] == pytest.approx(14 / 15)
    assert v.at[("U", "S"), "learned_c_index"] == pytest.approx(0.5)
    # T learns from both; on S only the state varies (z_aggr falls with time): concordant
    assert v.at[("T", "S"), "learned_states_c_index"] == pytest.approx(1.0)


def test_marginal_reader_keeps_the_unadjusted_effect() -> None:
    """T's deaths come in pairs ordered by z_aggr (3, 3, 1, 1, -1, -1); within each pair the
    patient with more stroma dies later, while over all patients more stroma goes with an
    earlier death (9 of 15 pairs). Adjusted for the cells' state, stroma is protective;
    alone, harmful. U (another family) shows T's stroma but not its tumour's state, and U's
    stroma falls with time: the joint reader ranks U backwards (0 of 15), the marginal one in
    order (15 of 15)."""
    truth = _learning_truth()
    z_aggr, stroma = [3, 3, 1, 1, -1, -1], [0.4, 0.7, 0.3, 0.6, 0.2, 0.5]
    mine = [p for p in truth["patients"] if p["cohort"] == "T"]
    for p, z, share in zip(mine, z_aggr, stroma, strict=True):
        p["z"][0], p["mix_realised"]["stroma"] = float(z), share
    v = visible_oracle(truth)
    assert v is not None
    v = v.set_index(["source", "target"])
    assert v.at[("T", "U"), "learned_states_c_index"] == pytest.approx(0.0)
    assert v.at[("T", "U"), "learned_marginal_c_index"] == pytest.approx(1.0)
    # on S only the state varies: both readers rank S by it (z_aggr falls with time)
    assert v.at[("T", "S"), "learned_marginal_c_index"] == pytest.approx(1.0)


def test_learned_reader_without_events_is_nan() -> None:
    from oncoslide.transfer.report import _learned_risk

    shares = np.array([[0.1], [0.2], [0.3], [0.4]])
    rows = np.array([True, True, True, False])
    time = np.array([1.0, 2.0, 3.0, 4.0])
    assert np.isnan(_learned_risk(shares, rows, time, np.zeros(4, bool))).all()
    # with events: the risk is given to every row, the one outside the fit included
    risk = _learned_risk(shares, rows, time, np.array([True, True, True, False]))
    assert np.isfinite(risk).all() and risk[0] > risk[1] > risk[2] > risk[3]
