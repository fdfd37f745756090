"""Slow: every preset at its documented default size, from the command line, holds its truths.

The numbers are the simulator's oracle scores in truth.json (computed from the latents and patch
labels, never from a trained model); tests/simulate/test_world_v2.py recomputes them with
independent tools on the same worlds with fewer feature dimensions. About a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oncoslide.cli import app

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "preset", ["demo", "pan-cancer", "spatial", "histogenomic", "site-shift", "hierarchical"]
)
def test_preset_at_default_size_holds_its_truth(preset: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", str(tmp_path), "--preset", preset])
    assert result.exit_code == 0, result.output
    s = json.loads((tmp_path / "truth.json").read_text())["summary"]
    if preset == "demo":  # the first simulator's default world, unchanged
        assert (s["oracle_c_index"], s["oracle_auc_msi"], s["n_patches"]) == (0.8257, 0.9033, 52050)
    if preset == "pan-cancer":
        assert s["oracle_transfer_spearman"] >= 0.8
        sizes = list(s["cohort_sizes"].values())
        assert max(sizes) >= 390 and min(sizes) <= 30
    if preset == "spatial":
        assert s["oracle_c_index_composition"] <= 0.55
        assert s["oracle_c_index_interface"] >= 0.70
        assert s["oracle_c_index_interface_readout"] >= 0.68
        assert s["oracle_auc_inflamed"] >= 0.8
    if preset == "histogenomic":
        assert s["oracle_c_index_omics"] - s["oracle_c_index_wsi"] >= 0.05
    if preset == "site-shift":
        shift = s["site_shift"]
        source, shifted = shift["source_sites"], shift["shifted_sites"]
        assert source["nearest_centre_accuracy"] - shifted["nearest_centre_accuracy"] > 0.2
        loss = {
            k: v["reader_c_index_true_labels"] - v["reader_c_index_as_seen"]
            for k, v in shift.items()
            if k != "nearest_centre_accuracy"
        }
        assert loss["shifted_sites"] > loss["source_sites"] + 0.03
    if preset == "hierarchical":
        assert s["oracle_auc_histology_coarse"] >= 0.8 and s["oracle_auc_histology_fine"] >= 0.8
