"""The benchmark's results store: one embedded SQLite file, ``<out>/results.sqlite``.

Every finished *cell* (one fold of one seed of one model on one task and one feature set) is
written in ONE transaction with its metrics and its test predictions, so a cell is either fully
in the store or absent: a run killed at any moment resumes by skipping :meth:`ResultStore.done_keys`
and never sees half a cell. Several processes may write at once (each waits for the single
writer lock, up to the busy timeout) and any number may read while they write (WAL journal).

Tables (schema version 1, kept in ``meta``):

``meta``
    ``key`` TEXT PRIMARY KEY, ``value_json`` TEXT (a JSON value). ``schema_version`` is
    reserved; a store whose version is newer or unknown is refused.
``cells`` (one row per finished cell)
    ``cell_key`` TEXT PRIMARY KEY (see :func:`cell_key`), ``task``, ``feature_set``, ``model``,
    ``protocol`` TEXT, ``seed``, ``fold`` INTEGER, ``config_json`` TEXT (the resolved cell
    config, canonical JSON), ``seconds`` REAL (wall time of the cell), ``info_json`` TEXT (extras
    such as n_test, n_excluded, excluded patient ids), ``outputs_json`` TEXT (the JSON list of
    the cell's output columns, sorted, e.g. ``["risk"]``), ``finished_at`` TEXT (ISO 8601,
    UTC).
    Indexed on (task, feature_set, model, seed, fold, cell_key).
``metrics`` (one row per cell and metric)
    ``cell_key`` TEXT, ``metric`` TEXT, ``value`` REAL (NULL for NaN);
    PRIMARY KEY (cell_key, metric).
``predictions`` (one row per cell and test patient)
    ``cell_key`` TEXT, ``patient_id`` TEXT, ``time`` REAL, ``event`` REAL (NULL for
    classification), ``label`` TEXT (NULL for survival), ``outputs_json`` TEXT: a JSON object of
    the model outputs, ``{"risk": r, "risk_threshold": t}`` for survival or
    ``{"prob_<class>": p, ...}`` for classification (NaN written as null); PRIMARY KEY
    (cell_key, patient_id). ``risk_threshold`` is the median predicted risk of the cell's
    training part (the high / low risk groups of the Kaplan-Meier curves split there): one
    finite value, the same on every row of the cell. Cells written before it existed lack the
    key (their ``outputs_json`` in ``cells`` is ``["risk"]``); they still load, with
    ``risk_threshold`` NaN (or no such column when no cell read has one), so the schema version
    is unchanged. Models that describe their patients add ``detail_<name>`` outputs (e.g.
    ROUPKT's ``detail_routing_<expert>``, see ``oncoslide.training.details``), read back as
    columns like the others.

Readers give back the tidy metric rows and the prediction frame of the benchmark contract
(``docs/contracts.md``): :meth:`ResultStore.metrics`, :meth:`ResultStore.predictions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide.errors import ConfigError

__all__ = [
    "CELL_COLUMNS",
    "ID_COLUMNS",
    "METRIC_COLUMNS",
    "PATIENT_COLUMNS",
    "RISK_THRESHOLD",
    "SCHEMA_VERSION",
    "STORE_FILENAME",
    "CellRecord",
    "ResultStore",
    "canonical_json",
    "cell_key",
]

SCHEMA_VERSION = 1
STORE_FILENAME = "results.sqlite"

ID_COLUMNS = ("cell_key", "task", "feature_set", "model", "protocol", "seed", "fold")
# a survival cell's risk-group threshold, stored with each prediction as an output
RISK_THRESHOLD = "risk_threshold"
# per-patient details a model gives beside its outputs (oncoslide.training.details), e.g.
# ``detail_routing_<expert>``: stored with the outputs, never checked as probabilities
DETAIL_PREFIX = "detail_"
PATIENT_COLUMNS = ("patient_id", "time", "event", "label")
METRIC_COLUMNS = (*ID_COLUMNS, "metric", "value")
CELL_COLUMNS = (*ID_COLUMNS, "seconds", "finished_at", "config", "info")

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value_json TEXT NOT NULL)",
    """CREATE TABLE cells (
        cell_key TEXT PRIMARY KEY, task TEXT NOT NULL, feature_set TEXT NOT NULL,
        model TEXT NOT NULL, protocol TEXT NOT NULL, seed INTEGER NOT NULL, fold INTEGER NOT NULL,
        config_json TEXT NOT NULL, seconds REAL NOT NULL, info_json TEXT NOT NULL,
        outputs_json TEXT NOT NULL, finished_at TEXT NOT NULL)""",
    # the readers' ORDER BY walks this index, so no sort of the (large) joined result is needed
    "CREATE INDEX cells_by_entry ON cells (task, feature_set, model, seed, fold, cell_key)",
    """CREATE TABLE metrics (
        cell_key TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
        PRIMARY KEY (cell_key, metric)) WITHOUT ROWID""",
    """CREATE TABLE predictions (
        cell_key TEXT NOT NULL, patient_id TEXT NOT NULL, time REAL, event REAL, label TEXT,
        outputs_json TEXT NOT NULL, PRIMARY KEY (cell_key, patient_id)) WITHOUT ROWID""",
)
_TABLES = frozenset({"meta", "cells", "metrics", "predictions"})
_RESERVED_META = frozenset({"schema_version"})
_ORDER = "c.task, c.feature_set, c.model, c.seed, c.fold, c.cell_key"
_PROB_TOLERANCE = 1e-3


# --------------------------------------------------------------------------- canonical JSON


def _jsonable(value: Any, where: str, problems: list[str]) -> Any:
    """Plain JSON types for ``value``; what cannot be converted is added to ``problems``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, os.PathLike):
        return str(os.fspath(value))
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                # json would turn 1 into "1" silently, so {1: x} and {"1": x} would collide
                problems.append(f"{where}: key {key!r} is not a string")
                continue
            out[key] = _jsonable(item, f"{where}.{key}", problems)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where, problems)
    problems.append(f"{where}: {type(value).__name__} value {value!r:.60} cannot be made JSON")
    return None


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_json(value: Any, what: str = "value") -> str:
    """Canonical JSON of ``value``: sorted keys, no spaces, numpy scalars/arrays and paths converted.

    Raises :class:`ConfigError` listing every part that cannot be made JSON (sets, objects,
    non-string mapping keys).
    """
    problems: list[str] = []
    plain = _jsonable(value, what, problems)
    if problems:
        raise ConfigError(f"{what} cannot be written as JSON:\n" + _bullets(problems))
    return _dumps(plain)


