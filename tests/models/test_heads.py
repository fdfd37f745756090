from __future__ import annotations

import numpy as np
import torch

from oncoslide.models import class_probs, discrete_hazards, discrete_risk, discrete_survival


def test_survival_and_risk_match_the_mcat_formulas() -> None:
    logits = torch.tensor([[-2.0, 0.0, 1.0, 3.0], [0.5, -1.0, -1.0, 2.0]], dtype=torch.float64)
    h = 1 / (1 + np.exp(-logits.numpy()))
    survival = np.cumprod(1 - h, axis=1)
    np.testing.assert_allclose(discrete_hazards(logits).numpy(), h, rtol=1e-12)
    np.testing.assert_allclose(discrete_survival(logits).numpy(), survival, rtol=1e-12)
    np.testing.assert_allclose(discrete_risk(logits).numpy(), -survival.sum(axis=1), rtol=1e-12)


def test_higher_hazards_mean_higher_risk_and_extremes_stay_finite() -> None:
    base = torch.zeros(1, 4)
    assert discrete_risk(base + 1.0) > discrete_risk(base) > discrete_risk(base - 1.0)
    extreme = torch.tensor([[-200.0, 200.0, 50.0], [200.0, -200.0, -50.0]])
    survival = discrete_survival(extreme)
    assert torch.isfinite(survival).all() and (survival >= 0).all() and (survival <= 1).all()
    torch.testing.assert_close(survival[1], torch.zeros(3))
    torch.testing.assert_close(survival[0, 0], torch.tensor(1.0))


def test_class_probs_is_a_softmax() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0], [1000.0, 0.0]])
    probs = class_probs(logits)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.5]))
    expected = np.exp(3.0) / (1 + np.exp(3.0))
    torch.testing.assert_close(probs[0, 0], torch.tensor(expected, dtype=torch.float32))
    assert probs[2, 0] == 1.0
