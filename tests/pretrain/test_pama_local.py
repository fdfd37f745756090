"""PAMA's short-range patch mixing (``local_neighbours``): the neighbour lookup against a
brute-force search, the layer's locality, masked patches never keys, the position ablations,
and the encoder folder (old folders load without the layer) and CLI option."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import Result

from oncoslide.errors import ConfigError
from oncoslide.pretrain import PretrainBags, create_method, load_slide_encoder, run_pretraining
from oncoslide.pretrain.bags import feature_slide_ids
from oncoslide.pretrain.base import SlideEncoder
from oncoslide.pretrain.pama import PAMA, Encoded, LocalMixing, PAMAEncoder, nearest_patches

SMALL = dict(width=16, depth=2, heads=2, decoder_width=8)


def _grid(w: int, h: int) -> torch.Tensor:
    xy = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1)
    return xy.reshape(-1, 2).float()


def _brute(pos: torch.Tensor, k: int) -> list[list[int]]:
    """Each patch's k nearest other patches, by distance then index, by plain Python loops."""
    pts = pos.tolist()
    out = []
    for i, (xi, yi) in enumerate(pts):
        d = sorted((math.hypot(xi - x, yi - y), j) for j, (x, y) in enumerate(pts) if j != i)
        out.append([j for _, j in d[:k]])
    return out


