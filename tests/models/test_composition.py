"""The tissue composition model: shares by hand, the fit on planted tissues, the effects against
lifelines' Cox fits (the oracle), the loss views in a training step, and the training path."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter

from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.models import create_model
from oncoslide.models.base import MILOutput
from oncoslide.models.composition import CompositionMIL, reservoir_update
from oncoslide.survival.losses import cox_ph_loss
from oncoslide.training.config import make_config
from oncoslide.training.cv import training_bags
from oncoslide.training.fit_all import fit_all
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.module import MILModule
from oncoslide.training.tasks import FoldTask, TaskSpec

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 6
# three tissues, far apart in feature space (the planted truth of the fit)
CENTRES = np.array([[8.0, 0, 0, 0, 0, 0], [0, 8.0, 0, 0, 0, 0], [0, 0, 8.0, 0, 0, 0]])


def _bag(x: np.ndarray) -> dict[str, Any]:
    t = torch.as_tensor(x, dtype=torch.float32)[None]
    return {"features": t, "mask": torch.ones(t.shape[:2], dtype=torch.bool)}


def _planted(n_patients: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags whose patches come from the three tissues in random shares; the true shares."""
    rng = np.random.default_rng(seed)
    bags, shares = [], []
    for _ in range(n_patients):
        n = int(rng.integers(20, 60))
        p = rng.dirichlet(np.ones(3))
        tissue = rng.choice(3, size=n, p=p)
        bags.append(CENTRES[tissue] + rng.normal(0, 0.5, (n, DIM)))
        shares.append(np.bincount(tissue, minlength=3) / n)
    return bags, np.array(shares)


def _fitted(bags: list[np.ndarray], **kw: Any) -> CompositionMIL:
    model = create_model("composition", in_dim=DIM, n_outputs=1, clusters=3, **kw)
    assert isinstance(model, CompositionMIL)
    model.fit_to_training([_bag(x) for x in bags])
    return model


def test_shares_by_hand() -> None:
    model = create_model("composition", in_dim=2, n_outputs=1, clusters=2)
    assert isinstance(model, CompositionMIL)
    model.centroids.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
    model.fitted.fill_(1)
    x = torch.tensor(
        [[[1.0, 0], [9.0, 1], [2.0, -1], [0.0, 0]], [[7.0, 0], [0, 0], [0, 0], [0, 0]]]
    )
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # bag 0: two patches near 0, one near 10 (the padded row is ignored); bag 1: one and one
    torch.testing.assert_close(model.shares(x, mask), torch.tensor([[2 / 3, 1 / 3], [0.5, 0.5]]))


