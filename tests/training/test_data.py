"""Batches of bags: padding and masks, seeded shuffles and patch sampling, background assembly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oncoslide.cohort.table import load_cohort
from oncoslide.features.cache import FeatureCache
from oncoslide.training.data import (
    BackgroundBatches,
    BagDataset,
    BagTargets,
    EpochShuffleSampler,
    collate_bags,
    length_sorted_order,
)


def _item(i: int, n: int, dim: int = 3, dtype: str = "float16") -> dict[str, object]:
    features = (np.arange(n * dim).reshape(n, dim) + 100 * i).astype(dtype)
    coords = np.stack([np.arange(n), np.arange(n) * 2], axis=1).astype(np.int64)
    features.setflags(write=False)  # cached arrays are read-only
    return {
        "index": i,
        "features": features,
        "coords": coords,
        "slide_index": np.arange(n) % 2,
        "time": 10.0 * i,
        "event": 1.0,
    }


def test_collate_pads_masks_and_casts_to_float32() -> None:
    batch = collate_bags([_item(0, 2), _item(1, 5), _item(2, 3, dtype="float32")])
    assert batch["features"].dtype == torch.float32 and batch["features"].shape == (3, 5, 3)
    assert batch["mask"].tolist() == [
        [True, True, False, False, False],
        [True] * 5,
        [True, True, True, False, False],
    ]
    np.testing.assert_array_equal(batch["features"][1].numpy(), _item(1, 5)["features"])
    assert (batch["features"][0, 2:] == 0).all() and (batch["coords"][0, 2:] == 0).all()
    assert batch["time"].tolist() == [0.0, 10.0, 20.0] and batch["index"].tolist() == [0, 1, 2]
    assert batch["slide_index"].dtype == torch.long
    assert batch["slide_index"][0].tolist() == [0, 1, -1, -1, -1]  # -1 on padding


def test_slide_index_travels_from_files_into_batches(tiny_cohort: Path) -> None:
    """Each slide is its own coordinate frame: batches say which slide every patch comes from."""
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    two = [p for p in cohort.patient_ids if len(cohort.slide_ids(p)) == 2]
    assert two, "the tiny cohort has two-slide patients"
    cache = FeatureCache()
    for max_patches in (None, 12):
        ds = BagDataset(cohort, two, cache, BagTargets(), max_patches=max_patches, seed=1)
        batch = collate_bags([ds[i] for i in range(len(ds))])
        for b, pid in enumerate(two):
            valid = batch["mask"][b]
            index = batch["slide_index"][b][valid].numpy()
            coords = batch["coords"][b][valid].numpy()
            assert set(index) == {0, 1}
            for k, path in enumerate(cohort.slide_paths(pid)):
                own = {tuple(c) for c in cache.get(path).coords.tolist()}
                # every patch's coordinates exist in the slide its index names
                assert all(tuple(c) in own for c in coords[index == k].astype(int).tolist())
            assert (batch["slide_index"][b][~valid] == -1).all()
    cache.close()


def test_bag_sampling_is_seeded_by_seed_epoch_and_item(tiny_cohort: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    ids = cohort.patient_ids[:6]
    cache = FeatureCache()
    ds = BagDataset(cohort, ids, cache, BagTargets(), max_patches=8, seed=3)
    first = [ds[i]["features"] for i in range(6)]
    again = [ds[i]["features"] for i in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(f.shape[0] == 8 for f in first)
    ds.set_epoch(1)
    assert not all(np.array_equal(a, ds[i]["features"]) for i, a in enumerate(first))
    full = BagDataset(cohort, ids, cache, BagTargets(), max_patches=None)
    assert [full[i]["features"].shape[0] for i in range(6)] == list(full.n_patches())
    cache.close()


def test_epoch_shuffle_differs_per_epoch_and_repeats_per_seed(tiny_cohort: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    ds = BagDataset(cohort, cohort.patient_ids, FeatureCache(), BagTargets())
    sampler = EpochShuffleSampler(ds, seed=5)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sorted(epoch0) == list(range(len(ds))) and epoch0 != epoch1
    assert ds.epoch == 1  # the sampler told the dataset which epoch it serves
    assert list(EpochShuffleSampler(ds, seed=5)) == epoch0
    order = length_sorted_order(ds)
    sizes = ds.n_patches()[order]
    assert (np.diff(sizes) >= 0).all()


def test_background_batches_keep_order_and_raise_producer_errors() -> None:
    assert list(BackgroundBatches(range(50), depth=2)) == list(range(50))
    assert len(BackgroundBatches([1, 2, 3])) == 3

    def failing():
        yield 1
        raise ValueError("bad bag")

    it = iter(BackgroundBatches(failing()))
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad bag"):
        next(it)


def test_background_batches_stop_their_thread_when_abandoned() -> None:
    import threading

    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    it = iter(BackgroundBatches(source(), depth=2))
    assert next(it) == 0
    it.close()  # the consumer stops early (e.g. early stopping)
    assert not any(t.name == "oncoslide-batches" for t in threading.enumerate())
    assert len(produced) < 10
