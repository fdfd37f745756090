"""Patient bags as a torch dataset, minibatches of several bags with padding and masks.

Features come from a ``FeatureCache`` shared by every fold and seed of a run, so each feature
file is read once per run (while the cohort fits under the cache limit); a background prefetch
fills the cache in the order the first epoch will ask for it, which hides disk reads behind
compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.table import Cohort
from oncoslide.features.cache import FeatureCache


@dataclass(frozen=True)
class BagTargets:
    """Per-patient targets aligned with a dataset's patient order (unused fields are None)."""

    time: np.ndarray | None = None  # float, survival
    event: np.ndarray | None = None  # float 0/1, survival
    bin_index: np.ndarray | None = None  # int64, discrete-time survival
    label: np.ndarray | None = None  # int64 class index, classification


class BagDataset(Dataset):
    """One item per patient: all patches of all the patient's slides, plus targets.

    In training mode a bag larger than ``max_patches`` is subsampled without replacement, with a
    generator seeded by (seed, epoch, item) so a run is reproducible whatever the load order.
    """

    def __init__(
        self,
        cohort: Cohort,
        patient_ids: Sequence[str],
        cache: FeatureCache,
        targets: BagTargets,
        *,
        max_patches: int | None = None,
        seed: int = 0,
        side: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.cohort = cohort
        self.patient_ids = list(patient_ids)
        self.cache = cache
        self.targets = targets
        self.max_patches = max_patches
        self.seed = seed
        self.epoch = 0
        # per-patient side inputs of THIS part only: name -> ((n, G) values, (n,) present)
        self.side = dict(side or {})
        n = len(self.patient_ids)
        for name, (values, present) in self.side.items():
            if len(values) != n or len(present) != n:
                raise ValueError(f"side input {name} has {len(values)} rows for {n} patients")
        for name in ("time", "event", "bin_index", "label"):
            arr = getattr(targets, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"target {name} has {len(arr)} entries for {n} patients")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.patient_ids)

    def slide_paths(self, order: Sequence[int] | None = None) -> list[str]:
        """Feature-file paths in the order the given item order will read them."""
        order = range(len(self)) if order is None else order
        return [str(p) for i in order for p in self.cohort.slide_paths(self.patient_ids[i])]

    def n_patches(self) -> np.ndarray:
        counts = self.cohort.patients.loc[self.patient_ids, "n_patches"]
        return counts.to_numpy(dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, object]:
        bag = load_bag(self.cohort, self.patient_ids[i], self.cache)
        features, coords, slide_index = bag.features, bag.coords, bag.slide_index
        if self.max_patches is not None and features.shape[0] > self.max_patches:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            keep = np.sort(rng.choice(features.shape[0], self.max_patches, replace=False))
            features, coords, slide_index = features[keep], coords[keep], slide_index[keep]
        item: dict[str, object] = {
            "index": i,
            "features": features,
            "coords": coords,
            "slide_index": slide_index,
        }
        for name in ("time", "event", "bin_index", "label"):
            arr = getattr(self.targets, name)
            if arr is not None:
                item[name] = arr[i]
        for name, (values, present) in self.side.items():
            item[f"side:{name}"] = values[i]
            item[f"side_present:{name}"] = bool(present[i])
        return item


def collate_bags(items: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    """Pad bags to the longest one in the batch; ``mask`` marks the real patches.

    ``coords`` (B, N, 2) are level-0 pixels of each patch's own slide and ``slide_index``
    (B, N) says which of the patient's slides it comes from (-1 on padding): slides are separate
    coordinate frames, so two patches are neighbours only when their slide indices agree.

    Bags are copied into fresh numpy buffers (cached arrays are read-only and may be float16),
    which torch then wraps without another copy.
    """
    arrays = [np.asarray(it["features"]) for it in items]
    lengths = [a.shape[0] for a in arrays]
    n_max, dim = max(lengths), arrays[0].shape[1]
    features = np.zeros((len(items), n_max, dim), dtype=np.float32)
    coords = np.zeros((len(items), n_max, 2), dtype=np.float32)
    slide_index = np.full((len(items), n_max), -1, dtype=np.int64)
    mask = np.zeros((len(items), n_max), dtype=bool)
    for b, (it, arr, n) in enumerate(zip(items, arrays, lengths, strict=True)):
        features[b, :n] = arr
        coords[b, :n] = np.asarray(it["coords"])
        slide_index[b, :n] = np.asarray(it["slide_index"])
        mask[b, :n] = True
    batch: dict[str, torch.Tensor] = {
        "features": torch.from_numpy(features),
        "coords": torch.from_numpy(coords),
        "slide_index": torch.from_numpy(slide_index),
        "mask": torch.from_numpy(mask),
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),  # type: ignore[call-overload]
    }
    for name, dtype in (
        ("time", torch.float32),
        ("event", torch.float32),
        ("bin_index", torch.long),
        ("label", torch.long),
    ):
        if name in items[0]:
            batch[name] = torch.tensor([it[name] for it in items], dtype=dtype)
    for key in items[0]:
        if key.startswith("side:"):
            batch[key] = torch.from_numpy(np.stack([np.asarray(it[key]) for it in items]))
        elif key.startswith("side_present:"):
            batch[key] = torch.tensor([bool(it[key]) for it in items], dtype=torch.bool)
    return batch


