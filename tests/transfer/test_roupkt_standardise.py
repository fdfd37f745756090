"""ROUPKT's standardised expert risks (``source_risk_standardise=True``) and the scale's learning
rate (``risk_scale_lr``), and the generic hook behind the first: ``MILModel.fit_to_training``,
called by the training path with the fold's training bags only (issue 13, must-hold A)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import torch

from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.models import MILModel, create_model
from oncoslide.models.heads import discrete_survival
from oncoslide.models.roupkt import ROUPKT
from oncoslide.training import cross_validate, make_config
from oncoslide.training.cv import training_bags
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.module import optimiser_groups
from oncoslide.training.predict import predict_cohort


@pytest.fixture
def zoo(loss_zoo: Path) -> Path:
    return loss_zoo


def _model(zoo: Path, n_outputs: int = 1, **kwargs: Any) -> ROUPKT:
    torch.manual_seed(0)
    return cast(ROUPKT, create_model("roupkt", in_dim=16, n_outputs=n_outputs, hidden_dim=8,
                                     experts=str(zoo), **kwargs))  # fmt: skip


def _bags(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """Unpadded single bags of different lengths, as the training path hands them over."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 10 + 3 * i
        out.append({"patient_id": f"p{i}", "features": torch.randn(1, length, 16, generator=gen),
                    "mask": torch.ones(1, length, dtype=torch.bool),
                    "coords": torch.zeros(1, length, 2)})  # fmt: skip
    return out


def _risk(expert: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor) -> float:
    """An expert's own risk by hand: a Cox logit, or -sum_k S_k of a discrete-time head."""
    logits = expert(features, mask).logits
    if logits.shape[1] == 1:
        return float(logits[0, 0])
    return -float(discrete_survival(logits)[0].sum())


@pytest.mark.parametrize("scale", ["shared", "per_expert"])
def test_standardised_risks_match_a_hand_computation(zoo: Path, scale: str) -> None:
    """Mean and sd (ddof 0) of each expert's risk over the training bags; the output is
    head(mixture) + sum_j s_j w_j (r_j - mean_j) / sd_j with the top-k weights."""
    model = _model(zoo, source_risk=True, source_risk_standardise=True, top_k=2,
                   source_risk_scale=scale).train()  # fmt: skip
    bags = _bags(7)
    model.fit_to_training(iter(bags))
    with torch.no_grad():
        by_hand = np.array(
            [[_risk(e, b["features"], b["mask"]) for e in model.experts] for b in bags]
        )  # (patients, experts)
    mean, sd = by_hand.mean(axis=0), by_hand.std(axis=0, ddof=0)
    assert np.all(sd > 1e-3)  # the experts do vary here: the check is not vacuous
    np.testing.assert_allclose(model.risk_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.risk_sd.numpy(), sd, rtol=1e-5, atol=1e-6)
    assert int(model.risk_fitted) == 7

    scales = [0.6, -1.3] if scale == "per_expert" else [0.6, 0.6]
    assert model.risk_scale is not None
    with torch.no_grad():
        model.risk_scale.copy_(torch.tensor(scales if scale == "per_expert" else 0.6))
    model.eval()
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(3, 30, 16, generator=gen)
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[2, 18:] = False
    with torch.no_grad():
        out = model(features, mask)
        probs = torch.stack(list(model.routing(features, mask).values()), dim=1)
        expected = model.head(out.embedding)
        for b in range(3):
            kept = set(probs[b].argsort(descending=True)[:2].tolist())
            for j, expert in enumerate(model.experts):
                if j in kept:
                    r = _risk(expert, features[b : b + 1, mask[b]], mask[b : b + 1, mask[b]])
                    expected[b] += scales[j] * float(probs[b, j]) * (r - mean[j]) / sd[j]
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


def test_constant_expert_keeps_sd_one_and_unfitted_model_refuses(zoo: Path) -> None:
    model = _model(zoo, source_risk=True, source_risk_standardise=True)
    features, mask = _bags(1)[0]["features"], _bags(1)[0]["mask"]
    with pytest.raises(ConfigError, match="fit_to_training"):
        model(features, mask)  # never standardised: refused, not silently unstandardised
    with pytest.raises(ConfigError, match="no training patient"):
        model.fit_to_training(iter([]))
    one = _bags(1)
    model.fit_to_training(iter(one + one))  # the same patient twice: no spread at all
    assert torch.equal(model.risk_sd, torch.ones(2))
    assert torch.isfinite(model(features, mask).logits).all()


def _untouchable() -> Iterator[Mapping[str, Any]]:
    raise AssertionError("the bags were read")
    yield {}  # pragma: no cover


def test_off_adds_nothing(zoo: Path) -> None:
    """Without the path, and with the path's two options off (its revision-2 form): no buffer,
    no lr group, and the hook reads no bag and draws no random number."""
    for kwargs in (
        {"source_risk": False},
        {"source_risk": True, "source_risk_standardise": False, "risk_scale_lr": 1.0},
    ):
        model = _model(zoo, **kwargs).eval()
        assert not any(k.startswith("risk_") and k != "risk_scale" for k in model.state_dict())
        rng = torch.random.get_rng_state()
        model.fit_to_training(_untouchable())
        assert torch.equal(rng, torch.random.get_rng_state())
        assert model.lr_scales() == {}
        assert len(optimiser_groups(model, 5e-4)) == 1
        features, mask = _bags(1)[0]["features"], _bags(1)[0]["mask"]
        with torch.no_grad():  # needs no statistics
            assert torch.isfinite(model(features, mask).logits).all()


