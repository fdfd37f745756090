"""One training path for every model: Lightning, patient-level cross-validation, run folders."""

from oncoslide.training.config import TrainConfig, make_config
from oncoslide.training.cv import CVResult, cross_validate

__all__ = ["CVResult", "TrainConfig", "cross_validate", "make_config"]
