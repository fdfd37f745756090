"""PAMA's second-order pairs readout (``pool="cls+mean+pairs"``): the readout against a hand
computation, the label-free axes against numpy's principal components, the position ablations,
a planted arrangement it must tell apart, and the encoder folder and CLI option. Its grid edges
are tested in tests/features/test_neighbours.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import Result

from oncoslide.errors import ConfigError
from oncoslide.pretrain import PretrainBags, create_method, load_slide_encoder, run_pretraining
from oncoslide.pretrain.bags import feature_slide_ids
from oncoslide.pretrain.base import SlideEncoder
from oncoslide.pretrain.pama import PAMA, PAMAEncoder, random_pairs

SMALL = dict(width=16, depth=2, heads=2, decoder_width=8)


def _grid(w: int, h: int) -> torch.Tensor:
    xy = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1)
    return xy.reshape(-1, 2).float()


def _brute_edges(pos: torch.Tensor) -> set[tuple[int, int]]:
    pts = [tuple(round(v) for v in p) for p in pos.tolist()]
    out = set()
    for i, (x, y) in enumerate(pts):
        for j, (u, v) in enumerate(pts):
            if (u, v) in ((x + 1, y), (x, y + 1)):
                out.add((i, j))
    return out


def test_random_pairs_are_distinct_patches() -> None:
    pairs = random_pairs(50, torch.Generator().manual_seed(1))
    assert pairs.shape == (100, 2)
    assert bool((pairs[:, 0] != pairs[:, 1]).all())
    assert int(pairs.max()) < 50 and int(pairs.min()) >= 0
    assert random_pairs(1, torch.Generator()).shape == (0, 2)


def _pairs_encoder(positions: str = "on") -> PAMAEncoder:
    return PAMAEncoder(
        in_dim=12, width=16, depth=2, heads=2, pool="cls+mean+pairs", pair_dim=3,
        positions=positions,  # type: ignore[arg-type]
    )  # fmt: skip


def test_readout_equals_a_hand_computation() -> None:
    enc = _pairs_encoder()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(20, 16, generator=gen)
    pos = _grid(5, 4)
    enc.pair_centre.copy_(torch.randn(16, generator=gen))
    enc.pair_axes.copy_(torch.randn(16, 3, generator=gen))
    got = enc.pair_readout(tokens, pos).numpy()
    z = ((tokens - enc.pair_centre) @ enc.pair_axes).double().numpy()
    m = np.zeros((3, 3))
    edges = _brute_edges(pos)
    for i, j in edges:
        m += (np.outer(z[i], z[j]) + np.outer(z[j], z[i])) / 2
    m /= len(edges)
    want = [m[a, b] for a in range(3) for b in range(a, 3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the embedding: CLS, mean, then the 6 pair statistics
    assert enc.embed_dim == 2 * 16 + 6
    feats = torch.randn(20, 12, generator=gen)
    assert enc.embed(feats, pos * 224).shape == (38,)


def test_axes_are_the_tokens_principal_components() -> None:
    enc = _pairs_encoder()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(500, 16, generator=gen) * torch.linspace(3, 0.1, 16)
    enc.fit_pair_axes(tokens)
    t = tokens.double().numpy()
    np.testing.assert_allclose(enc.pair_centre.numpy(), t.mean(0), atol=1e-5)
    _, _, vt = np.linalg.svd(t - t.mean(0), full_matrices=False)
    axes = enc.pair_axes.double().numpy()
    np.testing.assert_allclose(np.abs(axes.T @ vt[:3].T), np.eye(3), atol=1e-4)  # up to sign
    # the sign convention makes a refit reproduce the same axes
    first = enc.pair_axes.clone()
    enc.fit_pair_axes(tokens.flip(0))
    assert torch.allclose(enc.pair_axes, first, atol=1e-5)


def test_the_readout_tells_a_planted_arrangement_apart() -> None:
    """Two slides with the same two patch types in the same shares (identical first-order
    statistics), one as two separate halves and one as a checkerboard: only the pairs part
    differs, and in the planted direction (checkerboard pairs are mixed: negative products on
    the axis separating the types)."""
    enc = _pairs_encoder(positions="on")
    pos = _grid(8, 8)
    kind_halves = (pos[:, 0] >= 4).float()
    kind_checker = ((pos[:, 0] + pos[:, 1]) % 2).float()
    direction = torch.zeros(16)
    direction[0] = 1.0
    enc.pair_centre.zero_()
    enc.pair_axes.zero_()
    enc.pair_axes[0, 0] = 1.0

    def readout(kind: torch.Tensor) -> torch.Tensor:
        tokens = (2 * kind - 1).unsqueeze(1) * direction  # +-1 on the first axis
        return enc.pair_readout(tokens, pos)

    halves, checker = readout(kind_halves), readout(kind_checker)
    assert float(halves[0]) == pytest.approx((112 - 2 * 8) / 112)  # 8 of 112 edges cross
    assert float(checker[0]) == pytest.approx(-1.0)  # every edge joins the two types
    # shuffled coordinates: the same readout of the two arrangements comes out alike
    shuffled = _pairs_encoder(positions="shuffled")
    shuffled.load_state_dict(enc.state_dict())
    gen = torch.Generator().manual_seed(4)
    perm = torch.randperm(64, generator=gen)
    a = shuffled.pair_readout((2 * kind_halves - 1).unsqueeze(1) * direction, pos[perm])
    b = shuffled.pair_readout((2 * kind_checker - 1).unsqueeze(1) * direction, pos[perm])
    assert abs(float(a[0]) - float(b[0])) < 0.5 < float(halves[0] - checker[0])


def test_positions_off_reads_random_pairs_not_coordinates() -> None:
    enc = _pairs_encoder(positions="off")
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(30, 12, generator=gen)
    enc.pair_axes.copy_(torch.randn(16, 3, generator=gen))
    pos = _grid(6, 5) * 224
    other = pos[torch.randperm(30, generator=gen)] * 3 + 7
    assert torch.equal(enc.embed(feats, pos), enc.embed(feats, other))  # no position reaches it


def test_validated_and_off_by_default() -> None:
    enc = PAMAEncoder(in_dim=8)
    assert enc.pool == "cls+mean" and not enc.pairs
    assert not any(k.startswith("pair_") for k in enc.state_dict())  # the paper's readout
    with pytest.raises(ConfigError):
        PAMAEncoder(in_dim=8, pool="pairs")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PAMAEncoder(in_dim=8, width=16, heads=2, pool="cls+mean+pairs", pair_dim=17)


def test_pretraining_fits_the_axes_on_the_exported_weights(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    ids = feature_slide_ids(tiny_cohort / "features")[:4]
    bags = PretrainBags.from_features(tiny_cohort / "features", slide_ids=ids, max_patches=32)
    torch.manual_seed(0)
    method = create_method("pama", in_dim=bags.feature_dim, pool="cls+mean+pairs", **SMALL)
    assert isinstance(method, PAMA)
    out = tmp_path / "enc"
    run_pretraining(method, bags, out, max_steps=2, batch_size=4, probe_size=4)
    loaded = load_slide_encoder(out).encoder
    assert isinstance(loaded, PAMAEncoder) and loaded.pairs and loaded.embed_dim == 32 + 36
    # the axes: orthonormal, fitted on the tokens the folder's weights give the bags
    axes = loaded.pair_axes
    assert torch.allclose(axes.T @ axes, torch.eye(8), atol=1e-4)
    tokens = torch.cat(
        [loaded.patch_tokens(b.features, b.coords) for b in (bags.load(i, subsample=True,
         epoch=0) for i in range(len(bags)))]
    )  # fmt: skip
    assert torch.allclose(loaded.pair_centre, tokens.mean(0), atol=1e-4)
    bag = bags.load(0, subsample=False)
    emb = loaded.embed(bag.features, bag.coords)
    assert emb.shape == (68,) and float(emb[32:].abs().sum()) > 0
    # a folder written without the option has no pairs part (and loads as before)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["encoder"]["config"]["pool"] == "cls+mean+pairs"


def test_cli_pool(pama_cli: Callable[..., Result], tmp_path: Path) -> None:
    out = tmp_path / "enc"
    res = pama_cli(out, "--pool", "cls+mean+pairs")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["encoder"]["config"]["pool"] == "cls+mean+pairs"
    assert meta["encoder"]["embed_dim"] == 32 + 36
    bad = pama_cli(tmp_path / "bad", "--pool", "pairs", tiny=False)
    assert bad.exit_code != 0 and "pool" in bad.output


# ------------------------------------------------------------------ pair_readout="codes"
def _codes_encoder(n_codes: int = 4) -> PAMAEncoder:
    return PAMAEncoder(
        in_dim=12, width=16, depth=1, heads=2, pool="cls+mean+pairs", pair_dim=n_codes,
        pair_readout="codes",
    )  # fmt: skip


def test_codes_readout_equals_a_hand_computation() -> None:
    """Posterior of a spherical Gaussian mixture (fitted codes, shares, variance) per token,
    then the mean over the 4-neighbour edges of sym(q_i q_j^T): computed in numpy."""
    enc = _codes_encoder(4)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randn(20, 16, generator=gen)
    pos = _grid(5, 4)
    enc.pair_codes.copy_(torch.randn(4, 16, generator=gen))
    enc.pair_log_prior.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))
    enc.pair_precision.fill_(0.05)
    got = enc.pair_readout(tokens, pos).numpy()
    t, c = tokens.double().numpy(), enc.pair_codes.double().numpy()
    logit = np.log([0.1, 0.2, 0.3, 0.4]) - 0.05 * ((t[:, None, :] - c[None]) ** 2).sum(-1)
    q = np.exp(logit - logit.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    m = np.zeros((4, 4))
    edges = _brute_edges(pos)
    for i, j in edges:
        m += (np.outer(q[i], q[j]) + np.outer(q[j], q[i])) / 2
    m /= len(edges)
    want = [m[a, b] for a in range(4) for b in range(a, 4)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert enc.embed_dim == 2 * 16 + 10
    # unfitted (zeros): every code equally likely, a constant readout
    fresh = _codes_encoder(4)
    np.testing.assert_allclose(fresh.pair_readout(tokens, pos).numpy().sum(), 10 / 16, rtol=1e-5)


def test_codes_are_fitted_on_the_tokens_without_labels() -> None:
    """Three well separated token clusters of unequal sizes: the fitted codes are their centres,
    the prior their shares, the variance the within-cluster spread per dimension; tokens then
    get a near one-hot posterior on their own cluster's code. The same generator state gives
    the same fit."""
    gen = torch.Generator().manual_seed(7)
    centres = torch.zeros(3, 16)
    centres[0, 0], centres[1, 1], centres[2, 2] = 10.0, 10.0, 10.0
    sizes = [300, 200, 100]
    kind = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    tokens = centres[kind] + 0.5 * torch.randn(600, 16, generator=gen)
    enc = _codes_encoder(3)
    enc.fit_pair_readout(tokens, torch.Generator().manual_seed(8))
    codes = enc.pair_codes.double()
    match = torch.cdist(centres.double(), codes).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2]
    assert torch.allclose(codes[match], centres.double(), atol=0.15)
    shares = enc.pair_log_prior.exp()[match]
    np.testing.assert_allclose(shares.numpy(), [0.5, 1 / 3, 1 / 6], atol=1e-6)
    variance = 1.0 / (2.0 * float(enc.pair_precision))
    assert variance == pytest.approx(0.25, rel=0.1)  # 0.5 ** 2 per dimension
    q = enc.pair_coordinates(tokens)
    assert float((q.argmax(1) == match[kind]).float().mean()) == 1.0
    again = _codes_encoder(3)
    again.fit_pair_readout(tokens, torch.Generator().manual_seed(8))
    assert torch.equal(again.pair_codes, enc.pair_codes)


def test_codes_readout_tells_a_planted_arrangement_apart() -> None:
    """Same shares of two token types, halves vs checkerboard: the cross-code pair rate is
    8 / 112 of the edges for the halves and every edge for the checkerboard."""
    enc = _codes_encoder(2)
    direction = torch.zeros(16)
    direction[0] = 1.0
    enc.pair_codes.copy_(torch.stack([-5 * direction, 5 * direction]))
    enc.pair_precision.fill_(10.0)  # sharp posteriors
    pos = _grid(8, 8)
    halves = enc.pair_readout(((pos[:, 0] >= 4).float() * 10 - 5).unsqueeze(1) * direction, pos)
    mixed = ((pos[:, 0] + pos[:, 1]) % 2).float() * 10 - 5
    checker = enc.pair_readout(mixed.unsqueeze(1) * direction, pos)
    # upper triangle (0,0), (0,1), (1,1): the (0,1) rate is half the share of crossing edges
    assert float(halves[1]) == pytest.approx(0.5 * 8 / 112, abs=1e-4)
    assert float(checker[1]) == pytest.approx(0.5, abs=1e-4)


def test_codes_readout_is_validated_and_fitted_by_pretraining(
    pama_cli: Callable[..., Result], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="pair_readout"):
        PAMAEncoder(in_dim=8, pool="cls+mean+pairs", pair_readout="pca")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="codes"):
        PAMAEncoder(in_dim=8, pool="cls+mean+pairs", pair_readout="codes", pair_dim=1)
    out = tmp_path / "enc"
    res = pama_cli(out, "--pool", "cls+mean+pairs", "--pair-readout", "codes", max_steps=2)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "encoder.json").read_text())
    cfg = meta["encoder"]["config"]
    assert (cfg["pair_readout"], cfg["pair_dim"]) == ("codes", 16)
    assert meta["encoder"]["embed_dim"] == 32 + 136
    loaded = load_slide_encoder(out).encoder
    assert isinstance(loaded, PAMAEncoder)
    assert float(loaded.pair_precision) > 0 and float(loaded.pair_codes.abs().sum()) > 0
    np.testing.assert_allclose(float(loaded.pair_log_prior.exp().sum()), 1.0, atol=1e-5)


def test_an_axes_folder_written_before_pair_readout_loads_as_before(
    pama_cli: Callable[..., Result],
    load_as_before: Callable[[Path, str], SlideEncoder],
    tiny_cohort: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "enc"
    assert pama_cli(out, "--pool", "cls+mean+pairs").exit_code == 0
    now = load_slide_encoder(out).encoder
    before = load_as_before(out, "pair_readout")
    assert isinstance(before, PAMAEncoder) and before.pair_readout_kind == "axes"
    bags = PretrainBags.from_features(tiny_cohort / "features", max_patches=32)
    bag = bags.load(0, subsample=False)
    assert torch.equal(before.embed(bag.features, bag.coords), now.embed(bag.features, bag.coords))


def test_recipes_name_the_settings_and_options_override_them(
    pama_cli: Callable[..., Result], tmp_path: Path
) -> None:
    """``--recipe codes`` is the configuration judged over four worlds (docs/pretrain.md);
    ``paper`` is the library's defaults; options given explicitly win over either."""
    import inspect

    from oncoslide.pretrain.pama import PAMA_RECIPES, pama_recipe

    defaults = inspect.signature(PAMA).parameters
    assert {k: defaults[k].default for k in PAMA_RECIPES["paper"]} == PAMA_RECIPES["paper"]
    out = tmp_path / "codes"
    res = pama_cli(out, "--recipe", "codes", max_steps=2)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "encoder.json").read_text())
    enc, method = meta["encoder"]["config"], meta["method"]["config"]
    assert (enc["pool"], enc["pair_readout"], enc["pair_dim"]) == ("cls+mean+pairs", "codes", 16)
    assert enc["local_neighbours"] == 8
    assert (method["target"], method["mask_ratio"]) == ("codes", 0.5)
    mixed = tmp_path / "mixed"
    res = pama_cli(mixed, "--recipe", "codes", "--mask-ratio", "0.6", "--pool", "cls+mean")
    assert res.exit_code == 0, res.output
    meta = json.loads((mixed / "encoder.json").read_text())
    assert meta["encoder"]["config"]["pool"] == "cls+mean"
    assert (meta["method"]["config"]["target"], meta["method"]["config"]["mask_ratio"]) == (
        "codes",
        0.6,
    )
    assert pama_recipe("paper", pool=None, mask_ratio=0.5)["mask_ratio"] == 0.5
    bad = pama_cli(tmp_path / "bad", "--recipe", "fast", tiny=False)
    assert bad.exit_code != 0 and "known: codes, paper" in bad.output
    assert not (tmp_path / "bad").exists()
