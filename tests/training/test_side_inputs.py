"""Side inputs (omics seen in training only) and auxiliary losses through the one training path.

A probe model declares a training-only omics input and a reconstruction loss. Sentinel values
planted in the validation and test patients' omics rows must never reach an array the model
sees, nor the standardisation fitted on the training part.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from oncoslide.cohort.omics import load_omics
from oncoslide.cohort.splits import fold_parts, make_splits
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.models import MODELS, MILModel, MILOutput
from oncoslide.models.base import bag_index, project_valid
from oncoslide.models.heads import make_head
from oncoslide.training import cross_validate, make_config
from oncoslide.training.cv import train_fold
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.run_folder import RunFolder
from oncoslide.training.tasks import resolve_task

SENTINEL = 1.0e6
SEEN: list[dict[str, Tensor]] = []


class SideProbe(MILModel):
    """Mean pooling; reconstructs the omics profile from the embedding when it is given."""

    def __init__(self, in_dim: int, n_outputs: int, n_genes: int = 24, hidden_dim: int = 8) -> None:
        super().__init__(in_dim, n_outputs, dropout=0.0, hidden_dim=hidden_dim)
        self.proj = nn.Linear(in_dim, hidden_dim)
        self.decoder = nn.Linear(hidden_dim, n_genes)
        self.head = make_head(hidden_dim, n_outputs)

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        side: dict[str, Tensor] | None = None,
    ) -> MILOutput:
        rows = project_valid(self.proj, features, mask)
        index = bag_index(mask)
        pooled = rows.new_zeros(mask.shape[0], rows.shape[1]).index_add(0, index, rows)
        embedding = pooled / mask.sum(1, keepdim=True)
        aux = {}
        if side is not None:
            SEEN.append({k: v.detach().clone() for k, v in side.items()})
            present = side["omics_present"]
            error = ((self.decoder(embedding) - side["omics"]) ** 2).mean(dim=1)
            aux["recon"] = error[present].mean() if present.any() else error.sum() * 0
        return MILOutput(logits=self.head(embedding), embedding=embedding, aux_losses=aux)


@pytest.fixture(autouse=True, scope="module")
def _probe_registered() -> Iterator[None]:
    """The probe is registered for this module only (other tests list the real models)."""
    MODELS.register(
        "side_probe",
        reference="test probe",
        has_attention=False,
        uses_coords=False,
        side_inputs={"omics": "train"},
        aux_losses={"recon": 0.5},
    )(SideProbe)
    yield
    MODELS.unregister("side_probe")


FAST = dict(epochs=2, folds=3, batch_size=4, n_boot=0, progress=False)


def _omics(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "omics.csv", dtype={"patient_id": str})


def test_training_only_omics_never_reach_validation_or_test(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(task="survival", model="side_probe", **FAST)
    task = resolve_task(cohort, config)
    splits = make_splits(cohort.patient_ids, n_folds=3, val_fraction=0.25)
    table = _omics(tiny_cohort)
    genes = [c for c in table.columns if c != "patient_id"]
    cache = FeatureCache()
    for fold in range(3):
        parts = fold_parts(splits, 0, fold)
        planted = table.copy()
        held = planted["patient_id"].isin(parts["val"] + parts["test"])
        planted.loc[held, genes] = SENTINEL
        # some training patients have no omics: masked, not dropped
        absent = parts["train"][:3]
        planted = planted[~planted["patient_id"].isin(absent)]
        SEEN.clear()
        outcome = train_fold(
            cohort,
            task,
            config,
            splits,
            0,
            fold,
            tmp_path / f"f{fold}",
            cache,
            side={"omics": load_omics(planted)},
        )
        assert SEEN, "the model saw its training-only input in training steps"
        values = torch.cat([s["omics"] for s in SEEN])
        present = torch.cat([s["omics_present"] for s in SEEN])
        assert values.abs().max() < 50  # standardised training rows only, no sentinel
        assert not present.all() and (values[~present] == 0).all()
        assert len(values) == outcome.info["epochs_run"] * len(parts["train"])  # train steps only
        scaler = outcome.fold_task.side_scalers["omics"]
        expected = table.set_index("patient_id").loc[
            [p for p in parts["train"] if p not in absent], genes
        ]
        np.testing.assert_allclose(scaler.mean, expected.mean().to_numpy())
        history = pd.DataFrame(outcome.history)
        assert {"train_loss", "train_aux_recon", "val_loss"} <= set(history.columns)
    cache.close()


def test_side_inputs_are_declared_given_and_saved(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    omics = load_omics(tiny_cohort / "omics.csv", tiny_cohort / "gene_groups.gmt")
    with pytest.raises(ConfigError, match="needs the side input 'omics'"):
        cross_validate(
            cohort, make_config(task="survival", model="side_probe", **FAST), tmp_path / "a"
        )
    with pytest.raises(ConfigError, match="does not use it"):
        cross_validate(
            cohort, make_config(task="survival", **FAST), tmp_path / "b", side={"omics": omics}
        )
    with pytest.raises(ConfigError, match="no auxiliary loss"):
        cross_validate(
            cohort,
            make_config(task="survival", model="side_probe", aux_weights={"kl": 1.0}, **FAST),
            tmp_path / "c",
            side={"omics": omics},
        )
    run = cross_validate(
        cohort,
        make_config(task="survival", model="side_probe", aux_weights={"recon": 2.0}, **FAST),
        tmp_path / "run",
        side={"omics": omics},
    )
    assert np.isfinite(run.summary.set_index("metric").loc["c_index", "mean"])
    trained = load_model_folder(RunFolder(run.out_dir).fold(0, 1).model_dir)
    assert set(trained.fold_task.side_scalers) == {"omics"}  # restored with the model
    assert trained.config.aux_weights == {"recon": 2.0}
    # predictions need no omics: the model is slide-only at test time
    assert trained.model(
        torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
    ).logits.shape == (
        1,
        1,
    )
