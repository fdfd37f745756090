"""One full read of each feature file: its content digest and its NaN / inf rows, cached.

Runs and benchmark cells are keyed by their data (see :mod:`oncoslide.cohort.fingerprint`), so
every feature file they use needs a content digest. Reading a whole file costs about what the
first training epoch costs anyway; the result is cached against the file's path, size and
modification time, so a file is read once, and later runs only ``stat`` it. The same read
counts the patches with NaN or infinite values, which then are found when a cohort is loaded
(``oncoslide validate``, before a run folder is written), not in the middle of training.

The cache is one SQLite file, ``file_scans.sqlite``, in ``$ONCOSLIDE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/oncoslide``, else ``~/.cache/oncoslide``; ``ONCOSLIDE_CACHE_DIR=off`` turns
it off). It holds digests only, never data; deleting it costs one more read of each file. A
cache that cannot be written is not an error: files are then read every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from oncoslide.errors import FeatureFileError, NonFiniteFeaturesError
from oncoslide.features.readers import read_features

__all__ = ["FileScan", "ScanCache", "default_scan_cache", "file_digest", "scan_feature_file"]

# bump when what a scan measures changes: older cached rows are then ignored
SCAN_VERSION = 1
CACHE_FILENAME = "file_scans.sqlite"
_CHUNK = 1 << 22
# a file modified this recently may still change within the same mtime tick: not cached
_RACY_SECONDS = 2.0


@dataclass(frozen=True)
class FileScan:
    """What one full read of a feature file found."""

    digest: str  # BLAKE2b-128 of the file's bytes, hex
    n_patches: int
    n_non_finite: int  # patches (rows) with a NaN or infinite value


def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-128 of a file's bytes (hex)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


class ScanCache:
    """Scans keyed by (absolute path, size, mtime): SQLite, safe for concurrent processes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._broken = False

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30.0)
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS scans (path TEXT, size INTEGER, "
                    "mtime_ns INTEGER, version INTEGER, digest TEXT, n_patches INTEGER, "
                    "n_non_finite INTEGER, PRIMARY KEY (path, size, mtime_ns, version))"
                )
                conn.commit()
                self._conn = conn
            except (OSError, sqlite3.Error):
                self._broken = True  # unwritable cache folder: read files every time
        return self._conn

    def get(self, key: tuple[str, int, int]) -> FileScan | None:
        conn = self._connection()
        if conn is None:
            return None
        try:
            row = conn.execute(
                "SELECT digest, n_patches, n_non_finite FROM scans "
                "WHERE path = ? AND size = ? AND mtime_ns = ? AND version = ?",
                (*key, SCAN_VERSION),
            ).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else FileScan(str(row[0]), int(row[1]), int(row[2]))

    def put(self, key: tuple[str, int, int], scan: FileScan) -> None:
        conn = self._connection()
        if conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            with conn:
                # one row per path: a replaced file's old scan is dropped
                conn.execute("DELETE FROM scans WHERE path = ?", (key[0],))
                conn.execute(
                    "INSERT OR REPLACE INTO scans VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, SCAN_VERSION, scan.digest, scan.n_patches, scan.n_non_finite),
                )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_DEFAULT: dict[str, ScanCache] = {}


def default_scan_cache() -> ScanCache | None:
    """The cache named by ``$ONCOSLIDE_CACHE_DIR`` (see the module docstring); None when off."""
    folder = os.environ.get("ONCOSLIDE_CACHE_DIR")
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(base) / "oncoslide")
    if folder.strip().lower() in ("", "off", "none", "0"):
        return None
    path = str(Path(folder).expanduser() / CACHE_FILENAME)
    if path not in _DEFAULT:
        _DEFAULT[path] = ScanCache(path)
    return _DEFAULT[path]


def scan_feature_file(
    path: str | os.PathLike[str],
    *,
    stamp_mpp: float | None = None,
    cache: ScanCache | bool | None = True,
) -> FileScan:
    """Digest and NaN / inf count of one feature file, from the cache when it is unchanged.

    Args:
        path: a feature file in any layout :func:`~oncoslide.features.readers.read_features`
            reads.
        stamp_mpp: passed to the reader (STAMP files that do not record their resolution).
        cache: a :class:`ScanCache`, True for :func:`default_scan_cache`, False/None for none.

    Raises:
        FeatureFileError: the file is missing or cannot be read (non-finite values are counted,
            not raised).
    """
    path = Path(path)
    store = default_scan_cache() if cache is True else (cache or None)
    try:
        st = path.stat()
    except OSError as exc:
        raise FeatureFileError(path, f"cannot read: {exc.strerror or exc}") from None
    key = (str(path.resolve()), int(st.st_size), int(st.st_mtime_ns))
    if store is not None:
        hit = store.get(key)
        if hit is not None:
            return hit
    try:
        digest = file_digest(path)
    except OSError as exc:
        raise FeatureFileError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        n = read_features(path, stamp_mpp=stamp_mpp).n_patches
        bad = 0
    except NonFiniteFeaturesError as exc:
        n, bad = exc.n_patches, exc.n_bad
    scan = FileScan(digest, n, bad)
    if store is not None and time.time() - st.st_mtime_ns / 1e9 > _RACY_SECONDS:
        store.put(key, scan)
    return scan
