"""ROUPKT through the one training path: frozen zoo experts, top-k routing, auxiliary losses,
and the leak check that refuses experts trained on the fold's held-out patients."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.models import create_model
from oncoslide.models.roupkt import ROUPKT
from oncoslide.training import cross_validate, make_config
from oncoslide.training.model_folder import load_model_folder
from oncoslide.transfer import build_zoo, load_zoo

runner = CliRunner()
ZOO_TRAIN = dict(task="survival", folds=2, epochs=2, n_boot=0, progress=False,
                 model_kwargs={"hidden_dim": 16, "attn_dim": 8})  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(cohort, make_config(**ZOO_TRAIN), out, by="cohort", min_patients=10)
    return out


def _target(tiny_cohort: Path, tmp_path: Path, cancer: str) -> Path:
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    out = tmp_path / f"{cancer}.csv"
    table[table["cohort"] == cancer].to_csv(out, index=False)
    return out


@pytest.mark.parametrize("own_expert", [True, False])
def test_routing_mixes_the_top_k_frozen_experts(zoo: Path, own_expert: bool) -> None:
    torch.manual_seed(0)
    model = cast(ROUPKT, create_model("roupkt", in_dim=16, n_outputs=4, hidden_dim=8,
                                      experts=str(zoo), top_k=1,
                                      own_expert=own_expert)).train()  # fmt: skip
    names = ["SIM-A", "SIM-B", *(["own"] if own_expert else [])]
    assert model.routed_names == names and model.router.out_features == len(names)
    before = {k: v.clone() for k, v in model.experts.state_dict().items()}
    features = torch.randn(3, 20, 16)
    mask = torch.ones(3, 20, dtype=torch.bool)
    model.fit_to_training([{"features": features, "mask": mask}])  # the expert risks' statistics
    model.top_k = len(names)  # every expert kept, so that each gets a gradient
    out = model(features, mask)
    model.top_k = 1
    assert out.logits.shape == (3, 4) and set(out.aux_losses) == {"balance", "z"}
    (out.logits.sum() + sum(out.aux_losses.values())).backward()
    assert all(p.grad is None for p in model.experts.parameters())  # frozen
    assert all(not m.training for m in model.experts.modules())  # no expert dropout
    torch.testing.assert_close(model.experts.state_dict(), before)
    if own_expert:  # the own expert trains (its patch projection gets a gradient)
        assert model.own is not None and model.own.training
        assert model.own.proj[0].weight.grad is not None
        assert model.own.proj[0].weight.grad.abs().sum() > 0
        assert "own" in model.parameter_groups()
    else:
        assert model.own is None
    # with top_k = 1 each patient's mixture is its top expert's adapted embedding times p_top;
    # the own expert's embedding is ABMIL's attention pooling with its weights, recomputed here
    model.eval()
    with torch.no_grad():
        out = model(features, mask)
        routing = model.routing(features, mask)
        assert list(routing) == names
        weights = torch.stack(list(routing.values()), dim=1)
        embeddings = [e(features, mask).embedding for e in model.experts]
        if own_expert:
            assert model.own is not None
            hidden = model.own.proj(features)  # (B, N, H), no padding here
            logits = model.own.attention(hidden.reshape(-1, 8)).reshape(3, 20)
            embeddings.append((torch.softmax(logits, dim=1).unsqueeze(-1) * hidden).sum(1))
        adapted = torch.stack([a(x) for a, x in zip(model.adapters, embeddings, strict=True)], 1)
        top = weights.argmax(dim=1)
        expected = weights[torch.arange(3), top, None] * adapted[torch.arange(3), top]
    torch.testing.assert_close(out.embedding, expected)


def test_folders_saved_without_the_own_expert_still_load(zoo: Path) -> None:
    """Weights of a ROUPKT without the own expert (saved before it existed, when its folder
    recorded no own_expert keyword) load into the default model, which then routes as before."""
    torch.manual_seed(0)
    kwargs = dict(in_dim=16, n_outputs=4, hidden_dim=8, experts=str(zoo))
    # before the own expert there was no source-risk path either (revision 1)
    old = create_model("roupkt", own_expert=False, source_risk=False, **kwargs).eval()
    new = cast(ROUPKT, create_model("roupkt", **kwargs)).eval()
    assert new.own is not None and new.risk_scale is not None
    new.load_state_dict(old.state_dict())
    assert new.own is None and new.routed_names == ["SIM-A", "SIM-B"]
    assert new.risk_scale is None and not new.source_risk
    features, mask = torch.randn(2, 10, 16), torch.ones(2, 10, dtype=torch.bool)
    torch.testing.assert_close(new(features, mask).logits, old(features, mask).logits)
    with pytest.raises(ConfigError, match="own_expert"):
        create_model("roupkt", own_expert="yes", **kwargs)


@pytest.mark.parametrize("saved_with", [{}, {"source_risk": True}])
def test_folders_saved_before_revision_3_load_as_the_models_they_were(
    zoo: Path, saved_with: dict[str, bool]
) -> None:
    """Revision 3 turned the source-risk path (standardised, risk_scale_lr 100) on by default.
    A folder records only the keywords its run was given, so weights saved with the old
    defaults ({}: no path; {"source_risk": True}: the path unstandardised) are rebuilt with the
    new ones; loading them drops what the weights lack, and the logits are the saved model's."""
    torch.manual_seed(0)
    kwargs = dict(in_dim=16, n_outputs=1, hidden_dim=8, experts=str(zoo))
    old_defaults = {"source_risk": False} if not saved_with else {
        "source_risk_standardise": False, "risk_scale_lr": 1.0}  # fmt: skip
    old = create_model("roupkt", **kwargs, **saved_with, **old_defaults).eval()
    new = cast(ROUPKT, create_model("roupkt", **kwargs, **saved_with)).eval()
    assert new.source_risk and new.source_risk_standardise and new.risk_scale_lr == 100.0
    new.load_state_dict(old.state_dict())
    assert not new.source_risk_standardise and not hasattr(new, "risk_mean")
    assert (new.risk_scale is None) == (not saved_with)
    assert list(new.state_dict()) == list(old.state_dict())
    features, mask = torch.randn(2, 10, 16), torch.ones(2, 10, dtype=torch.bool)
    with torch.no_grad():  # no fit_to_training needed: nothing is standardised
        torch.testing.assert_close(new(features, mask).logits, old(features, mask).logits)


