"""Slide-encoder pre-training: the runner, its checkpoints and exact resume after kill -9, RankMe,
the encoder folder, embed-slides, and PAMA's geometry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.cli import app
from oncoslide.errors import ConfigError
from oncoslide.features.neighbours import grid_step
from oncoslide.features.slide_embeddings import load_slide_embeddings
from oncoslide.pretrain import (
    PRETRAINERS,
    SLIDE_ENCODERS,
    PretrainBags,
    create_method,
    load_slide_encoder,
    rankme,
    read_steps,
    run_pretraining,
)
from oncoslide.pretrain.bags import feature_slide_ids
from oncoslide.pretrain.embed import embed_slides
from oncoslide.pretrain.pama import PAMAEncoder, kmeans_anchors, n_anchors

SMALL = dict(width=16, depth=1, heads=2, decoder_width=8)


def _bags(tiny_cohort: Path, n: int = 12, **kw: object) -> PretrainBags:
    ids = feature_slide_ids(tiny_cohort / "features")[:n]
    return PretrainBags.from_features(tiny_cohort / "features", slide_ids=ids, **kw)  # type: ignore[arg-type]


def test_registries_build_by_name() -> None:
    assert "pama" in PRETRAINERS and "pama" in SLIDE_ENCODERS
    assert PRETRAINERS.metadata("pama")["encoder"] == "pama"
    enc = SLIDE_ENCODERS.create("pama", in_dim=8, width=16, heads=2)
    rebuilt = SLIDE_ENCODERS.create("pama", **json.loads(json.dumps(enc.config())))
    assert rebuilt.config() == enc.config() and rebuilt.embed_dim == 32
    with pytest.raises(ConfigError):
        SLIDE_ENCODERS.create("pama", in_dim=8, positions="sideways")


def test_patient_bags_keep_each_slide_in_its_own_frame(tiny_cohort: Path) -> None:
    from oncoslide.cohort.table import load_cohort
    from oncoslide.features.readers import read_features

    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    pid = next(p for p in cohort.patient_ids if len(cohort.slide_ids(p)) == 2)
    extras = {"omics": {pid: np.arange(3.0)}}
    per_patient = PretrainBags.from_features(
        tiny_cohort / "features", cohort=cohort, per="patient", extras=extras
    )
    per_slide = PretrainBags.from_features(tiny_cohort / "features", cohort=cohort)
    assert len(per_patient) == len(cohort.patient_ids)
    assert len(per_slide) == sum(len(cohort.slide_ids(p)) for p in cohort.patient_ids)
    i = next(k for k, u in enumerate(per_patient.units) if u.unit_id == pid)
    bag = per_patient.load(i, subsample=False)
    assert bag.coords is not None and torch.equal(bag.extras["omics"], torch.arange(3.0))
    for k, (sid, path) in enumerate(zip(*(per_patient.units[i].slide_ids, per_patient.units[i].paths), strict=True)):  # fmt: skip
        slide = read_features(path, slide_id=sid)
        rows = bag.slide_index == k
        np.testing.assert_array_equal(bag.coords[rows].numpy(), slide.coords.astype(np.float32))
    other = next(k for k, u in enumerate(per_patient.units) if u.patient_id != pid)
    assert per_patient.load(other).extras == {}
    with pytest.raises(ConfigError, match="cohort"):
        PretrainBags.from_features(tiny_cohort / "features", per="patient")


def test_rankme_is_the_effective_rank() -> None:
    # k equal singular values: entropy log k, effective rank k
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(50, 6)))
    assert rankme(q * 3.0) == pytest.approx(6.0, rel=1e-4)
    one = np.outer(np.arange(1, 11), np.ones(4))
    assert rankme(one) == pytest.approx(1.0, abs=1e-3)


def test_kmeans_anchors_find_the_cluster_centres() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [40.0, 0.0], [0.0, 40.0]])
    pts = np.concatenate([c + rng.normal(0, 2, (60, 2)) for c in centres])
    idx = kmeans_anchors(torch.tensor(pts, dtype=torch.float32), 3)
    # oracle: scikit-learn's k-means, then the patch nearest each of its centres
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=3, n_init=10, random_state=0).fit(pts)
    nearest = np.linalg.norm(pts[None] - km.cluster_centers_[:, None], axis=-1).argmin(1)
    assert sorted(idx.tolist()) == sorted(nearest.tolist())
    assert n_anchors(300, 128) == 17 and n_anchors(10_000, 128) == 128


def test_encoder_sees_relative_positions_only() -> None:
    torch.manual_seed(0)
    enc = PAMAEncoder(in_dim=8, width=16, heads=2).eval()
    xy = np.stack(np.meshgrid(np.arange(9), np.arange(7)), -1).reshape(-1, 2)
    coords = torch.tensor(xy * 448.0, dtype=torch.float32)
    feats = torch.randn(len(xy), 8)
    assert grid_step(coords) == 448.0
    base = enc(feats, coords)
    # a translation of the whole slide by whole patches changes nothing
    torch.testing.assert_close(enc(feats, coords + torch.tensor([448.0 * 5, 448.0 * 3])), base)
    # moving the patches around does
    perm = torch.randperm(len(xy), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(enc(feats, coords[perm]), base, atol=1e-4)
    # with positions off, where the patches sit cannot matter
    off = PAMAEncoder(in_dim=8, width=16, heads=2, positions="off").eval()
    torch.testing.assert_close(off(feats, coords[perm]), off(feats, coords))


def test_pretraining_smoke_and_encoder_folder(tiny_cohort: Path, tmp_path: Path) -> None:
    bags = _bags(tiny_cohort, max_patches=64)
    torch.manual_seed(0)
    method = create_method("pama", in_dim=bags.feature_dim, **SMALL)
    out = tmp_path / "enc"
    result = run_pretraining(
        method, bags, out, epochs=2, batch_size=4, checkpoint_every_n_steps=2, probe_size=8
    )
    assert result.steps == 6 and [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and h["rankme"] >= 1.0 for h in result.history)
    assert result.chosen_epoch in (1, 2)
    steps = read_steps(out)
    assert [s for s, _ in steps] == list(range(1, 7))
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["format"] == "oncoslide-slide-encoder" and meta["contract"]["feature_dim"] == 16
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "run.log").exists()
    assert "epoch 2/2" in (out / "run.log").read_text()
    loaded = load_slide_encoder(out)
    # the folder's weights are the RankMe-chosen epoch's
    best = torch.load(out / "checkpoints" / "best-encoder.pt", weights_only=True)
    for k, v in loaded.encoder.state_dict().items():
        torch.testing.assert_close(v, best[k])
    bag = bags.load(0, subsample=False)
    assert loaded.encoder(bag.features, bag.coords).shape == (loaded.embed_dim,)
    # a different run into the same folder is refused, not mixed
    other = create_method("pama", in_dim=bags.feature_dim, **{**SMALL, "width": 8})
    with pytest.raises(ConfigError, match="another run"):
        run_pretraining(other, bags, out, epochs=2, batch_size=4)


_SCRIPT = """
import sys, time, torch, lightning.pytorch as pl
from oncoslide.pretrain import PretrainBags, create_method, run_pretraining
from oncoslide.pretrain.bags import feature_slide_ids
feats, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
ids = feature_slide_ids(feats)[:12]
bags = PretrainBags.from_features(feats, slide_ids=ids, max_patches=48, seed=5)
pl.seed_everything(5)
method = create_method("pama", in_dim=bags.feature_dim, width=16, depth=1, heads=2,
                       decoder_width=8)
