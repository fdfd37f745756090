"""Per-dimension patch-feature statistics of a model's training part, kept in its model folder.

Test-time adaptation (:mod:`oncoslide.training.adapt`) maps a new site's features onto these
statistics, so they are computed when the model is fitted (training part only, every patch of
every slide of its patients) and written as ``feature_stats.npz`` beside ``weights.pt``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oncoslide._io import atomic_path
from oncoslide.errors import ConfigError

FEATURE_STATS_FILE = "feature_stats.npz"

# a dimension that never varies keeps its values: it is centred but not rescaled
_MIN_STD = 1e-6


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureStats:
    """Mean and standard deviation per feature dimension over ``n_patches`` patches."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64, at least _MIN_STD
    n_patches: int
    n_slides: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def of(cls, arrays: Iterable[np.ndarray]) -> FeatureStats:
        """Pooled statistics of (N_i, D) feature arrays (sums in float64, one pass)."""
        total: np.ndarray | None = None
        squares: np.ndarray | None = None
        count = slides = 0
        for x in arrays:
            x64 = np.asarray(x, dtype=np.float64)
            if x64.ndim != 2 or x64.shape[0] == 0:
                continue
            s, q = x64.sum(axis=0), np.einsum("nd,nd->d", x64, x64)
            total = s if total is None else total + s
            squares = q if squares is None else squares + q
            count += x64.shape[0]
            slides += 1
        if total is None or squares is None or count == 0:
            raise ConfigError("no patches to compute feature statistics from")
        mean = total / count
        var = np.maximum(squares / count - mean**2, 0.0)
        return cls(
            mean=mean, std=np.maximum(np.sqrt(var), _MIN_STD), n_patches=count, n_slides=slides
        )

    def save(self, folder: str | Path) -> Path:
        target = Path(folder) / FEATURE_STATS_FILE
        with atomic_path(target, suffix=".npz.tmp") as tmp, tmp.open("wb") as fh:
            np.savez(
                fh,
                mean=self.mean,
                std=self.std,
                n_patches=np.int64(self.n_patches),
                n_slides=np.int64(self.n_slides),
            )
        return target

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        """The statistics stored in a model folder.

        Raises:
            ConfigError: the folder has none (written before they were stored) or they are
                unreadable.
        """
        file = Path(folder) / FEATURE_STATS_FILE
        if not file.is_file():
            raise ConfigError(
                f"the model in {folder} has no training feature statistics ({FEATURE_STATS_FILE}): "
                "it was written before they were stored, so it cannot be adapted to a new site. "
                "Fit it again with this version (e.g. `oncoslide train ... --fit-all --overwrite`)"
            )
        try:
            with np.load(file) as data:
                return cls(
                    mean=np.asarray(data["mean"], dtype=np.float64),
                    std=np.asarray(data["std"], dtype=np.float64),
                    n_patches=int(data["n_patches"]),
                    n_slides=int(data["n_slides"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from None


__all__ = ["FEATURE_STATS_FILE", "FeatureStats"]
