"""Unlabelled bags over a feature folder: the data of slide-encoder pre-training.

One item per slide (``per="slide"``, the default: each slide is its own coordinate frame, as
PAMA pre-trains) or per patient (``per="patient"``: the patient's slides concatenated, with
``slide_index``; needs a cohort table). Without a cohort table every feature file of the
folder (and of its immediate subfolders, as CLAM/TRIDENT write them) is a slide of its own
patient. Files are read through a :class:`~oncoslide.features.cache.FeatureCache`.

Bags larger than ``max_patches`` are subsampled without replacement with a generator seeded by
(seed, epoch, item): reproducible whatever the order or process that loads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from oncoslide.errors import ConfigError, FeatureFileError
from oncoslide.features.cache import FeatureCache
from oncoslide.features.readers import FEATURE_SUFFIXES, FeatureIndex
from oncoslide.features.schema import FeatureContract, SlideFeatures
from oncoslide.pretrain.base import Bag

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class BagUnit:
    """What one item reads: its slides' feature files, in order."""

    unit_id: str
    patient_id: str
    slide_ids: tuple[str, ...]
    paths: tuple[Path, ...]


def feature_slide_ids(features_dir: PathLike) -> list[str]:
    """Slide ids of every feature file in ``features_dir`` and its immediate subfolders."""
    folder = Path(features_dir)
    if not folder.is_dir():
        raise FeatureFileError(folder, "features folder not found")
    stems: set[str] = set()
    for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if sub.name.startswith(".") and sub != folder:
            continue
        for entry in sub.iterdir():
            name = entry.name
            if name.startswith(".") or not entry.is_file():
                continue
            for suffix in FEATURE_SUFFIXES:
                if name.lower().endswith(suffix) and len(name) > len(suffix):
                    stems.add(name[: -len(suffix)])
                    break
    return sorted(stems)


