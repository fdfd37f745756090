"""Running benchmarks: cells, protocols, resuming, executors, and a killed run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from oncoslide.bench.protocols import CellRunner, plan_cells
from oncoslide.bench.resolve import resolve_bench
from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.bench.store import ResultStore
from oncoslide.evaluation.classification import roc_auc
from oncoslide.survival.metrics import concordance_index_censored


def _linear_only(spec: dict[str, Any]) -> dict[str, Any]:
    spec["models"] = [m for m in spec["models"] if m["protocol"] == "linear"]
    return spec


def test_cell_keys_are_stable_and_only_new_cells_are_new(bench_data: Path, small_spec: Any) -> None:
    raw = small_spec(bench_data)
    cells = plan_cells(resolve_bench(spec_from_dict(raw)))
    assert len(cells) == 2 * 2 * 2 * 3  # feature sets x tasks x models x folds
    assert len({c.key for c in cells}) == len(cells)
    again = plan_cells(resolve_bench(spec_from_dict(small_spec(bench_data))))
    assert [c.key for c in again] == [c.key for c in cells]
    # another model adds its cells and leaves every existing key as it was
    raw["models"].append({"name": "abmil", "protocol": "mil", "train": {"epochs": 1}})
    more = plan_cells(resolve_bench(spec_from_dict(raw)))
    assert {c.key for c in cells} < {c.key for c in more}
    assert len(more) - len(cells) == 2 * 2 * 3
    # a change that alters a model's numbers gives that model new keys
    raw["models"][1]["train"]["epochs"] = 3
    changed = plan_cells(resolve_bench(spec_from_dict(raw)))
    old_mean = {c.key for c in cells if c.model == "meanpool"}
    assert not old_mean & {c.key for c in changed}


def test_linear_protocol_scores_what_it_predicts_and_respects_exclusions(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str})
    seen = table["patient_id"].drop_duplicates().iloc[::4].tolist()
    (tmp_path / "seen.csv").write_text("patient_id\n" + "\n".join(seen) + "\n")
    raw = _linear_only(small_spec(bench_data))
    raw["feature_sets"][0]["exclude"] = str(tmp_path / "seen.csv")
    bench = resolve_bench(spec_from_dict(raw))
    runner = CellRunner(bench)
    try:
        for cell in plan_cells(bench):
            if cell.feature_set != "real":
                continue
            rec = runner.run(cell)
            test = bench.tasks[cell.task].splits.query(
                "seed == @cell.seed and fold == @cell.fold and part == 'test'"
            )["patient_id"]
            expected = sorted(set(test) - set(seen))
            assert sorted(rec.predictions["patient_id"]) == expected
            assert rec.info["n_excluded"] == len(set(test) & set(seen)) > 0
            p = rec.predictions
            if cell.task == "os":
                c = concordance_index_censored(
                    p["event"].to_numpy().astype(bool), p["time"].to_numpy(), p["risk"].to_numpy()
                ).cindex
                assert rec.metrics["c_index"] == pytest.approx(c, abs=1e-12)
                assert rec.info["alpha"] > 0
            else:
                probs = p[["prob_0", "prob_1"]].to_numpy()
                assert np.allclose(probs.sum(axis=1), 1)
                auc = roc_auc(p["label"].astype(int).to_numpy(), probs, classes=[0, 1])
                assert rec.metrics["auc"] == pytest.approx(auc, abs=1e-12)
    finally:
        runner.close()


def _finished_cells(db: Path) -> int:
    """Cells in a store another process is writing: 0 until its schema exists."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("select count(*) from cells").fetchone()[0])
    except sqlite3.OperationalError:  # created but without tables yet, or locked
        return 0


def _counts(db: Path) -> tuple[int, int, int]:
    with sqlite3.connect(db) as conn:
        cells = conn.execute("select count(*) from cells").fetchone()[0]
        dup = conn.execute(
            "select count(*) from (select cell_key, patient_id, count(*) c from predictions "
            "group by cell_key, patient_id having c > 1)"
        ).fetchone()[0]
        dup += conn.execute(
            "select count(*) from (select cell_key, metric, count(*) c from metrics "
            "group by cell_key, metric having c > 1)"
        ).fetchone()[0]
        orphans = conn.execute(
            "select count(*) from predictions where cell_key not in (select cell_key from cells)"
        ).fetchone()[0]
    return cells, dup, orphans