class _EpochSampler(Sampler[int]):
    """An epoch's order from ``order(epoch)``; iterating tells the dataset which epoch it is."""

    def __init__(self, dataset: BagDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def order(self, epoch: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        self.dataset.set_epoch(self.epoch)
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return len(self.dataset)


class EpochShuffleSampler(_EpochSampler):
    """A seeded shuffle that differs per epoch and tells the dataset which epoch it is."""

    def order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch, 7])
        return [int(i) for i in rng.permutation(len(self.dataset))]


class BalancedSampler(_EpochSampler):
    """Each epoch draws len(dataset) items with replacement, every stratum equally likely.

    Strata are e.g. time bin x censoring (survival) or the class (classification), so rare
    strata are seen as often as common ones. Seeded by (seed, epoch): reproducible.
    """

    def __init__(self, dataset: BagDataset, strata: np.ndarray, seed: int) -> None:
        if len(strata) != len(dataset):
            raise ValueError(f"{len(strata)} strata for {len(dataset)} items")
        super().__init__(dataset, seed)
        _, codes, counts = np.unique(strata, return_inverse=True, return_counts=True)
        weight = 1.0 / counts[codes]
        self.p = weight / weight.sum()

    def order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch, 11])
        return [int(i) for i in rng.choice(len(self.p), size=len(self.p), p=self.p)]


class ShardedBatches(Sampler[list[int]]):
    """Batches of an epoch's order (from an epoch sampler), shared out over processes.

    The epoch's order is cut into batches of ``batch_size``; with W processes (multi-process
    training) process r takes batches r, r + W, r + 2W, ... So W processes that each accumulate
    A / W batches per optimiser step see exactly the batches one process accumulating A of them
    sees, and their averaged gradients are that process's gradient. When the batches do not
    divide evenly, a process short of one repeats an earlier batch of the epoch (every process
    must step together).
    """

    def __init__(self, sampler: _EpochSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    @staticmethod
    def world() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _n_batches(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(iter(self.sampler))  # advances the epoch and tells the dataset
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rank, world = self.world()
        mine = batches[rank::world]
        while len(mine) < len(self):
            mine.append(batches[len(mine) % len(batches)])
        return iter(mine)

    def __len__(self) -> int:
        _, world = self.world()
        return -(-self._n_batches() // world)


def length_sorted_order(dataset: BagDataset) -> list[int]:
    """Inference order that groups bags of similar size, so padding wastes little."""
    return [int(i) for i in np.argsort(dataset.n_patches(), kind="stable")]


class BackgroundBatches:
    """Iterate a loader in a background thread, ``depth`` batches ahead of the consumer.

    Assembling a batch (reading bags from the cache, padding, casting float16 to float32) is
    numpy work that releases the GIL, as do the model's matrix products: in a thread it
    overlaps the previous step's compute instead of adding to it. Batches come out in the
    loader's order, so results do not depend on thread timing.
    """

    _END = object()

    def __init__(self, loader: Iterable[Any], depth: int = 2) -> None:
        self.loader = loader
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        slots: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self.loader:
                    while not stop.is_set():
                        try:
                            slots.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                slots.put(self._END)
            except BaseException as exc:  # handed to the consumer, raised there
                slots.put(_Failure(exc))

        worker = threading.Thread(target=produce, name="oncoslide-batches", daemon=True)
        worker.start()
        try:
            while True:
                item = slots.get()
                if item is self._END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            worker.join()


@dataclass(frozen=True)
class _Failure:
    exc: BaseException
