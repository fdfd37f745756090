"""The baselines that read omics at test time: numpy oracles, the missing-omics rules, and
modality dropout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from oncoslide.errors import ConfigError
from oncoslide.models import MODELS, create_model
from oncoslide.models.omics_baselines import EXPERTS, MOME, LateFusion, OmicsSNN

pytestmark = pytest.mark.usefixtures("one_thread")

IN_DIM, G = 12, 5
LAYOUT = {"omics": {"n_columns": G, "groups": {"a": [0, 1], "b": [2, 3, 4]}}}
NAMES = ("omics_snn", "fusion_late", "mome")
LENGTHS = (23, 9, 1, 16)
PRESENT = torch.tensor([True, False, True, False])
# SELU's constants (Klambauer et al.), typed in here rather than read from torch
SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def _model(name: str, seed: int = 0, **kw: Any) -> Any:
    torch.manual_seed(seed)
    options: dict[str, Any] = {"in_dim": IN_DIM, "n_outputs": 3, "hidden_dim": 16}
    if name != "omics_snn":
        options.update(attn_dim=8, omics_dim=8)
    return create_model(name, **{**options, "side_layout": LAYOUT, **kw}).eval()


def _batch(pad_to: int = 30, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(len(LENGTHS), pad_to, IN_DIM, generator=gen)
    mask = torch.arange(pad_to)[None, :] < torch.tensor(LENGTHS)[:, None]
    features = torch.where(mask[..., None], features, 1e3 * torch.randn(features.shape))
    omics = torch.randn(len(LENGTHS), G, generator=gen)
    # absent rows hold garbage: no branch may read them
    omics[~PRESENT] = torch.tensor([1e6, -1e6, 3e5, 7.0, -2.0])
    return features, mask, {"omics": omics, "omics_present": PRESENT.clone()}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _selu(x: np.ndarray) -> np.ndarray:
    return SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * (np.exp(np.minimum(x, 0)) - 1))


def _snn_np(snn: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    for block in snn.blocks:
        x = _selu(x @ _np(block[0].weight).T + _np(block[0].bias))
    return x


def _abmil_np(model: Any, features: torch.Tensor, b: int, n: int) -> np.ndarray:
    """The gated-attention pooled embedding of bag b, from the model's weights."""
    h = np.maximum(_np(features[b, :n]) @ _np(model.proj[0].weight).T + _np(model.proj[0].bias), 0)
    t, g = model.attention.tanh_branch[0], model.attention.gate_branch[0]
    gate = np.tanh(h @ _np(t.weight).T + _np(t.bias)) / (
        1 + np.exp(-(h @ _np(g.weight).T + _np(g.bias)))
    )
    scores = (gate @ _np(model.attention.score.weight).T + _np(model.attention.score.bias))[:, 0]
    a = np.exp(scores - scores.max())
    return (a / a.sum()) @ h


def _linear_np(layer: torch.nn.Linear, x: np.ndarray) -> np.ndarray:
    return x @ _np(layer.weight).T + _np(layer.bias)


# ------------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", NAMES)
def test_they_are_labelled_as_reading_test_omics(name: str) -> None:
    meta = MODELS.metadata(name)
    assert meta["side_inputs"] == {"omics": "always"} and meta["side_layout"] is True
    assert "test time" in meta["description"]
    assert meta["has_attention"] is (name != "omics_snn")


# -------------------------------------------------------------------- numpy oracles


def test_omics_snn_matches_numpy_and_ignores_the_patches() -> None:
    model = _model("omics_snn")
    features, mask, side = _batch()
    # the missing embedding starts at zeros: move it so the check can tell it from a zero row
    with torch.no_grad():
        model.missing.add_(0.5)
    out = model(features, mask, side=side)
    hidden = _snn_np(model.snn, _np(side["omics"]))
    missing = _np(model.missing)[0]
    for b in range(len(LENGTHS)):
        expected = hidden[b] if PRESENT[b] else missing
        np.testing.assert_allclose(_np(out.embedding[b]), expected, atol=1e-5)
        np.testing.assert_allclose(_np(out.logits[b]), _linear_np(model.head, expected), atol=1e-5)
    other = model(torch.randn_like(features), mask, side=side)
    torch.testing.assert_close(other.logits, out.logits, atol=0, rtol=0)
    assert out.attention is None