def test_risk_scale_lr_multiplies_the_scales_learning_rate(zoo: Path) -> None:
    for scale in ("shared", "per_expert"):
        model = _model(zoo, source_risk=True, source_risk_scale=scale, risk_scale_lr=100)
        assert model.lr_scales() == {"risk_scale": 100.0}
        groups = optimiser_groups(model, 5e-4)
        by_lr = {g["lr"]: g["params"] for g in groups}
        assert set(by_lr) == {5e-4, 5e-2}
        assert len(by_lr[5e-2]) == 1 and by_lr[5e-2][0] is model.risk_scale


def test_bad_values_are_refused(zoo: Path) -> None:
    with pytest.raises(ConfigError, match="source_risk_standardise must be"):
        _model(zoo, source_risk=True, source_risk_standardise="yes")
    for bad in (0, -1.0, True, "x"):
        with pytest.raises(ConfigError, match="risk_scale_lr must be"):
            _model(zoo, source_risk=True, risk_scale_lr=bad)
    for kwargs in ({"source_risk_standardise": True}, {"risk_scale_lr": 100}):
        with pytest.raises(ConfigError, match="source_risk=false turns off"):
            _model(zoo, source_risk=False, **kwargs)


def test_the_hook_sees_the_training_part_only(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fold's hook call gets exactly that fold's training patients (never one of its
    validation or test patients), whole bags, no outcome."""
    seen: list[list[str]] = []

    def record(self: MILModel, bags: Any) -> None:
        items = list(bags)
        assert all(set(b) == {"patient_id", "features", "mask", "coords"} for b in items)
        assert all(b["features"].shape[0] == 1 and bool(b["mask"].all()) for b in items)
        seen.append([b["patient_id"] for b in items])

    monkeypatch.setattr(MILModel, "fit_to_training", record)
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(task="survival", model="abmil", folds=3, epochs=1, n_boot=0,
                         val_fraction=0.25, progress=False,
                         model_kwargs={"hidden_dim": 8})  # fmt: skip
    cross_validate(cohort, config, tmp_path / "run")
    splits = pd.read_csv(tmp_path / "run" / "splits.csv", dtype={"patient_id": str})
    assert len(seen) == 3
    for fold, ids in enumerate(seen):
        part = splits[(splits["seed"] == 0) & (splits["fold"] == fold)]
        part = part.set_index("patient_id")["part"]
        assert len(ids) == len(set(ids))
        assert set(ids) == set(part[part == "train"].index)
        assert not set(ids) & set(part[part != "train"].index)
        assert {"val", "test"} <= set(part)  # there were held-out patients to avoid


def test_bags_are_the_whole_bags(tiny_cohort: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    ids = list(cohort.patient_ids[:3])
    with FeatureCache(max_bytes=2**26) as cache:
        for pid, bag in zip(ids, training_bags(cohort, ids, cache), strict=True):
            stored = load_bag(cohort, pid, cache)
            assert bag["patient_id"] == pid
            np.testing.assert_array_equal(bag["features"][0].numpy(), stored.features)


def test_trains_saves_and_reloads(zoo: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    """Through the training path: the saved fold model holds the statistics of that fold's
    training patients (recomputed by hand from the reloaded experts), and the x100 scale moved
    (at x1, 2 epochs of a few steps at lr 5e-4 cannot move it 0.01)."""
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    target = tmp_path / "SIM-B.csv"
    table[table["cohort"] == "SIM-B"].to_csv(target, index=False)
    cohort = load_cohort(target, tiny_cohort / "features")
    kwargs = {"experts": str(zoo), "hidden_dim": 8, "source_risk": True, "exclude": ["SIM-B"],
              "source_risk_standardise": True, "risk_scale_lr": 100}  # fmt: skip
    config = make_config(task="survival", model="roupkt", folds=2, epochs=2, n_boot=0,
                         progress=False, model_kwargs=kwargs)  # fmt: skip
    cross_validate(cohort, config, tmp_path / "run")
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert np.isfinite(preds["risk"]).all()
    splits = pd.read_csv(tmp_path / "run" / "splits.csv", dtype={"patient_id": str})
    part = splits[(splits["seed"] == 0) & (splits["fold"] == 0)]
    train_ids = part.loc[part["part"] == "train", "patient_id"].tolist()
    trained = load_model_folder(tmp_path / "run" / "folds" / "seed0-fold0" / "model")
    model = cast(ROUPKT, trained.model)
    assert model.source_risk_standardise and int(model.risk_fitted) == len(train_ids)
    with FeatureCache(max_bytes=2**26) as cache, torch.no_grad():
        risks = np.array(
            [[_risk(e, b["features"], b["mask"]) for e in model.experts]
             for b in training_bags(cohort, train_ids, cache)]
        )  # fmt: skip
    np.testing.assert_allclose(model.risk_mean.numpy(), risks.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.risk_sd.numpy(), risks.std(axis=0), rtol=1e-5, atol=1e-6)
    assert model.risk_scale is not None and abs(model.risk_scale.item() - 1.0) > 0.01
    # the reloaded folder predicts the fold's test patients as the run did (the buffers travel)
    test = preds[(preds["seed"] == 0) & (preds["fold"] == 0)].set_index("patient_id")["risk"]
    again = predict_cohort(trained, cohort, tmp_path / "again", embeddings=False).predictions
    again = again.set_index("patient_id")["risk"]
    np.testing.assert_allclose(again.loc[test.index].to_numpy(), test.to_numpy(), rtol=1e-5)
