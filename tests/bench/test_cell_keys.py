"""Adding settings never invalidates stored benchmark results: cell keys of the first release."""

from __future__ import annotations

from pathlib import Path

import pytest

from oncoslide.bench.protocols import plan_cells
from oncoslide.bench.resolve import resolve_bench
from oncoslide.bench.spec import spec_from_dict
from oncoslide.simulate import make_simulation_config, simulate_cohort

# Computed by the first release (before TrainConfig gained init, freeze, sampler, optimizer,
# accumulation, fixed bins, aux weights and multi-process settings) on the cohort below.
RECORDED = [
    "2a7d3ae41068988324b8",
    "5637078776e9729b1332",
    "91c55f971e34b8c8521d",
    "95e179ade1a14731cdcd",
    "c70472ee82798c11dd1b",
    "ccf1da5a3f3935b135da",
    "ce06d4e1b5aa7c171d89",
    "ee77ee0d0ff74ca04c50",
]


def _spec(root: Path, **train: object) -> dict:
    return {
        "name": "keys",
        "cohort": "cohort.csv",
        "folds": 2,
        "seeds": [0],
        "train": {"epochs": 2, **train},
        "feature_sets": [{"name": "sim", "features": "features"}],
        "tasks": [
            {"name": "os", "kind": "survival"},
            {"name": "msi", "kind": "binary", "target": "msi"},
        ],
        "models": [{"name": "abmil", "protocol": "mil"}, {"name": "linear", "protocol": "linear"}],
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    settings = {"n_patients": 24, "feature_dim": 8, "patches_median": 10, "patches_min": 5}
    settings |= {"n_genes": 12, "within_prototype_rank": 2, "seed": 5}
    simulate_cohort(out, make_simulation_config("demo", settings))
    return out


def _keys(root: Path, **train: object) -> list[str]:
    spec = spec_from_dict(_spec(root, **train), base_dir=root, source="keys")
    return sorted(c.key for c in plan_cells(resolve_bench(spec)))


def test_cell_keys_are_those_of_the_first_release(root: Path) -> None:
    assert _keys(root) == RECORDED
    # new settings at their defaults, or execution-only ones, leave every key as it was
    assert _keys(root, sampler="shuffle", optimizer="adamw", devices=1, freeze=[]) == RECORDED
    changed = _keys(root, sampler="balanced")
    assert len(set(changed) - set(RECORDED)) == 4  # the four mil cells, not the linear ones
