"""Survival losses against closed forms, brute force, torchsurv, lifelines and planted hazards."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from oncoslide.errors import ConfigError
from oncoslide.survival.losses import cox_ph_loss, discrete_time_nll

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- discrete-time NLL --------------------------------------------------------------------


def _nll_numpy(
    logits: np.ndarray, y: np.ndarray, event: np.ndarray, alpha: float, eps: float
) -> np.ndarray:
    """The MCAT formula written directly with products and clamped logs."""
    h = 1 / (1 + np.exp(-logits))
    s_pad = np.concatenate([np.ones((len(y), 1)), np.cumprod(1 - h, axis=1)], axis=1)
    rows = np.arange(len(y))

    def log(x: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(x, eps))

    uncensored = -event * (log(s_pad[rows, y]) + log(h[rows, y]))
    censored = -(1 - event) * log(s_pad[rows, y + 1])
    return (1 - alpha) * (uncensored + censored) + alpha * uncensored


def test_discrete_nll_by_hand_on_one_patient() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)  # every hazard 1/2
    died_in_1 = discrete_time_nll(logits, torch.tensor([1]), torch.tensor([1.0]))
    assert died_in_1.item() == pytest.approx(-math.log(0.5 * 0.5))  # survived bin 0, died in 1
    censored_in_1 = discrete_time_nll(logits, torch.tensor([1]), torch.tensor([0.0]))
    assert censored_in_1.item() == pytest.approx(-math.log(0.25))  # survived bins 0 and 1
    died_in_0 = discrete_time_nll(logits, torch.tensor([0]), torch.tensor([True]))
    assert died_in_0.item() == pytest.approx(math.log(2))
    censored_last = discrete_time_nll(logits, torch.tensor([2]), torch.tensor([False]))
    assert censored_last.item() == pytest.approx(-math.log(0.125))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_discrete_nll_matches_the_direct_formula(alpha: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(30, 5))
    y = rng.integers(0, 5, size=30)
    event = (rng.random(30) < 0.6).astype(float)
    expected = _nll_numpy(logits, y, event, alpha, eps=1e-7)
    args = (torch.tensor(logits), torch.tensor(y), torch.tensor(event))
    per_patient = discrete_time_nll(*args, alpha=alpha, reduction="none")
    np.testing.assert_allclose(per_patient.numpy(), expected, rtol=1e-10)
    assert discrete_time_nll(*args, alpha=alpha).item() == pytest.approx(expected.mean())
    assert discrete_time_nll(*args, alpha=alpha, reduction="sum").item() == pytest.approx(
        expected.sum()
    )


def test_discrete_nll_eps_floor_and_stability() -> None:
    logits = torch.tensor([[-60.0, 0.0]], dtype=torch.float64, requires_grad=True)
    floored = discrete_time_nll(logits, torch.tensor([0]), torch.tensor([1.0]))
    assert floored.item() == pytest.approx(-math.log(1e-7))  # MCAT's clamp of h at eps
    exact = discrete_time_nll(logits, torch.tensor([0]), torch.tensor([1.0]), eps=0.0)
    assert exact.item() == pytest.approx(60.0, rel=1e-12)  # -logsigmoid(-60), no overflow
    exact.backward()
    assert logits.grad is not None and logits.grad[0, 0].item() == pytest.approx(-1.0)
    huge = torch.tensor([[500.0, -500.0, 500.0]] * 2, requires_grad=True)
    loss = discrete_time_nll(huge, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]), eps=0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(huge.grad).all()  # type: ignore[arg-type]


def test_discrete_nll_recovers_planted_hazards() -> None:
    """Simulated discrete data: the minimiser is the closed-form MLE, close to the truth."""
    rng = np.random.default_rng(1)
    true_h = np.array([0.1, 0.25, 0.2, 0.4])
    n, k = 10_000, len(true_h)
    death = np.full(n, k - 1)  # bin of death; who survives every bin is censored in the last
    alive = np.ones(n, dtype=bool)
    for j in range(k):
        dies = alive & (rng.random(n) < true_h[j])
        death[dies], alive[dies] = j, False
    censor = rng.integers(0, k, size=n)  # censored in bin c = known to survive bin c
    event = ~alive & (death <= censor)
    y = np.where(event, death, np.minimum(censor, death))
    # closed form: hazard of bin j = deaths in j / patients still at risk in j
    mle = np.array([(event & (y == j)).sum() / (y >= j).sum() for j in range(k)])

    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [theta],
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    targets = (torch.tensor(y), torch.tensor(event.astype(float)))

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = discrete_time_nll(theta.expand(n, k), *targets)
        loss.backward()
        return loss

    optimiser.step(closure)
    fitted = torch.sigmoid(theta).detach().numpy()
    np.testing.assert_allclose(fitted, mle, atol=1e-6)
    np.testing.assert_allclose(fitted, true_h, atol=0.02)


def test_discrete_nll_rejects_bad_input() -> None:
    logits = torch.zeros(3, 4)
    with pytest.raises(ConfigError, match=r"bin_index must lie in \[0, 4\)"):
        discrete_time_nll(logits, torch.tensor([0, 4, 1]), torch.ones(3))
    with pytest.raises(ConfigError, match=r"bin_index must have shape \(3,\).*event must"):
        discrete_time_nll(logits, torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ConfigError, match="integer"):
        discrete_time_nll(logits, torch.tensor([0.0, 1.0, 2.0]), torch.ones(3))
    with pytest.raises(ConfigError, match="alpha"):
        discrete_time_nll(logits, torch.tensor([0, 1, 2]), torch.ones(3), alpha=2.0)
    with pytest.raises(ConfigError, match="reduction"):
        discrete_time_nll(logits, torch.tensor([0, 1, 2]), torch.ones(3), reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\(B, K\)"):
        discrete_time_nll(torch.zeros(3), torch.tensor([0, 1, 2]), torch.ones(3))


# ---- Cox partial likelihood -----------------------------------------------------------------


def _cox_brute_force(risk: np.ndarray, time: np.ndarray, event: np.ndarray, ties: str) -> float:
    """Negative partial log-likelihood, one event time at a time (textbook formulas)."""
    total = 0.0
    for t in np.unique(time[event]):
        dead = event & (time == t)
        at_risk = np.exp(risk[time >= t]).sum()
        tied = np.exp(risk[dead]).sum()
        m = dead.sum()
        total += risk[dead].sum()
        if ties == "breslow":
            total -= m * np.log(at_risk)
        else:
            total -= sum(np.log(at_risk - r / m * tied) for r in range(m))
    return -total


def _survival_data(n: int, seed: int, n_times: int = 8) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(scale=1.5, size=n)
    time = rng.integers(1, n_times, size=n).astype(float)  # many ties, censored ones included
    event = rng.random(n) < 0.6
    return risk, time, event


def _t(*arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(a) for a in arrays)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_matches_brute_force(ties: str) -> None:
    for seed in range(5):
        risk, time, event = _survival_data(40, seed)
        loss = cox_ph_loss(*_t(risk, time, event), ties=ties, reduction="sum")  # type: ignore[arg-type]
        assert loss.item() == pytest.approx(_cox_brute_force(risk, time, event, ties), rel=1e-10)


@pytest.mark.filterwarnings("ignore:Ties in", "ignore::DeprecationWarning")
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_matches_torchsurv(ties: str) -> None:
    from torchsurv.loss.cox import neg_partial_log_likelihood

    risk, time, event = _t(*_survival_data(256, 3, n_times=30))
    ours = cox_ph_loss(risk, time, event, ties=ties, reduction="sum")  # type: ignore[arg-type]
    theirs = neg_partial_log_likelihood(risk, event, time, ties_method=ties, reduction="sum")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cox_mean_is_per_event_and_matches_torchsurv_without_ties() -> None:
    """torchsurv's "mean" is per event time, ours per event: equal when event times are unique."""
    from torchsurv.loss.cox import neg_partial_log_likelihood

    rng = np.random.default_rng(4)
    risk, time = rng.normal(size=50), rng.permutation(50).astype(float) + 1.0
    event = rng.random(50) < 0.5
    args = _t(risk, time, event)
    ours = cox_ph_loss(*args)
    theirs = neg_partial_log_likelihood(args[0], args[2], args[1], reduction="mean")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    total = cox_ph_loss(*args, reduction="sum")
    assert ours.item() == pytest.approx(total.item() / event.sum(), rel=1e-12)


