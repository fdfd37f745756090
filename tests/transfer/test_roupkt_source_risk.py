"""ROUPKT's source-risk path (``source_risk=True``): the zoo experts' own risk predictions,
routed by the top-k weights and scaled, are added to the output (issue 13, must-hold A)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import torch

from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.models import create_model
from oncoslide.models.heads import discrete_survival
from oncoslide.models.roupkt import ROUPKT
from oncoslide.training import cross_validate, make_config
from oncoslide.training.model_folder import load_model_folder


@pytest.fixture
def zoo(loss_zoo: Path) -> Path:
    return loss_zoo


def _model(zoo: Path, n_outputs: int = 1, **kwargs: Any) -> ROUPKT:
    """The path's raw form: the experts' risks unstandardised (tested in
    test_roupkt_standardise.py), the scale at the training path's learning rate."""
    torch.manual_seed(0)
    if kwargs.get("source_risk") is not False:
        kwargs = {"source_risk_standardise": False, "risk_scale_lr": 1.0, **kwargs}
    return cast(ROUPKT, create_model("roupkt", in_dim=16, n_outputs=n_outputs, hidden_dim=8,
                                     experts=str(zoo), **kwargs))  # fmt: skip


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(4, 25, 16, generator=gen)
    mask = torch.ones(4, 25, dtype=torch.bool)
    mask[1, 20:] = False  # one padded bag
    return features, mask


@pytest.mark.parametrize("scale", ["shared", "per_expert"])
@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_output_is_the_head_plus_the_routed_expert_risks(
    zoo: Path, n_outputs: int, top_k: int, scale: str
) -> None:
    """Recomputed by hand: the experts' own risks (Cox logit, or -sum_k S_k of a discrete-time
    head), the router's softmax weights with all but the top k zeroed, the scale(s)."""
    model = _model(zoo, n_outputs, source_risk=True, top_k=top_k, source_risk_scale=scale)
    model.eval()
    assert model.risk_scale is not None
    assert model.risk_scale.shape == ((2,) if scale == "per_expert" else ())
    assert bool((model.risk_scale == 1.0).all())  # starts at 1
    scales = [0.7, -0.4] if scale == "per_expert" else [0.7, 0.7]
    with torch.no_grad():
        model.risk_scale.copy_(torch.tensor(scales if scale == "per_expert" else 0.7))
    features, mask = _inputs()
    with torch.no_grad():
        out = model(features, mask)
        probs = torch.stack(list(model.routing(features, mask).values()), dim=1)  # (B, 3)
        assert probs.shape == (4, 3)  # SIM-A, SIM-B, own
        expected = model.head(out.embedding)
        for b in range(4):
            kept = set(probs[b].argsort(descending=True)[:top_k].tolist())
            total = 0.0
            for j, expert in enumerate(model.experts):  # the own expert (index 2) has no risk
                logits = expert(features[b : b + 1, mask[b]], mask[b : b + 1, mask[b]]).logits
                if logits.shape[1] == 1:  # Cox: the log relative hazard
                    risk = float(logits[0, 0])
                else:  # discrete time: -sum_k S_k
                    risk = -float(discrete_survival(logits)[0].sum())
                if j in kept:
                    total += scales[j] * float(probs[b, j]) * risk
            expected[b] += total  # every bin of a discrete-time target shifted alike
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


def test_off_is_the_old_model(zoo: Path) -> None:
    """Without the path: no new parameter, the same initial weights, logits = head(mixture)
    exactly; with the path and scale 0 the same logits as without it."""
    off = _model(zoo, source_risk=False).eval()
    on = _model(zoo, source_risk=True).eval()
    assert off.risk_scale is None and "risk_scale" not in off.state_dict()
    state = on.state_dict()
    assert set(state) - set(off.state_dict()) == {"risk_scale"}
    torch.testing.assert_close({k: state[k] for k in off.state_dict()}, off.state_dict())
    features, mask = _inputs()
    with torch.no_grad():
        out = off(features, mask)
        assert torch.equal(out.logits, off.head(out.embedding))
        assert on.risk_scale is not None
        on.risk_scale.zero_()
        assert torch.equal(on(features, mask).logits, out.logits)
        on.risk_scale.fill_(1.0)  # and the path does change the output
        assert not torch.allclose(on(features, mask).logits, out.logits)


@pytest.mark.parametrize("scale", ["shared", "per_expert"])
def test_gradients_reach_router_and_scale_not_experts(zoo: Path, scale: str) -> None:
    model = _model(zoo, source_risk=True, top_k=3, source_risk_scale=scale).train()
    with torch.no_grad():  # a zero head: the router's gradient can only come from the path
        model.head.weight.zero_()
        model.head.bias.zero_()
    features, mask = _inputs()
    out = model(features, mask)
    (out.logits * torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).sum().backward()
    assert model.risk_scale is not None and model.risk_scale.grad is not None
    assert bool((model.risk_scale.grad.abs() > 0).all())  # every scale
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    proj = dict(model.named_parameters())["proj.0.weight"]  # the router's patch projection
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.experts.parameters())  # frozen
    assert "risk_scale" in model.parameter_groups()