def test_run_resume_and_add_a_model(bench_data: Path, small_spec: Any, tmp_path: Path) -> None:
    raw = small_spec(bench_data)
    raw["models"] = [raw["models"][0]]  # linear only: quick
    out = tmp_path / "bench"
    first = run_benchmark(spec_from_dict(raw), out, workers=0, progress=False)
    assert (first.n_cells, first.n_ran, first.failures) == (12, 12, [])
    assert (out / "splits" / "os.csv").exists() and (out / "bench.json").exists()
    again = run_benchmark(spec_from_dict(raw), out, workers=0, progress=False)
    assert (again.n_already_done, again.n_ran) == (12, 0)
    raw["models"].append({"name": "linear-max", "protocol": "linear", "pooling": "max"})
    more = run_benchmark(spec_from_dict(raw), out, workers=0, progress=False)
    assert (more.n_already_done, more.n_ran) == (12, 12)
    assert _counts(out / "results.sqlite") == (24, 0, 0)
    with ResultStore.in_dir(out) as store:
        preds = store.predictions(task="os")
        assert len(store.get_meta("plan")) == 24
    # each patient tested once per (entry, seed)
    assert not preds.duplicated(["feature_set", "model", "seed", "patient_id"]).any()


def test_a_failing_cell_is_reported_and_the_rest_go_on(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    raw = _linear_only(small_spec(bench_data))
    raw["models"].append(
        {"name": "bad", "protocol": "mil", "model": "abmil", "kwargs": {"no_such_option": 1}}
    )
    run = run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=0, progress=False)
    assert run.n_ran == 12 and len(run.failures) == 12
    assert all("bad" in f["cell"] for f in run.failures)
    assert "no_such_option" in run.failures[0]["error"]
    assert (tmp_path / "b" / "failures.csv").exists()


