"""The CPU fast path of Dropout keeps nn.Dropout's semantics."""

from __future__ import annotations

import torch

from oncoslide.models.base import Dropout


def test_dropout_zeroes_a_fraction_p_and_preserves_the_mean() -> None:
    torch.manual_seed(0)
    layer = Dropout(0.25).train()
    x = torch.ones(400, 500)
    y = layer(x)
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.005
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    assert abs(float(y.mean()) - 1.0) < 0.01


def test_dropout_is_identity_in_eval_and_seeded_in_training() -> None:
    x = torch.randn(50, 20)
    layer = Dropout(0.5)
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    assert torch.equal(a, b)


def test_dropout_gradient_flows_only_through_kept_units() -> None:
    torch.manual_seed(2)
    x = torch.randn(30, 40, requires_grad=True)
    y = Dropout(0.3).train()(x)
    y.sum().backward()
    assert x.grad is not None
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert (x.grad[~kept] == 0).all()
