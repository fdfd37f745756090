"""The results store: round trips, exactly-once cells under concurrent writers, crash safety.

Row counts are checked with raw sqlite3 queries (not through the store), and stored values
against the planted frames they were written from.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from oncoslide.bench.store import (
    SCHEMA_VERSION,
    STORE_FILENAME,
    CellRecord,
    ResultStore,
    cell_key,
)
from oncoslide.errors import ConfigError

ID_COLUMNS = ["cell_key", "task", "feature_set", "model", "protocol", "seed", "fold"]
PATIENT_COLUMNS = ["patient_id", "time", "event", "label"]

# --------------------------------------------------------------------------- helpers


def _survival_frame(n: int, seed: int, first: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "patient_id": [f"P{i:04d}" for i in range(first, first + n)],
            "time": rng.exponential(20.0, n),
            "event": rng.integers(0, 2, n).astype(float),
            "label": None,
            "risk": rng.normal(size=n),
        }
    )


def _classification_frame(n: int, seed: int, classes: tuple[str, ...]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(classes)), n)
    frame = pd.DataFrame(
        {
            "patient_id": [f"P{i:04d}" for i in range(n)],
            "time": np.nan,
            "event": np.nan,
            "label": rng.choice(list(classes), n),
        }
    )
    for j, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, j]
    return frame


def _record(
    task: str,
    predictions: pd.DataFrame,
    *,
    model: str = "abmil",
    seed: int = 0,
    fold: int = 0,
    metrics: dict[str, float] | None = None,
    info: dict[str, Any] | None = None,
    key: str | None = None,
) -> CellRecord:
    config = {"task": task, "model": model, "seed": seed, "fold": fold, "lr": 1e-4}
    return CellRecord(
        cell_key=key or cell_key(config),
        task=task,
        feature_set="uni",
        model=model,
        protocol="mil",
        seed=seed,
        fold=fold,
        config=config,
        metrics=metrics if metrics is not None else {"auc": 0.7},
        predictions=predictions,
        seconds=12.5,
        info=info if info is not None else {"n_test": len(predictions)},
    )


def _raw_counts(path: Path) -> dict[str, int]:
    """Rows per table, read with plain sqlite3 (independent of the store's readers)."""
    with sqlite3.connect(path) as conn:
        return {
            table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("cells", "metrics", "predictions")
        }


def _spawn_context(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A spawn context whose children can import this test module by its pytest name."""
    # pytest (importlib mode) names this module after its path from the rootdir; a spawned
    # child imports it by that name, so the rootdir must be on the path the child inherits
    root = Path(__file__).resolve().parents[__name__.count(".")]
    monkeypatch.syspath_prepend(str(root))
    return mp.get_context("spawn")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    with ResultStore.in_dir(tmp_path / "out") as opened:
        yield opened


# --------------------------------------------------------------------------- round trips


def test_survival_cell_round_trip(store: ResultStore) -> None:
    planted = _survival_frame(30, seed=1)
    metrics = {"c_index": 0.71, "c_index_uno": 0.69, "td_auc": float("nan"), "ibs": 0.18}
    record = _record("os", planted, metrics=metrics, seed=2, fold=3)
    assert store.record_cell(record) is True

    got = store.predictions(task="os")
    assert list(got.columns) == [*ID_COLUMNS, *PATIENT_COLUMNS, "risk"]
    assert got.dtypes["seed"] == np.int64 and got.dtypes["fold"] == np.int64
    assert got.dtypes["time"] == np.float64 and got.dtypes["event"] == np.float64
    assert got.dtypes["label"] == np.dtype("O") and got.dtypes["patient_id"] == np.dtype("O")
    assert got["label"].map(lambda v: v is None).all()
    assert (got["cell_key"] == record.cell_key).all() and (got["seed"] == 2).all()
    assert (got["fold"] == 3).all() and (got["protocol"] == "mil").all()
    # rows come back sorted by patient id; values are bit-exact (REAL is a double)
    expected = planted.sort_values("patient_id").reset_index(drop=True)
    for column in ("patient_id", "time", "event", "risk"):
        assert got[column].tolist() == expected[column].tolist()

    tidy = store.metrics(task="os")
    assert list(tidy.columns) == [*ID_COLUMNS, "metric", "value"]
    values = dict(zip(tidy["metric"], tidy["value"], strict=True))
    assert set(values) == set(metrics)
    assert math.isnan(values["td_auc"])
    assert values["c_index"] == 0.71 and values["ibs"] == 0.18
    assert tidy.dtypes["value"] == np.float64


def test_classification_cells_round_trip(store: ResultStore) -> None:
    binary = _classification_frame(25, seed=3, classes=("neg", "pos"))
    multi = _classification_frame(40, seed=4, classes=("LumA", "LumB", "Basal"))
    multi.loc[5, ["prob_LumA", "prob_LumB", "prob_Basal"]] = np.nan  # a failed row stays NaN
    assert store.record_cell(_record("msi", binary, metrics={"auc": 0.8}))
    info = {"n_test": np.int64(40), "excluded": ["P9000", "P9001"], "path": Path("/x/y")}
    assert store.record_cell(_record("subtype", multi, info=info, metrics={"auc": 0.6}))

    got = store.predictions(task="subtype")
    # outputs sorted after the id columns (classes in sorted order, not the written order)
    assert list(got.columns) == [
        *ID_COLUMNS,
        *PATIENT_COLUMNS,
        "prob_Basal",
        "prob_LumA",
        "prob_LumB",
    ]
    assert got["time"].isna().all() and got["event"].isna().all()
    assert got.dtypes["time"] == np.float64 and got.dtypes["label"] == np.dtype("O")
    expected = multi.sort_values("patient_id").reset_index(drop=True)
    assert got["label"].tolist() == expected["label"].tolist()
    assert all(isinstance(v, str) for v in got["label"])
    for column in ("prob_Basal", "prob_LumA", "prob_LumB"):
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy())
    assert got.loc[got["patient_id"] == "P0005", "prob_LumA"].isna().all()

    cells = store.cells().set_index("task")
    assert cells.loc["subtype", "info"] == {
        "n_test": 40,
        "excluded": ["P9000", "P9001"],
        "path": "/x/y",
    }
    assert cells.loc["msi", "config"]["lr"] == 1e-4
    assert cells.loc["msi", "seconds"] == 12.5
    assert str(cells["finished_at"].dt.tz) == "UTC"

    # every task at once: the union of outputs, NaN where a cell does not have one
    everything = store.predictions()
    assert len(everything) == 65
    assert list(everything.columns)[-5:] == [
        "prob_Basal",
        "prob_LumA",
        "prob_LumB",
        "prob_neg",
        "prob_pos",
    ]
    assert everything.loc[everything["task"] == "msi", "prob_LumA"].isna().all()


def test_survival_and_classification_together_put_risk_first(store: ResultStore) -> None:
    store.record_cell(_record("os", _survival_frame(5, seed=1)))
    store.record_cell(_record("msi", _classification_frame(4, seed=2, classes=("a", "b"))))
    got = store.predictions()
    assert list(got.columns)[len(ID_COLUMNS) + 4 :] == ["risk", "prob_a", "prob_b"]
    assert got.loc[got["task"] == "msi", "risk"].isna().all()
    assert got.loc[got["task"] == "os", "prob_a"].isna().all()


def test_risk_threshold_round_trips_and_cells_without_it_still_load(
    store: ResultStore, tmp_path: Path
) -> None:
    # the training part's median risk rides along with every prediction of its cell
    with_threshold = _survival_frame(12, seed=1).assign(risk_threshold=0.1 + 2**-40)
    older = _survival_frame(8, seed=2, first=100)  # as written before the column existed
    assert store.record_cell(_record("os", with_threshold, fold=0))
    assert store.record_cell(_record("os", older, fold=1))
    got = store.predictions(task="os")
    assert list(got.columns) == [*ID_COLUMNS, *PATIENT_COLUMNS, "risk", "risk_threshold"]
    fold0 = got[got["fold"] == 0]
    assert fold0["risk_threshold"].tolist() == [0.1 + 2**-40] * 12  # bit-exact
    assert got.loc[got["fold"] == 1, "risk_threshold"].isna().all()
    expected = with_threshold.sort_values("patient_id")
    assert fold0["risk"].tolist() == expected["risk"].tolist()
    with sqlite3.connect(store.path) as conn:  # read back without the store's readers
        outputs = conn.execute(
            "SELECT outputs_json FROM predictions WHERE patient_id = 'P0000' AND cell_key = ?",
            (_record("os", with_threshold, fold=0).cell_key,),
        ).fetchone()[0]
    assert json.loads(outputs)["risk_threshold"] == 0.1 + 2**-40
    # a store holding only cells without the column reads as before
    with ResultStore(tmp_path / "old.sqlite") as old:
        old.record_cell(_record("os", older))
        assert list(old.predictions().columns) == [*ID_COLUMNS, *PATIENT_COLUMNS, "risk"]


def test_a_risk_threshold_must_be_one_finite_value_of_a_survival_cell(store: ResultStore) -> None:
    varying = _survival_frame(4, seed=1).assign(risk_threshold=[0.0, 0.0, 1.0, 0.0])
    missing = _survival_frame(4, seed=1).assign(risk_threshold=[0.0, np.nan, 0.0, 0.0])
    classification = _classification_frame(4, seed=1, classes=("a", "b")).assign(risk_threshold=0.0)
    for frame, needle in (
        (varying, "one finite value"),
        (missing, "one finite value"),
        (classification, "survival"),
    ):
        with pytest.raises(ConfigError, match="risk_threshold") as info:
            store.record_cell(_record("os", frame))
        assert needle in str(info.value)
    assert _raw_counts(store.path) == {"cells": 0, "metrics": 0, "predictions": 0}


def test_empty_store_gives_typed_empty_frames(store: ResultStore) -> None:
    predictions, metrics, cells = store.predictions(), store.metrics(), store.cells()
    assert list(predictions.columns) == [*ID_COLUMNS, *PATIENT_COLUMNS] and predictions.empty
    assert list(metrics.columns) == [*ID_COLUMNS, "metric", "value"] and metrics.empty
    assert predictions.dtypes["seed"] == np.int64 and metrics.dtypes["value"] == np.float64
    assert cells.empty and store.done_keys() == set() and len(store) == 0


def test_odd_class_names_survive(store: ResultStore) -> None:
    # a '"' cannot be quoted in an SQLite JSON path, so this goes through the Python reader
    frame = _classification_frame(6, seed=5, classes=('he said "x"', "b.c"))
    store.record_cell(_record("odd", frame))
    got = store.predictions()
    np.testing.assert_array_equal(got['prob_he said "x"'], frame['prob_he said "x"'])
    np.testing.assert_array_equal(got["prob_b.c"], frame["prob_b.c"])


# --------------------------------------------------------------------------- exactly once


def test_record_twice_writes_once(store: ResultStore) -> None:
    first = _record("os", _survival_frame(20, seed=1), metrics={"c_index": 0.6})
    second = _record("os", _survival_frame(20, seed=2), metrics={"c_index": 0.9})
    assert second.cell_key == first.cell_key
    assert store.record_cell(first) is True
    assert store.record_cell(second) is False
    assert _raw_counts(store.path) == {"cells": 1, "metrics": 1, "predictions": 20}
    assert store.metrics()["value"].tolist() == [0.6]  # the first write is kept
    assert first.cell_key in store and "nope" not in store and 3 not in store
    assert store.done_keys() == {first.cell_key} and len(store) == 1


def test_an_error_inside_the_transaction_writes_nothing(store: ResultStore) -> None:
    def fail(_: CellRecord) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C after the INSERTs, before COMMIT

    store.record_cell(_record("os", _survival_frame(4, seed=1), key="kept"))
    store._before_commit = fail
    with pytest.raises(KeyboardInterrupt):
        store.record_cell(_record("os", _survival_frame(9, seed=2), key="interrupted"))
    assert _raw_counts(store.path) == {"cells": 1, "metrics": 1, "predictions": 4}
    store._before_commit = None
    assert store.record_cell(_record("os", _survival_frame(9, seed=2), key="interrupted"))
    assert _raw_counts(store.path) == {"cells": 2, "metrics": 2, "predictions": 13}


def test_invalid_record_lists_every_problem_and_writes_nothing(store: ResultStore) -> None:
    frame = _classification_frame(6, seed=1, classes=("a", "b"))
    frame.loc[1, "patient_id"] = "P0000"  # duplicate patient
    frame.loc[2, "event"] = 2.0  # not 0/1
    frame.loc[3, "prob_a"] = 0.99  # row no longer sums to 1
    frame["extra"] = 1
    record = _record("msi", frame, metrics={"auc": "high"}, info={"s": {1, 2}})  # type: ignore[dict-item]
    with pytest.raises(ConfigError) as err:
        store.record_cell(record)
    message = str(err.value)
    for fragment in ("twice", "'event'", "sum to 1", "'extra'", "'auc'", "info.s"):
        assert fragment in message
    assert _raw_counts(store.path) == {"cells": 0, "metrics": 0, "predictions": 0}


def test_delete_cells_removes_everything_of_those_cells(store: ResultStore) -> None:
    records = [_record("os", _survival_frame(10, seed=i), fold=i) for i in range(3)]
    for record in records:
        store.record_cell(record)
    assert store.delete_cells([records[0].cell_key, records[0].cell_key, "unknown"]) == 1
    assert _raw_counts(store.path) == {"cells": 2, "metrics": 2, "predictions": 20}
    assert store.done_keys() == {records[1].cell_key, records[2].cell_key}
    assert store.record_cell(records[0]) is True  # a rerun writes it again
    assert _raw_counts(store.path)["predictions"] == 30


def test_meta_values(store: ResultStore) -> None:
    store.set_meta("spec", {"tasks": ["os"], "n": np.int64(3)})
    store.set_meta("spec", {"tasks": ["os", "msi"], "n": 4})
    assert store.get_meta("spec") == {"tasks": ["os", "msi"], "n": 4}
    assert store.get_meta("missing", default="d") == "d"
    assert store.get_meta("schema_version") == SCHEMA_VERSION
    with pytest.raises(ConfigError, match="reserved"):
        store.set_meta("schema_version", 2)


def test_pickled_store_reopens_the_same_file(store: ResultStore) -> None:
    store.record_cell(_record("os", _survival_frame(3, seed=1)))
    with pickle.loads(pickle.dumps(store)) as copy:
        assert copy.path == store.path and copy.done_keys() == store.done_keys()


def test_writing_a_cell_is_fast(store: ResultStore) -> None:
    records = [_record("os", _survival_frame(300, seed=i), fold=i) for i in range(20)]
    start = time.perf_counter()
    for record in records:
        store.record_cell(record)
    # a few ms per cell measured; the bound is generous for a loaded machine
    assert (time.perf_counter() - start) / len(records) < 0.05
    assert _raw_counts(store.path)["predictions"] == 6000


@pytest.mark.slow
def test_reading_many_cells_is_fast(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    ResultStore(path).close()
    with sqlite3.connect(path) as conn:  # 5,000 cells x 50 predictions, written raw
        cells = [
            (f"k{i:05d}", f"t{i % 4}", "fs", f"m{i % 7}", "mil", i % 5, i % 5, "{}", 1.0, "{}")
            for i in range(5000)
        ]
        conn.executemany(
            "INSERT INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,'[\"risk\"]','2026-01-01T00:00:00Z')",
            cells,
        )
        conn.executemany(
            "INSERT INTO predictions VALUES (?,?,1.0,0.0,NULL,?)",
            [(c[0], f"P{j:03d}", f'{{"risk":{j / 7}}}') for c in cells for j in range(50)],
        )
    with ResultStore(path) as store:
        start = time.perf_counter()
        frame = store.predictions()
        elapsed = time.perf_counter() - start
    assert frame.shape == (250_000, len(ID_COLUMNS) + 5)
    assert frame["risk"].iloc[:50].tolist() == [j / 7 for j in range(50)]
    assert elapsed < 3.0


# --------------------------------------------------------------------------- concurrency


N_WRITERS, CELLS_PER_WRITER, N_PREDICTIONS = 4, 20, 8


def _writer_records(writer: int) -> list[CellRecord]:
    """Half the keys are shared by every writer, half are its own; content names the writer."""
    records = []
    for i in range(CELLS_PER_WRITER):
        shared = i % 2 == 0
        key = f"shared-{i:02d}" if shared else f"own-{writer}-{i:02d}"
        frame = _survival_frame(N_PREDICTIONS, seed=i)
        frame["risk"] = float(writer)  # every row of a cell must come from one writer
        records.append(
            _record("os", frame, key=key, fold=i, metrics={"c_index": float(writer)},
                    info={"writer": writer})
        )  # fmt: skip
    return records


def _concurrent_writer(path: str, writer: int, barrier: Any, results: Any) -> None:
    records = _writer_records(writer)
    with ResultStore(path, busy_timeout=30) as store:
        barrier.wait(timeout=60)
        written = [record.cell_key for record in records if store.record_cell(record)]
    results.put((writer, written))


def _collect(results: Any, processes: list[Any], timeout: float) -> list[Any]:
    """One result per process; fails at once (not after the timeout) when a process dies."""
    collected: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(collected) < len(processes):
        try:
            collected.append(results.get(timeout=0.1))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            assert not failed, f"a writer process failed (exit codes {failed}); see its stderr"
            assert time.monotonic() < deadline, "the writers did not finish in time"
    return collected


def test_concurrent_writers_store_every_cell_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _spawn_context(monkeypatch)
    path = tmp_path / STORE_FILENAME  # created by the writers themselves, all at once
    barrier, results = ctx.Barrier(N_WRITERS), ctx.Queue()
    processes = [
        ctx.Process(target=_concurrent_writer, args=(str(path), w, barrier, results))
        for w in range(N_WRITERS)
    ]
    for process in processes:
        process.start()
    try:
        written = dict(_collect(results, processes, timeout=90))
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()

    shared = {f"shared-{i:02d}" for i in range(0, CELLS_PER_WRITER, 2)}
    own = {f"own-{w}-{i:02d}" for w in range(N_WRITERS) for i in range(1, CELLS_PER_WRITER, 2)}
    claimed = [key for keys in written.values() for key in keys]
    assert sorted(claimed) == sorted(shared | own)  # each key written by exactly one writer
    n_cells = len(shared | own)
    assert _raw_counts(path) == {
        "cells": n_cells,
        "metrics": n_cells,
        "predictions": n_cells * N_PREDICTIONS,
    }
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ResultStore(path) as store:
        cells = store.cells().set_index("cell_key")
        predictions = store.predictions()
        tidy = store.metrics().set_index("cell_key")
    # a cell's row, metrics and predictions all come from the writer whose record_cell said True
    for writer, keys in written.items():
        for key in keys:
            assert cells.loc[key, "info"] == {"writer": writer}
            assert tidy.loc[key, "value"] == writer
            assert (predictions.loc[predictions["cell_key"] == key, "risk"] == writer).all()


# --------------------------------------------------------------------------- crash safety


def _stalled_writer(path: str, marker: str) -> None:
    """Write one cell but stall inside the transaction, after every INSERT, before COMMIT."""

    def stall(_: CellRecord) -> None:
        Path(marker).write_text("in transaction")
        time.sleep(120)

    with ResultStore(path) as store:
        store._before_commit = stall
        store.record_cell(_record("os", _survival_frame(50, seed=7), key="victim"))


def _wait_for(path: Path, process: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.is_alive(), "the writer died before reaching its transaction"
        assert time.monotonic() < deadline, "the writer never reached its transaction"
        time.sleep(0.02)


def test_writer_killed_inside_a_transaction_leaves_a_consistent_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _spawn_context(monkeypatch)
    path = tmp_path / STORE_FILENAME
    kept = [_record("os", _survival_frame(10, seed=i), fold=i) for i in range(2)]
    with ResultStore(path) as store:
        for record in kept:
            store.record_cell(record)

    marker = tmp_path / "marker"
    process = ctx.Process(target=_stalled_writer, args=(str(path), str(marker)))
    process.start()
    try:
        _wait_for(marker, process, timeout=60)
        with ResultStore(path, busy_timeout=0.2) as other:
            # readers see the last committed state while the write is open (WAL) ...
            assert "victim" not in other and len(other.predictions()) == 20
            # ... and a second writer waits out its busy timeout, then gets a typed error
            with pytest.raises(ConfigError, match=str(path).replace("\\", "\\\\")):
                other.record_cell(_record("os", _survival_frame(3, seed=9), key="blocked"))
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
    assert process.exitcode == -signal.SIGKILL

    assert _raw_counts(path) == {"cells": 2, "metrics": 2, "predictions": 20}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ResultStore(path, busy_timeout=5) as store:
        assert store.done_keys() == {record.cell_key for record in kept}
        assert store.record_cell(_record("os", _survival_frame(50, seed=7), key="victim"))
        assert _raw_counts(path) == {"cells": 3, "metrics": 3, "predictions": 70}


# --------------------------------------------------------------------------- cell keys


def test_cell_key_is_stable_and_canonical() -> None:
    config = {"b": {"y": [1, 2.5], "x": "s"}, "a": 1, "c": None, "d": True}
    reordered = {"d": True, "c": None, "a": 1, "b": {"x": "s", "y": [1, 2.5]}}
    # independent oracle: sha256 of the canonical JSON written by hand
    canonical = '{"a":1,"b":{"x":"s","y":[1,2.5]},"c":null,"d":true}'
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    assert cell_key(config) == cell_key(reordered) == expected
    assert cell_key({**config, "a": 2}) != expected
    assert cell_key({**config, "a": np.int64(1)}) == expected
    assert cell_key({**config, "b": {"x": "s", "y": (np.int32(1), np.float64(2.5))}}) == expected
    assert cell_key({"p": Path("/data/x")}) == cell_key({"p": "/data/x"})
    assert cell_key({"v": np.arange(3)}) == cell_key({"v": [0, 1, 2]})
    assert len(expected) == 20 and int(expected, 16) >= 0


def test_cell_key_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(ConfigError) as err:
        cell_key({"a": {1, 2}, "b": {"c": object()}, "d": {3: "x"}})
    message = str(err.value)
    assert "config.a" in message and "config.b.c" in message and "key 3" in message
    with pytest.raises(ConfigError):
        cell_key([("a", 1)])  # type: ignore[arg-type]


def test_canonical_json_matches_the_standard_library() -> None:
    config = {"z": [1, {"q": "é", "p": -0.5}], "a": 3.0}
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    assert cell_key(config) == hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- opening


def test_a_file_that_is_not_a_database_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    path.write_bytes(b"this is not an SQLite database, just some text\n" * 100)
    with pytest.raises(ConfigError) as err:
        ResultStore(path)
    assert str(path) in str(err.value)


def test_stores_of_other_programs_and_versions_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE things (x)")
    with pytest.raises(ConfigError, match="not an oncoslide results store"):
        ResultStore(foreign)

    newer = tmp_path / "newer.sqlite"
    ResultStore(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value_json = '99' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError, match="schema version 99"):
        ResultStore(newer)


def test_opening_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ResultStore(tmp_path / "missing.sqlite", create=False)
    with pytest.raises(ConfigError, match="directory"):
        ResultStore(tmp_path)
    with ResultStore.in_dir(tmp_path / "a" / "b") as store:
        assert store.path == tmp_path / "a" / "b" / STORE_FILENAME
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        store.done_keys()


def test_spawned_children_can_find_this_module() -> None:
    # guards the _spawn_context assumption: this module's name maps onto its file
    root = Path(__file__).resolve().parents[__name__.count(".")]
    assert root.joinpath(*__name__.split(".")).with_suffix(".py") == Path(__file__).resolve()
    assert sys.modules[__name__].__file__ is not None
