"""Shared fixtures: small simulated cohorts written once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from oncoslide.cohort.simulate import SimulationConfig, simulate_cohort, write_permuted_cohort


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 patients, 2 cancer types, 16-d features, ~40 patches per slide (seconds to train)."""
    out = tmp_path_factory.mktemp("tiny-cohort")
    config = SimulationConfig(
        n_patients=40,
        n_cohorts=2,
        feature_dim=16,
        patches_median=40,
        patches_min=10,
        patches_max=120,
        n_genes=24,
        seed=3,
    )
    simulate_cohort(out, config)
    write_permuted_cohort(out / "cohort.csv", out / "cohort_permuted.csv", seed=1)
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds overhead (a lot on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
