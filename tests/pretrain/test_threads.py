"""Threads-style contrastive pre-training: the loss against a hand-written CLIP loss, patients
missing a modality, per-patient pairing, padding, the scaler's patients, a run through the one
runner and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.omics import load_omics
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.pretrain import PRETRAINERS, SLIDE_ENCODERS, Bag, create_method, load_slide_encoder
from oncoslide.pretrain.threads import (
    ThreadsConfig,
    ThreadsMethod,
    ThreadsSlideEncoder,
    build_profiles,
    load_mutations,
    paired_info_nce,
    patient_embeddings,
    pretrain_threads,
)
from oncoslide.simulate import make_simulation_config, simulate_cohort

runner = CliRunner()


@pytest.fixture(scope="module")
def hg_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The histogenomic world, small: 40 patients, 8-d features, 20 % without omics."""
    out = tmp_path_factory.mktemp("hg-small")
    cfg = make_simulation_config(
        "histogenomic",
        {
            "n_patients": 40,
            "feature_dim": 8,
            "within_prototype_rank": 2,
            "patches_median": 12,
            "patches_min": 6,
            "n_genes": 30,
            "n_mutation_genes": 20,
        },
    )
    simulate_cohort(out, cfg)
    return out


def _clip(s: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * F.normalize(s, dim=-1) @ F.normalize(p, dim=-1).T
    target = torch.arange(len(s))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def test_info_nce_is_the_clip_loss_with_one_slide_per_patient() -> None:
    g = torch.Generator().manual_seed(0)
    s, p = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    got = paired_info_nce(s, p, torch.arange(6), 10.0)
    assert float(got) == pytest.approx(float(_clip(s, p, 10.0)), rel=1e-6)
    # aligned pairs give a small loss, shuffled ones a large one
    assert float(paired_info_nce(p, p, torch.arange(6), 10.0)) < float(got)


def test_two_slides_of_one_patient_are_not_each_others_negatives() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3, 4, generator=g)
    s = torch.randn(3, 4, generator=g)
    # patient 0 has two identical slides: slide -> profile terms are those of one slide, and
    # profile -> slide for patient 0 sums its two slides' mass (log 2 more than one slide has)
    s2 = torch.cat([s[:1], s])
    owner = torch.tensor([0, 0, 1, 2])
    got = paired_info_nce(s2, p, owner, 5.0)
    logits = 5.0 * F.normalize(s2, dim=-1) @ F.normalize(p, dim=-1).T
    to_profile = F.cross_entropy(logits, owner)
    cols = torch.logsumexp(logits, 0)
    pos = torch.stack(
        [torch.logsumexp(logits[:2, 0], 0), logits[2, 1], logits[3, 2]]  # both slides of 0
    )
    expected = 0.5 * (to_profile + (cols - pos).mean())
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


def _bag(i: int, pid: str, n: int, extras: dict[str, torch.Tensor], dim: int = 8) -> Bag:
    g = torch.Generator().manual_seed(100 + i)
    return Bag(
        index=i,
        unit_id=f"s{i}",
        patient_id=pid,
        features=torch.randn(n, dim, generator=g),
        coords=None,
        slide_index=torch.zeros(n, dtype=torch.long),
        extras=extras,
    )


def test_patients_missing_a_modality_are_masked_out_of_its_loss() -> None:
    torch.manual_seed(0)
    m = ThreadsMethod(
        in_dim=8,
        n_genes=5,
        n_mutation_genes=3,
        embed_dim=8,
        hidden_dim=8,
        attn_dim=4,
        heads=2,
        dropout=0.0,
        profile_hidden=8,
    )
    m.eval()
    g = torch.Generator().manual_seed(2)
    expr = {f"p{i}": torch.randn(5, generator=g) for i in range(4)}
    muts = {f"p{i}": (torch.rand(3, generator=g) > 0.5).float() for i in range(4)}
    # p3 has no expression, p0 no mutations, p4 neither
    bags = [
        _bag(0, "p0", 7, {"expression": expr["p0"]}),
        _bag(1, "p1", 5, {"expression": expr["p1"], "mutations": muts["p1"]}),
        _bag(2, "p2", 9, {"expression": expr["p2"], "mutations": muts["p2"]}),
        _bag(3, "p3", 4, {"mutations": muts["p3"]}),
        _bag(4, "p4", 6, {}),
    ]
    m.loss(bags, torch.Generator())
    terms = m.last_terms
    # the expression term equals the loss of p0-p2 alone; the mutation term that of p1-p3
    m.loss(bags[:3], torch.Generator())
    assert m.last_terms["expression"] == pytest.approx(terms["expression"], rel=1e-5)
    m.loss(bags[1:4], torch.Generator())
    assert m.last_terms["mutations"] == pytest.approx(terms["mutations"], rel=1e-5)
    assert terms["loss"] == pytest.approx(
        0.5 * (terms["expression"] + terms["mutations"]), rel=1e-5
    )
    # a batch with no two patients sharing a modality gives a zero that still backpropagates
    loss = m.loss([bags[0], bags[4]], torch.Generator())
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_slide_encoder_ignores_padding_and_fits_the_contract() -> None:
    torch.manual_seed(0)
    enc = SLIDE_ENCODERS.create("threads", in_dim=8, embed_dim=6, hidden_dim=8, attn_dim=4, heads=3)
    assert isinstance(enc, ThreadsSlideEncoder)
    enc.eval()
    a, b = torch.randn(5, 8), torch.randn(9, 8)
    feats = torch.full((2, 9, 8), float("nan"))
    feats[0, :5], feats[1] = a, b
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :5], mask[1] = True, True
    out, attn = enc.encode(feats, mask, return_attention=True)
    assert torch.allclose(out[0], enc(a), atol=1e-6)
    assert torch.allclose(out[1], enc(b, None), atol=1e-6)
    assert attn.shape == (2, 3, 9)
    assert torch.all(attn[0, :, 5:] == 0)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3))
    rebuilt = SLIDE_ENCODERS.create("threads", **enc.config())
    assert json.dumps(enc.config()) and rebuilt.embed_dim == 6
    assert PRETRAINERS.metadata("threads")["encoder"] == "threads"
    with pytest.raises(ConfigError):
        enc.encode(feats, torch.zeros(2, 9, dtype=torch.bool))


