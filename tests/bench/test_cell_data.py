"""Benchmark cells are keyed by their data too: cells whose feature files were replaced in
place, or whose targets were edited, run again; NaN features leave their slide out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.bench.store import ResultStore


def _linear_spec(small_spec: Any, data: Path, features: Path, table: Path) -> dict[str, Any]:
    raw = small_spec(data)
    raw["cohort"] = str(table)
    raw["models"] = [m for m in raw["models"] if m["protocol"] == "linear"]
    raw["feature_sets"] = [{"name": "real", "features": str(features)}]
    raw["tasks"] = [raw["tasks"][0]]  # survival only: 3 cells
    return raw


def _risks(out: Path) -> pd.Series:
    with ResultStore.in_dir(out) as store:
        preds = store.predictions()
    return preds.set_index(["seed", "fold", "patient_id"])["risk"].sort_index()


def test_cells_rerun_when_features_are_replaced_in_place(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    features = tmp_path / "features"
    shutil.copytree(bench_data / "features", features)
    table = tmp_path / "cohort.csv"
    shutil.copy(bench_data / "cohort.csv", table)
    spec = spec_from_dict(_linear_spec(small_spec, bench_data, features, table))
    out = tmp_path / "bench"
    first = run_benchmark(spec, out, workers=0, progress=False)
    assert (first.n_cells, first.n_ran) == (3, 3)
    before = _risks(out)
    assert run_benchmark(spec, out, workers=0, progress=False).n_ran == 0  # same data: reused

    # every feature file replaced in place by other values (same names, same shapes)
    rng = np.random.default_rng(0)
    for path in features.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f["features"][...] = rng.normal(size=f["features"].shape).astype(np.float32)
    again = run_benchmark(spec, out, workers=0, progress=False)
    assert (again.n_already_done, again.n_ran) == (0, 3)
    assert any("computed on other data" in n for n in again.notes)
    after = _risks(out)
    assert len(after) == len(before) and not np.allclose(after.to_numpy(), before.to_numpy())

    # an edited outcome changes the cells' data too
    edited = pd.read_csv(table)
    edited.loc[0, "time"] = edited.loc[0, "time"] + 50.0
    edited.to_csv(table, index=False)
    third = run_benchmark(spec, out, workers=0, progress=False)
    assert third.n_ran == 3
    with ResultStore.in_dir(out) as store:
        assert len(store.cells()) == 3  # replaced, not added


def test_nan_features_leave_that_slide_out_of_the_feature_set(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    features = tmp_path / "features"
    shutil.copytree(bench_data / "features", features)
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    single = table.groupby("patient_id").filter(lambda g: len(g) == 1)
    slide, patient = single["slide_id"].iloc[0], single["patient_id"].iloc[0]
    with h5py.File(features / f"{slide}.h5", "r+") as f:
        f["features"][1, 3] = np.nan
    raw = _linear_spec(small_spec, bench_data, features, bench_data / "cohort.csv")
    run = run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=0, progress=False)
    assert not run.failures and run.n_ran == 3
    assert any("1 slide(s) left out" in n for n in run.notes), run.notes
    with ResultStore.in_dir(tmp_path / "b") as store:
        preds = store.predictions()
    assert patient not in set(preds["patient_id"])
    assert preds["patient_id"].nunique() == table["patient_id"].nunique() - 1
