"""One training path for every model: Lightning, patient-level cross-validation, run folders.

``cross_validate`` and ``CVResult`` are imported on first use: Lightning takes seconds to
import, and validating a configuration should not wait for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oncoslide.training.config import TrainConfig, make_config

if TYPE_CHECKING:
    from oncoslide.training.cv import CVResult, cross_validate

__all__ = ["CVResult", "TrainConfig", "cross_validate", "make_config"]


def __getattr__(name: str) -> Any:
    if name in ("CVResult", "cross_validate"):
        from oncoslide.training import cv

        return getattr(cv, name)
    raise AttributeError(f"module 'oncoslide.training' has no attribute {name!r}")