class PretrainBags(Dataset[Bag]):
    """Unlabelled bags (see the module docstring); items are :class:`Bag`."""

    def __init__(
        self,
        units: Sequence[BagUnit],
        *,
        cache: FeatureCache | None = None,
        max_patches: int | None = None,
        seed: int = 0,
        extras: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        if not units:
            raise ConfigError("no bags to pre-train on: the feature folder has no feature file")
        if max_patches is not None and max_patches < 1:
            raise ConfigError(f"max_patches must be >= 1, got {max_patches}")
        self.units = list(units)
        self.cache = cache if cache is not None else FeatureCache(max_bytes=4 * 2**30)
        self.max_patches = max_patches
        self.seed = seed
        self.epoch = 0
        # name -> {patient_id: vector}: per-patient side data handed to methods (Threads)
        self.extras = {k: dict(v) for k, v in (extras or {}).items()}

    @classmethod
    def from_features(
        cls,
        features_dir: PathLike,
        *,
        cohort: Any = None,
        per: Literal["slide", "patient"] = "slide",
        slide_ids: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> PretrainBags:
        """Bags of a feature folder; ``cohort`` (a :class:`~oncoslide.cohort.table.Cohort`)
        names the slides, their patients and files; without it every file is a slide."""
        units: list[BagUnit] = []
        if cohort is not None:
            for pid in cohort.patient_ids:
                sids = tuple(str(s) for s in cohort.slide_ids(pid))
                paths = tuple(Path(p) for p in cohort.slide_paths(pid))
                if per == "patient":
                    units.append(BagUnit(str(pid), str(pid), sids, paths))
                else:
                    units += [
                        BagUnit(s, str(pid), (s,), (p,)) for s, p in zip(sids, paths, strict=True)
                    ]
        else:
            if per == "patient":
                raise ConfigError("per-patient bags need a cohort table (patient of each slide)")
            index = FeatureIndex(features_dir)
            ids = list(slide_ids) if slide_ids is not None else feature_slide_ids(features_dir)
            for sid in ids:
                path = index.find(sid)
                if path is None:
                    raise FeatureFileError(Path(features_dir), f"no feature file for slide {sid}")
                units.append(BagUnit(sid, sid, (sid,), (path,)))
        if slide_ids is not None and cohort is not None:
            wanted = set(map(str, slide_ids))
            units = [u for u in units if set(u.slide_ids) & wanted]
        return cls(units, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.units)

    def slides(self, i: int) -> list[SlideFeatures]:
        return [self.cache.get(p) for p in self.units[i].paths]

    def contract(self) -> FeatureContract:
        """The feature contract of the first bag (encoder, dimension, patch grid)."""
        return FeatureContract.of(self.slides(0)[0])

    @property
    def feature_dim(self) -> int:
        return self.slides(0)[0].dim

    def load(self, i: int, *, subsample: bool = True, epoch: int | None = None) -> Bag:
        """Bag ``i``; subsampled to ``max_patches`` with a draw seeded by (seed, epoch, i)."""
        epoch = self.epoch if epoch is None else epoch
        unit = self.units[i]
        slides = self.slides(i)
        dims = {s.dim for s in slides}
        if len(dims) > 1:
            raise FeatureFileError(unit.paths[0], f"slides of {unit.unit_id} disagree: D={dims}")
        feats = np.concatenate([s.features for s in slides]).astype(np.float32, copy=False)
        coords = np.concatenate([s.coords for s in slides]).astype(np.float32, copy=False)
        sidx = np.repeat(np.arange(len(slides)), [s.n_patches for s in slides])
        has_coords = not bool((coords == -1).all(axis=1).any())
        if subsample and self.max_patches is not None and feats.shape[0] > self.max_patches:
            rng = np.random.default_rng([self.seed, epoch, i])
            keep = np.sort(rng.choice(feats.shape[0], self.max_patches, replace=False))
            feats, coords, sidx = feats[keep], coords[keep], sidx[keep]
        extras = {
            name: torch.as_tensor(np.asarray(table[unit.patient_id], dtype=np.float32))
            for name, table in self.extras.items()
            if unit.patient_id in table
        }
        return Bag(
            index=i,
            unit_id=unit.unit_id,
            patient_id=unit.patient_id,
            features=torch.from_numpy(np.array(feats, dtype=np.float32)),
            coords=torch.from_numpy(np.array(coords, dtype=np.float32)) if has_coords else None,
            slide_index=torch.from_numpy(sidx.astype(np.int64)),
            extras=extras,
        )

    def __getitem__(self, i: int | tuple[int, int]) -> Bag:  # type: ignore[override]
        if isinstance(i, tuple):  # (epoch, index) from ResumableBatches
            return self.load(i[1], epoch=i[0])
        return self.load(i)


def collate_list(items: list[Bag]) -> list[Bag]:
    """Bags stay a list (no padding): methods batch them as they need."""
    return items


class ResumableBatches(Sampler[list[tuple[int, int]]]):
    """The whole run's batches as one sequence, shared out over processes, resumable.

    Epoch e's order is a permutation seeded by (seed, e), cut into batches; with W processes,
    process r takes batches r, r + W, ... of each epoch (a process short of one repeats an
    earlier batch of the epoch: every process must step together). Items are (epoch, index)
    pairs, so a bag's patch subsample depends on its epoch and not on shared state.
    The trainer sees the run as one epoch of ``total`` batches: a resumed run restarts inside
    it, at :meth:`start`'s position (the number of optimiser steps done).
    """

    def __init__(self, dataset: PretrainBags, batch_size: int, seed: int, total: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.total = total
        self._start = 0

    @staticmethod
    def world() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @property
    def steps_per_epoch(self) -> int:
        _, world = self.world()
        n_batches = -(-len(self.dataset) // self.batch_size)
        return -(-n_batches // world)

    def start(self, position: int) -> None:
        self._start = position

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch, 17])
        order = [int(i) for i in rng.permutation(len(self.dataset))]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rank, world = self.world()
        mine = batches[rank::world]
        while len(mine) < self.steps_per_epoch:
            mine.append(batches[len(mine) % len(batches)])
        return mine

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per = self.steps_per_epoch
        position, self._start = self._start, 0
        epoch, skip = divmod(position, per)
        while position < self.total:
            for batch in self.epoch_batches(epoch)[skip:]:
                if position >= self.total:
                    return
                yield [(epoch, i) for i in batch]
                position += 1
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        return self.total


class ResumableLoader(DataLoader[Bag]):
    """A DataLoader whose position Lightning saves in its checkpoints (``state_dict``) and
    restores on resume (``load_state_dict``). The position is set by the runner after each
    finished step (:meth:`mark`), not by iteration (the trainer fetches a batch ahead)."""

    def __init__(self, dataset: PretrainBags, batch_size: int, seed: int, total: int) -> None:
        self.batches = ResumableBatches(dataset, batch_size, seed, total)
        super().__init__(
            dataset,
            batch_sampler=self.batches,  # type: ignore[arg-type]
            collate_fn=collate_list,
            num_workers=0,
        )
        self._position = 0

    def mark(self, done: int) -> None:
        """``done`` optimiser steps (batches of this process) are finished."""
        self._position = done

    def state_dict(self) -> dict[str, int]:
        return {"position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._position = int(state["position"])
        self.batches.start(self._position)


__all__ = [
    "BagUnit",
    "PretrainBags",
    "ResumableBatches",
    "ResumableLoader",
    "collate_list",
    "feature_slide_ids",
]