def test_neighbours_match_a_brute_force_search() -> None:
    gen = torch.Generator().manual_seed(0)
    full = _grid(12, 10)
    cases = {
        "full grid": full,
        "grid with holes": full[torch.randperm(120, generator=gen)[:80]] + 0.25,
        "sparse grid": full[torch.randperm(120, generator=gen)[:30]]
        * 2.0,  # every other cell: sparse
        "far patch": torch.cat([_grid(3, 3), torch.tensor([[40.0, 30.0]])]),  # beyond the window
        "off the lattice": torch.rand(60, 2, generator=gen) * 8,
    }
    for name, pos in cases.items():
        for k in (4, 8):
            nbr = nearest_patches(pos, k)
            assert nbr.shape == (pos.shape[0], min(k, pos.shape[0] - 1)), name
            # exactly the brute force's, ties broken by index alike (deterministic)
            assert nbr.tolist() == _brute(pos, k), (name, k)
            assert torch.equal(nearest_patches(pos, k, chunk=7), nbr), name
    # a full grid's interior: K = 8 is exactly the 8-neighbourhood
    nbr = nearest_patches(full, 8)
    for i, (x, y) in enumerate(full.tolist()):
        if 0 < x < 11 and 0 < y < 9:
            found = {tuple(p) for p in full[nbr[i]].tolist()}
            ring = {(x + dx, y + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy}
            assert found == ring, (i, found)
    assert nearest_patches(full[:3], 8).shape == (3, 2)  # fewer patches than K
    assert nearest_patches(full[:1], 8).shape == (1, 0)


def test_local_mixing_reads_its_neighbours_only() -> None:
    """A patch's output depends on its own and its neighbours' inputs, on nothing else."""
    torch.manual_seed(0)
    layer = LocalMixing(16, 2, 64)
    pos = _grid(6, 6)
    nbr = nearest_patches(pos, 8)
    bins = torch.zeros(36, 9, dtype=torch.long)
    x = torch.randn(36, 16, requires_grad=True)
    out = layer(x, nbr, bins)
    assert out.shape == (36, 16)
    i = 14  # (2, 2): interior
    (grad,) = torch.autograd.grad(out[i].sum(), x)
    touched = set(torch.nonzero(grad.abs().sum(1) > 0).flatten().tolist())
    assert touched == {i, *nbr[i].tolist()}


def test_encoder_never_sees_masked_patches(tiny_cohort: Path) -> None:
    """In pre-training, the encoder's tokens do not change when the masked patches' features
    do (they are not keys of the local layer, nor of anything else), and do when a visible
    patch's features do."""
    ids = feature_slide_ids(tiny_cohort / "features")[:1]
    bag = PretrainBags.from_features(tiny_cohort / "features", slide_ids=ids).load(
        0, subsample=False
    )
    torch.manual_seed(0)
    method = create_method("pama", in_dim=bag.features.shape[1], local_neighbours=8, **SMALL)
    assert isinstance(method, PAMA)
    n = bag.features.shape[0]
    # the mask bag_loss draws first from a generator seeded 3 (positions "on" draw nothing)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    n_visible = max(1, round(n * (1 - method.mask_ratio)))
    visible, masked = perm[:n_visible].sort().values, perm[n_visible:]
    seen: list[torch.Tensor] = []
    original = method.encoder.encode

    def spy(*args: Any, **kwargs: Any) -> Encoded:
        out = original(*args, **kwargs)
        seen.append(out.patches.detach())
        return out

    setattr(method.encoder, "encode", spy)  # noqa: B010 (a spy on the encoder)
    feats = bag.features.clone()
    method.bag_loss(replace(bag, features=feats.clone()), _gen(3))
    feats[masked] = torch.randn(masked.numel(), feats.shape[1]) * 5
    method.bag_loss(replace(bag, features=feats.clone()), _gen(3))
    feats[visible[0]] += 5.0
    method.bag_loss(replace(bag, features=feats.clone()), _gen(3))
    assert seen[0].shape[0] == n_visible
    assert torch.equal(seen[0], seen[1])
    assert not torch.allclose(seen[1], seen[2])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_position_ablations_with_local_mixing() -> None:
    torch.manual_seed(0)
    pos = _grid(8, 8)
    feats = torch.randn(64, 12)
    coords = pos * 448.0
    moved = coords[torch.randperm(64, generator=_gen(1))]
    off = _enc(positions="off")
    off.eval()
    # no position reaches the model: random neighbours, the no-position bin only
    nbr, bins = off.neighbours(pos, _gen(0))
    assert nbr.shape == (64, 8) and bool((bins == off.n_distance_bins).all())
    assert not bool((nbr == torch.arange(64).unsqueeze(1)).any())
    assert torch.equal(off(feats, coords), off(feats, moved))
    on = _enc()
    on.eval()
    assert not torch.allclose(on(feats, coords), on(feats, moved))
    shuffled = _enc(positions="shuffled")
    shuffled.load_state_dict(on.state_dict())
    shuffled.eval()
    assert shuffled(feats, coords).shape == on(feats, coords).shape
    assert not torch.allclose(shuffled(feats, coords), on(feats, coords))


def test_tiny_bags_with_local_mixing() -> None:
    """Bags with fewer patches than K (one patch: no neighbour at all) embed in every mode."""
    for positions in ("on", "off", "shuffled"):
        enc = _enc(positions=positions)
        for n in (1, 2, 5):
            coords = torch.arange(2 * n, dtype=torch.float32).reshape(n, 2) * 448
            out = enc(torch.randn(n, 12), coords)
            assert out.shape == (32,) and bool(torch.isfinite(out).all()), (positions, n)


def _enc(**kwargs: Any) -> PAMAEncoder:
    return PAMAEncoder(in_dim=12, width=16, depth=2, heads=2, local_neighbours=8, **kwargs)


def test_off_by_default_and_validated() -> None:
    enc = PAMAEncoder(in_dim=8)
    assert enc.local_neighbours == 0 and len(enc.local) == 0
    assert not any(k.startswith("local.") for k in enc.state_dict())  # the paper's encoder
    assert len(PAMAEncoder(in_dim=8, depth=3, local_neighbours=4).local) == 3
    with pytest.raises(ConfigError):
        PAMAEncoder(in_dim=8, local_neighbours=-1)


def test_option_travels_in_the_encoder_folder(
    tiny_cohort: Path, tmp_path: Path, load_as_before: Callable[[Path, str], SlideEncoder]
) -> None:
    ids = feature_slide_ids(tiny_cohort / "features")[:4]
    bags = PretrainBags.from_features(tiny_cohort / "features", slide_ids=ids, max_patches=32)
    torch.manual_seed(0)
    method = create_method("pama", in_dim=bags.feature_dim, local_neighbours=8, **SMALL)
    out = tmp_path / "enc"
    run_pretraining(method, bags, out, max_steps=1, batch_size=4, probe_size=4)
    loaded = load_slide_encoder(out).encoder
    assert isinstance(loaded, PAMAEncoder) and loaded.local_neighbours == 8
    bag = bags.load(0, subsample=False)
    assert torch.allclose(loaded.embed(bag.features, bag.coords), method.encoder.embed(
        bag.features, bag.coords), atol=1e-6)  # fmt: skip
    # a folder written before the option (no key, no local weights) loads without the layer
    torch.manual_seed(0)
    plain = create_method("pama", in_dim=bags.feature_dim, **SMALL)
    old_out = tmp_path / "old"
    run_pretraining(plain, bags, old_out, max_steps=1, batch_size=4, probe_size=4)
    old = load_as_before(old_out, "local_neighbours")
    assert isinstance(old, PAMAEncoder) and old.local_neighbours == 0


def test_cli_local_neighbours(pama_cli: Callable[..., Result], tmp_path: Path) -> None:
    out = tmp_path / "enc"
    res = pama_cli(out, "--local-neighbours", "4")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["encoder"]["config"]["local_neighbours"] == 4
    bad = pama_cli(tmp_path / "bad", "--local-neighbours", "-1", tiny=False)
    assert bad.exit_code != 0 and "local_neighbours" in bad.output