def test_late_fusion_averages_heads_where_omics_are_present() -> None:
    model = _model("fusion_late")
    features, mask, side = _batch()
    out = model(features, mask, side=side)
    hidden = _snn_np(model.snn, _np(side["omics"]))
    for b, n in enumerate(LENGTHS):
        slide = _abmil_np(model, features, b, n)
        slide_logits = _linear_np(model.head, slide)
        if PRESENT[b]:
            expected = 0.5 * (slide_logits + _linear_np(model.omics_head, hidden[b]))
            kept = hidden[b]
        else:
            expected, kept = slide_logits, np.zeros(8)
        np.testing.assert_allclose(_np(out.logits[b]), expected, atol=1e-5)
        np.testing.assert_allclose(_np(out.embedding[b]), np.concatenate([slide, kept]), atol=1e-5)


def test_mome_mixes_the_available_experts_with_its_gate() -> None:
    model = _model("mome")
    features, mask, side = _batch()
    mixed, weights, _ = model.mixture(features, mask, side)
    out = model(features, mask, side=side)
    hidden = _snn_np(model.snn, _np(side["omics"]))
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    for b, n in enumerate(LENGTHS):
        slide = _abmil_np(model, features, b, n)
        if not PRESENT[b]:
            assert weights[b].tolist() == [1.0, 0.0, 0.0]  # exactly: masked out of the softmax
            np.testing.assert_allclose(_np(out.embedding[b]), slide, atol=1e-5)
            continue
        both = np.concatenate([slide, hidden[b]])
        experts = np.stack(
            [
                slide,
                relu(_linear_np(model.omics_expert[0], hidden[b])),
                relu(_linear_np(model.fused_expert[0], both)),
            ]
        )
        scores = _linear_np(model.gate, both)
        gate = np.exp(scores - scores.max())
        gate /= gate.sum()
        np.testing.assert_allclose(_np(weights[b]), gate, atol=1e-6)
        np.testing.assert_allclose(_np(mixed[b]), gate @ experts, atol=1e-5)
        np.testing.assert_allclose(
            _np(out.logits[b]), _linear_np(model.head, gate @ experts), atol=1e-5
        )
    assert EXPERTS == ("slide", "omics", "fused")


@pytest.mark.parametrize("name", ["fusion_late", "mome"])
def test_without_omics_the_prediction_is_the_abmil_slide_path(name: str) -> None:
    """The closed form: ``abmil`` loaded with the model's slide weights gives the same logits."""
    model = _model(name)
    features, mask, side = _batch()
    abmil = create_model("abmil", in_dim=IN_DIM, n_outputs=3, hidden_dim=16, attn_dim=8).eval()
    own = model.state_dict()
    abmil.load_state_dict({k: own[k] for k in abmil.state_dict()})
    slide = abmil(features, mask)
    for given in (side, None, {**side, "omics_present": torch.zeros(4, dtype=torch.bool)}):
        out = model(features, mask, side=given)
        absent = ~PRESENT if given is side else torch.ones(4, dtype=torch.bool)
        torch.testing.assert_close(out.logits[absent], slide.logits[absent], atol=1e-6, rtol=0)
        assert out.attention is not None
        torch.testing.assert_close(out.attention, slide.attention, atol=1e-7, rtol=0)
    # with omics the prediction does move: the check above can fail
    present = model(features, mask, side=side).logits[PRESENT]
    assert (present - slide.logits[PRESENT]).abs().max() > 1e-3


# ----------------------------------------------------------------- side-aware contract