def cell_key(config: Mapping[str, Any]) -> str:
    """Stable key of a resolved cell config: the first 20 hex digits of the sha256 of its
    canonical JSON. The same config in any key order gives the same key."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a cell config must be a mapping, not {type(config).__name__}")
    return hashlib.sha256(canonical_json(config, "config").encode()).hexdigest()[:20]


def _bullets(problems: Iterable[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


# --------------------------------------------------------------------------- the cell record


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: comparing DataFrames has no truth
class CellRecord:
    """Everything the store keeps about one finished cell.

    ``predictions`` has one row per test patient with columns ``patient_id`` (str), ``time``,
    ``event`` (floats; NaN for classification), ``label`` (str; None for survival) and the
    outputs: ``risk`` and optionally ``risk_threshold`` (the training part's median risk, one
    finite value for the whole cell) for survival, or ``prob_<class>`` for every class.
    ``metrics`` values may be NaN. ``config`` and ``info`` must be JSON-able (numpy scalars and
    paths are converted).
    """

    cell_key: str
    task: str
    feature_set: str
    model: str
    protocol: str
    seed: int
    fold: int
    config: dict[str, Any]
    metrics: dict[str, float]
    predictions: pd.DataFrame
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _EncodedCell:
    """A validated record as the rows the three tables receive."""

    key: str
    cell_row: tuple[Any, ...]
    metric_rows: list[tuple[str, str, float | None]]
    prediction_rows: list[tuple[Any, ...]]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_scalars(record: CellRecord, problems: list[str]) -> None:
    for name in ("cell_key", "task", "feature_set", "model", "protocol"):
        value = getattr(record, name)
        if not isinstance(value, str) or not value:
            problems.append(f"{name} must be a non-empty string, got {value!r}")
    for name in ("seed", "fold"):
        if not _is_int(getattr(record, name)):
            problems.append(f"{name} must be an integer, got {getattr(record, name)!r}")
    if not _is_real(record.seconds) or not math.isfinite(record.seconds) or record.seconds < 0:
        problems.append(f"seconds must be a finite number >= 0, got {record.seconds!r}")
    if not isinstance(record.config, Mapping):
        problems.append(f"config must be a mapping, got {type(record.config).__name__}")
    if not isinstance(record.info, Mapping):
        problems.append(f"info must be a mapping, got {type(record.info).__name__}")


def _metric_rows(record: CellRecord, problems: list[str]) -> list[tuple[str, str, float | None]]:
    if not isinstance(record.metrics, Mapping):
        problems.append(f"metrics must be a mapping, got {type(record.metrics).__name__}")
        return []
    rows: list[tuple[str, str, float | None]] = []
    for name, value in record.metrics.items():
        if not isinstance(name, str) or not name:
            problems.append(f"metric name {name!r} is not a non-empty string")
        elif value is not None and not _is_real(value):
            problems.append(f"metric {name!r} is not a number: {value!r}")
        else:
            number = None if value is None or math.isnan(value) else float(value)
            rows.append((record.cell_key, name, number))
    return rows


def _output_columns(frame: pd.DataFrame, problems: list[str]) -> list[str]:
    known = set(PATIENT_COLUMNS) | set(ID_COLUMNS)  # id columns may ride along; they are ignored
    outputs = [c for c in frame.columns if c == "risk" or (isinstance(c, str) and c[:5] == "prob_")]
    duplicated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if duplicated:
        problems.append(f"predictions have duplicated columns {duplicated!r}")
        return []
    details = [c for c in frame.columns if isinstance(c, str) and c.startswith(DETAIL_PREFIX)]
    unknown = [c for c in frame.columns if c not in known and c not in outputs + details]
    if RISK_THRESHOLD in unknown:
        unknown.remove(RISK_THRESHOLD)
        if "risk" not in outputs:
            problems.append(f"'{RISK_THRESHOLD}' belongs to survival predictions (with 'risk')")
        _check_threshold(frame[RISK_THRESHOLD], problems)
    if unknown:
        problems.append(f"predictions have unknown columns {unknown!r}")
    if not outputs:
        problems.append("predictions have no output column ('risk' or 'prob_<class>')")
    elif "risk" in outputs and len(outputs) > 1:
        problems.append("predictions mix a survival 'risk' with class probabilities")
    elif any(len(c) == 5 for c in outputs):
        problems.append("an output column is named 'prob_' without a class")
    if "risk" in outputs and RISK_THRESHOLD in frame.columns:
        outputs.append(RISK_THRESHOLD)
    return outputs + details


def _check_threshold(values: pd.Series, problems: list[str]) -> None:
    """A cell's risk threshold: one finite number, the same on every row."""
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    if len(numeric) and (not np.isfinite(numeric).all() or (numeric != numeric[0]).any()):
        problems.append(
            f"'{RISK_THRESHOLD}' must be one finite value for the whole cell (the training "
            "part's median risk)"
        )


