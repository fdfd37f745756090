"""FeatureCache: each file read once, memory bounded, prefetch that waits instead of evicting."""

from __future__ import annotations

import pickle
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from oncoslide.errors import ConfigError, FeatureFileError
from oncoslide.features import FeatureCache, PatchGrid, SlideFeatures, read_features
from oncoslide.features import write_feature_file as write

GRID = PatchGrid(
    patch_size=224,
    patch_size_level0=224,
    target_mpp=0.5,
    level0_mpp=0.5,
    level0_width=1000,
    level0_height=1000,
)
N, D = 10, 8
SLIDE_BYTES = N * D * 4 + N * 2 * 8  # float32 features + int64 coords = 480 bytes


class CountingReader:
    """Wraps read_features, counting reads per path; optionally slow, to widen race windows."""

    def __init__(self, delay: float = 0.0) -> None:
        self.counts: Counter[Path] = Counter()
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> SlideFeatures:
        with self._lock:
            self.counts[Path(path)] += 1
        time.sleep(self.delay)
        return read_features(path)


@pytest.fixture
def slides(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        feats = rng.normal(size=(N, D)).astype(np.float32)
        coords = np.stack([np.arange(N) * 224, np.zeros(N)], axis=1).astype(np.int64)
        paths.append(write(tmp_path / f"s{i}.h5", feats, coords, grid=GRID, encoder="e"))
    return paths


def _wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def test_many_threads_each_file_read_exactly_once(slides: list[Path]) -> None:
    reader = CountingReader(delay=0.01)
    cache = FeatureCache(reader=reader)
    results: dict[Path, set[int]] = {p: set() for p in slides}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        order = slides * 3
        random.Random(seed).shuffle(order)
        try:
            for p in order:
                results[p].add(id(cache.get(p)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert reader.counts == Counter(dict.fromkeys(slides, 1))
    assert all(len(ids) == 1 for ids in results.values())  # everyone got the same object
    stats = cache.stats
    assert stats.reads == len(slides)
    assert stats.misses == len(slides)
    assert stats.hits == 8 * 3 * len(slides) - len(slides)
    assert stats.bytes_read == stats.bytes_in_cache == len(slides) * SLIDE_BYTES


def test_values_match_a_direct_read_and_are_read_only(slides: list[Path]) -> None:
    cache = FeatureCache()
    sf = cache.get(slides[0])
    np.testing.assert_array_equal(sf.features, read_features(slides[0]).features)
    with pytest.raises(ValueError, match="read-only"):
        sf.features[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        sf.coords[0, 0] = 1


def test_same_file_through_another_path_spelling_is_one_entry(slides: list[Path]) -> None:
    reader = CountingReader()
    cache = FeatureCache(reader=reader)
    cache.get(slides[0])
    cache.get(slides[0].parent / ".." / slides[0].parent.name / slides[0].name)
    assert sum(reader.counts.values()) == 1


def test_lru_eviction_under_a_small_limit(slides: list[Path]) -> None:
    reader = CountingReader()
    cache = FeatureCache(max_bytes=2 * SLIDE_BYTES, reader=reader)
    a, b, c = slides[:3]
    cache.get(a)
    cache.get(b)
    cache.get(a)  # a is now the most recently used
    cache.get(c)  # must evict b, not a
    assert a in cache and c in cache and b not in cache
    stats = cache.stats
    assert (stats.evictions, stats.entries, stats.bytes_in_cache) == (1, 2, 2 * SLIDE_BYTES)
    cache.get(b)  # read again after eviction
    assert reader.counts[b] == 2 and cache.stats.bytes_in_cache <= 2 * SLIDE_BYTES
    assert cache.stats.peak_bytes == 2 * SLIDE_BYTES  # the high-water mark never passed the limit


def test_slide_larger_than_the_limit_is_returned_but_not_kept(slides: list[Path]) -> None:
    cache = FeatureCache(max_bytes=SLIDE_BYTES - 1)
    sf = cache.get(slides[0])
    assert sf.n_patches == N
    assert len(cache) == 0 and cache.stats.bytes_in_cache == 0


def test_float16_option_halves_feature_memory(slides: list[Path]) -> None:
    half = FeatureCache(dtype="float16")
    full = FeatureCache()
    h, f = half.get(slides[0]), full.get(slides[0])
    assert h.features.dtype == np.float16 and f.features.dtype == np.float32
    np.testing.assert_allclose(h.features, f.features, rtol=1e-3, atol=1e-3)
    assert half.stats.bytes_in_cache == N * D * 2 + N * 16
    assert full.stats.bytes_in_cache == N * D * 4 + N * 16


def test_failed_read_raises_typed_error_each_time(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    cache = FeatureCache()
    for _ in range(2):
        with pytest.raises(FeatureFileError, match="cannot read HDF5"):
            cache.get(bad)
    assert len(cache) == 0


def test_prefetch_reads_everything_once(slides: list[Path]) -> None:
    reader = CountingReader(delay=0.01)
    cache = FeatureCache(reader=reader)
    cache.prefetch(slides)
    for p in slides:  # a get may come before, during or after the prefetch of its file
        cache.get(p)
    assert reader.counts == Counter(dict.fromkeys(slides, 1))
    assert cache.stats.hits + cache.stats.misses == len(slides)
    cache.close()


def test_get_waits_for_a_prefetch_in_flight_instead_of_reading_again(slides: list[Path]) -> None:
    gate = threading.Event()
    reader = CountingReader()

    def gated(path: Path) -> SlideFeatures:
        sf = reader(path)
        gate.wait(5)
        return sf

    cache = FeatureCache(reader=gated)
    cache.prefetch([slides[0]])
    _wait_until(lambda: reader.counts[slides[0]] == 1)  # the prefetcher is inside the read
    got: list[SlideFeatures] = []
    getter = threading.Thread(target=lambda: got.append(cache.get(slides[0])))
    getter.start()
    time.sleep(0.05)
    assert not got  # still waiting for the prefetch
    gate.set()
    getter.join(5)
    assert got and got[0].n_patches == N
    assert reader.counts[slides[0]] == 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.reads) == (1, 0, 1)
    cache.close()


def test_prefetcher_survives_a_bad_file_and_get_reraises(
    slides: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    reader = CountingReader()
    cache = FeatureCache(reader=reader)
    cache.prefetch([bad, slides[0]])
    _wait_until(lambda: slides[0] in cache)
    with pytest.raises(FeatureFileError, match="cannot read HDF5"):
        cache.get(bad)
    cache.get(slides[0])
    assert reader.counts[slides[0]] == 1 and reader.counts[bad] == 1


def test_prefetch_never_evicts_slides_not_yet_used(slides: list[Path]) -> None:
    reader = CountingReader()
    cache = FeatureCache(max_bytes=2 * SLIDE_BYTES, reader=reader)
    cache.prefetch(slides[:4])
    _wait_until(lambda: len(cache) == 2)
    time.sleep(0.1)  # give a misbehaving prefetcher the chance to go on
    assert sum(reader.counts.values()) == 2  # blocked: room only by evicting unused slides
    for p in slides[:4]:
        cache.get(p)  # each get frees room for the next prefetch
    assert reader.counts == Counter(dict.fromkeys(slides[:4], 1))
    assert cache.stats.bytes_in_cache <= 2 * SLIDE_BYTES
    cache.close()


def test_close_stops_a_blocked_prefetcher(slides: list[Path]) -> None:
    cache = FeatureCache(max_bytes=SLIDE_BYTES)
    cache.prefetch(slides)
    _wait_until(lambda: len(cache) == 1)
    cache.close()  # must not hang on the waiting thread
    assert len(cache) == 0
    with pytest.raises(ConfigError, match="closed"):
        cache.get(slides[0])


@pytest.mark.parametrize("kwargs", [{"max_bytes": -1}, {"max_bytes": 1.5}, {"dtype": "int8"}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FeatureCache(**kwargs)


def test_default_cache_is_bounded(slides: list[Path]) -> None:
    # predict and the reports make caches without a limit: they must not grow with the cohort
    assert FeatureCache().max_bytes == 8 * 2**30
    assert FeatureCache(None).max_bytes is None  # unbounded only when asked for
    assert pickle.loads(pickle.dumps(FeatureCache())).max_bytes == 8 * 2**30
