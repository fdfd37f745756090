"""PAMA's anchor density (``patches_per_anchor``): the rule, the geometry it gives, the
encoder folder (old folders load with the paper's rule) and the CLI option."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import Result

from oncoslide.errors import ConfigError
from oncoslide.pretrain import PretrainBags, create_method, load_slide_encoder, run_pretraining
from oncoslide.pretrain.bags import feature_slide_ids
from oncoslide.pretrain.base import SlideEncoder
from oncoslide.pretrain.pama import PATCHES_PER_ANCHOR, PAMAEncoder, n_anchors

SMALL = dict(width=16, depth=1, heads=2, decoder_width=8)


def test_anchor_rule() -> None:
    assert PATCHES_PER_ANCHOR == 18  # the paper's N / 18 + 1
    assert n_anchors(300, 128) == 17 == n_anchors(300, 128, 18)
    assert n_anchors(300, 128, 4) == 76
    assert n_anchors(300, 50, 4) == 50  # capped by max_anchors
    assert n_anchors(5, 128, 1) == 5  # never more anchors than patches
    for bad in (dict(patches_per_anchor=0), dict(max_anchors=0)):
        with pytest.raises(ConfigError):
            PAMAEncoder(in_dim=8, **bad)  # type: ignore[arg-type]


def test_denser_anchors_sit_closer_to_every_patch() -> None:
    """On a 20 x 15 grid (300 patches): the k-means anchors of the paper's rule are about 4
    patches apart (17 anchors, ~18 patches each); with 4 patches per anchor, 76 anchors about 2
    apart. Measured as the mean distance from a patch to its nearest anchor (planted geometry:
    a square cell of area a has mean distance ~0.38 sqrt(a) to its centre)."""
    xy = torch.stack(torch.meshgrid(torch.arange(20), torch.arange(15), indexing="xy"), -1)
    pos = xy.reshape(-1, 2).float()
    gen = torch.Generator().manual_seed(0)
    near = {}
    for per in (18, 4):
        enc = PAMAEncoder(in_dim=8, patches_per_anchor=per)
        idx = enc.choose_anchors(pos, gen)
        assert len(idx) <= n_anchors(300, 128, per) and len(idx) >= 0.9 * n_anchors(300, 128, per)
        near[per] = float(torch.cdist(pos, pos[idx]).min(1).values.mean())
    assert 1.0 < near[18] < 2.2, near  # ~0.38 sqrt(18) = 1.6
    assert 0.4 < near[4] < 1.0, near  # ~0.38 sqrt(4) = 0.8 (anchors sit on patches: a bit less)


def test_density_travels_in_the_encoder_folder(
    tiny_cohort: Path, tmp_path: Path, load_as_before: Callable[[Path, str], SlideEncoder]
) -> None:
    ids = feature_slide_ids(tiny_cohort / "features")[:4]
    bags = PretrainBags.from_features(tiny_cohort / "features", slide_ids=ids, max_patches=32)
    torch.manual_seed(0)
    method = create_method("pama", in_dim=bags.feature_dim, patches_per_anchor=4, **SMALL)
    out = tmp_path / "enc"
    run_pretraining(method, bags, out, max_steps=1, batch_size=4, probe_size=4)
    loaded = load_slide_encoder(out).encoder
    assert isinstance(loaded, PAMAEncoder) and loaded.patches_per_anchor == 4
    bag = bags.load(0, subsample=False)
    assert torch.allclose(loaded.embed(bag.features, bag.coords), method.encoder.embed(
        bag.features, bag.coords), atol=1e-6)  # fmt: skip
    # a folder written before the option (no key in its config) loads with the paper's rule
    old = load_as_before(out, "patches_per_anchor")
    assert isinstance(old, PAMAEncoder) and old.patches_per_anchor == 18


def test_cli_patches_per_anchor(pama_cli: Callable[..., Result], tmp_path: Path) -> None:
    out = tmp_path / "enc"
    res = pama_cli(out, "--patches-per-anchor", "6")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["encoder"]["config"]["patches_per_anchor"] == 6
    bad = pama_cli(tmp_path / "bad", "--patches-per-anchor", "0", tiny=False)
    assert bad.exit_code != 0 and "patches_per_anchor" in bad.output
