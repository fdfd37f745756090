"""Feature-file scans: content digests and NaN / inf rows, read once and cached by stat."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from oncoslide.features import scan as scan_module
from oncoslide.features.scan import ScanCache, scan_feature_file


def _write(path: Path, seed: int = 0, n: int = 50, bad_rows: tuple[int, ...] = ()) -> Path:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 8)).astype(np.float32)
    for r in bad_rows:
        feats[r, r % 8] = np.nan if r % 2 else np.inf
    coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
    with h5py.File(path, "w") as f:  # CLAM's layout
        f["features"] = feats
        f["coords"] = coords
    return path


def _age(path: Path, seconds: float = 60.0) -> None:
    """Date the file back: a file modified within the last seconds is never cached."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_digest_is_blake2b_of_the_bytes_and_bad_rows_are_counted(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.h5", bad_rows=(3, 10, 11))
    result = scan_feature_file(path, cache=False)
    expected = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    assert result.digest == expected
    assert (result.n_patches, result.n_non_finite) == (50, 3)


def test_an_unchanged_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ScanCache(tmp_path / "cache" / "scans.sqlite")
    path = _write(tmp_path / "s.h5")
    _age(path)
    first = scan_feature_file(path, cache=cache)

    def no_read(_: object) -> str:
        raise AssertionError("the file was read again")

    monkeypatch.setattr(scan_module, "file_digest", no_read)
    assert scan_feature_file(path, cache=cache) == first
    # a new cache object on the same file (another process) sees it too
    assert scan_feature_file(path, cache=ScanCache(cache.path)) == first


def test_a_replaced_file_is_read_again(tmp_path: Path) -> None:
    cache = ScanCache(tmp_path / "scans.sqlite")
    path = _write(tmp_path / "s.h5", seed=0)
    _age(path, 120)
    first = scan_feature_file(path, cache=cache)
    _write(path, seed=1)  # same shapes, so the same size; other values
    _age(path, 60)
    second = scan_feature_file(path, cache=cache)
    assert second.digest != first.digest
    assert second.digest == hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def test_a_just_written_file_is_not_cached(tmp_path: Path) -> None:
    """Written within the mtime tick, a file could change again without its stat changing."""
    cache = ScanCache(tmp_path / "scans.sqlite")
    path = _write(tmp_path / "s.h5")
    scan_feature_file(path, cache=cache)
    stat = path.stat()
    assert cache.get((str(path.resolve()), stat.st_size, stat.st_mtime_ns)) is None


def test_cache_off_and_unwritable_cache_still_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "s.h5")
    _age(path)
    monkeypatch.setenv("ONCOSLIDE_CACHE_DIR", "off")
    assert scan_module.default_scan_cache() is None
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unwritable = ScanCache(blocker / "scans.sqlite")
    result = scan_feature_file(path, cache=unwritable)
    assert result.n_patches == 50 and len(result.digest) == 32


def test_default_cache_lives_in_the_named_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCOSLIDE_CACHE_DIR", str(tmp_path / "c"))
    path = _write(tmp_path / "s.h5")
    _age(path)
    scan_feature_file(path)
    assert (tmp_path / "c" / scan_module.CACHE_FILENAME).is_file()
