"""A bounded, thread-safe, in-memory cache of slide features shared by every fold and seed of a run.

Cross-validation visits each patient once per fold and seed; without a cache every visit re-reads
the slide's HDF5 file. With ``FeatureCache`` each file is read once per run when the cohort fits
under ``max_bytes``; when it does not, memory stays bounded by ``max_bytes`` (least recently used
slides are evicted) instead of growing with the cohort.

Cached arrays are marked read-only: they are shared between folds, so an in-place change (say a
normalisation) would silently leak into every later use.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oncoslide.errors import ConfigError, FeatureFileError
from oncoslide.features.readers import inspect_features, read_features
from oncoslide.features.schema import SlideFeatures

PathLike = str | os.PathLike[str]
Reader = Callable[[Path], SlideFeatures]
_DTYPES = (None, "float16", "float32")
# the training path's default (``cache_gb`` 8): a cache made without a bound (predict, reports)
# must not grow with a cohort of thousands of slides
DEFAULT_MAX_BYTES = 8 * 2**30


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`FeatureCache`.

    ``hits`` counts ``get`` calls served without reading (from memory, or by waiting for a read
    already under way, including the prefetcher's); ``misses`` counts ``get`` calls that read the
    file themselves or met a failed prefetch. ``reads`` counts file reads by anyone (the
    prefetcher included); ``bytes_read`` their size as read, ``bytes_in_cache`` the size held now,
    ``peak_bytes`` the most it ever held (never above ``max_bytes``).
    """

    reads: int
    hits: int
    misses: int
    evictions: int
    bytes_in_cache: int
    bytes_read: int
    entries: int
    peak_bytes: int = 0


