"""Survival targets, time bins, losses and metrics."""

from oncoslide.survival.target import make_survival, split_survival

__all__ = ["make_survival", "split_survival"]