def _float_column(frame: pd.DataFrame, name: str, problems: list[str]) -> np.ndarray | None:
    try:
        return pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError):
        problems.append(f"predictions column {name!r} is not numeric")
        return None


def _check_patients(frame: pd.DataFrame, problems: list[str]) -> tuple[list[Any], list[Any]]:
    ids = frame["patient_id"].tolist()
    bad = [p for p in ids if not isinstance(p, str) or not p]
    if bad:
        problems.append(f"patient_id values must be non-empty strings; got {bad[:5]!r}")
    duplicated = sorted(str(p) for p, n in Counter(ids).items() if n > 1)
    if duplicated:
        problems.append(f"patients appear twice in one cell: {duplicated[:5]!r}")
    labels = [
        None if (lab is None or (isinstance(lab, float) and math.isnan(lab))) else lab
        for lab in frame["label"].tolist()
    ]
    bad_labels = [lab for lab in labels if lab is not None and not isinstance(lab, str)]
    if bad_labels:
        problems.append(f"label values must be strings or None; got {bad_labels[:5]!r}")
    return [str(p) for p in ids], [None if lab is None else str(lab) for lab in labels]


def _check_outputs(outputs: list[str], values: np.ndarray, problems: list[str]) -> None:
    if np.isinf(values).any():
        problems.append("predictions outputs contain infinite values")
    probs = [i for i, c in enumerate(outputs) if not c.startswith(DETAIL_PREFIX)]
    if values.shape[1] != len(outputs):  # not numeric: reported already
        return
    if probs and "risk" not in outputs and len(values):
        values = values[:, probs]
        finite = values[~np.isnan(values).any(axis=1)]
        if ((finite < 0) | (finite > 1)).any():
            problems.append("class probabilities outside [0, 1]")
        elif (np.abs(finite.sum(axis=1) - 1.0) > _PROB_TOLERANCE).any():
            problems.append("class probabilities do not sum to 1 on every row")