def test_cox_efron_matches_lifelines_partial_likelihood() -> None:
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(7)
    n = 80
    x = rng.normal(size=n)
    time = np.ceil(rng.exponential(scale=np.exp(-0.8 * x)) * 5)  # rounded: many ties
    event = rng.random(n) < 0.7
    frame = pd.DataFrame({"x": x, "T": time, "E": event.astype(int)})
    assert frame.loc[frame.E == 1, "T"].duplicated().any()
    fitter = CoxPHFitter().fit(frame, duration_col="T", event_col="E")
    beta = float(fitter.params_["x"])
    loss = cox_ph_loss(*_t(beta * x, time, event), ties="efron", reduction="sum")
    assert loss.item() == pytest.approx(-fitter.log_likelihood_, rel=1e-9)


def test_cox_mask_excludes_padded_entries_completely() -> None:
    risk, time, event = _survival_data(30, 11)
    mask = np.ones(33, dtype=bool)
    mask[[4, 17, 32]] = False
    full_risk = np.insert(risk, [4, 16, 30], np.nan)  # garbage at the padded positions
    full_time = np.insert(time, [4, 16, 30], [np.nan, -5.0, 0.0])
    full_event = np.insert(event, [4, 16, 30], True)
    risk_t = torch.tensor(full_risk, requires_grad=True)
    loss = cox_ph_loss(risk_t, *_t(full_time, full_event, mask), reduction="sum")
    assert loss.item() == pytest.approx(_cox_brute_force(risk, time, event, "efron"), rel=1e-10)
    loss.backward()
    assert risk_t.grad is not None and torch.isfinite(risk_t.grad).all()
    assert (risk_t.grad[~torch.tensor(mask)] == 0).all()