class Pause(pl.Callback):
    def on_train_batch_end(self, *a, **k):
        time.sleep(pause)
run_pretraining(method, bags, out, max_steps=10, batch_size=3, checkpoint_every_n_steps=3,
                seed=5, probe_size=6, callbacks=[Pause()])
"""


def _run(script: Path, feats: Path, out: Path, pause: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(feats), str(out), str(pause)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


class _Crash(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 5:
            raise RuntimeError("crash")


def test_resume_after_a_crash_gives_the_uninterrupted_losses(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    def run(out: Path, crash: bool) -> None:
        bags = _bags(tiny_cohort, n=12, max_patches=48, seed=5)
        torch.manual_seed(5)
        method = create_method("pama", in_dim=bags.feature_dim, **SMALL)
        run_pretraining(
            method, bags, out, max_steps=9, batch_size=3, checkpoint_every_n_steps=2,
            seed=5, probe_size=4, callbacks=[_Crash()] if crash else [],
        )  # fmt: skip

    run(tmp_path / "straight", crash=False)
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "crashed", crash=True)
    assert len(read_steps(tmp_path / "crashed")) == 5  # steps 5 is after the checkpoint (4)
    run(tmp_path / "crashed", crash=False)
    assert read_steps(tmp_path / "crashed") == read_steps(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_losses(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    feats = tiny_cohort / "features"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = _run(script, feats, straight, 0.0)
    victim = _run(script, feats, killed, 0.3)
    # kill -9 mid-epoch (4 steps per epoch), after a checkpoint (step 3 or 6)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "steps.csv").exists() and len(read_steps(killed)) >= 5:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    written = len(read_steps(killed))
    assert 5 <= written < 10, "the run was not killed mid-way"
    saved = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] in (3, 6, 9) and saved["global_step"] < written
    assert not (killed / "encoder.json").exists()
    resumed = _run(script, feats, killed, 0.0)
    assert resumed.wait() == 0, resumed.stderr.read().decode() if resumed.stderr else ""
    assert ref.wait() == 0, ref.stderr.read().decode() if ref.stderr else ""
    a, b = read_steps(straight), read_steps(killed)
    assert [s for s, _ in b] == list(range(1, 11))
    assert b == a  # identical losses, step by step (exact on CPU)
    assert "resuming at step" in (killed / "run.log").read_text()
    ha = json.loads((straight / "encoder.json").read_text())["info"]["history"]
    hb = json.loads((killed / "encoder.json").read_text())["info"]["history"]
    for x, y in zip(ha, hb, strict=True):
        assert (x["loss"], x["rankme"]) == (y["loss"], y["rankme"])
    wa = torch.load(straight / "encoder.pt", weights_only=True)
    wb = torch.load(killed / "encoder.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_embed_slides_cli_writes_a_slide_level_feature_set(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    feats = tiny_cohort / "features"
    runner = CliRunner()
    enc = tmp_path / "enc"
    args = ["pretrain", "pama", "--features", str(feats), "--out", str(enc), "--max-steps", "3"]
    args += ["--batch-size", "8", "--width", "16", "--depth", "1", "--heads", "2"]
    args += ["--decoder-width", "8", "--max-patches", "32", "--probe-size", "4", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "RankMe" in res.output
    emb = tmp_path / "emb"
    res = runner.invoke(
        app, ["embed-slides", str(enc), "--features", str(feats), "--out", str(emb)]
    )
    assert res.exit_code == 0, res.output
    ids = feature_slide_ids(feats)
    loaded = load_slide_embeddings(emb, ids)
    assert loaded.matrix.shape == (len(ids), 32) and np.isfinite(loaded.matrix).all()
    # the embedding is the encoder applied to the whole slide
    encoder = load_slide_encoder(enc)
    bag = PretrainBags.from_features(feats, slide_ids=ids[:1]).load(0, subsample=False)
    np.testing.assert_allclose(
        loaded.matrix[0],
        encoder.encoder.embed(bag.features, bag.coords).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    again = embed_slides(enc, feats, emb)
    assert again.skipped == len(ids) and again.written == 0
    # the encoder folder and the embeddings' manifest record the slides pre-trained on
    seen = pd.read_csv(enc / "pretrain_slides.csv", dtype=str)
    assert sorted(seen["slide_id"]) == sorted(ids)
    manifest = json.loads((emb / "slide_embeddings.json").read_text())
    assert manifest["pretrain_slides"] == seen["slide_id"].tolist()
    # a benchmark's level: slide feature set runs the linear protocol on them; this encoder saw
    # every patient, so by default none is left to score
    spec = {
        "name": "pama-emb",
        "cohort": str(tiny_cohort / "cohort.csv"),
        "folds": 3,
        "seeds": [0],
        "feature_sets": [{"name": "pama", "features": str(emb), "level": "slide"}],
        "tasks": [{"name": "msi", "kind": "binary", "target": "msi"}],
        "models": [{"name": "linear", "protocol": "linear"}],
    }
    run = run_benchmark(spec_from_dict(spec), tmp_path / "bench", workers=0, progress=False)
    assert len(run.failures) == 3 and run.n_ran == 0
    assert all("no test patient left" in f["error"] for f in run.failures)
    # transductive label-free pre-training, declared: the patients are scored
    spec["feature_sets"][0]["pretraining"] = "keep"  # type: ignore[index]
    run = run_benchmark(spec_from_dict(spec), tmp_path / "bench2", workers=0, progress=False)
    assert not run.failures and run.n_ran == 3
    # a bad --out for pretrain is a message, not a traceback
    res = runner.invoke(app, ["pretrain", "pama", "--features", str(tmp_path / "none"),
                              "--out", str(tmp_path / "x")])  # fmt: skip
    assert res.exit_code == 2 and "not found" in res.output


@pytest.mark.parametrize(
    "kwargs",
    [{"kro": False}, {"anchor_dropout": 0.0}, {"positions": "off"}, {"positions": "shuffled"}],
)
def test_ablations_train(tiny_cohort: Path, kwargs: dict[str, object]) -> None:
    bags = _bags(tiny_cohort, n=4, max_patches=40)
    torch.manual_seed(0)
    method = create_method("pama", in_dim=bags.feature_dim, **SMALL, **kwargs)
    loss = method.loss([bags[0], bags[1]], torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in method.encoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.slow  # spawning workers: about 10 s of imports each on a loaded 2-core machine
def test_two_processes_train(tiny_cohort: Path, tmp_path: Path) -> None:
    bags = _bags(tiny_cohort, n=8, max_patches=32)
    torch.manual_seed(0)
    method = create_method("pama", in_dim=bags.feature_dim, **SMALL)
    result = run_pretraining(
        method, bags, tmp_path / "ddp", max_steps=2, batch_size=2, devices=2, probe_size=4
    )
    assert result.steps == 2
    assert len(read_steps(tmp_path / "ddp")) == 2
    assert load_slide_encoder(tmp_path / "ddp").info["processes"] == 2
