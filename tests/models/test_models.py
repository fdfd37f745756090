"""The model contract, checked for every registered model, and per-model oracles."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from oncoslide.errors import ConfigError
from oncoslide.models import MODELS, MILModel, MILOutput, create_model, list_models

IN_DIM = 12
# omics of 5 genes in 3 groups (one gene in two groups), as the training path passes it
LAYOUT = {"n_columns": 5, "groups": {"b": [2, 3, 4], "a": [0, 1], "c": [1, 4]}}
SMALL: dict[str, dict[str, Any]] = {
    "mean": {},
    "max": {},
    "composition": {"clusters": 3},
    "abmil": {"attn_dim": 8},
    "abmil_plain": {"attn_dim": 8},
    "transmil": {"n_landmarks": 6, "heads": 4},
    "ghanet": {"heads": 4, "attn_dim": 8, "side_layout": {"omics": LAYOUT}},
    "pathlupi": {"heads": 4, "side_layout": {"omics": LAYOUT}},
    "omics_snn": {"side_layout": {"omics": LAYOUT}},
    "fusion_late": {"attn_dim": 8, "omics_dim": 8, "side_layout": {"omics": LAYOUT}},
    "mome": {"attn_dim": 8, "omics_dim": 8, "side_layout": {"omics": LAYOUT}},
    "hmil": {"attn_dim": 8},  # its label tree: see _model
    "slide-finetune": {"finetune": "full"},  # a small Threads encoder (docs/pretrain.md)
}
LENGTHS = (23, 9, 1, 16)  # includes a one-patch bag and a perfect square
# models whose fixed statistics are fitted to the training part before use (fit_to_training)
FITTED = {"composition"}
# models that read the patches without a gradient (hard tissue assignment)
NO_PATCH_GRADIENT = {"composition"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, n_outputs: int = 3, seed: int = 0, **kw: Any) -> MILModel:
    torch.manual_seed(seed)
    options = {"in_dim": IN_DIM, "n_outputs": n_outputs, "hidden_dim": 16, **SMALL[name], **kw}
    if MODELS.metadata(name).get("uses_label_tree"):  # a tree over n_outputs fine classes
        options.setdefault("tree", {"A": [f"a{i}" for i in range(n_outputs - 1)], "B": ["b"]})
    model = create_model(name, **options)
    if name in FITTED:
        features, mask = _batch((30, 25, 40), pad_to=40, seed=11)
        model.fit_to_training(
            [{"features": features[b : b + 1], "mask": mask[b : b + 1]} for b in range(3)]
        )
        with torch.no_grad():  # effects away from their zero start, so outputs differ
            for p in model.parameters():
                p.normal_()
    return model.eval()


def _batch(
    lengths: tuple[int, ...], pad_to: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), pad_to, IN_DIM, generator=gen)
    mask = torch.arange(pad_to)[None, :] < torch.tensor(lengths)[:, None]
    # padding holds garbage of a very different scale
    garbage = 1e3 * torch.randn(features.shape, generator=gen)
    return torch.where(mask[..., None], features, garbage), mask


def test_all_models_are_tested() -> None:
    # models built from other trained models (a zoo of experts) are tested in tests/transfer
    own = {m for m in list_models() if not MODELS.metadata(m).get("needs_experts")}
    assert own == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_shapes(name: str) -> None:
    model = _model(name, n_outputs=5)
    features, mask = _batch(LENGTHS, pad_to=30)
    out = model(features, mask)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (4, 5)
    assert out.embedding.shape == (4, model.embed_dim)
    if not MODELS.metadata(name)["has_attention"]:
        assert out.attention is None
    else:
        assert out.attention is not None and out.attention.shape == (4, 30)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_padding_never_changes_outputs(name: str) -> None:
    model = _model(name)
    features, mask = _batch(LENGTHS, pad_to=max(LENGTHS))
    reference = model(features, mask)
    gen = torch.Generator().manual_seed(7)
    for extra, fill in ((5, None), (40, None), (3, float("nan")), (3, float("inf"))):
        garbage = 1e4 * torch.randn(len(LENGTHS), extra, IN_DIM, generator=gen)
        if fill is not None:
            garbage.fill_(fill)
        padded = model(
            torch.cat([features, garbage], dim=1),
            torch.cat([mask, torch.zeros(len(LENGTHS), extra, dtype=torch.bool)], dim=1),
        )
        torch.testing.assert_close(padded.logits, reference.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(padded.embedding, reference.embedding, atol=1e-5, rtol=0)
        if reference.attention is not None:
            assert padded.attention is not None
            torch.testing.assert_close(
                padded.attention[:, : max(LENGTHS)], reference.attention, atol=1e-6, rtol=0
            )
            assert (padded.attention[:, max(LENGTHS) :] == 0).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_bag_in_a_batch_equals_the_bag_alone(name: str) -> None:
    model = _model(name)
    features, mask = _batch(LENGTHS, pad_to=max(LENGTHS) + 4)
    batched = model(features, mask)
    for b, n in enumerate(LENGTHS):
        alone = model(features[b : b + 1, :n], mask[b : b + 1, :n])
        torch.testing.assert_close(alone.logits[0], batched.logits[b], atol=1e-5, rtol=0)
        if alone.attention is not None:
            assert batched.attention is not None
            torch.testing.assert_close(
                alone.attention[0], batched.attention[b, :n], atol=1e-6, rtol=0
            )


@pytest.mark.parametrize("name", [m for m in sorted(SMALL) if MODELS.metadata(m)["has_attention"]])
def test_attention_is_a_distribution_over_valid_patches(name: str) -> None:
    out = _model(name)(*_batch(LENGTHS, pad_to=30))
    assert out.attention is not None
    mask = _batch(LENGTHS, pad_to=30)[1]
    assert (out.attention >= 0).all()
    assert (out.attention[~mask] == 0).all()
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(len(LENGTHS)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_padding_gets_no_gradient_and_training_mode_runs(name: str) -> None:
    model = _model(name).train()
    features, mask = _batch(LENGTHS, pad_to=30)
    features = features.clone().requires_grad_(True)
    side = None
    if MODELS.metadata(name).get("side_inputs"):  # training steps get the side input
        # one patient without omics: the rule for missing omics is trained too
        present = torch.tensor([True, True, False, True])
        side = {"omics": torch.randn(len(LENGTHS), 5), "omics_present": present}
        out = model(features, mask, side=side)
        assert set(out.aux_losses) == set(MODELS.metadata(name).get("aux_losses", {}))
    elif MODELS.metadata(name).get("uses_targets"):  # training steps get the labels
        out = model(features, mask, targets={"label": torch.tensor([0, 1, 1, 2])})
        assert set(out.aux_losses) == set(MODELS.metadata(name).get("aux_losses", {}))
    else:
        out = model(features, mask)
    loss = out.logits.sum() + out.embedding.sum() + sum(out.aux_losses.values())
    loss.backward()
    if MODELS.metadata(name).get("uses_patches", True) is False or name in NO_PATCH_GRADIENT:
        assert features.grad is None or (features.grad == 0).all()
    else:
        assert features.grad is not None
        assert (features.grad[~mask] == 0).all()
        assert features.grad[mask].abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_packing_gives_the_same_result_as_projecting_everything(name: str) -> None:
    model = _model(name)
    features, mask = _batch(LENGTHS, pad_to=30)
    packed = model(features, mask)
    model.pack_valid = False
    unpacked = model(features, mask)
    torch.testing.assert_close(packed.logits, unpacked.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_coords_are_accepted_and_checked(name: str) -> None:
    model = _model(name)
    features, mask = _batch(LENGTHS, pad_to=30)
    coords = torch.randint(0, 10_000, (4, 30, 2))
    torch.testing.assert_close(model(features, mask, coords).logits, model(features, mask).logits)
    with pytest.raises(ConfigError, match="coords"):
        model(features, mask, coords[..., :1])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_half_precision_features_are_accepted(name: str) -> None:
    model = _model(name)
    features, mask = _batch(LENGTHS, pad_to=30)
    half = features.clamp(-6e4, 6e4).half()
    torch.testing.assert_close(model(half, mask).logits, model(half.float(), mask).logits)


def test_input_problems_are_listed_together() -> None:
    model = _model("abmil")
    features, mask = _batch((5, 0, 3), pad_to=6)
    with pytest.raises(ConfigError, match=r"bags \[1\] have no valid patch"):
        model(features, mask)
    with pytest.raises(ConfigError, match=r"dimension 7.*expects 12.*mask shape"):
        model(torch.randn(2, 6, 7), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="mask must be bool"):
        model(torch.randn(2, 6, IN_DIM), torch.ones(2, 6))
    with pytest.raises(ConfigError, match=r"\(B, N, D\)"):
        model(torch.randn(6, IN_DIM), torch.ones(6, dtype=torch.bool))


@pytest.mark.parametrize(
    ("name", "kw", "message"),
    [
        ("abmil", {"dropout": 1.0}, "dropout"),
        ("mean", {"hidden_dim": 0}, "hidden_dim"),
        ("abmil", {"attn_dim": 0}, "attn_dim"),
        ("transmil", {"heads": 5}, "heads"),
        ("composition", {"clusters": 1, "effects": "both"}, "clusters.*effects"),
        ("transmil", {"n_landmarks": 0, "pinv_iterations": 0}, "n_landmarks.*pinv_iterations"),
    ],
)
def test_bad_constructor_values_raise(name: str, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _model(name, **kw)


def test_defaults_match_the_documented_architecture() -> None:
    model = create_model("abmil", in_dim=1536, n_outputs=4)
    assert model.proj[0].weight.shape == (512, 1536)
    assert model.proj[2].p == 0.25
    assert model.attention.tanh_branch[0].weight.shape == (128, 512)
    assert model.attention.gate_branch is not None
    assert model.head.weight.shape == (4, 512)
    plain = create_model("abmil_plain", in_dim=1536, n_outputs=4, attn_dim=384)
    assert plain.attention.gate_branch is None
    assert plain.attention.tanh_branch[0].weight.shape == (384, 512)
    transmil = create_model("transmil", in_dim=1024, n_outputs=2)
    assert transmil.layer1.attn.n_landmarks == 256 and transmil.layer1.attn.heads == 8
    assert transmil.layer1.attn.pinv_iterations == 6


# ---- per-model oracles (numpy re-implementations) ----------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("gated", [True, False])
def test_abmil_matches_a_numpy_reimplementation(gated: bool) -> None:
    model = _model("abmil" if gated else "abmil_plain")
    features, mask = _batch(LENGTHS, pad_to=30)
    out = model(features, mask)
    w1, b1 = _np(model.proj[0].weight), _np(model.proj[0].bias)
    va, ba = _np(model.attention.tanh_branch[0].weight), _np(model.attention.tanh_branch[0].bias)
    ws, bs = _np(model.attention.score.weight), _np(model.attention.score.bias)
    wh, bh = _np(model.head.weight), _np(model.head.bias)
    for b, n in enumerate(LENGTHS):
        h = np.maximum(_np(features[b, :n]) @ w1.T + b1, 0)
        gate = np.tanh(h @ va.T + ba)
        if gated:
            gu = model.attention.gate_branch[0]
            gate = gate / (1 + np.exp(-(h @ _np(gu.weight).T + _np(gu.bias))))
        scores = (gate @ ws.T + bs)[:, 0]
        a = np.exp(scores - scores.max())
        a /= a.sum()
        pooled = a @ h
        np.testing.assert_allclose(_np(out.attention[b, :n]), a, atol=1e-6)
        np.testing.assert_allclose(_np(out.embedding[b]), pooled, atol=1e-5)
        np.testing.assert_allclose(_np(out.logits[b]), pooled @ wh.T + bh, atol=1e-5)


@pytest.mark.parametrize("name", ["mean", "max"])
def test_pooling_matches_numpy(name: str) -> None:
    model = _model(name)
    features, mask = _batch(LENGTHS, pad_to=30)
    out = model(features, mask)
    w1, b1 = _np(model.proj[0].weight), _np(model.proj[0].bias)
    for b, n in enumerate(LENGTHS):
        h = np.maximum(_np(features[b, :n]) @ w1.T + b1, 0)
        expected = h.mean(axis=0) if name == "mean" else h.max(axis=0)
        np.testing.assert_allclose(_np(out.embedding[b]), expected, atol=1e-5)


def planted_bags(
    n_bags: int, n_patches: int, dim: int, strength: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags of noise; odd bags are positive and get one 'key' patch shifted along axis 0."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_bags, n_patches, dim, generator=gen)
    labels = torch.arange(n_bags) % 2
    key = torch.randint(0, n_patches, (n_bags,), generator=gen)
    positive = labels == 1
    features[positive, key[positive]] += strength * torch.eye(dim)[0]
    return features, labels, key


def test_abmil_learns_to_attend_to_the_planted_key_patch() -> None:
    """Planted ground truth, judged on held-out bags (memorising the training bags fails)."""
    features, labels, _ = planted_bags(64, 10, 6, strength=4.0, seed=5)
    test_features, test_labels, test_key = planted_bags(64, 10, 6, strength=4.0, seed=6)
    mask = torch.ones(64, 10, dtype=torch.bool)
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=6, n_outputs=2, hidden_dim=16, attn_dim=8, dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(features, mask).logits, labels).backward()
        optimiser.step()
    with torch.no_grad():
        out = model.eval()(test_features, mask)
    assert (out.logits.argmax(dim=1) == test_labels).float().mean() >= 0.8  # chance: 0.5
    assert out.attention is not None
    positive = test_labels == 1
    assert out.attention[positive, test_key[positive]].mean() > 0.5  # uniform: 0.1
