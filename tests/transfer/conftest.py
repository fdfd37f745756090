"""Fixtures of the transfer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from oncoslide.cohort.table import load_cohort
from oncoslide.training import make_config
from oncoslide.transfer import build_zoo


@pytest.fixture(scope="module", params=["cox", "nll"])
def loss_zoo(request: pytest.FixtureRequest, tiny_cohort: Path, tmp_path_factory: Any) -> Path:
    """A zoo of the tiny cohort's cancers, with Cox experts (one logit) or discrete-time
    experts (4 bins): the source-risk path's two kinds of risk."""
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    out = tmp_path_factory.mktemp(f"zoo-{request.param}")
    config = make_config(task="survival", folds=2, epochs=2, n_boot=0, progress=False,
                         model_kwargs={"hidden_dim": 16, "attn_dim": 8},
                         survival_loss=request.param)  # fmt: skip
    build_zoo(cohort, config, out, by="cohort", min_patients=10)
    return out
