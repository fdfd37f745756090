"""Presets, settings from files and the command line, determinism, and the v1 world kept intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.errors import ConfigError
from oncoslide.simulate import (
    PRESETS,
    SimulationConfig,
    list_presets,
    make_simulation_config,
    parse_assignments,
    simulate_cohort,
)

# Small worlds of every preset (seconds in all); the pan-cancer one keeps >= 2 per cancer.
SMALL = {"feature_dim": 8, "within_prototype_rank": 2, "patches_median": 12, "patches_min": 6}
SMALL_SIZES = {
    "demo": 30,
    "pan-cancer": 120,
    "spatial": 30,
    "histogenomic": 30,
    "site-shift": 30,
    "hierarchical": 30,
}
runner = CliRunner()


def test_presets_are_listed_and_described() -> None:
    names = list_presets()
    assert names == list(SMALL_SIZES)
    assert all(PRESETS[n].description for n in names)
    result = runner.invoke(app, ["simulate", "--list-presets"])
    assert result.exit_code == 0
    for name in names:
        assert name in result.output


def test_demo_preset_is_the_default_world() -> None:
    assert make_simulation_config("demo") == SimulationConfig()
    assert make_simulation_config() == SimulationConfig()


def test_v1_world_is_unchanged_by_the_v2_knobs(tmp_path: Path) -> None:
    """The demo world's figures, as the first simulator produced them (seed 0, 240 patients).

    Outcomes and bag sizes do not depend on the feature dimension, so a small one suffices.
    """
    sim = simulate_cohort(tmp_path, SimulationConfig(feature_dim=8, within_prototype_rank=2))
    recorded = {
        "event_rate": 0.5125,
        "msi_prevalence": 0.225,
        "n_patches": 52050,
        "n_slides": 299,
        "oracle_auc_msi": 0.9033,
        "oracle_auc_subtype": 0.8153,
        "oracle_c_index": 0.8257,
        "oracle_c_index_within_cohort": 0.8119,
    }
    assert {k: sim.summary[k] for k in recorded} == recorded
    truth = json.loads(sim.truth.read_text())
    assert {"spatial", "genomic_programme", "mutations", "site_shift", "hierarchy"}.isdisjoint(
        truth
    )
    assert sim.mutations_table is None and sim.label_tree is None and sim.site_transforms is None
    assert not (tmp_path / "mutations.csv").exists()


def test_settings_apply_in_order_preset_file_then_set(tmp_path: Path) -> None:
    spec = tmp_path / "world.yaml"
    spec.write_text("preset: spatial\nn_patients: 50\nseed: 3\ncohort_names: [LUAD]\n")
    cfg = make_simulation_config(settings={"seed": 4}, config_file=spec)
    assert cfg.interface_coupling == PRESETS["spatial"].settings["interface_coupling"]
    assert (cfg.n_patients, cfg.seed, cfg.cohort_names) == (50, 4, ("LUAD",))
    # an explicit preset wins over the file's
    spec.write_text("preset: spatial\nn_patients: 50\n")
    assert make_simulation_config("histogenomic", config_file=spec).genomic_signal > 0
    tree = make_simulation_config(
        "hierarchical", {"hierarchy_tree": {"a": ["a1", "a2"], "b": ["b1"]}}
    ).hierarchy_tree
    assert tree == (("a", ("a1", "a2")), ("b", ("b1",)))


def test_bad_settings_are_all_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        make_simulation_config(
            "demo", {"n_patient": 10, "omics_hidden": "high", "two_slide_fraction": True}
        )
    text = str(err.value)
    assert "3 problem" in text and "did you mean n_patients" in text
    assert "omics_hidden" in text and "two_slide_fraction" in text
    with pytest.raises(ConfigError, match="unknown simulation preset 'pancancer'"):
        make_simulation_config("pancancer")
    with pytest.raises(ConfigError) as err:
        parse_assignments(["n_patients=10", "oops", "=3"])
    assert "'oops' is not key=value" in str(err.value) and "'=3'" in str(err.value)
    assert parse_assignments(["a=1", "b=[1, 2]", "c=true", "d=x"]) == {
        "a": 1,
        "b": [1, 2],
        "c": True,
        "d": "x",
    }
    # range checks of the config itself still apply, every one listed
    with pytest.raises(ConfigError) as err:
        make_simulation_config("demo", {"omics_hidden": 2.0, "prognosis_families": 9})
    assert "omics_hidden" in str(err.value) and "prognosis_families" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        make_simulation_config(config_file=bad)
    with pytest.raises(ConfigError, match="not found"):
        make_simulation_config(config_file=tmp_path / "missing.yaml")


@pytest.mark.parametrize("preset", list(SMALL_SIZES))
def test_every_preset_is_byte_identical_for_a_seed(preset: str, tmp_path: Path) -> None:
    cfg = make_simulation_config(preset, {**SMALL, "n_patients": SMALL_SIZES[preset]})
    a = simulate_cohort(tmp_path / "a", cfg)
    b = simulate_cohort(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    for name in files:
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes(), name
    other = simulate_cohort(
        tmp_path / "c",
        make_simulation_config(preset, {**SMALL, "n_patients": SMALL_SIZES[preset], "seed": 1}),
    )
    assert other.cohort_table.read_bytes() != a.cohort_table.read_bytes()


def test_truth_holds_each_presets_planted_quantities(tmp_path: Path) -> None:
    expected = {
        "pan-cancer": ("prognosis",),
        "spatial": ("spatial",),
        "histogenomic": ("genomic_programme", "mutations"),
        "site-shift": ("site_shift",),
        "hierarchical": ("hierarchy",),
    }
    for preset, sections in expected.items():
        cfg = make_simulation_config(preset, {**SMALL, "n_patients": SMALL_SIZES[preset]})
        sim = simulate_cohort(tmp_path / preset, cfg)
        truth = json.loads(sim.truth.read_text())
        assert truth["version"] == 2 and truth["config"] == cfg.to_dict()
        for section in sections:
            assert truth.get(section), (preset, section)
    pan = json.loads((tmp_path / "pan-cancer" / "truth.json").read_text())["prognosis"]
    assert set(pan["similarity"]) == set(pan["families"]) and pan["oracle_transfer_c_index"]


def test_cli_simulate_with_preset_settings_and_file(tmp_path: Path) -> None:
    spec = tmp_path / "world.yaml"
    spec.write_text("n_patients: 24\nfeature_dim: 8\nwithin_prototype_rank: 2\n")
    out = tmp_path / "sim"
    result = runner.invoke(
        app,
        [
            "simulate",
            str(out),
            "--preset",
            "hierarchical",
            "--config",
            str(spec),
            "--set",
            "patches_median=10",
            "--set",
            "patches_min=5",
            "--seed",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "label tree" in result.output
    truth = json.loads((out / "truth.json").read_text())
    assert truth["config"]["n_patients"] == 24 and truth["config"]["seed"] == 2
    assert truth["config"]["hierarchical_labels"] is True
    assert (out / "label_tree.yaml").exists() and (out / "cohort_permuted.csv").exists()

    bad = runner.invoke(app, ["simulate", str(tmp_path / "x"), "--set", "n_patiens=3"])
    assert bad.exit_code == 2 and "n_patients" in bad.output
    missing = runner.invoke(app, ["simulate"])
    assert missing.exit_code == 2 and "OUT" in missing.output
    # an overwrite removes the optional files of the earlier world
    again = runner.invoke(
        app, ["simulate", str(out), "--config", str(spec), "--overwrite", "--no-permuted-copy"]
    )
    assert again.exit_code == 0, again.output
    assert not (out / "label_tree.yaml").exists() and not (out / "cohort_permuted.csv").exists()