def test_bench_run_into_a_file_writes_a_line_per_cell_and_run_log(
    bench_data: Path, small_spec: Any, write_spec: Any, tmp_path: Path
) -> None:
    """`oncoslide bench run ... > log 2>&1` with worker processes: the driver writes a line per
    finished cell (score or failure, done/total) to the file and to OUT/run.log."""
    raw = _linear_only(small_spec(bench_data))
    raw["tasks"] = raw["tasks"][:1]
    raw["models"].append(
        {"name": "bad", "protocol": "mil", "model": "abmil", "kwargs": {"no_such_option": 1}}
    )
    spec = write_spec(tmp_path / "spec.yaml", raw)
    out, log = tmp_path / "bench", tmp_path / "log"
    cmd = [sys.executable, "-m", "oncoslide.cli", "bench", "run", str(spec), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    with log.open("w") as fh:
        code = subprocess.run(
            [*cmd, "--workers", "1"], stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=600
        ).returncode
    text = log.read_text()
    assert code == 1, text  # the bad model's cells failed
    with ResultStore.in_dir(out) as store:
        done = store.cells()
    cells = plan_cells(resolve_bench(spec_from_dict(raw)))
    assert len(cells) == 12 and len(done) == 6
    saved = (out / "run.log").read_text()
    for cell in cells:
        ok = cell.model == "linear"
        line = f"{cell.label}: c_index " if ok else f"{cell.label}: failed: "
        # once: in the lines view the library's own failure message is not printed as well
        assert text.count(cell.label) == 1 and text.count(line) == 1, (cell.label, text)
        assert saved.count(line) == 1
    for index in range(1, 13):
        assert text.count(f"[{index}/12] ") == 1
    assert "==== benchmark tiny" in saved and "finished: 6 cell(s) run, 6 failed" in saved
    assert text.index("finished: 6 cell(s) run") < text.index("12 cells: 0 already done")
    assert "━" not in text and "\x1b" not in text
    # a second invocation appends to the same run.log
    subprocess.run([*cmd, "--workers", "0", "--no-progress"], env=env, capture_output=True)
    again = (out / "run.log").read_text()
    assert again.startswith(saved) and again.count("==== benchmark tiny") == 2


def test_local_process_pool_gives_the_same_results_as_inline(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    raw = _linear_only(small_spec(bench_data))
    raw["tasks"] = raw["tasks"][:1]
    run_benchmark(spec_from_dict(raw), tmp_path / "inline", workers=0, progress=False, gpus=[])
    # device numbers that need not exist: the placement is observable without a GPU
    pooled = run_benchmark(
        spec_from_dict(raw), tmp_path / "pool", workers=2, progress=False, gpus=[5, 7]
    )
    assert pooled.n_ran == 6 and not pooled.failures
    with ResultStore.in_dir(tmp_path / "inline") as a, ResultStore.in_dir(tmp_path / "pool") as b:
        ma = a.metrics().sort_values(["cell_key", "metric"]).reset_index(drop=True)
        mb = b.metrics().sort_values(["cell_key", "metric"]).reset_index(drop=True)
        pooled_devices = {info["cuda_visible_devices"] for info in b.cells()["info"]}
        inline_devices = {info["cuda_visible_devices"] for info in a.cells()["info"]}
    pd.testing.assert_frame_equal(ma, mb)
    # each worker is pinned to one of the given devices; cells rarely all go to one worker
    assert pooled_devices <= {"5", "7"} and pooled_devices
    assert inline_devices == {os.environ.get("CUDA_VISIBLE_DEVICES")}


@pytest.mark.usefixtures("one_ray_instance")
def test_ray_executor_on_a_local_instance(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    raw = _linear_only(small_spec(bench_data))
    raw["tasks"] = raw["tasks"][1:]
    run_benchmark(spec_from_dict(raw), tmp_path / "inline", workers=0, progress=False)
    # one logical GPU (no hardware needed): cells asking for half of it are given device 0
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run = run_benchmark(
            spec_from_dict(raw), tmp_path / "ray", executor="ray", gpus_per_cell=0.5, progress=False
        )
    finally:
        ray.shutdown()
    assert run.n_ran == 6 and not run.failures
    with ResultStore.in_dir(tmp_path / "inline") as a, ResultStore.in_dir(tmp_path / "ray") as b:
        assert a.done_keys() == b.done_keys()
        assert {info["cuda_visible_devices"] for info in b.cells()["info"]} == {"0"}
        pa = a.predictions().sort_values(["cell_key", "patient_id"]).reset_index(drop=True)
        pb = b.predictions().sort_values(["cell_key", "patient_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(pa, pb)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_killed_run_resumes_without_duplicates(
    bench_data: Path, small_spec: Any, write_spec: Any, tmp_path: Path
) -> None:
    raw = small_spec(bench_data)
    raw["models"] = [raw["models"][1]]  # mil mean pooling: a few seconds per cell
    raw["models"][0]["train"]["epochs"] = 4
    spec = write_spec(tmp_path / "spec.yaml", raw)
    out = tmp_path / "bench"
    db = out / "results.sqlite"
    cmd = [sys.executable, "-m", "oncoslide.cli", "bench", "run", str(spec), "--out", str(out)]
    cmd += ["--workers", "1"]
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if _finished_cells(db) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert workers, "the local executor runs cells in worker processes"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers must not outlive it
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "orphaned worker processes"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    n_cells, dup, orphans = _counts(db)
    assert 2 <= n_cells < 12 and dup == 0 and orphans == 0
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{n_cells} already done, {12 - n_cells} run now" in " ".join(done.stdout.split())
    assert _counts(db) == (12, 0, 0)


def test_workers_take_gpus_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    from oncoslide.bench import runner

    monkeypatch.setattr(runner, "_die_with_parent", lambda: None)
    monkeypatch.setattr(runner, "CellRunner", lambda *a, **k: None)
    # _init_worker sets the variable in this process: put back what was there afterwards
    original = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        started = multiprocessing.get_context("spawn").Value("i", 0)
        seen = []
        for _ in range(5):
            runner._init_worker(None, Path("."), 1.0, 1, (2, 3), started)  # type: ignore[arg-type]
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        assert seen == ["2", "3", "2", "3", "2"]
        del os.environ["CUDA_VISIBLE_DEVICES"]
        runner._init_worker(None, Path("."), 1.0, 1, (), started)  # type: ignore[arg-type]
        assert "CUDA_VISIBLE_DEVICES" not in os.environ  # no GPUs given: nothing is hidden
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        if original is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = original
    assert runner.default_workers((0, 1, 2)) == 3 and runner.default_workers(()) >= 1


def test_a_multiclass_task_runs_through_both_protocols_and_the_leaderboard(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    from oncoslide.bench.report import build_leaderboard

    raw = small_spec(bench_data)
    raw["feature_sets"] = raw["feature_sets"][:1]
    raw["tasks"] = [{"name": "subtype", "kind": "multiclass", "target": "subtype"}]
    run = run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=0, progress=False)
    assert run.n_ran == 2 * 3 and not run.failures
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str})
    classes = sorted(table["subtype"].unique())
    assert len(classes) >= 3
    with ResultStore.in_dir(tmp_path / "b") as store:
        preds, metrics = store.predictions(task="subtype"), store.metrics(task="subtype")
    prob_cols = [f"prob_{c}" for c in classes]
    assert np.allclose(preds[prob_cols].to_numpy(float).sum(axis=1), 1.0)
    for key, cell in preds.groupby("cell_key"):
        auc = roc_auc(cell["label"].to_numpy(), cell[prob_cols].to_numpy(float), classes=classes)
        stored = metrics[(metrics["cell_key"] == key) & (metrics["metric"] == "auc")]["value"]
        assert stored.iloc[0] == pytest.approx(auc, abs=1e-12)
    board = build_leaderboard(tmp_path / "b", n_boot=100)
    scores = board.data.scores
    assert set(scores["metric"]) == {"auc"} and len(scores) == 2
    assert (
        scores["lower"].le(scores["estimate"]).all()
        and scores["estimate"].le(scores["upper"]).all()
    )
    assert "subtype" in board.html_path.read_text()


def test_unusable_feature_files_leave_their_patients_out_of_that_feature_set(
    bench_data: Path, small_spec: Any, tmp_path: Path
) -> None:
    import shutil

    from oncoslide.errors import CohortValidationError

    real = tmp_path / "real"
    shutil.copytree(bench_data / "features", real)
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    single = table.groupby("patient_id").filter(lambda g: len(g) == 1)
    broken = single.iloc[:2]
    (real / f"{broken['slide_id'].iloc[0]}.h5").write_bytes(b"corrupt")
    (real / f"{broken['slide_id'].iloc[1]}.h5").unlink()
    lost = set(broken["patient_id"])
    raw = _linear_only(small_spec(bench_data))
    raw["feature_sets"][0]["features"] = str(real)
    run = run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=0, progress=False)
    assert not run.failures and run.n_ran == 12
    assert any("real: 2 slide(s) left out for unusable features" in n for n in run.notes)
    with ResultStore.in_dir(tmp_path / "b") as store:
        preds = store.predictions()
        tasks = store.get_meta("tasks")
    by_set = preds.groupby("feature_set")["patient_id"].apply(set)
    assert not by_set["real"] & lost and lost <= by_set["shuffled"]
    assert by_set["real"] | lost == by_set["shuffled"]  # same splits, minus the lost ones
    assert all("real: 2 patient(s) without usable features" in t["excluded"] for t in tasks)
    # the strict policy refuses to run and lists both files
    raw["bad_features"] = "error"
    with pytest.raises(CohortValidationError) as info:
        resolve_bench(spec_from_dict(raw))
    assert all(sid in str(info.value) for sid in broken["slide_id"])


def test_survival_cells_store_the_median_risk_of_their_training_part(
    bench_data: Path, small_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linear cells: the threshold is the median of the fitted Cox model's risks on the
    training part, recomputed here from embeddings read with h5py; mil cells pass on the one
    ``train_fold`` computed. Both survive the store."""
    import h5py

    from oncoslide.bench.store import ResultStore
    from oncoslide.survival import coxnet

    fitted: list[Any] = []
    fit_select_alpha = coxnet.fit_select_alpha

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = fit_select_alpha(*args, **kwargs)
        fitted.append(out[0])
        return out

    monkeypatch.setattr(coxnet, "fit_select_alpha", spy)
    raw = small_spec(bench_data)
    raw["feature_sets"] = raw["feature_sets"][:1]
    raw["tasks"] = [t for t in raw["tasks"] if t["kind"] == "survival"]
    bench = resolve_bench(spec_from_dict(raw))
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str, "slide_id": str})

    def embedding(patient: str) -> np.ndarray:  # the mean of every patch of the patient
        slides = table.loc[table["patient_id"] == patient, "slide_id"]
        parts = []
        for slide in slides:
            with h5py.File(bench_data / "features" / f"{slide}.h5", "r") as f:
                parts.append(np.asarray(f["features"], dtype=np.float32))
        return np.concatenate(parts).mean(axis=0).astype(np.float64)

    splits = bench.tasks["os"].splits
    runner = CellRunner(bench)
    records, gaps = [], []
    try:
        for cell in plan_cells(bench):
            if cell.protocol == "mil" and cell.fold != 0:
                continue  # one mil cell is enough
            rec = runner.run(cell)
            records.append(rec)
            threshold = rec.predictions["risk_threshold"].to_numpy()
            assert np.isfinite(threshold).all() and (threshold == threshold[0]).all()
            if cell.protocol == "mil":
                continue
            part = splits.query("seed == @cell.seed and fold == @cell.fold")
            train = part.loc[part["part"] == "train", "patient_id"].tolist()
            val = part.loc[part["part"] == "val", "patient_id"].tolist()
            model = fitted[-1]
            train_risk = model.predict(np.stack([embedding(p) for p in train]))
            assert threshold[0] == pytest.approx(np.median(train_risk), rel=1e-5, abs=1e-8)
            # not the median of the test fold, nor of train + validation (may coincide by chance)
            fit_risk = model.predict(np.stack([embedding(p) for p in train + val]))
            gaps.append(
                [abs(threshold[0] - np.median(r)) for r in (rec.predictions["risk"], fit_risk)]
            )
    finally:
        runner.close()
    assert len(gaps) == 3 and (np.array(gaps) > 1e-6).any(axis=0).all()
    with ResultStore(tmp_path / "results.sqlite") as store:
        for rec in records:
            store.record_cell(rec)
        back = store.predictions(task="os").set_index(["cell_key", "patient_id"]).sort_index()
    for rec in records:
        want = rec.predictions.set_index("patient_id")["risk_threshold"].sort_index()
        got = back.loc[rec.cell_key, "risk_threshold"].sort_index()
        np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_bench_threads_per_worker_default_to_cores_over_workers(
    bench_data: Path, small_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from oncoslide import _threads
    from oncoslide.bench import runner
    from oncoslide.errors import ConfigError

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads, "usable_cores", lambda: 6)
    raw = small_spec(bench_data)
    raw["models"] = [raw["models"][0]]  # linear only: quick
    raw["tasks"] = raw["tasks"][:1]
    raw["feature_sets"] = raw["feature_sets"][:1]
    handed: list[int | None] = []

    def pool(bench: Any, cells: Any, work: Any, workers: int, cache: Any, gpus: Any, threads: Any):
        handed.append(threads)
        return iter(())

    monkeypatch.setattr(runner, "_run_pool", pool)
    run_benchmark(spec_from_dict(raw), tmp_path / "a", workers=4, progress=False)
    run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=2, progress=False)
    run_benchmark(spec_from_dict(raw), tmp_path / "c", workers=4, num_threads=3, progress=False)
    assert handed == [1, 3, 3]  # 6 cores over 4 workers, over 2, and an explicit value
    assert "4 worker(s) x 1 thread(s)" in (tmp_path / "a" / "run.log").read_text()

    # in this process (workers=0): every cell runs on the resolved or the explicit value
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
        done = run_benchmark(spec_from_dict(raw), tmp_path / "d", workers=0, progress=False)
        assert done.n_ran == 3 and torch.get_num_threads() == 2
        run_benchmark(spec_from_dict(raw), tmp_path / "e", workers=0, num_threads=1, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert runner.default_workers(()) == 1  # one worker per 4 usable cores
    with pytest.raises(ConfigError, match="at least 1"):
        run_benchmark(spec_from_dict(raw), tmp_path / "f", workers=2, num_threads=0)
