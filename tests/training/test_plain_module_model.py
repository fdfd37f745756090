"""A registered model need not derive from MILModel: a plain ``nn.Module`` with the model call,
``in_dim``, ``n_outputs`` and ``embed_dim`` trains through the one training path, writes fold
model folders that load and predict the run's numbers, and fits with ``fit_all``.

The training path's optional hooks (``lr_scales``, ``fit_to_training``, ...) are looked up
with ``getattr``; a hook once called unconditionally crashed such a model (benchmarks/
bench_train.py's side-input model) while every tested model subclassed MILModel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import Tensor, nn

from oncoslide.cohort.table import load_cohort
from oncoslide.models import MODELS, MILModel, MILOutput
from oncoslide.training import cross_validate, make_config
from oncoslide.training.fit_all import fit_all
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.predict import predict_cohort
from oncoslide.training.run_folder import RunFolder

NAME = "plain_module_probe"


class PlainMeanPool(nn.Module):
    """Mean of the valid patches' projections, then a linear head; no MILModel base."""

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 8) -> None:
        super().__init__()
        self.in_dim, self.n_outputs, self.embed_dim = in_dim, n_outputs, hidden_dim
        self.proj = nn.Linear(in_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, n_outputs)

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        rows = self.proj(features.float().nan_to_num()) * mask.unsqueeze(-1)
        embedding = rows.sum(1) / mask.sum(1, keepdim=True)
        return MILOutput(logits=self.head(embedding), embedding=embedding)


@pytest.fixture(autouse=True, scope="module")
def _registered() -> Iterator[None]:
    MODELS.register(NAME, reference="test probe", has_attention=False, uses_coords=False)(
        PlainMeanPool
    )
    yield
    MODELS.unregister(NAME)


FAST = dict(epochs=2, folds=3, batch_size=4, n_boot=0, progress=False)


def test_the_probe_is_not_a_milmodel() -> None:
    model = PlainMeanPool(4, 1)
    assert not isinstance(model, MILModel)
    for hook in ("lr_scales", "fit_to_training", "parameter_groups", "set_training_progress"):
        assert not hasattr(model, hook), hook


@pytest.mark.parametrize("loss", ["cox", "nll"])
def test_a_plain_module_trains_and_its_fold_models_predict_the_runs_numbers(
    tiny_cohort: Path, tmp_path: Path, loss: str
) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(task="survival", model=NAME, survival_loss=loss, **FAST)
    result = cross_validate(cohort, config, tmp_path / "run")
    c_index = result.metrics[result.metrics["metric"] == "c_index"]
    assert len(c_index) == 3 and np.isfinite(c_index["value"]).all()
    for fold in range(3):
        history = pd.read_csv(RunFolder(tmp_path / "run").fold(0, fold).history)
        # two epochs, and the weights moved: their training losses differ
        assert len(history) == 2 and np.isfinite(history["train_loss"]).all()
        assert history["train_loss"].iloc[0] != history["train_loss"].iloc[1]
    expected = result.predictions[result.predictions["fold"] == 0].set_index("patient_id")
    trained = load_model_folder(RunFolder(tmp_path / "run").fold(0, 0).model_dir)
    assert type(trained.model) is PlainMeanPool
    got = predict_cohort(trained, cohort, tmp_path / "p", embeddings=False).predictions
    got = got.set_index("patient_id").loc[expected.index]
    assert np.array_equal(got["risk"].to_numpy(), expected["risk"].to_numpy())


def test_a_plain_module_fits_on_all_patients(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    fit_all(cohort, make_config(task="survival", model=NAME, **FAST), tmp_path / "model")
    trained = load_model_folder(tmp_path / "model")
    assert type(trained.model) is PlainMeanPool
    assert set(trained.patients()["patient_id"]) == set(cohort.patient_ids)
