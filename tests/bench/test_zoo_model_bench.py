"""benchmarks/bench_zoo_model.py's ``--familiar-only`` diagnostic: the target slides cut down
to the patches of morphologies the source's cancer has (the world's patch labels), then scored
as the transfer matrix scores them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pandas as pd
import pytest

from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import make_config
from oncoslide.transfer import build_zoo, load_zoo, transfer_matrix
from oncoslide.transfer.report import _prototype_sets


@pytest.fixture(scope="module")
def small_pan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three cancers in two prognostic families, a zoo of 1-epoch ABMIL models."""
    out = tmp_path_factory.mktemp("pan-small")
    settings = {"n_patients": 90, "n_cohorts": 3, "cohort_size_ratio": 2.0,
                "prognosis_families": 2, "feature_dim": 16, "patches_median": 12,
                "patches_min": 6, "seed": 2}  # fmt: skip
    simulate_cohort(out / "world", make_simulation_config("pan-cancer", settings))
    cohort = load_cohort(out / "world" / "cohort.csv", out / "world" / "features")
    config = make_config(task="survival", folds=2, epochs=1, n_boot=0, progress=False,
                         model_kwargs={"hidden_dim": 16, "attn_dim": 8})  # fmt: skip
    build_zoo(cohort, config, out / "zoo", by="cohort", min_patients=20)
    return out / "world", out / "zoo"


def test_each_source_scores_only_the_morphologies_it_met(
    benchmark_script: Callable[[str], ModuleType], small_pan: tuple[Path, Path], tmp_path: Path
) -> None:
    bench = benchmark_script("bench_zoo_model")
    world, zoo_dir = small_pan
    zoo = load_zoo(zoo_dir)
    cells = bench.familiar_only_cells(world, zoo, tmp_path)
    cancers = sorted(pd.read_csv(world / "cohort.csv")["cohort"].unique())
    assert sorted(zip(cells["source"], cells["target"], strict=True)) == sorted(
        (s, t) for s in zoo.cancers for t in cancers if s != t
    )
    assert np.isfinite(cells["c_index"]).all() and not cells["diagonal"].any()
    truth = json.loads((world / "truth.json").read_text())
    labels = np.load(world / "truth_patch_labels.npz")
    names = {int(p["index"]): str(p["name"]) for p in truth["prototypes"]}
    members = _prototype_sets(truth)
    for source in zoo.cancers:
        known = [i for i, n in names.items() if n in members[source]]
        dropped = 0
        for path in sorted((world / "features").glob("*.h5")):
            keep = np.isin(labels[path.stem], known)
            keep = keep if keep.any() else np.ones_like(keep)
            with h5py.File(path) as full, h5py.File(tmp_path / source / path.name) as cut:
                for key in ("features", "coords"):
                    np.testing.assert_array_equal(cut[key][()], full[key][()][keep])
                    assert dict(cut[key].attrs).keys() == dict(full[key].attrs).keys()
            dropped += int((~keep).sum())
        assert dropped > 0  # other cancers' own tissue, the other family's tumours


def test_with_nothing_left_out_the_cells_are_the_matrix(
    benchmark_script: Callable[[str], ModuleType],
    small_pan: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every morphology counted as met: the cut slides are the slides, and each cell equals the
    transfer matrix's (the scoring half of the diagnostic is the matrix's)."""
    bench = benchmark_script("bench_zoo_model")
    world, zoo_dir = small_pan
    truth = json.loads((world / "truth.json").read_text())
    everything = {str(p["name"]) for p in truth["prototypes"]}
    monkeypatch.setattr(bench, "_prototype_sets", lambda t: dict.fromkeys(
        t["prognosis"]["similarity"], everything))  # fmt: skip
    zoo = load_zoo(zoo_dir)
    cells = bench.familiar_only_cells(world, zoo, tmp_path / "cut")
    cohort = load_cohort(world / "cohort.csv", world / "features")
    matrix = transfer_matrix(zoo, cohort, tmp_path / "tm", n_boot=1).cells
    off = matrix[~matrix["diagonal"]].set_index(["source", "target"])["c_index"]
    got = cells.set_index(["source", "target"])["c_index"]
    pd.testing.assert_series_equal(got.sort_index(), off.sort_index(), check_exact=False, rtol=1e-9)


def test_over_worlds_judges_b_per_model_by_hand(
    benchmark_script: Callable[[str], ModuleType],
) -> None:
    bench = benchmark_script("bench_zoo_model")
    rows = pd.DataFrame(
        {
            "seed": [0, 1, 2, 0, 1, 2],
            "model": ["abmil"] * 3 + ["mean"] * 3,
            "spearman": [0.6, 0.7, 0.8, 0.5, 0.5, 0.8],
            "learned_c_index": [0.7, 0.8, 0.9, 0.7, 0.8, 0.9],
            "zoo_cv_c": [0.7] * 6,
        }
    )
    table = bench.over_worlds(rows).set_index("model")
    # abmil: mean 0.7, sd 0.1, t(0.975, 2) = 4.3027 -> half width 0.1 * 4.3027 / sqrt(3)
    half = 0.1 * 4.302652729911275 / np.sqrt(3)
    assert table.at["abmil", "spearman"] == pytest.approx(0.7)
    assert table.at["abmil", "spearman_lower"] == pytest.approx(0.7 - half)
    assert table.at["abmil", "spearman_upper"] == pytest.approx(0.7 + half)
    assert table.at["abmil", "worlds_at_threshold"] == 2  # 0.7 counts
    assert table.at["mean", "worlds_at_threshold"] == 1
    assert table.at["mean", "spearman"] == pytest.approx(0.6)
    assert table.at["abmil", "learned_c_index"] == pytest.approx(0.8)
    assert "zoo_cv_c" not in table.columns and int(table.at["mean", "n_worlds"]) == 3
