"""`slide-finetune`: a pre-trained slide encoder fine-tuned fully, with LoRA or frozen, through
the one training path (`oncoslide train --model slide-finetune --init enc/`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.omics import load_omics
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.models import MODELS, create_model
from oncoslide.models.slide_finetune import LoRALinear, SlideFinetune, add_lora, encoder_spec
from oncoslide.pretrain import load_slide_encoder
from oncoslide.pretrain.threads import ThreadsConfig, ThreadsSlideEncoder, pretrain_threads
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training.model_folder import load_model_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def world_and_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small histogenomic world and a Threads encoder pre-trained on its first 30 patients."""
    out = tmp_path_factory.mktemp("ft")
    sim = out / "sim"
    cfg = make_simulation_config(
        "histogenomic",
        {
            "n_patients": 40,
            "feature_dim": 8,
            "within_prototype_rank": 2,
            "patches_median": 12,
            "patches_min": 6,
            "n_genes": 30,
            "n_mutation_genes": 0,
        },
    )
    simulate_cohort(sim, cfg)
    cohort = load_cohort(sim / "cohort.csv", sim / "features")
    small = ThreadsConfig(embed_dim=8, hidden_dim=16, attn_dim=8, heads=2, profile_hidden=16)
    pretrain_threads(
        cohort,
        load_omics(sim / "omics.csv"),
        out / "enc",
        patients=cohort.patient_ids[:30],
        config=small,
        epochs=1,
        batch_size=8,
    )
    return sim, out / "enc"