def _prediction_rows(
    record: CellRecord, problems: list[str]
) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The predictions table rows of a record and its output column names (sorted)."""
    frame = record.predictions
    if not isinstance(frame, pd.DataFrame):
        problems.append(f"predictions must be a DataFrame, got {type(frame).__name__}")
        return [], []
    missing = [c for c in PATIENT_COLUMNS if c not in frame.columns]
    if missing:
        problems.append(f"predictions lack columns {missing!r}")
    outputs = _output_columns(frame, problems)
    if missing:
        return [], []
    ids, labels = _check_patients(frame, problems)
    times = _float_column(frame, "time", problems)
    events = _float_column(frame, "event", problems)
    if events is not None and not np.isin(events[~np.isnan(events)], (0.0, 1.0)).all():
        problems.append("predictions column 'event' has values other than 0, 1 or NaN")
    if times is not None and (times[~np.isnan(times)] < 0).any():
        problems.append("predictions column 'time' has negative values")
    values = np.empty((len(frame), 0))
    if outputs:
        try:
            values = frame[outputs].to_numpy(dtype=float, na_value=np.nan)
        except (TypeError, ValueError):
            problems.append(f"output columns {outputs!r} are not all numeric")
        _check_outputs(outputs, values, problems)
    if problems or times is None or events is None:
        return [], []
    rows = _encode_predictions(record.cell_key, ids, labels, times, events, outputs, values)
    return rows, sorted(outputs)


def _encode_predictions(
    key: str,
    ids: list[str],
    labels: list[str | None],
    times: np.ndarray,
    events: np.ndarray,
    outputs: list[str],
    values: np.ndarray,
) -> list[tuple[Any, ...]]:
    """Rows of the predictions table; NaN becomes NULL / null (SQLite and JSON have no NaN)."""

    def nullable(array: np.ndarray) -> list[float | None]:
        return [None if math.isnan(v) else v for v in array.tolist()]

    # the outputs JSON is formatted directly (sorted keys, no spaces, float repr as json.dumps
    # writes it): json.dumps per row would cost most of the write time of a cell
    names = sorted(outputs)
    ordered = values[:, [outputs.index(name) for name in names]].tolist()
    keys = [json.dumps(name) + ":" for name in names]
    outputs_json = [
        "{"
        + ",".join(k + ("null" if v != v else repr(v)) for k, v in zip(keys, row, strict=True))
        + "}"
        for row in ordered
    ]
    return list(
        zip(
            [key] * len(ids),
            ids,
            nullable(times),
            nullable(events),
            labels,
            outputs_json,
            strict=True,
        )
    )


def _encode(record: CellRecord) -> _EncodedCell:
    """Validate a record and turn it into table rows; every problem is reported at once."""
    if not isinstance(record, CellRecord):
        raise ConfigError(f"record_cell takes a CellRecord, not {type(record).__name__}")
    problems: list[str] = []
    _check_scalars(record, problems)
    config = _jsonable(record.config, "config", problems)
    info = _jsonable(record.info, "info", problems)
    metric_rows = _metric_rows(record, problems)
    prediction_rows, outputs = _prediction_rows(record, problems)
    if problems:
        n = len(problems)
        raise ConfigError(
            f"cell record {record.cell_key!r} has {n} problem{'s' if n != 1 else ''}:\n"
            + _bullets(problems)
        )
    finished = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    cell_row = (
        record.cell_key,
        record.task,
        record.feature_set,
        record.model,
        record.protocol,
        int(record.seed),
        int(record.fold),
        _dumps(config),
        float(record.seconds),
        _dumps(info),
        _dumps(outputs),
        finished,
    )
    return _EncodedCell(record.cell_key, cell_row, metric_rows, prediction_rows)


# --------------------------------------------------------------------------- the store


def _reopen(path: str, busy_timeout: float, create: bool) -> ResultStore:
    return ResultStore(path, busy_timeout=busy_timeout, create=create)


class ResultStore:
    """The results database of one benchmark output folder (see the module docstring).

    Open it with ``ResultStore(path)`` or ``ResultStore.in_dir(out_dir)``, best as a context
    manager. ``busy_timeout`` (seconds) is how long a write waits for another process's write to
    finish. ``create=False`` refuses a missing file instead of creating an empty store.

    A store passed to another process (pickled, or inherited through fork) opens its own
    connection there: SQLite connections must never cross processes.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = 60.0, create: bool = True
    ) -> None:
        self.path = Path(path)
        self.busy_timeout = float(busy_timeout)
        self.create = create
        # test hook: called inside record_cell's transaction just before COMMIT
        self._before_commit: Callable[[CellRecord], None] | None = None
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        if self.busy_timeout < 0:
            raise ConfigError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        if self.path.is_dir():
            raise ConfigError(f"results store {self.path} is a directory, not a database file")
        if not create and not self.path.is_file():
            raise ConfigError(f"results store {self.path} does not exist")
        self._conn = self._open()

    @classmethod
    def in_dir(cls, out_dir: str | os.PathLike[str], **kwargs: Any) -> ResultStore:
        """The store of a benchmark output folder: ``<out_dir>/results.sqlite``."""
        return cls(Path(out_dir) / STORE_FILENAME, **kwargs)

    # ----------------------------------------------------------------- connection management

    def _open(self) -> sqlite3.Connection:
        if self.create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return self._connect()
            except sqlite3.OperationalError as exc:
                # switching a fresh file to WAL can report "locked" without waiting on the busy
                # handler when several processes open it at the same moment: try again
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise self._error("cannot open it", exc) from exc
                time.sleep(0.05)
            except sqlite3.Error as exc:
                raise self._error("cannot open it", exc) from exc

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; every transaction here is explicit
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives a crash of the process, may be lost only on
            # a power failure, and costs no fsync per cell
            conn.execute("PRAGMA synchronous = NORMAL")
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _tables(self, conn: sqlite3.Connection) -> set[str]:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name for (name,) in rows if not name.startswith("sqlite_")}

    def _schema_version(self, conn: sqlite3.Connection) -> object:
        if "meta" not in self._tables(conn):
            return None
        row = conn.execute("SELECT value_json FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else json.loads(row[0])

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = self._schema_version(conn)
        if version is None:
            with _write(conn):
                # checked again under the write lock: another process may have just created it
                if not self._tables(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO meta (key, value_json) VALUES ('schema_version', ?)",
                        (_dumps(SCHEMA_VERSION),),
                    )
            version = self._schema_version(conn)
        if version is None:
            tables = ", ".join(sorted(self._tables(conn)))
            raise ConfigError(
                f"results store {self.path} is an SQLite database but not an oncoslide results "
                f"store (tables: {tables})"
            )
        if version != SCHEMA_VERSION or not _TABLES <= self._tables(conn):
            raise ConfigError(
                f"results store {self.path} has schema version {version!r}; this oncoslide "
                f"reads version {SCHEMA_VERSION} (was it written by a newer oncoslide?)"
            )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConfigError(f"results store {self.path} is closed")
        if os.getpid() != self._pid:
            # inherited through fork: leave the parent's connection alone, open our own
            self._pid = os.getpid()
            self._conn = self._open()
        return self._conn

    def _error(self, action: str, exc: BaseException) -> ConfigError:
        return ConfigError(f"results store {self.path}: {action}: {exc}")

    @contextlib.contextmanager
    def _sqlite_errors(self, action: str) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self._error(action, exc) from exc

    def close(self) -> None:
        """Close the connection (idempotent). The store cannot be used afterwards."""
        conn, self._conn = self._conn, None
        if conn is not None and os.getpid() == self._pid:
            conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (str(self.path), self.busy_timeout, self.create))

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    # ----------------------------------------------------------------- writing

    def record_cell(self, record: CellRecord) -> bool:
        """Write a cell, its metrics and its predictions in one transaction.

        Returns False, writing nothing, when a cell with the same key is already stored. Raises
        :class:`ConfigError` listing every problem of an invalid record before touching the
        database.
        """
        cell = _encode(record)
        with self._sqlite_errors(f"cannot write cell {cell.key!r}") as conn, _write(conn):
            if conn.execute("SELECT 1 FROM cells WHERE cell_key = ?", (cell.key,)).fetchone():
                return False  # commits an empty transaction: nothing written
            conn.execute("INSERT INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", cell.cell_row)
            conn.executemany("INSERT INTO metrics VALUES (?,?,?)", cell.metric_rows)
            conn.executemany("INSERT INTO predictions VALUES (?,?,?,?,?,?)", cell.prediction_rows)
            if self._before_commit is not None:
                self._before_commit(record)
        return True

    def delete_cells(self, keys: Iterable[str]) -> int:
        """Delete cells (with their metrics and predictions) in one transaction, so that a rerun
        computes them again. Unknown keys are ignored; returns the number of cells deleted."""
        params = [(k,) for k in dict.fromkeys(keys)]
        with self._sqlite_errors("cannot delete cells") as conn, _write(conn):
            conn.executemany("DELETE FROM predictions WHERE cell_key = ?", params)
            conn.executemany("DELETE FROM metrics WHERE cell_key = ?", params)
            return conn.executemany("DELETE FROM cells WHERE cell_key = ?", params).rowcount

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (replacing any previous value)."""
        if not isinstance(key, str) or not key:
            raise ConfigError(f"meta key must be a non-empty string, got {key!r}")
        if key in _RESERVED_META:
            raise ConfigError(f"meta key {key!r} is reserved by the results store")
        text = canonical_json(value, f"meta value {key!r}")
        with self._sqlite_errors(f"cannot set meta {key!r}") as conn:
            conn.execute(
                "INSERT INTO meta (key, value_json) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value_json = excluded.value_json",
                (key, text),
            )

    # ----------------------------------------------------------------- reading

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``, or ``default``."""
        with self._sqlite_errors(f"cannot read meta {key!r}") as conn:
            row = conn.execute("SELECT value_json FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def done_keys(self) -> set[str]:
        """Keys of every stored cell."""
        with self._sqlite_errors("cannot read cells") as conn:
            return {key for (key,) in conn.execute("SELECT cell_key FROM cells")}

    def data_keys(self) -> dict[str, str | None]:
        """Every stored cell's data key (``info_json["data_key"]``); None for cells stored
        before cells recorded their data."""
        with self._sqlite_errors("cannot read cells") as conn:
            rows = conn.execute("SELECT cell_key, info_json FROM cells").fetchall()
        out: dict[str, str | None] = {}
        for key, info in rows:
            try:
                value = json.loads(info).get("data_key") if info else None
            except (ValueError, AttributeError):
                value = None
            out[str(key)] = value if isinstance(value, str) else None
        return out

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._sqlite_errors("cannot read cells") as conn:
            return (
                conn.execute("SELECT 1 FROM cells WHERE cell_key = ?", (key,)).fetchone()
                is not None
            )

    def __len__(self) -> int:
        with self._sqlite_errors("cannot read cells") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    def _select(self, sql: str, task: str | None, action: str) -> list[tuple[Any, ...]]:
        where, params = ("WHERE c.task = ?", (task,)) if task is not None else ("", ())
        with self._sqlite_errors(action) as conn:
            return conn.execute(sql.format(where=where, order=_ORDER), params).fetchall()

    def cells(self, task: str | None = None) -> pd.DataFrame:
        """One row per cell: the id columns, seconds, finished_at (UTC timestamps), and config /
        info parsed back to dicts."""
        rows = self._select(
            "SELECT c.cell_key, c.task, c.feature_set, c.model, c.protocol, c.seed, c.fold, "
            "c.seconds, c.finished_at, c.config_json, c.info_json FROM cells c {where} "
            "ORDER BY {order}",
            task,
            "cannot read cells",
        )
        columns = _columns(rows, 11)
        frame = _id_frame(columns)
        frame["seconds"] = np.array(columns[7], dtype=float)
        frame["finished_at"] = pd.to_datetime(pd.Series(columns[8], dtype=object), utc=True)
        frame["config"] = _object([json.loads(text) for text in columns[9]])
        frame["info"] = _object([json.loads(text) for text in columns[10]])
        return frame

    def metrics(self, task: str | None = None) -> pd.DataFrame:
        """Tidy metric rows: cell_key, task, feature_set, model, protocol, seed, fold, metric,
        value (NaN where the metric was NaN)."""
        rows = self._select(
            "SELECT c.cell_key, c.task, c.feature_set, c.model, c.protocol, c.seed, c.fold, "
            "m.metric, m.value FROM cells c JOIN metrics m ON m.cell_key = c.cell_key {where} "
            "ORDER BY {order}, m.metric",
            task,
            "cannot read metrics",
        )
        columns = _columns(rows, 9)
        frame = _id_frame(columns)
        frame["metric"] = _object(columns[7])
        frame["value"] = np.array(columns[8], dtype=float)  # None (NULL) becomes NaN
        return frame

    def predictions(self, task: str | None = None) -> pd.DataFrame:
        """The prediction frame: one row per (cell, test patient), the id columns, patient_id,
        time, event, label, then the output columns (``risk``, ``risk_threshold``, then
        ``prob_<class>`` sorted); an output a row's cell does not have (e.g. ``risk`` of a
        classification cell when reading every task, or ``risk_threshold`` of a cell written
        before it existed) is NaN, and an output no cell read has is absent."""
        where, params = ("WHERE c.task = ?", [task]) if task is not None else ("", [])
        with self._sqlite_errors("cannot read predictions") as conn, _snapshot(conn):
            cells = conn.execute(
                "SELECT c.rowid, c.cell_key, c.task, c.feature_set, c.model, c.protocol, c.seed, "
                f"c.fold, c.outputs_json FROM cells c {where} ORDER BY {_ORDER}",
                params,
            ).fetchall()
            names = sorted(
                {name for *_, text in cells for name in json.loads(text)},
                key=lambda name: (
                    name != "risk",
                    name != RISK_THRESHOLD,
                    name.startswith(DETAIL_PREFIX),
                    name,
                ),
            )
            # SQLite's JSON functions read the outputs far faster than json.loads per row; a
            # JSON path cannot quote a name holding '"', so such (odd) names are parsed here
            in_sql = all('"' not in name for name in names)
            extract = (
                "".join(", json_extract(p.outputs_json, ?)" for _ in names)
                if in_sql
                else ", p.outputs_json"
            )
            paths = [f'$."{name}"' for name in names] if in_sql else []
            rows = conn.execute(
                f"SELECT c.rowid, p.patient_id, p.time, p.event, p.label{extract} "
                f"FROM cells c JOIN predictions p ON p.cell_key = c.cell_key {where} "
                f"ORDER BY {_ORDER}, p.patient_id",
                paths + params,
            ).fetchall()
        cell_columns = _columns(cells, 9)
        columns = _columns(rows, 5 + (len(names) if in_sql else 1))
        where_cell = pd.Index(cell_columns[0]).get_indexer(np.array(columns[0], dtype=np.int64))
        frame = _id_frame([_object(c)[where_cell] for c in cell_columns[1:8]])
        frame["patient_id"] = _object(columns[1])
        frame["time"] = np.array(columns[2], dtype=float)
        frame["event"] = np.array(columns[3], dtype=float)
        frame["label"] = _object(columns[4])
        outputs = _output_values(names, columns[5:], in_sql)
        for name in names:
            frame[name] = np.array(outputs[name], dtype=float)  # None (null) becomes NaN
        return frame


def _output_values(
    names: list[str], columns: Sequence[Sequence[Any]], in_sql: bool
) -> dict[str, Sequence[Any]]:
    """Each output's values: columns extracted by SQLite, or one column of JSON to parse."""
    if in_sql:
        return {name: columns[i] for i, name in enumerate(names)}
    parsed = [json.loads(text) for text in columns[0]]
    return {name: [row.get(name) for row in parsed] for name in names}


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: BEGIN IMMEDIATE takes the write lock at once (waiting up to the busy
    timeout), so two writers never both read, then both try to upgrade and deadlock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # also after a failed COMMIT, which can leave the transaction open
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: several SELECTs see one state even while other processes write."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("COMMIT")


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[tuple[Any, ...]]:
    """Transpose query rows into ``width`` columns (empty columns for no rows)."""
    return list(zip(*rows, strict=True)) if rows else [()] * width


def _object(values: Sequence[Any]) -> np.ndarray:
    """A 1-d object array (np.array would build a 2-d array from equal-length lists)."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        return values
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


def _id_frame(columns: Sequence[Sequence[Any]]) -> pd.DataFrame:
    """The contract's id columns (cell_key ... fold) with their dtypes (str as object, int64)."""
    data: dict[str, Any] = {name: _object(columns[i]) for i, name in enumerate(ID_COLUMNS[:5])}
    data["seed"] = np.array(columns[5], dtype=np.int64)
    data["fold"] = np.array(columns[6], dtype=np.int64)
    return pd.DataFrame(data)
