"""Patch-feature statistics of a model's training part, kept in its model folder.

Test-time adaptation (:mod:`oncoslide.training.adapt`) maps a new site's features onto these
statistics, so they are computed when the model is fitted (training part only, every patch of
every slide of its patients) and written as ``feature_stats.npz`` beside ``weights.pt``: the
mean and sd of each dimension (re-standardisation), the full covariance (CORAL alignment) and,
for classification, the share of training patients the fitted model predicts as each class
(decision matching). Folders written before the last two were stored lack them; the
adaptation steps that need them then refuse with a message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oncoslide._io import atomic_path
from oncoslide.errors import ConfigError

FEATURE_STATS_FILE = "feature_stats.npz"

# a dimension that never varies keeps its values: it is centred but not rescaled
_MIN_STD = 1e-6


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureStats:
    """Mean, standard deviation and covariance of the feature dimensions over ``n_patches``."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64, at least _MIN_STD
    n_patches: int
    n_slides: int
    cov: np.ndarray | None = None  # (D, D) float64 (population covariance); None: not stored
    # classification: the share of training-part patients the fitted model predicts as each
    # class (argmax of its outputs, full bags); None: not stored (survival, or an older folder)
    decision_rates: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def of(cls, arrays: Iterable[np.ndarray]) -> FeatureStats:
        """Pooled statistics of (N_i, D) feature arrays (sums in float64, one pass).

        The cross-products are taken about the first slide's mean, so the covariance does not
        lose precision to large feature means.
        """
        total: np.ndarray | None = None
        cross: np.ndarray | None = None
        ref: np.ndarray | None = None
        count = slides = 0
        for x in arrays:
            x64 = np.asarray(x, dtype=np.float64)
            if x64.ndim != 2 or x64.shape[0] == 0:
                continue
            if ref is None:
                ref = x64.mean(axis=0)
            xc = x64 - ref
            s, q = xc.sum(axis=0), xc.T @ xc
            total = s if total is None else total + s
            cross = q if cross is None else cross + q
            count += x64.shape[0]
            slides += 1
        if total is None or cross is None or ref is None or count == 0:
            raise ConfigError("no patches to compute feature statistics from")
        shift = total / count
        cov = cross / count - np.outer(shift, shift)
        cov = (cov + cov.T) / 2.0
        var = np.maximum(np.diag(cov), 0.0)
        return cls(
            mean=ref + shift,
            std=np.maximum(np.sqrt(var), _MIN_STD),
            n_patches=count,
            n_slides=slides,
            cov=cov,
        )

    def save(self, folder: str | Path) -> Path:
        target = Path(folder) / FEATURE_STATS_FILE
        with atomic_path(target, suffix=".npz.tmp") as tmp, tmp.open("wb") as fh:
            arrays: dict[str, Any] = {
                "mean": self.mean,
                "std": self.std,
                "n_patches": np.int64(self.n_patches),
                "n_slides": np.int64(self.n_slides),
            }
            for key, value in (("cov", self.cov), ("decision_rates", self.decision_rates)):
                if value is not None:
                    arrays[key] = value
            np.savez(fh, **arrays)
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
                    cov=(
                        np.asarray(data["cov"], dtype=np.float64) if "cov" in data.files else None
                    ),
                    decision_rates=(
                        np.asarray(data["decision_rates"], dtype=np.float64)
                        if "decision_rates" in data.files
                        else None
                    ),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from None


__all__ = ["FEATURE_STATS_FILE", "FeatureStats"]
