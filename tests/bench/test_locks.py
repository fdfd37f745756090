"""Two `bench run` on one folder share the work: each cell is computed once; a killed cell's
scratch folder is removed by the next run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from oncoslide.bench.locks import CellLocks
from oncoslide.bench.protocols import plan_cells
from oncoslide.bench.resolve import resolve_bench
from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.bench.store import ResultStore

RUN = """
import json, sys
from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import load_spec
run = run_benchmark(load_spec(sys.argv[1]), sys.argv[2], workers=0, progress=False)
print(json.dumps({"ran": run.n_ran, "elsewhere": run.n_elsewhere, "failed": len(run.failures)}))
"""

HOLD = """
import sys, time
from oncoslide.bench.locks import CellLocks
locks = CellLocks(sys.argv[1])
assert locks.try_claim(sys.argv[2])
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _spec(small_spec: Any, data: Path) -> dict[str, Any]:
    raw = small_spec(data)
    raw["feature_sets"] = raw["feature_sets"][:1]
    raw["tasks"] = raw["tasks"][:1]
    return raw


def test_two_runs_on_one_folder_compute_each_cell_once(
    bench_data: Path, small_spec: Any, write_spec: Any, tmp_path: Path
) -> None:
    raw = _spec(small_spec, bench_data)
    path = write_spec(tmp_path / "spec.yaml", raw)
    out = tmp_path / "bench"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, str(path), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    n_cells = len(plan_cells(resolve_bench(spec_from_dict(raw))))
    assert all(r["failed"] == 0 for r in results)
    assert sum(r["ran"] for r in results) == n_cells, results  # never computed twice
    with ResultStore.in_dir(out) as store:
        assert len(store.cells()) == n_cells


def test_a_cell_held_by_a_killed_run_is_computed_after_its_lock_goes(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    raw = _spec(small_spec, bench_data)
    raw["models"] = raw["models"][:1]  # linear: quick
    spec = spec_from_dict(raw)
    out = tmp_path / "bench"
    out.mkdir()
    cells = plan_cells(resolve_bench(spec))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), cells[0].key, "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    started = time.perf_counter()
    run = run_benchmark(spec, out, workers=0, progress=False)
    holder.wait(timeout=60)
    assert time.perf_counter() - started > 2  # it waited for the holder
    assert (run.n_ran, run.n_elsewhere, run.failures) == (len(cells), 0, [])


def test_scratch_folders_of_killed_cells_are_removed(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    raw = _spec(small_spec, bench_data)
    raw["models"] = raw["models"][:1]
    spec = spec_from_dict(raw)
    out = tmp_path / "bench"
    cells = plan_cells(resolve_bench(spec))
    left = out / "work" / f"cell-{cells[0].key}"
    (left / "checkpoints").mkdir(parents=True)
    legacy = out / "work" / "cell-1a2b3c4d-x8y7z6"  # the random names of earlier versions
    legacy.mkdir()
    held = out / "work" / ("cell-" + "f" * 20)  # a cell another live run is training
    held.mkdir()
    with CellLocks(out):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(out), "f" * 20, "30"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            run_benchmark(spec, out, workers=0, progress=False)
        finally:
            holder.kill()
            holder.wait()
    assert not left.exists() and not legacy.exists()
    assert held.exists()