def test_the_source_risk_path_is_on_by_default_for_survival_zoos(zoo: Path) -> None:
    model = cast(ROUPKT, create_model("roupkt", in_dim=16, n_outputs=1, hidden_dim=8,
                                      experts=str(zoo)))  # fmt: skip
    assert model.source_risk and model.source_risk_standardise and model.risk_scale is not None
    assert model.lr_scales() == {"risk_scale": 100.0}
    assert int(model.risk_fitted) == 0  # fitted on the training part by the training path
    off = cast(ROUPKT, create_model("roupkt", in_dim=16, n_outputs=1, hidden_dim=8,
                                    experts=str(zoo), source_risk=False))  # fmt: skip
    assert off.risk_scale is None and off.lr_scales() == {} and not off.source_risk_standardise


def test_experts_that_saw_held_out_patients_are_refused(
    zoo: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    target = _target(tiny_cohort, tmp_path, "SIM-B")
    cohort = load_cohort(target, tiny_cohort / "features")
    config = make_config(task="survival", model="roupkt", folds=2, epochs=1, n_boot=0,
                         progress=False, model_kwargs={"experts": str(zoo), "hidden_dim": 8})  # fmt: skip
    with pytest.raises(ConfigError, match=r"would leak.*SIM-B"):
        cross_validate(cohort, config, tmp_path / "run")


def test_roupkt_trains_predicts_and_reloads_through_the_cli(
    zoo: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    target = _target(tiny_cohort, tmp_path, "SIM-B")
    run = tmp_path / "run"
    args = [
        "train", "--cohort", str(target), "--features", str(tiny_cohort / "features"),
        "--model", "roupkt", "--model-arg", f"experts={zoo}", "--model-arg", "exclude=[SIM-B]",
        "--model-arg", "hidden_dim=8", "--folds", "2", "--epochs", "2", "--no-progress",
        "--out", str(run),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    history = pd.read_csv(run / "folds" / "seed0-fold0" / "history.csv")
    assert {"train_aux_balance", "train_aux_z"} <= set(history.columns)
    preds = pd.read_parquet(run / "predictions.parquet")
    assert np.isfinite(preds["risk"]).all()
    # the router's weights, the own expert's included, beside each prediction; they sum to 1
    routing = ["detail_routing_SIM-A", "detail_routing_own"]
    assert set(routing) <= set(preds.columns)
    np.testing.assert_allclose(preds[routing].sum(axis=1), 1.0, rtol=1e-5)
    trained = load_model_folder(run / "folds" / "seed0-fold0" / "model")
    assert trained.model.expert_names == ["SIM-A"]
    assert trained.model.routed_names == ["SIM-A", "own"]
    assert load_zoo(zoo).cancers == ["SIM-A", "SIM-B"]
