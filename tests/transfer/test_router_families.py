"""Issue 13's must-hold "router weights concentrate on the planted same-family sources", on the
untouched `pan-cancer` world (seed 0): a zoo of the cancers with >= 100 patients (ABMIL, 12
epochs), ROUPKT on every target cancer (``exclude: auto``, 5-fold CV, 12 epochs) as benchmark
cells, then the transfer report. Per target with same-family sources among its experts, the
router's weight on them (per patient, summed, as a share of its weight on the zoo's sources,
then averaged; ROUPKT's own expert, on by default, is no source) is compared with the share
uniform routing would give them; over targets, a one-sided Wilcoxon signed-rank test of the
excess.
The settings are those of ``benchmarks/bench_transfer_report.py --seeds 0`` (see
docs/transfer.md for the measured numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import make_config
from oncoslide.transfer import build_zoo, transfer_matrix
from oncoslide.transfer.report import transfer_report

pytestmark = pytest.mark.slow


def test_router_weights_concentrate_on_same_family_sources(tmp_path: Path) -> None:
    sim = simulate_cohort(tmp_path / "pan", make_simulation_config("pan-cancer"))
    cohort = load_cohort(sim.cohort_table, sim.features_dir)
    config = make_config(task="survival", model="abmil", epochs=12, n_boot=0, progress=False)
    zoo, _ = build_zoo(cohort, config, tmp_path / "zoo", by="cohort", min_patients=100)
    assert len(zoo.cancers) == 5
    transfer_matrix(zoo, cohort, tmp_path / "tm", n_boot=100)
    cancers = sorted(cohort.patients["cohort"].astype(str).unique())
    raw = {
        "name": "router", "cohort": str(sim.cohort_table), "folds": 5, "seeds": [0],
        "n_boot": 1000,
        "feature_sets": [{"name": "sim", "features": str(sim.features_dir)}],
        "tasks": [{"name": f"os-{c}", "kind": "survival", "filter": {"cohort": [c]}}
                  for c in cancers],
        "models": [{"name": "roupkt", "protocol": "mil", "model": "roupkt", "train": {"epochs": 12},
                    "kwargs": {"experts": str(tmp_path / "zoo"), "exclude": "auto"}}],
    }  # fmt: skip
    run = run_benchmark(spec_from_dict(raw), tmp_path / "bench", workers=0, progress=False)
    assert not run.failures, run.failures
    report = transfer_report(tmp_path / "tm", tmp_path / "report", bench=tmp_path / "bench",
                             world=sim.out_dir)  # fmt: skip
    c = report.summary["concentration"]
    print(report.summary_text())
    print(report.concentration.round(3).to_string())
    # every target but SIM-C (whose family members are too small for the zoo) has one
    assert c["n_targets"] == 8
    assert c["mean_same_share"] > c["mean_uniform_share"]
    assert c["wilcoxon_p"] < 0.05