@pytest.mark.parametrize("name", NAMES)
def test_with_omics_padding_and_batching_change_nothing(name: str) -> None:
    model = _model(name)
    features, mask, side = _batch(pad_to=max(LENGTHS))
    reference = model(features, mask, side=side)
    extra = torch.full((len(LENGTHS), 7, IN_DIM), float("nan"))
    padded = model(
        torch.cat([features, extra], dim=1),
        torch.cat([mask, torch.zeros(len(LENGTHS), 7, dtype=torch.bool)], dim=1),
        side=side,
    )
    torch.testing.assert_close(padded.logits, reference.logits, atol=1e-5, rtol=0)
    for b, n in enumerate(LENGTHS):
        one = {k: v[b : b + 1] for k, v in side.items()}
        alone = model(features[b : b + 1, :n], mask[b : b + 1, :n], side=one)
        torch.testing.assert_close(alone.logits[0], reference.logits[b], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.embedding[0], reference.embedding[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_absent_rows_are_never_read(name: str) -> None:
    model = _model(name)
    features, mask, side = _batch()
    reference = model(features, mask, side=side)
    changed = side["omics"].clone()
    changed[~PRESENT] = float("nan")
    out = model(features, mask, side={**side, "omics": changed})
    torch.testing.assert_close(out.logits, reference.logits, atol=0, rtol=0)
    # the present rows are read: changing one changes its prediction only
    changed = side["omics"].clone()
    changed[0] += 3.0
    moved = model(features, mask, side={**side, "omics": changed}).logits
    assert (moved[0] - reference.logits[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved[1:], reference.logits[1:], atol=1e-6, rtol=0)


def test_every_patient_without_omics_gets_one_prediction_from_omics_snn() -> None:
    model = _model("omics_snn")
    features, mask, _ = _batch()
    out = model(features, mask, side=None)
    assert torch.equal(out.logits, out.logits[:1].expand_as(out.logits))
    torch.testing.assert_close(out.logits[0], model.head(model.missing)[0], atol=0, rtol=0)


# --------------------------------------------------------------------- modality dropout


@pytest.mark.parametrize(
    ("name", "default"), [("omics_snn", 0.0), ("fusion_late", 0.0), ("mome", 0.5)]
)
def test_modality_dropout_hides_the_asked_share_in_training_steps_only(
    name: str, default: float
) -> None:
    assert _model(name).p_missing_train == default
    n = 4000
    model = _model(name, dropout=0.0, **({"omics_dropout": 0.0} if name != "omics_snn" else {}))
    model.p_missing_train = 0.5
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(n, 3, IN_DIM, generator=gen)
    mask = torch.ones(n, 3, dtype=torch.bool)
    side = {"omics": torch.randn(n, G, generator=gen), "omics_present": torch.ones(n).bool()}
    with torch.no_grad():
        shown = model.eval()(features, mask, side=side).logits
        hidden = model(features, mask, side=None).logits
        torch.manual_seed(5)
        trained = model.train()(features, mask, side=side).logits
    as_hidden = (trained - hidden).abs().amax(dim=1) < 1e-6
    as_shown = (trained - shown).abs().amax(dim=1) < 1e-6
    assert bool((as_hidden ^ as_shown).all())  # each patient is one or the other
    # binomial(4000, 0.5): sd 0.008
    assert abs(float(as_hidden.float().mean()) - 0.5) < 0.04
    model.p_missing_train = 0.0
    with torch.no_grad():
        torch.testing.assert_close(
            model(features, mask, side=side).logits, shown, atol=1e-6, rtol=0
        )


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_and_inputs_raise_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="side_layout"):
        _model(name, side_layout=None)
    with pytest.raises(ConfigError, match="side_layout"):
        _model(name, side_layout={"omics": {"n_columns": 0}})
    with pytest.raises(ConfigError, match="p_missing_train"):
        _model(name, p_missing_train=1.5)
    with pytest.raises(ConfigError, match="n_blocks"):
        _model(name, n_blocks=0)
    model = _model(name)
    features, mask, side = _batch()
    with pytest.raises(ConfigError, match=r"side\['omics'\] must be \(B, G\)"):
        model(features, mask, side={**side, "omics": side["omics"][:, :3]})
    with pytest.raises(ConfigError, match="omics_present"):
        model(features, mask, side={"omics": side["omics"]})


def test_classes_are_the_registered_factories() -> None:
    assert MODELS.get("omics_snn") is OmicsSNN
    assert MODELS.get("fusion_late") is LateFusion
    assert MODELS.get("mome") is MOME


# ------------------------------------------------------------------------ tabular fit


def test_fit_omics_snn_recovers_a_planted_cox_risk() -> None:
    """Planted Cox model: the SNN's test C-index comes close to the true risk's own C."""
    from oncoslide.models.omics_baselines import fit_omics_snn
    from oncoslide.survival.metrics import concordance_index_censored

    rng = np.random.default_rng(0)
    n, beta = 900, np.array([1.0, -0.8, 0.5, 0, 0, 0, 0, 0])
    x = rng.normal(size=(n, beta.size))
    event_time = rng.exponential(np.exp(-x @ beta))
    censor = rng.exponential(2.0, size=n)
    time, event = np.minimum(event_time, censor), event_time <= censor
    tr, va, te = np.arange(500), np.arange(500, 650), np.arange(650, n)
    fit = fit_omics_snn(x[tr], time[tr], event[tr], x_val=x[va], time_val=time[va],
                        event_val=event[va], hidden_dim=32, seed=0)  # fmt: skip
    assert fit.epochs == int(np.argmax(fit.val_scores)) + 1  # the best validation epoch is kept
    oracle = concordance_index_censored(event[te], time[te], x[te] @ beta).cindex
    found = concordance_index_censored(event[te], time[te], fit.risk(x[te])).cindex
    assert oracle > 0.7 and found > oracle - 0.04, (found, oracle)
    # chance for comparison: the same model untrained
    untrained = fit_omics_snn(x[tr], time[tr], event[tr], epochs=1, lr=1e-9, hidden_dim=32)
    assert concordance_index_censored(event[te], time[te], untrained.risk(x[te])).cindex < found