def test_lora_starts_from_the_pretrained_function_and_trains_under_5_percent() -> None:
    torch.manual_seed(0)
    enc = ThreadsSlideEncoder(384)  # the default size on 384-d features (the preset's)
    enc.eval()
    x = torch.randn(50, 384)
    before = enc(x).detach()
    n = sum(p.numel() for p in enc.parameters())
    replaced = add_lora(enc, rank=4, alpha=8.0)
    assert replaced == sum(isinstance(m, LoRALinear) for m in enc.modules()) > 0
    assert torch.allclose(enc(x), before, atol=1e-6)  # B = 0 at the start
    model = SlideFinetune(
        384, 2, encoder={"name": "threads", "config": ThreadsSlideEncoder(384).config()}
    )
    assert model.n_encoder_parameters == n
    assert 0 < model.trainable_share < 0.05
    trainable = [k for k, p in model.encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    full = SlideFinetune(384, 2, finetune="full")
    assert full.trainable_share == 1.0
    frozen = SlideFinetune(384, 2, finetune="frozen")
    assert frozen.trainable_share == 0.0
    assert all(p.requires_grad for p in frozen.head.parameters())
    assert MODELS.metadata("slide-finetune")["encoder_init"] is encoder_spec


def test_model_embeds_patient_bags_with_padding_ignored() -> None:
    torch.manual_seed(0)
    model = create_model("slide-finetune", in_dim=8, n_outputs=3, finetune="lora")
    model.eval()
    feats = torch.randn(2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    feats[0, 4:] = float("nan")
    out = model(feats, mask)
    alone = model(feats[:1, :4], mask[:1, :4])
    assert torch.allclose(out.logits[0], alone.logits[0], atol=1e-5)
    assert out.attention is not None and torch.all(out.attention[0, 4:] == 0)


def test_train_with_init_copies_the_encoder_and_keeps_its_weights_under_lora(
    world_and_encoder: tuple[Path, Path], tmp_path: Path
) -> None:
    sim, enc = world_and_encoder
    base = [
        "train", "--cohort", str(sim / "cohort.csv"), "--features", str(sim / "features"),
        "--task", "msi", "--model", "slide-finetune", "--init", str(enc), "--folds", "2",
        "--epochs", "2", "--no-progress", "--n-boot", "0",
    ]  # fmt: skip
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    assert "parameters train" in result.output
    folder = tmp_path / "lora" / "folds" / "seed0-fold0" / "model"
    trained = load_model_folder(folder)
    assert isinstance(trained.model, SlideFinetune)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["model"]["kwargs"]["encoder"] == encoder_spec(enc)
    assert 0 < meta["info"]["encoder_trainable_share"] < 1
    # LoRA left the pre-trained weights as they were; only the low-rank updates moved
    pre = load_slide_encoder(enc).encoder.state_dict()
    got = trained.model.encoder.state_dict()
    assert all(torch.equal(pre[k], got[k]) for k in pre)
    assert any(k.endswith("lora_b") and got[k].abs().sum() > 0 for k in got)
    # full fine-tuning moves them
    result = runner.invoke(
        app, [*base, "--out", str(tmp_path / "full"), "--model-arg", "finetune=full"]
    )
    assert result.exit_code == 0, result.output
    full: Any = load_model_folder(tmp_path / "full" / "folds" / "seed0-fold0" / "model").model
    moved = full.encoder.state_dict()
    assert any(not torch.equal(pre[k], moved[k]) for k in pre)


def test_an_encoder_folder_initialises_only_slide_finetune(
    world_and_encoder: tuple[Path, Path], tmp_path: Path
) -> None:
    sim, enc = world_and_encoder
    result = runner.invoke(
        app,
        [
            "train", "--cohort", str(sim / "cohort.csv"), "--features", str(sim / "features"),
            "--task", "msi", "--model", "abmil", "--init", str(enc), "--folds", "2",
            "--epochs", "1", "--no-progress", "--out", str(tmp_path / "x"),
        ],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "slide-finetune" in result.output


@pytest.mark.slow
def test_lora_matches_full_fine_tuning_on_the_histogenomic_world(tmp_path: Path) -> None:
    """LoRA trains under 5 % of the encoder and lands within noise of full fine-tuning (MSI,
    pooled out-of-fold AUC: the paired bootstrap interval of the difference contains 0), in the
    protocol of docs/pretrain.md: the encoder pre-trained (20 epochs) on 1,500 extra patients of
    the same world, never evaluated. Both at the training default lr (5e-4): LoRA's updates
    train at lora_lr_scale = 10 times it (5e-3), its head at 5e-4 (measured before that default
    with --lr 0.005 for the whole LoRA model: docs/pretrain.md). With a smaller encoder run (300
    extra patients, 10 epochs) LoRA fell just outside noise (0.725 vs 0.752, interval [-0.057,
    -0.001]). About 10 minutes."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from oncoslide.pretrain.threads import load_mutations

    sim = tmp_path / "sim"
    simulate_cohort(sim, make_simulation_config("histogenomic", {"n_patients": 2000}))
    cohort = load_cohort(sim / "cohort.csv", sim / "features")
    rng = np.random.default_rng([0, 99])
    eval_ids = sorted(rng.choice(cohort.patient_ids, 500, replace=False))
    pretrain_ids = sorted(set(cohort.patient_ids) - set(eval_ids))
    pretrain_threads(
        cohort,
        load_omics(sim / "omics.csv"),
        tmp_path / "enc",
        mutations=load_mutations(sim / "mutations.csv"),
        patients=pretrain_ids,
        epochs=20,
    )
    table = pd.read_csv(sim / "cohort.csv", dtype={"patient_id": str})
    table[table["patient_id"].isin(eval_ids)].to_csv(tmp_path / "eval.csv", index=False)
    base = [
        "train", "--cohort", str(tmp_path / "eval.csv"), "--features", str(sim / "features"),
        "--task", "msi", "--model", "slide-finetune", "--init", str(tmp_path / "enc"),
        "--folds", "3", "--epochs", "10", "--no-progress", "--n-boot", "0",
    ]  # fmt: skip
    runs = {"lora": [], "full": ["--model-arg", "finetune=full"]}
    probs = {}
    for name, extra in runs.items():
        result = runner.invoke(app, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        preds = pd.read_parquet(tmp_path / name / "predictions.parquet").sort_values("patient_id")
        probs[name] = preds
    meta = json.loads(
        (tmp_path / "lora" / "folds" / "seed0-fold0" / "model" / "model.json").read_text()
    )
    assert meta["info"]["encoder_trainable_share"] < 0.05
    y = (probs["lora"]["label"].astype(str) == "1").to_numpy().astype(int)
    pl, pf = probs["lora"]["prob_1"].to_numpy(), probs["full"]["prob_1"].to_numpy()
    boot = np.random.default_rng(0)
    diffs = []
    for _ in range(1000):
        i = boot.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            diffs.append(roc_auc_score(y[i], pl[i]) - roc_auc_score(y[i], pf[i]))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert lo < 0 < hi, (roc_auc_score(y, pl), roc_auc_score(y, pf), lo, hi)


_TINY = {
    "name": "threads",
    "config": ThreadsSlideEncoder(8, embed_dim=8, hidden_dim=16, attn_dim=8, heads=2).config(),
}


def _tiny_model(finetune: str = "lora", **kwargs: Any) -> SlideFinetune:
    return SlideFinetune(8, 2, encoder=_TINY, finetune=finetune, **kwargs)


def test_lora_runs_train_at_the_scaled_learning_rate_and_the_hook_scales_its_groups_only() -> None:
    from oncoslide.training.config import make_config
    from oncoslide.training.module import MILModule, optimiser_groups
    from oncoslide.training.tasks import FoldTask, TaskSpec

    torch.manual_seed(0)
    model = _tiny_model()
    # the default (docs/pretrain.md): the LoRA updates and the head at 10x the run's rate
    assert model.lr_scales() == {"lora": 10.0, "head": 10.0}
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    head = {id(p) for p in model.head.parameters()}
    assert lora and head
    config = make_config(task="msi", model="slide-finetune", lr=1e-3, epochs=2)
    task = TaskSpec("msi", "binary", classes=("0", "1"))
    module = MILModule(model, FoldTask(task, config, n_outputs=2), config, steps_per_epoch=4)
    optimised = module.configure_optimizers()
    groups = optimised["optimizer"].param_groups
    # initial_lr: the peak rate (the warm-up schedule already scaled "lr" down); the frozen
    # pre-trained weights are in no group
    assert [(g["initial_lr"], set(map(id, g["params"]))) for g in groups] == [
        (pytest.approx(1e-2), lora | head)
    ]

    class HeadFaster(SlideFinetune):  # the generic hook: one named group scaled, the rest not
        def lr_scales(self) -> dict[str, float]:
            return {"head": 3.0}

    full = HeadFaster(8, 2, encoder=_TINY, finetune="full")
    config = make_config(task="msi", model="slide-finetune", lr=1e-3, epochs=2)
    module = MILModule(full, FoldTask(task, config, n_outputs=2), config, steps_per_epoch=4)
    optimised = module.configure_optimizers()
    groups = optimised["optimizer"].param_groups
    head = {id(p) for p in full.head.parameters()}
    encoder = {id(p) for p in full.encoder.parameters()}
    assert sorted((g["initial_lr"], frozenset(map(id, g["params"]))) for g in groups) == [
        (1e-3, frozenset(encoder)),
        (pytest.approx(3e-3), frozenset(head)),
    ]
    # the schedule moves both groups alike: the ratio stays 3 after a step
    optimised["optimizer"].step()
    optimised["lr_scheduler"]["scheduler"].step()
    lrs = sorted(g["lr"] for g in groups)
    assert lrs[1] == pytest.approx(3 * lrs[0]) and lrs[0] > 0
    # full fine-tuning and a LoRA scale of 1: one group at the run's rate
    for other in (_tiny_model("full"), _tiny_model(lora_lr_scale=1.0)):
        groups = optimiser_groups(other, 1e-3)
        assert [g["lr"] for g in groups] == [1e-3]
        assert sum(len(g["params"]) for g in groups) == sum(
            p.requires_grad for p in other.parameters()
        )
    with pytest.raises(ConfigError):
        _tiny_model(lora_lr_scale=0.0)


def test_each_slide_is_embedded_alone_and_the_patient_is_their_mean() -> None:
    torch.manual_seed(1)
    model = _tiny_model()
    with torch.no_grad():  # LoRA updates away from zero, so they count too
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()
    model.eval()
    assert MODELS.metadata("slide-finetune")["uses_slide_index"] is True
    a, b, c = torch.randn(5, 8), torch.randn(3, 8), torch.randn(4, 8)
    feats = torch.full((2, 8, 8), float("nan"))
    feats[0, :5], feats[0, 5:], feats[1, :4] = a, b, c
    mask = ~torch.isnan(feats[..., 0])
    slide_index = torch.tensor([[0] * 5 + [1] * 3, [0] * 4 + [-1] * 4])
    with torch.no_grad():
        out = model(feats, mask, None, slide_index=slide_index)
        enc = model.encoder
        expected = torch.stack([(enc(a) + enc(b)) / 2, enc(c)])  # embed-slides' way, per slide
        assert torch.allclose(out.embedding, expected, atol=1e-5)
        assert torch.allclose(out.logits, model.head(expected), atol=1e-5)
        # one slide per bag (or no slide index): the bag is the slide, as before
        alone = model(feats[1:, :4], mask[1:, :4], None, slide_index=slide_index[1:, :4])
        assert torch.allclose(alone.embedding[0], enc(c), atol=1e-5)
        concatenated = model(feats, mask).embedding[0]
        assert not torch.allclose(concatenated, expected[0], atol=1e-3)
    assert out.attention is not None
    att = out.attention
    assert float(att[0, :5].sum()) == pytest.approx(0.5) == float(att[0, 5:].sum())
    assert float(att[1, :4].sum()) == pytest.approx(1.0) and float(att[1, 4:].abs().sum()) == 0


def test_fit_all_and_fold_models_predict_without_the_encoder_folder(
    world_and_encoder: tuple[Path, Path], tmp_path: Path
) -> None:
    """The model folder carries the pre-trained encoder and the LoRA state: with enc/ gone,
    `predict` reproduces a fold's out-of-fold predictions and the fit-all model's outputs equal
    a direct computation (each slide embedded alone, the mean, the head)."""
    import shutil

    import numpy as np
    import pandas as pd

    sim, enc_src = world_and_encoder
    enc = tmp_path / "enc"
    shutil.copytree(enc_src, enc)
    base = [
        "--cohort", str(sim / "cohort.csv"), "--features", str(sim / "features"),
        "--task", "msi", "--model", "slide-finetune", "--init", str(enc), "--epochs", "2",
        "--no-progress", "--n-boot", "0",
    ]  # fmt: skip
    result = runner.invoke(app, ["train", *base, "--fit-all", "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())  # rich wraps long lines
    assert "parameters train" in shown and "train at 10x the learning rate (0.005)" in shown
    result = runner.invoke(app, ["train", *base, "--folds", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    # the encoder pre-trained on the first 30 patients (those with profiles): they train, but
    # are never scored
    cohort = load_cohort(sim / "cohort.csv", sim / "features")
    seen = set(pd.read_csv(enc / "pretrain_slides.csv", dtype=str)["patient_id"])
    assert len(seen) >= 20 and seen <= set(cohort.patient_ids[:30])
    scored = set(pd.read_parquet(tmp_path / "run" / "predictions.parquet")["patient_id"])
    assert scored == set(cohort.patient_ids) - seen
    note = f"{len(seen)} patients were pre-trained on by the --init encoder"
    assert note in " ".join(result.output.split()) or note in (tmp_path / "run/run.log").read_text()
    only_seen = tmp_path / "seen.csv"
    table = pd.read_csv(sim / "cohort.csv", dtype={"patient_id": str})
    table[table["patient_id"].isin(seen)].to_csv(only_seen, index=False)
    refused = runner.invoke(
        app,
        ["train", *base[2:], "--cohort", str(only_seen), "--folds", "2",
         "--out", str(tmp_path / "none")],
    )  # fmt: skip
    assert refused.exit_code == 2 and "none is left to score" in " ".join(refused.output.split())
    shutil.rmtree(enc)  # the model folders must not need it any more
    # a trained slide-finetune model folder starts another run (--init model/)
    result = runner.invoke(
        app,
        [
            "train", "--cohort", str(sim / "cohort.csv"), "--features", str(sim / "features"),
            "--task", "msi", "--model", "slide-finetune", "--init", str(tmp_path / "model"),
            "--folds", "2", "--epochs", "1", "--no-progress", "--n-boot", "0",
            "--out", str(tmp_path / "again"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again/folds/seed0-fold0/model/model.json").read_text())
    n_state = len(load_model_folder(tmp_path / "model").model.state_dict())
    assert again["info"]["init_copied"] == n_state  # every tensor, the LoRA updates included

    out = tmp_path / "p_fold"
    result = runner.invoke(
        app,
        [
            "predict", str(tmp_path / "run"), "--seed", "0", "--fold", "1", "-c",
            str(sim / "cohort.csv"), "-f", str(sim / "features"), "--out", str(out),
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    oof = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    oof = oof[(oof["seed"] == 0) & (oof["fold"] == 1)].set_index("patient_id")
    again = pd.read_parquet(out / "predictions.parquet").set_index("patient_id").loc[oof.index]
    np.testing.assert_allclose(again["prob_1"], oof["prob_1"], atol=1e-6)

    # explain / report score bags through the same slide index (each slide in its own frame)
    from oncoslide.cohort.bags import load_bag
    from oncoslide.features.cache import FeatureCache
    from oncoslide.report.attention import load_fold_model
    from oncoslide.report.prototypes import bag_score

    cohort = load_cohort(sim / "cohort.csv", sim / "features")
    fm = load_fold_model(tmp_path / "run", cohort, seed=0, fold=1)
    multi = [p for p in oof.index if len(cohort.slide_ids(p)) > 1]
    assert multi
    with FeatureCache() as cache:
        bag = load_bag(cohort, multi[0], cache)
    score = bag_score(fm, bag.features, bag.coords, bag.slide_index)
    assert score == pytest.approx(float(oof.loc[multi[0], "prob_1"]), abs=1e-5)
    with pytest.raises(ConfigError, match="slide index"):
        bag_score(fm, bag.features, bag.coords)

    result = runner.invoke(
        app,
        [
            "predict", str(tmp_path / "model"), "-c", str(sim / "cohort.csv"), "-f",
            str(sim / "features"), "--out", str(tmp_path / "p_all"), "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    preds = pd.read_parquet(tmp_path / "p_all" / "predictions.parquet").set_index("patient_id")
    trained = load_model_folder(tmp_path / "model")
    cohort = load_cohort(sim / "cohort.csv", sim / "features")
    two = [p for p in cohort.patient_ids if len(cohort.slide_ids(p)) > 1]
    assert two  # multi-slide patients are in the check
    from oncoslide.features.readers import read_features

    model: Any = trained.model
    with torch.no_grad():
        for pid in [*two[:3], *cohort.patient_ids[:3]]:
            slides = [
                torch.from_numpy(np.asarray(read_features(p).features, dtype=np.float32))
                for p in cohort.slide_paths(pid)
            ]
            emb = torch.stack([model.encoder(s) for s in slides]).mean(0)
            prob = torch.softmax(model.head(emb), -1)[1].item()
            assert preds.loc[pid, "prob_1"] == pytest.approx(prob, abs=1e-5)


def test_benchmark_mil_entry_with_init_is_keyed_by_the_encoder_content(
    world_and_encoder: tuple[Path, Path], tmp_path: Path
) -> None:
    """`models: [{model: slide-finetune, init: enc}]`: the path is relative to the spec, the
    cells start from the encoder, and their keys follow its content, not its path."""
    import shutil

    import pandas as pd

    from oncoslide.bench.runner import run_benchmark
    from oncoslide.bench.spec import spec_from_dict

    sim, enc_src = world_and_encoder
    for where in ("a", "b"):
        shutil.copytree(enc_src, tmp_path / where / "enc")
    raw = {
        "name": "ft",
        "cohort": str(sim / "cohort.csv"),
        "folds": 2,
        "keep_models": True,
        "feature_sets": [{"name": "f", "features": str(sim / "features")}],
        "tasks": [{"name": "msi", "kind": "binary", "target": "msi"}],
        "models": [
            {"name": "ft", "model": "slide-finetune", "init": "enc", "train": {"epochs": 1}}
        ],
    }
    out = tmp_path / "bench"
    run = run_benchmark(
        spec_from_dict(raw, base_dir=tmp_path / "a"), out, workers=0, progress=False
    )
    assert (run.n_cells, run.n_ran, run.failures) == (2, 2, [])
    # the encoder's pre-training patients are never scored (its pretrain_slides.csv)
    from oncoslide.bench.store import ResultStore

    seen = set(pd.read_csv(enc_src / "pretrain_slides.csv", dtype=str)["patient_id"])
    with ResultStore.in_dir(out) as store:
        scored = set(store.predictions(task="msi")["patient_id"])
    assert scored and seen and scored.isdisjoint(seen)
    kept = sorted((out / "models").iterdir())
    assert len(kept) == 2
    pre = load_slide_encoder(enc_src).encoder.state_dict()
    for folder in kept:
        meta = json.loads((folder / "model.json").read_text())
        assert meta["config"]["init"] == str(tmp_path / "a" / "enc")
        assert meta["model"]["kwargs"]["encoder"] == encoder_spec(enc_src)
        # LoRA keeps the pre-trained weights: the cell started from this encoder
        loaded: Any = load_model_folder(folder).model
        got = loaded.encoder.state_dict()
        assert all(torch.equal(pre[k], got[k]) for k in pre)
    # the same encoder elsewhere: the same cells, nothing runs again
    again = run_benchmark(
        spec_from_dict(raw, base_dir=tmp_path / "b"), out, workers=0, progress=False
    )
    assert (again.n_already_done, again.n_ran) == (2, 0)
    # other weights at the same path: new cells
    state = torch.load(tmp_path / "b" / "enc" / "encoder.pt", weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, tmp_path / "b" / "enc" / "encoder.pt")
    third = run_benchmark(
        spec_from_dict(raw, base_dir=tmp_path / "b"), out, workers=0, progress=False
    )
    assert third.n_ran == 2
    bad = {**raw, "models": [{"name": "lin", "protocol": "linear", "init": "enc"}]}
    with pytest.raises(ConfigError, match="init"):
        spec_from_dict(bad, base_dir=tmp_path / "a")


def test_a_position_aware_encoder_sees_each_slide_in_its_own_frame() -> None:
    """PAMA (no batched encode): each slide through the encoder with its own coordinates."""
    from oncoslide.pretrain import SLIDE_ENCODERS

    torch.manual_seed(0)
    spec = {"name": "pama", "config": SLIDE_ENCODERS.create("pama", in_dim=8).config()}
    model = SlideFinetune(8, 2, encoder=spec, finetune="lora")
    model.eval()
    feats = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(2), indexing="ij"), -1)
    coords = (grid.reshape(10, 2).float() * 256).expand(2, 10, 2).clone()
    slide_index = torch.tensor([[0] * 6 + [1] * 4, [0] * 7 + [-1] * 3])
    enc: Any = model.encoder
    with torch.no_grad():
        out = model(feats, mask, coords, slide_index=slide_index)
        first = (enc(feats[0, :6], coords[0, :6]) + enc(feats[0, 6:], coords[0, 6:])) / 2
        assert torch.allclose(out.embedding[0], first, atol=1e-5)
        assert torch.allclose(out.embedding[1], enc(feats[1, :7], coords[1, :7]), atol=1e-5)


def test_attention_maps_are_refused_up_front_for_an_encoder_without_attention() -> None:
    """The registry lists slide-finetune with attention (Threads' encoder pools by attention);
    with a PAMA encoder it gives none, and heat maps say so before reading any bag."""
    from oncoslide.errors import ConfigError
    from oncoslide.pretrain import SLIDE_ENCODERS
    from oncoslide.report.attention import check_gives_attention

    spec = {"name": "pama", "config": SLIDE_ENCODERS.create("pama", in_dim=8).config()}
    pama = SlideFinetune(8, 2, encoder=spec, finetune="lora")
    threads = SlideFinetune(8, 2)
    assert threads.gives_attention and not pama.gives_attention
    # what the flag says is what forward does
    feats, mask = torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool)
    coords = torch.stack([torch.arange(6.0) * 256, torch.zeros(6)], -1)[None]
    with torch.no_grad():
        assert pama.eval()(feats, mask, coords).attention is None
        assert threads.eval()(feats, mask, coords).attention is not None
    check_gives_attention(threads, "slide-finetune")
    with pytest.raises(ConfigError, match="pama"):
        check_gives_attention(pama, "slide-finetune")
