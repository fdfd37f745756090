"""A model that reads omics during training runs in a benchmark; fold models can be kept."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import Tensor, nn

from oncoslide.bench.protocols import plan_cells
from oncoslide.bench.resolve import resolve_bench
from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.errors import ConfigError
from oncoslide.models import MODELS, MILModel, MILOutput
from oncoslide.models.base import bag_index, project_valid
from oncoslide.models.heads import make_head
from oncoslide.training.model_folder import load_model_folder


class BenchOmicsProbe(MILModel):
    """Mean pooling that reconstructs the omics profile from the embedding in training."""

    def __init__(self, in_dim: int, n_outputs: int, n_genes: int = 24) -> None:
        super().__init__(in_dim, n_outputs, dropout=0.0, hidden_dim=8)
        self.proj = nn.Linear(in_dim, 8)
        self.decoder = nn.Linear(8, n_genes)
        self.head = make_head(8, n_outputs)

    def forward(
        self, features: Tensor, mask: Tensor, coords: Tensor | None = None, side: dict | None = None
    ) -> MILOutput:
        rows = project_valid(self.proj, features, mask)
        total = rows.new_zeros(mask.shape[0], 8).index_add(0, bag_index(mask), rows)
        embedding = total / mask.sum(1, keepdim=True)
        aux = {}
        if side is not None:
            aux["recon"] = ((self.decoder(embedding) - side["omics"]) ** 2).mean()
        return MILOutput(logits=self.head(embedding), embedding=embedding, aux_losses=aux)


@pytest.fixture(autouse=True, scope="module")
def _probe_registered() -> Iterator[None]:
    """The probe is registered for this module only (other tests list the real models)."""
    MODELS.register(
        "bench_omics_probe",
        reference="test probe",
        has_attention=False,
        uses_coords=False,
        side_inputs={"omics": "train"},
        aux_losses={"recon": 0.3},
    )(BenchOmicsProbe)
    yield
    MODELS.unregister("bench_omics_probe")


def _spec(root: Path, *, omics: bool = True, keep: bool = True) -> dict:
    task = {"name": "os", "kind": "survival"}
    if omics:
        task |= {"omics": "omics.csv", "gene_groups": "gene_groups.gmt"}
    return {
        "name": "side",
        "cohort": "cohort.csv",
        "folds": 2,
        "seeds": [0],
        "n_boot": 100,
        "keep_models": keep,
        "train": {"epochs": 1, "batch_size": 4},
        "feature_sets": [{"name": "sim", "features": "features"}],
        "tasks": [task],
        "models": [
            {"name": "abmil", "protocol": "mil"},
            {"name": "probe", "protocol": "mil", "model": "bench_omics_probe"},
        ],
    }


def test_side_input_model_runs_and_fold_models_are_kept(tiny_cohort: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_cohort, root)
    spec = spec_from_dict(_spec(root), base_dir=root, source="side")
    run = run_benchmark(spec, tmp_path / "bench", workers=0, progress=False)
    assert not run.failures, run.failures
    cells = plan_cells(resolve_bench(spec))
    for cell in cells:
        trained = load_model_folder(tmp_path / "bench" / "models" / cell.key)
        assert trained.name == ("abmil" if cell.model == "abmil" else "bench_omics_probe")
        assert bool(trained.fold_task.side_scalers) == (cell.model == "probe")
    # the omics table is part of the probe's cells' data, not of the abmil cells'
    plain = spec_from_dict(_spec(root, omics=False, keep=False), base_dir=root, source="side")
    abmil = {c.key for c in cells if c.model == "abmil"}
    assert abmil == {c.key for c in plan_cells(resolve_bench_lenient(plain)) if c.model == "abmil"}


def resolve_bench_lenient(spec):  # without the probe, whose omics the plain spec lacks
    return resolve_bench(spec.model_copy(update={"models": spec.models[:1]}))


def test_a_task_without_the_side_table_is_refused_up_front(tiny_cohort: Path) -> None:
    spec = spec_from_dict(_spec(tiny_cohort, omics=False), base_dir=tiny_cohort, source="side")
    with pytest.raises(ConfigError, match="uses the side input 'omics'"):
        resolve_bench(spec)