class _Pending:
    """A read under way; other threads wait on it instead of reading the same file again."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: SlideFeatures | None = None
        self.error: FeatureFileError | None = None


class FeatureCache:
    """LRU cache of :class:`SlideFeatures` keyed by resolved file path.

    Args:
        max_bytes: memory bound for the cached arrays (features + coords), 8 GiB by default;
            ``None`` = unbounded. A single slide larger than the bound is returned but not kept.
        dtype: ``"float16"`` stores features as float16 (half the memory), ``"float32"`` as
            float32; ``None`` keeps the stored dtype.
        stamp_mpp: passed to :func:`~oncoslide.features.readers.read_features` for STAMP files.
        reader: replaces ``read_features`` (e.g. to count or instrument reads).
    """

    def __init__(
        self,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        dtype: str | None = None,
        *,
        stamp_mpp: float | None = None,
        reader: Reader | None = None,
    ) -> None:
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise ConfigError(
                f"max_bytes must be a non-negative integer or None, got {max_bytes!r}"
            )
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.max_bytes = max_bytes
        self.dtype = np.dtype(dtype) if dtype else None
        self._stamp_mpp = stamp_mpp
        self._reader: Reader = reader or (lambda p: read_features(p, stamp_mpp=stamp_mpp))
        self._cond = threading.Condition()
        self._entries: OrderedDict[str, SlideFeatures] = OrderedDict()
        self._unused: set[str] = set()  # prefetched and not yet asked for: evicted last
        self._pending: dict[str, _Pending] = {}
        self._errors: dict[str, FeatureFileError] = {}  # failed prefetches, raised on get
        self._queue: deque[Path] = deque()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._bytes = 0
        self._peak_bytes = 0
        self._reads = self._hits = self._misses = self._evictions = self._bytes_read = 0

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (for another process, e.g. a multi-process training worker) it becomes an
        empty cache with the same limits: the cached arrays and the prefetch thread stay here.
        A custom reader is not carried over (the worker reads files itself)."""
        dtype = None if self.dtype is None else str(self.dtype)
        return (_fresh_cache, (self.max_bytes, dtype, self._stamp_mpp))

    # ----------------------------------------------------------------------------------------
    # public API

    def get(self, path: PathLike) -> SlideFeatures:
        """Return the slide's features, reading the file only if no copy is cached or in flight.

        Raises:
            FeatureFileError: the file cannot be read (also when a prefetch of it failed).
        """
        path = Path(path)
        key = _key(path)
        with self._cond:
            self._check_open()
            if key in self._entries:
                self._hits += 1
                self._entries.move_to_end(key)
                self._mark_used(key)
                return self._entries[key]
            if key in self._errors:
                self._misses += 1
                raise self._errors.pop(key)
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                self._misses += 1
                pending = self._pending[key] = _Pending()
            else:
                self._hits += 1
        if owner:
            self._load(key, path, pending, prefetched=False)
        pending.done.wait()
        with self._cond:
            self._mark_used(key)
            self._errors.pop(key, None)  # reported here; do not raise it a second time
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def prefetch(self, paths: Iterable[PathLike]) -> None:
        """Read ``paths`` into the cache in order, in a background daemon thread.

        The prefetcher never makes room by evicting slides it fetched that have not been asked
        for yet: when they fill ``max_bytes`` it waits for ``get`` to consume them. A file that
        fails to read is recorded and its error raised by the next ``get`` of that path.
        """
        new = [Path(p) for p in paths]
        with self._cond:
            self._check_open()
            self._queue.extend(new)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._prefetch_loop, name="oncoslide-prefetch", daemon=True
                )
                self._worker.start()
            self._cond.notify_all()

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._cond:
            return CacheStats(
                reads=self._reads,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes_in_cache=self._bytes,
                peak_bytes=self._peak_bytes,
                bytes_read=self._bytes_read,
                entries=len(self._entries),
            )

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str | os.PathLike):
            return False
        with self._cond:
            return _key(Path(path)) in self._entries

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def close(self) -> None:
        """Stop the prefetcher (after the read it is doing) and drop every cached slide."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            worker = self._worker
            self._cond.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        with self._cond:
            self._entries.clear()
            self._unused.clear()
            self._errors.clear()
            self._bytes = 0

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    # internals (methods named *_locked expect self._cond to be held)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this FeatureCache is closed")

    def _mark_used(self, key: str) -> None:
        if key in self._unused:
            self._unused.discard(key)
            self._cond.notify_all()  # the prefetcher may be waiting for this room

    def _load(self, key: str, path: Path, pending: _Pending, *, prefetched: bool) -> None:
        """Read outside the lock, then publish the result (or error) to every waiter."""
        result: SlideFeatures | None = None
        try:
            result = self._prepare(self._reader(path))
        except FeatureFileError as exc:
            pending.error = exc
        except Exception as exc:  # a custom reader; never let it kill the prefetcher
            pending.error = FeatureFileError(path, f"read failed ({type(exc).__name__}: {exc})")
        with self._cond:
            self._reads += 1
            if result is not None:
                self._bytes_read += result.nbytes
                if not self._closed:
                    self._insert_locked(key, result, prefetched=prefetched)
            elif prefetched:
                self._errors[key] = pending.error  # type: ignore[assignment]
            pending.result = result
            del self._pending[key]
            pending.done.set()
            self._cond.notify_all()

    def _prepare(self, sf: SlideFeatures) -> SlideFeatures:
        if self.dtype is not None and sf.features.dtype != self.dtype:
            sf = dataclasses.replace(sf, features=sf.features.astype(self.dtype))
        sf.features.setflags(write=False)
        sf.coords.setflags(write=False)
        return sf

    def _insert_locked(self, key: str, sf: SlideFeatures, *, prefetched: bool) -> None:
        size = sf.nbytes
        if self.max_bytes is not None and size > self.max_bytes:
            return  # larger than the whole budget: hand it out, keep nothing
        if key in self._entries:  # re-read after a race; keep one copy
            self._bytes -= self._entries.pop(key).nbytes
        self._evict_locked(size)
        self._entries[key] = sf
        self._bytes += size
        self._peak_bytes = max(self._peak_bytes, self._bytes)
        if prefetched:
            self._unused.add(key)

    def _evict_locked(self, incoming: int) -> None:
        """Evict least recently used entries until ``incoming`` bytes fit.

        Entries already used go first; prefetched ones not yet used only when nothing else is left.
        """
        if self.max_bytes is None:
            return
        for protect in (True, False):
            for key in list(self._entries):
                if self._bytes + incoming <= self.max_bytes:
                    return
                if protect and key in self._unused:
                    continue
                self._bytes -= self._entries.pop(key).nbytes
                self._unused.discard(key)
                self._evictions += 1

    def _unused_bytes_locked(self) -> int:
        return sum(self._entries[k].nbytes for k in self._unused)

    def _prefetch_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed or not self._queue:
                    self._worker = None
                    return
                path = self._queue.popleft()
            key = _key(path)
            if self._busy(key):
                continue
            if self.max_bytes is not None:
                size = self._estimate(path)
                if size is not None and size > self.max_bytes:
                    continue  # would not be kept anyway; get() reads it when needed
                if size is not None and not self._wait_for_room(size):
                    return
            with self._cond:
                if self._closed or key in self._entries or key in self._pending:
                    continue
                pending = self._pending[key] = _Pending()
            self._load(key, path, pending, prefetched=True)

    def _busy(self, key: str) -> bool:
        with self._cond:
            return key in self._entries or key in self._pending or key in self._errors

    def _wait_for_room(self, size: int) -> bool:
        """Block until ``size`` bytes fit beside the unused prefetched ones; False once closed."""
        assert self.max_bytes is not None
        with self._cond:
            while not self._closed and self._unused_bytes_locked() + size > self.max_bytes:
                self._cond.wait()
            if self._closed:
                self._worker = None
                return False
            return True

    def _estimate(self, path: Path) -> int | None:
        """Bytes the slide will take in the cache, from its metadata; None if that fails."""
        try:
            info = inspect_features(path, stamp_mpp=self._stamp_mpp)
        except FeatureFileError:
            return None  # the read itself will record the error
        itemsize = (self.dtype or info.dtype).itemsize
        return info.n_patches * (info.dim * itemsize + 2 * 8)


def _key(path: Path) -> str:
    return str(path.resolve())


def _fresh_cache(max_bytes: int | None, dtype: str | None, stamp_mpp: float | None) -> FeatureCache:
    return FeatureCache(max_bytes, dtype, stamp_mpp=stamp_mpp)