def test_scaler_is_fitted_on_the_pretraining_patients_only(hg_small: Path) -> None:
    expr = load_omics(hg_small / "omics.csv")
    muts = load_mutations(hg_small / "mutations.csv")
    ids = expr.patient_ids[:10]
    prof = build_profiles([*ids, "not-in-omics"], expr, muts)
    values = expr.matrix(ids)
    assert np.allclose(prof.expr_mean, values.mean(axis=0), atol=1e-5)
    assert np.allclose(prof.expr_scale, values.std(axis=0), rtol=1e-4)
    assert set(prof.usable) == set(ids)
    assert prof.summary()["with_expression"] == 10
    extras = prof.extras()
    assert set(extras["expression"]) == set(ids) == set(extras["mutations"])
    # another patient's values never move the scaler
    other = expr.values.copy()
    other.loc[expr.patient_ids[20]] += 100.0
    prof2 = build_profiles(ids, load_omics(other.reset_index()), muts)
    assert np.array_equal(prof2.expr_mean, prof.expr_mean)
    bad = muts.values.reset_index()
    bad.iloc[0, 1] = 2
    with pytest.raises(ConfigError, match="0/1"):
        load_mutations(bad)


def test_pretrain_embed_and_leakage_guard(hg_small: Path, tmp_path: Path) -> None:
    cohort = load_cohort(hg_small / "cohort.csv", hg_small / "features")
    expr = load_omics(hg_small / "omics.csv")
    muts = load_mutations(hg_small / "mutations.csv")
    train = cohort.patient_ids[:30]
    cfg = ThreadsConfig(embed_dim=8, hidden_dim=16, attn_dim=8, heads=2, profile_hidden=16)
    result, prof = pretrain_threads(
        cohort,
        expr,
        tmp_path / "enc",
        mutations=muts,
        patients=train,
        config=cfg,
        epochs=2,
        batch_size=8,
        checkpoint_every_n_steps=3,
    )
    assert set(prof.patient_ids) == set(train)  # test patients' profiles never read
    assert len(result.history) == 2
    loaded = load_slide_encoder(tmp_path / "enc")
    assert loaded.name == "threads" and loaded.embed_dim == 8
    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert meta["method"]["name"] == "threads"
    assert "expression_mean" not in meta["method"]["config"]
    x = patient_embeddings(loaded.encoder, cohort, cohort.patient_ids[30:])
    assert x.shape == (10, 8) and np.isfinite(x).all()
    # the method rebuilt from its folder's config accepts the checkpoint (resume path)
    m = create_method("threads", in_dim=8, **meta["method"]["config"])
    assert isinstance(m, ThreadsMethod)


def test_resume_after_a_crash_gives_the_uninterrupted_losses(
    hg_small: Path, tmp_path: Path
) -> None:
    """Patch subsampling, dropout and the data order all come back on resume: the per-step
    losses after a crash and a rerun equal those of an uninterrupted run."""
    import lightning.pytorch as pl

    from oncoslide.pretrain.runner import read_steps

    class Crash(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step == 5:
                raise RuntimeError("crash")

    cohort = load_cohort(hg_small / "cohort.csv", hg_small / "features")
    expr = load_omics(hg_small / "omics.csv")
    cfg = ThreadsConfig(embed_dim=8, hidden_dim=16, attn_dim=8, heads=2, profile_hidden=16)

    def run(out: Path, crash: bool) -> None:
        pretrain_threads(
            cohort, expr, out, config=cfg, epochs=2, batch_size=8, seed=3,
            checkpoint_every_n_steps=2, callbacks=[Crash()] if crash else [],
        )  # fmt: skip

    run(tmp_path / "straight", crash=False)
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "crashed", crash=True)
    run(tmp_path / "crashed", crash=False)
    a, b = read_steps(tmp_path / "straight"), read_steps(tmp_path / "crashed")
    assert len(a) >= 6 and a == b