def test_fit_finds_the_planted_tissues_and_standardises_on_the_training_bags() -> None:
    bags, true_shares = _planted(40)
    model = _fitted(bags)
    shares = torch.cat([model.shares(**_bag(x)) for x in bags]).double().numpy()
    # the clusters are the tissues, up to their order: every patient's shares are recovered
    order = [int(np.argmax(np.corrcoef(true_shares.T, shares.T)[i, 3:])) for i in range(3)]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(shares[:, order], true_shares, atol=1e-6)
    np.testing.assert_allclose(model.share_mean.numpy(), shares.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(model.share_std.numpy(), shares.std(axis=0), atol=1e-6)
    allx = np.concatenate(bags)
    np.testing.assert_allclose(model.feature_mean.numpy(), allx.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(model.feature_std.numpy(), allx.std(axis=0), atol=1e-4)
    assert int(model.fitted) == 40


def test_a_fitted_model_keeps_its_clusters() -> None:
    # initialised from a trained model (--init): its effects refer to its own clusters
    bags, _ = _planted(20)
    model = _fitted(bags)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other, _ = _planted(20, seed=5)
    model.fit_to_training([_bag(x + 3.0) for x in other])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_fit_refuses_one_shot_bags_and_too_few_patches() -> None:
    bags, _ = _planted(5)
    model = create_model("composition", in_dim=DIM, n_outputs=1, clusters=3)
    with pytest.raises(ConfigError, match="read twice"):
        model.fit_to_training(_bag(x) for x in bags)
    with pytest.raises(ConfigError, match="at least 3 training patches"):
        model.fit_to_training([_bag(bags[0][:2])])
    with pytest.raises(ConfigError, match="not fitted"):
        create_model("composition", in_dim=DIM, n_outputs=1)(**_bag(bags[0]))


def test_reservoir_sample_is_uniform_over_the_stream() -> None:
    # 60 rows streamed in chunks of 7 into a sample of 10: every row kept with chance 1/6
    size, n, runs = 10, 60, 3000
    kept = np.zeros(n)
    rng = np.random.default_rng(0)
    rows = np.arange(n, dtype=np.float64)[:, None]
    for _ in range(runs):
        sample = np.full((size, 1), -1.0)
        for start in range(0, n, 7):
            reservoir_update(sample, start, rows[start : start + 7], rng)
        assert len(np.unique(sample)) == size and (sample >= 0).all()  # without replacement
        kept[sample[:, 0].astype(int)] += 1
    share = kept / runs
    # binomial sd of each row's share: sqrt(p (1-p) / runs) = 0.0068; 5 sd
    assert np.abs(share - size / n).max() < 0.035
    # and the first rows are not favoured over the last ones
    assert abs(share[:20].mean() - share[-20:].mean()) < 0.02
    # a stream shorter than the sample is kept whole, in order
    sample = np.zeros((10, 1))
    reservoir_update(sample, 0, rows[:4], rng)
    reservoir_update(sample, 4, rows[4:6], rng)
    np.testing.assert_array_equal(sample[:6, 0], np.arange(6))


def _survival(shares: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # tissue 0 raises the hazard, tissue 2 lowers it; censoring at random
    hazard = np.exp(2.0 * shares[:, 0] - 1.5 * shares[:, 2])
    event_time = rng.exponential(1.0 / hazard)
    censor = rng.exponential(2.0, len(hazard))
    return np.minimum(event_time, censor), (event_time <= censor).astype(float)


def _optimise(model: CompositionMIL, bags: list[np.ndarray], time: np.ndarray, event: np.ndarray):
    """Full-batch LBFGS on the training loss a training step uses (the mean over loss views of
    the Efron Cox loss, or the Cox loss of the logits)."""
    features = [_bag(x) for x in bags]
    t, e = torch.as_tensor(time), torch.as_tensor(event)
    params = list(model.parameters())
    opt = torch.optim.LBFGS(
        params, lr=0.5, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        outs = [model(**f) for f in features]
        if outs[0].loss_views is not None:
            views = torch.cat([o.loss_views for o in outs]).double()
            loss = torch.stack(
                [cox_ph_loss(views[:, v, 0], t, e, ties="efron") for v in range(views.shape[1])]
            ).mean()
        else:
            logits = torch.cat([o.logits for o in outs]).double()
            loss = cox_ph_loss(logits[:, 0], t, e, ties="efron")
        loss.backward()
        return loss

    opt.step(closure)
    return torch.cat([model.shares(**f) for f in features]).double().numpy()


def _lifelines(z: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    frame = pd.DataFrame(z, columns=[f"z{j}" for j in range(z.shape[1])])
    frame["t"], frame["e"] = time, event
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter(penalizer=0.0).fit(frame, "t", "e").params_.to_numpy()


def test_marginal_effects_are_the_univariable_cox_fits() -> None:
    bags, true_shares = _planted(150)
    time, event = _survival(true_shares)
    model = _fitted(bags)
    shares = _optimise(model, bags, time, event)
    z = (shares - model.share_mean.numpy()) / model.share_std.numpy()
    expected = np.array([_lifelines(z[:, [j]], time, event)[0] for j in range(3)])
    np.testing.assert_allclose(model.head["effect"].detach().numpy()[:, 0], expected, atol=2e-3)
    # the prediction is the mean of the one-cluster models
    out = model(**_bag(bags[0]))
    torch.testing.assert_close(out.logits, out.loss_views.mean(dim=1))
    # the planted signs: tissue 0 harmful, tissue 2 protective (unadjusted)
    order = [int(np.argmax(np.corrcoef(true_shares.T, shares.T)[i, 3:])) for i in range(3)]
    assert expected[order[0]] > 0.1 and expected[order[2]] < -0.1


def test_joint_effects_are_the_multivariable_cox_fit() -> None:
    bags, true_shares = _planted(150)
    time, event = _survival(true_shares)
    model = _fitted(bags, effects="joint")
    shares = _optimise(model, bags, time, event)
    z = (shares - model.share_mean.numpy()) / model.share_std.numpy()
    # shares sum to 1: the three standardised shares are collinear, so compare the risks
    risk = z @ model.head["effect"].detach().double().numpy()[:, 0]
    expected = z[:, :2] @ _lifelines(z[:, :2], time, event)
    np.testing.assert_allclose(risk - risk.mean(), expected - expected.mean(), atol=5e-3)
    assert model(**_bag(bags[0])).loss_views is None


def test_a_training_step_averages_the_task_loss_over_the_views() -> None:
    config = make_config(task="survival", model="composition", epochs=1)
    ftask = FoldTask(TaskSpec("survival", "survival"), config, n_outputs=1)
    views = torch.randn(6, 4, 1)

    class Views(torch.nn.Module):
        def forward(self, features: Any, mask: Any, coords: Any = None) -> MILOutput:
            return MILOutput(logits=views.mean(dim=1), embedding=views[:, :, 0], loss_views=views)

    module = MILModule(Views(), ftask, config, steps_per_epoch=1)
    batch = {
        "features": torch.zeros(6, 2, 3),
        "mask": torch.ones(6, 2, dtype=torch.bool),
        "time": torch.tensor([5.0, 3.0, 8.0, 1.0, 4.0, 6.0]),
        "event": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
    }
    loss = module.training_step(batch, 0)
    expected = torch.stack([ftask.loss(views[:, v], batch) for v in range(4)]).mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, ftask.loss(views.mean(dim=1), batch))


def test_the_training_path_fits_the_clusters_on_the_training_part_only(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(
        task="survival", model="composition", model_kwargs={"clusters": 4}, epochs=3,
        batch_size=8, n_boot=20, progress=False,
    )  # fmt: skip
    fit_all(cohort, config, tmp_path / "model")
    trained = load_model_folder(tmp_path / "model")
    model = trained.model
    assert isinstance(model, CompositionMIL)
    parts = trained.patients()
    train = parts.loc[parts["part"] == "train", "patient_id"].tolist()
    assert int(model.fitted) == len(train) and (parts["part"] == "val").any()
    with FeatureCache() as cache:
        bags = training_bags(cohort, train, cache)
        with torch.no_grad():
            shares = torch.cat([model.shares(b["features"], b["mask"]) for b in bags])
            # read twice: the bags of the training path can be iterated again
            assert len(list(bags)) == len(train)
    # the standardisation is the training part's (a validation patient would move it)
    torch.testing.assert_close(model.share_mean, shares.mean(dim=0), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model.share_std, shares.std(dim=0, unbiased=False), atol=1e-6, rtol=0
    )
    assert model.head["effect"].detach().abs().sum() > 0  # trained