def test_bad_values_are_refused(zoo: Path) -> None:
    with pytest.raises(ConfigError, match="source_risk"):
        _model(zoo, source_risk="yes")
    with pytest.raises(ConfigError, match="source_risk_scale"):
        _model(zoo, source_risk=True, source_risk_scale="each")


def test_trains_saves_and_reloads(zoo: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    """Through the one training path (leak check unchanged: the target's zoo model is
    excluded); the saved folder rebuilds the path and predicts what the run predicted."""
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    target = tmp_path / "SIM-B.csv"
    table[table["cohort"] == "SIM-B"].to_csv(target, index=False)
    cohort = load_cohort(target, tiny_cohort / "features")
    kwargs = {"experts": str(zoo), "hidden_dim": 8, "source_risk": True,
              "source_risk_standardise": False, "risk_scale_lr": 1.0}  # fmt: skip
    config = make_config(task="survival", model="roupkt", folds=2, epochs=2, n_boot=0,
                         progress=False, model_kwargs=kwargs)  # fmt: skip
    with pytest.raises(ConfigError, match=r"would leak.*SIM-B"):
        cross_validate(cohort, config, tmp_path / "leak")
    config = make_config(task="survival", model="roupkt", folds=2, epochs=2, n_boot=0,
                         progress=False, model_kwargs={**kwargs, "exclude": ["SIM-B"]})  # fmt: skip
    cross_validate(cohort, config, tmp_path / "run")
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert np.isfinite(preds["risk"]).all()
    assert {"detail_routing_SIM-A", "detail_routing_own"} <= set(preds.columns)
    trained = load_model_folder(tmp_path / "run" / "folds" / "seed0-fold0" / "model")
    model = cast(ROUPKT, trained.model)
    assert model.source_risk and model.risk_scale is not None
    assert model.routed_names == ["SIM-A", "own"]
    assert model.risk_scale.item() != 1.0  # it was trained


def test_off_on_a_classification_target(zoo: Path) -> None:
    """The shift would cancel in the softmax: with the target's task a classification the path
    is off by default and refused when asked for (with its options too)."""
    for kind in ("binary", "multiclass"):
        model = create_model("roupkt", in_dim=16, n_outputs=2 if kind == "binary" else 3,
                             hidden_dim=8, experts=str(zoo), target_task=kind)  # fmt: skip
        assert isinstance(model, ROUPKT)
        assert not model.source_risk and model.risk_scale is None
        assert not model.source_risk_standardise and "risk_mean" not in model.state_dict()
        with pytest.raises(ConfigError, match=rf"softmax cancels.*{kind}|{kind}.*softmax"):
            _model(zoo, 2, source_risk=True, target_task=kind)
        with pytest.raises(ConfigError, match=f"off on a {kind} target"):
            create_model("roupkt", in_dim=16, n_outputs=2, hidden_dim=8, experts=str(zoo),
                         target_task=kind, source_risk_standardise=True)  # fmt: skip
    survival = create_model("roupkt", in_dim=16, n_outputs=1, hidden_dim=8, experts=str(zoo),
                            target_task="survival")  # fmt: skip
    assert isinstance(survival, ROUPKT) and survival.source_risk
    with pytest.raises(ConfigError, match="target_task"):
        _model(zoo, target_task="regression")


def test_the_training_path_tells_the_target_task(zoo: Path, tiny_cohort: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    """A binary target through the one training path: the model folder records the task's
    kind and the model has no source-risk path (no risk statistics computed)."""
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    target = tmp_path / "SIM-B.csv"
    table[table["cohort"] == "SIM-B"].to_csv(target, index=False)
    cohort = load_cohort(target, tiny_cohort / "features", label_cols=("msi",))
    config = make_config(task="msi", model="roupkt", folds=2, epochs=1, n_boot=0,
                         progress=False, model_kwargs={"experts": str(zoo), "hidden_dim": 8,
                                                       "exclude": ["SIM-B"]})  # fmt: skip
    asked = config.model_copy(update={"model_kwargs": {**config.model_kwargs,
                                                       "source_risk": True}})  # fmt: skip
    with pytest.raises(ConfigError, match="softmax cancels"):
        cross_validate(cohort, asked, tmp_path / "refused")  # refused before any folder
    assert not (tmp_path / "refused").exists()
    cross_validate(cohort, config, tmp_path / "run")
    folder = tmp_path / "run" / "folds" / "seed0-fold0" / "model"
    spec = json.loads((folder / "model.json").read_text())["model"]
    assert spec["kwargs"]["target_task"] == "binary"
    model = cast(ROUPKT, load_model_folder(folder).model)
    assert not model.source_risk and model.risk_scale is None
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert len(preds) == len(cohort.patients) and preds["prob_1"].between(0, 1).all()
