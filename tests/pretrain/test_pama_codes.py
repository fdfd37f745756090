"""PAMA with discrete masked targets (``target="codes"``): the k-means tokenizer, the
cross-entropy pretext, the encoder folder, exact resume, and that the codes are learnable from
neighbours where raw features are not (planted truth)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import Result

from oncoslide.errors import ConfigError
from oncoslide.pretrain import (
    Bag,
    PretrainBags,
    create_method,
    load_slide_encoder,
    read_steps,
    run_pretraining,
)
from oncoslide.pretrain.bags import feature_slide_ids
from oncoslide.pretrain.pama import PAMA, TOKENIZER_FILE, assign_codes, fit_codebook

SMALL: dict[str, Any] = dict(width=16, depth=1, heads=2, decoder_width=8)


def _pama(**kwargs: Any) -> PAMA:
    method = create_method("pama", **kwargs)
    assert isinstance(method, PAMA)
    return method


def _bags(tiny_cohort: Path, n: int = 12, **kw: object) -> PretrainBags:
    ids = feature_slide_ids(tiny_cohort / "features")[:n]
    return PretrainBags.from_features(tiny_cohort / "features", slide_ids=ids, **kw)  # type: ignore[arg-type]


def test_fit_codebook_recovers_planted_centres() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=gen) * 3.0
    truth = torch.randint(5, (4000,), generator=gen)
    x = centres[truth] + torch.randn(4000, 32, generator=gen)
    book = fit_codebook(x, 5, torch.Generator().manual_seed(1))
    # every planted centre has a code within the noise of its mean (sd ~ 1 / sqrt(800))
    dist = torch.cdist(centres, book)
    assert float(dist.min(1).values.max()) < 0.5
    codes = assign_codes(x, book)
    # a code is a cluster: each code holds one planted centre's points
    purity = sum(int(torch.bincount(truth[codes == c]).max()) for c in codes.unique()) / len(x)
    assert purity > 0.99
    again = fit_codebook(x, 5, torch.Generator().manual_seed(1))
    assert torch.equal(book, again)  # deterministic given the generator
    with pytest.raises(ConfigError):
        fit_codebook(x[:3], 5, gen)


def test_codes_target_trains_and_needs_its_tokenizer(tiny_cohort: Path) -> None:
    bags = _bags(tiny_cohort, n=6, max_patches=40)
    torch.manual_seed(0)
    method = _pama(in_dim=bags.feature_dim, target="codes", codebook_size=6, **SMALL)
    assert method.config()["target"] == "codes" and method.dec_out.out_features == 6
    with pytest.raises(ConfigError, match="tokenizer"):
        method.loss([bags[0]], torch.Generator().manual_seed(0))
    method.prepare(bags, seed=0)
    assert method.codebook.shape == (6, bags.feature_dim) and float(method.codebook.abs().sum()) > 0
    loss = method.loss([bags[0], bags[1]], torch.Generator().manual_seed(0))
    loss.backward()
    # an untrained decoder predicts about uniformly: cross-entropy near log(6)
    assert abs(float(loss.detach()) - math.log(6)) < 0.5
    grads = [p.grad for p in method.encoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(ConfigError):
        _pama(in_dim=8, target="pixels")
    with pytest.raises(ConfigError):
        _pama(in_dim=8, target="codes", codebook_size=1)


def test_codes_run_writes_the_tokenizer_and_resumes_exactly(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    class Crash(Exception):
        pass

    import lightning.pytorch as pl

    class _Crash(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step == 5:
                raise Crash

    def run(out: Path, crash: bool) -> torch.Tensor:
        bags = _bags(tiny_cohort, n=12, max_patches=48, seed=5)
        torch.manual_seed(5)
        method = _pama(in_dim=bags.feature_dim, target="codes", codebook_size=4, **SMALL)
        run_pretraining(
            method, bags, out, max_steps=8, batch_size=3, checkpoint_every_n_steps=2,
            seed=5, probe_size=4, callbacks=[_Crash()] if crash else [],
        )  # fmt: skip
        return method.codebook.clone()

    book = run(tmp_path / "straight", crash=False)
    with pytest.raises(Crash):
        run(tmp_path / "crashed", crash=True)
    run(tmp_path / "crashed", crash=False)
    assert read_steps(tmp_path / "crashed") == read_steps(tmp_path / "straight")
    out = tmp_path / "straight"
    saved = torch.load(out / TOKENIZER_FILE, weights_only=True)
    assert torch.equal(saved["codebook"], book)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["method"]["config"]["target"] == "codes"
    assert meta["method"]["files"] == [TOKENIZER_FILE]
    loaded = load_slide_encoder(out)  # the encoder itself is PAMA's, unchanged
    bag = PretrainBags.from_features(
        tiny_cohort / "features", slide_ids=feature_slide_ids(tiny_cohort / "features")[:1]
    ).load(0, subsample=False)
    assert loaded.encoder(bag.features, bag.coords).shape == (loaded.embed_dim,)


def test_an_encoder_folder_written_before_the_codes_option_still_loads(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    bags = _bags(tiny_cohort, n=4, max_patches=32)
    torch.manual_seed(0)
    method = _pama(in_dim=bags.feature_dim, **SMALL)
    out = tmp_path / "enc"
    run_pretraining(method, bags, out, max_steps=1, batch_size=4, probe_size=4)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["version"] == 1 and "files" not in meta["method"]
    assert not (out / TOKENIZER_FILE).exists()
    # the folder as the first release wrote it: no target keys in the method's config
    for key in ("target", "codebook_size"):
        meta["method"]["config"].pop(key)
    (out / "encoder.json").write_text(json.dumps(meta))
    assert load_slide_encoder(out).encoder.config() == method.encoder.config()


def _blocky_bags(n_bags: int, seed: int) -> list[Bag]:
    """Bags on a 12 x 12 grid whose prototype (of 4) is constant over 6 x 6 blocks (the scale
    PAMA's anchors resolve: 9 anchors, about 4 patches apart); features = the prototype's
    centre (about 4 apart in 64-d) + unit noise: the `spatial` world's regime, where a masked
    patch's features are mostly noise but its prototype follows its neighbours'."""
    centres = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * (4 / math.sqrt(128))
    gen = torch.Generator().manual_seed(seed)
    xy = torch.stack(torch.meshgrid(torch.arange(12), torch.arange(12), indexing="xy"), -1)
    xy = xy.reshape(-1, 2)
    block = (xy[:, 0] // 6) * 2 + xy[:, 1] // 6
    bags = []
    for i in range(n_bags):
        proto = torch.randint(4, (4,), generator=gen)[block]
        feats = centres[proto] + torch.randn(len(xy), 64, generator=gen)
        sidx = torch.zeros(len(xy), dtype=torch.long)
        bags.append(Bag(i, f"s{i}", f"p{i}", feats, xy.float() * 448.0, sidx))
    return bags


class _BagList(list[Bag]):
    """A list of bags with PretrainBags' ``load`` (what ``prepare`` reads)."""

    def load(self, i: int, *, subsample: bool = True, epoch: int = 0) -> Bag:
        return self[i]


def test_codes_are_learnt_from_neighbours_on_noisy_features() -> None:
    """Planted truth: on features whose per-dimension variance is mostly noise (so the masked
    features' MSE has almost nothing to learn: even the true centre leaves the noise), the
    masked patches' codes are predicted from their neighbours far better than by ignoring them
    (cross-entropy on held-out bags well below the entropy of the code shares)."""
    train, held_out = _blocky_bags(24, seed=0), _blocky_bags(8, seed=1)
    x = torch.cat([b.features for b in held_out])
    assert float(x.var(0).mean()) < 1.2  # noise 1 of ~1.125: the raw-feature regime
    torch.manual_seed(0)
    method = _pama(
        in_dim=64, target="codes", codebook_size=4, width=32, depth=1, heads=2,
        decoder_width=16, mask_ratio=0.5,
    )  # fmt: skip
    method.prepare(_BagList(train), seed=0)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    for step in range(80):
        batch = train[(step * 4) % 24 : (step * 4) % 24 + 4]
        loss = method.loss(batch, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held = float(method.loss(held_out, torch.Generator().manual_seed(999)))
    share = torch.bincount(assign_codes(x, method.codebook), minlength=4).double() / len(x)
    entropy = float(-(share * share.clamp(min=1e-12).log()).sum())
    assert held < 0.7 * entropy, (held, entropy)


def test_cli_target_codes(pama_cli: Callable[..., Result], tmp_path: Path) -> None:
    out = tmp_path / "enc"
    res = pama_cli(
        out, "--target", "codes", "--codebook-size", "4", "--masking", "regions", max_steps=2
    )
    assert res.exit_code == 0, res.output
    assert (out / TOKENIZER_FILE).exists()
    bad = pama_cli(tmp_path / "bad", "--target", "pixels", tiny=False)
    assert bad.exit_code != 0 and "target" in bad.output


def test_region_masking_hides_whole_anchor_regions() -> None:
    torch.manual_seed(0)
    method = _pama(
        in_dim=8, width=16, depth=1, heads=2, decoder_width=8, masking="regions",
        mask_ratio=0.5, target="codes", codebook_size=3,
    )  # fmt: skip
    xy = torch.stack(torch.meshgrid(torch.arange(15), torch.arange(12), indexing="xy"), -1)
    pos = xy.reshape(-1, 2).float()
    n = pos.shape[0]
    visible, masked = method._region_mask(pos, torch.Generator().manual_seed(3))
    assert len(visible) + len(masked) == n and not set(visible.tolist()) & set(masked.tolist())
    assert 0.5 * n <= len(masked) < n
    # a region (the patches nearest one k-means anchor) is masked whole or not at all
    from oncoslide.pretrain.pama import kmeans_anchors, n_anchors

    centres = kmeans_anchors(pos, n_anchors(n, 128))
    region = torch.cdist(pos, pos[centres]).argmin(1)
    hidden = torch.zeros(n, dtype=torch.bool)
    hidden[masked] = True
    for r in region.unique():
        assert hidden[region == r].all() or not hidden[region == r].any()
    again = method._region_mask(pos, torch.Generator().manual_seed(3))
    assert torch.equal(again[1], masked)
    with pytest.raises(ConfigError):
        _pama(in_dim=8, masking="stripes")
    # and the pretext trains with it
    method.codebook_ready = True
    bag = Bag(0, "s", "p", torch.randn(n, 8), pos * 448.0, torch.zeros(n, dtype=torch.long))
    loss = method.loss([bag], torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