def test_cli_pretrain_threads(hg_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc"
    args = [
        "pretrain",
        "threads",
        "--features",
        str(hg_small / "features"),
        "--cohort",
        str(hg_small / "cohort.csv"),
        "--omics",
        str(hg_small / "omics.csv"),
        "--mutations",
        str(hg_small / "mutations.csv"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--embed-dim",
        "8",
        "--hidden-dim",
        "16",
        "--heads",
        "2",
        "--no-progress",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "without any profile left out" in result.output
    n_with = len(pd.read_csv(hg_small / "omics.csv"))
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["info"]["n_bags"] == len(
        pd.read_csv(hg_small / "cohort.csv", dtype=str).merge(
            pd.read_csv(hg_small / "omics.csv", dtype=str)[["patient_id"]]
        )
    )
    assert n_with < 40
    # its slide embeddings are a slide-level feature set for the benchmark's linear protocol
    from oncoslide.features.slide_embeddings import load_slide_embeddings

    emb = runner.invoke(
        app,
        ["embed-slides", str(out), "--features", str(hg_small / "features"),
         "--out", str(tmp_path / "emb"), "--no-progress"],
    )  # fmt: skip
    assert emb.exit_code == 0, emb.output
    slides = pd.read_csv(hg_small / "cohort.csv", dtype=str)["slide_id"].tolist()
    assert load_slide_embeddings(tmp_path / "emb", slides).matrix.shape == (len(slides), 8)
    bad = runner.invoke(app, [*args[:-1], "--omics", str(tmp_path / "missing.csv")])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_threads_beats_mean_pooling_on_the_histogenomic_molecular_tasks(tmp_path: Path) -> None:
    """The issue's check, on the untouched histogenomic world: 1,500 extra patients of the same
    world (same seed; the world does not depend on the number of patients) pre-train the
    encoder; the 500 evaluated patients' omics are never read. On MSI and subtype, Threads-style
    embeddings beat mean pooling in the frozen linear protocol and with few labels (k = 1, 4),
    and significantly at k = 4 on MSI. The margins are small and not significant with all
    labels (docs/pretrain.md); with 3 folds instead of 5 the subtype margin was -0.001.
    About 10 minutes on 2 shared CPU cores."""
    from oncoslide.evaluation.fewshot import FewShotConfig, compare_few_shot
    from oncoslide.pretrain.threads_eval import (
        ThreadsEvalConfig,
        evaluate_threads,
        paired_bootstrap,
    )

    sim = tmp_path / "sim"
    simulate_cohort(sim, make_simulation_config("histogenomic", {"n_patients": 2000}))
    cohort = load_cohort(sim / "cohort.csv", sim / "features", label_cols=("msi", "subtype"))
    rng = np.random.default_rng([0, 99])
    eval_ids = sorted(rng.choice(cohort.patient_ids, 500, replace=False))
    pretrain_ids = sorted(set(cohort.patient_ids) - set(eval_ids))
    labels = {
        "msi": cohort.patients["msi"].astype(int).astype(str),
        "subtype": cohort.patients["subtype"].astype(str),
    }
    # the benchmark's protocol (benchmarks/bench_threads_pretrain.py): 5 folds, 10 draws
    config = ThreadsEvalConfig(
        n_folds=5, epochs=20, fewshot=FewShotConfig(shots=(1, 4), draws=10), survival=False
    )
    result = evaluate_threads(
        cohort,
        load_omics(sim / "omics.csv"),
        labels,
        tmp_path / "enc",
        mutations=load_mutations(sim / "mutations.csv"),
        config=config,
        eval_patients=eval_ids,
        pretrain_patients=pretrain_ids,
    )
    paired = compare_few_shot(result.fewshot, "threads", "meanpool")
    for task in ("msi", "subtype"):
        full = paired_bootstrap(result.predictions, task, result.tasks[task], n_boot=200)
        assert full["diff"] > 0, (task, full)
        few = paired[(paired["task"] == task) & (paired["metric"] == "auc")].set_index("k")
        assert few.loc[[1, 4], "diff"].mean() > 0, (task, few)
        if task == "msi":
            assert few.loc[4, "p_wilcoxon"] < 0.05, few