def test_cox_gradient_is_right_and_batch_order_does_not_matter() -> None:
    risk, time, event = _survival_data(25, 5)
    risk_t = torch.tensor(risk, requires_grad=True)
    time_t, event_t = _t(time, event)
    for ties in ("breslow", "efron"):
        assert torch.autograd.gradcheck(
            lambda r, ties=ties: cox_ph_loss(r, time_t, event_t, ties=ties), (risk_t,)
        )
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        cox_ph_loss(risk_t[perm], time_t[perm], event_t[perm]), cox_ph_loss(risk_t, time_t, event_t)
    )


def test_cox_without_events_is_zero_with_a_graph() -> None:
    risk = torch.randn(6, requires_grad=True)
    loss = cox_ph_loss(risk, torch.arange(6.0), torch.zeros(6, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert risk.grad is not None and (risk.grad == 0).all()
    masked = cox_ph_loss(
        risk, torch.arange(6.0), torch.ones(6), mask=torch.zeros(6, dtype=torch.bool)
    )
    assert masked.item() == 0.0


def test_cox_reductions_and_head_shape() -> None:
    risk, time, event = _t(*_survival_data(20, 2))
    per_patient = cox_ph_loss(risk, time, event, reduction="none")
    assert per_patient.shape == (20,)
    assert (per_patient[~event] == 0).all() and (per_patient[event] > 0).all()
    torch.testing.assert_close(per_patient.sum(), cox_ph_loss(risk, time, event, reduction="sum"))
    torch.testing.assert_close(
        cox_ph_loss(risk[:, None], time, event), cox_ph_loss(risk, time, event)
    )


def test_cox_rejects_bad_input() -> None:
    risk = torch.zeros(4)
    with pytest.raises(ConfigError, match=r"time must have shape \(4,\).*event must"):
        cox_ph_loss(risk, torch.zeros(3), torch.zeros(5))
    with pytest.raises(ConfigError, match="mask must be bool"):
        cox_ph_loss(risk, torch.zeros(4), torch.zeros(4), mask=torch.ones(4))
    with pytest.raises(ConfigError, match="ties"):
        cox_ph_loss(risk, torch.zeros(4), torch.zeros(4), ties="exact")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"risk must be \(B,\)"):
        cox_ph_loss(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4))
