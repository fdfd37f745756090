"""The transfer baselines (zoo_finetune, zoo_probe): the source model is chosen on each fold's
validation part by the candidates' unchanged scores, never by the test part; the probe trains
only its head; the fine-tuned source changes and reloads with its choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.simulate import SimulationConfig, simulate_cohort
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training import cross_validate, make_config
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.predict import predict_cohort
from oncoslide.transfer import build_zoo, load_zoo

ZOO_TRAIN = dict(task="survival", folds=2, epochs=2, n_boot=0, progress=False,
                 model_kwargs={"hidden_dim": 16, "attn_dim": 8})  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three small cancers (16-d features) and a zoo of all three."""
    out = tmp_path_factory.mktemp("three")
    config = SimulationConfig(n_patients=120, n_cohorts=3, feature_dim=16, patches_median=30,
                              patches_min=10, patches_max=60, n_genes=24, seed=5)  # fmt: skip
    simulate_cohort(out, config)
    cohort = load_cohort(out / "cohort.csv", out / "features")
    zoo = out / "zoo"
    build_zoo(cohort, make_config(**ZOO_TRAIN), zoo, by="cohort", min_patients=10)
    return out, zoo


def _target(root: Path, tmp_path: Path, cancer: str, table: pd.DataFrame | None = None) -> Path:
    table = pd.read_csv(root / "cohort.csv") if table is None else table
    out = tmp_path / f"{cancer}.csv"
    table[table["cohort"] == cancer].to_csv(out, index=False)
    return out


def _config(model: str, zoo: Path, **over: object) -> object:
    kwargs = {"experts": str(zoo), "exclude": ["SIM-C"], **over}
    return make_config(task="survival", model=model, folds=2, epochs=2, n_boot=0,
                       val_fraction=0.5, progress=False, model_kwargs=kwargs)  # fmt: skip


def _fold(run: Path, fold: int):  # type: ignore[no-untyped-def]
    return load_model_folder(run / "folds" / f"seed0-fold{fold}" / "model")


def test_source_is_chosen_on_validation_and_never_by_the_test_part(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    root, zoo = world
    cohort = load_cohort(_target(root, tmp_path, "SIM-C"), root / "features")
    run = cross_validate(cohort, _config("zoo_probe", zoo), tmp_path / "run")
    assert np.isfinite(run.predictions["risk"]).all()
    sources = {c: load_zoo(zoo).model(c) for c in ("SIM-A", "SIM-B")}
    validation: set[str] = set()
    for fold in (0, 1):
        trained = _fold(tmp_path / "run", fold)
        val = trained.patients().query("part == 'val'")["patient_id"].tolist()
        assert val, "the fold has a validation part"
        validation |= set(val)
        # each candidate, unchanged, on the validation patients: the recorded scores and choice
        scores = {}
        for cancer, source in sources.items():
            frame = predict_cohort(source, cohort, tmp_path / f"p{fold}{cancer}", embeddings=False)
            part = frame.predictions.set_index("patient_id").loc[val]
            scores[cancer] = concordance_index_censored(
                part["event"].to_numpy().astype(bool), part["time"].to_numpy(),
                part["risk"].to_numpy(),
            ).cindex  # fmt: skip
            assert trained.info[f"val_score_{cancer}"] == pytest.approx(scores[cancer], abs=1e-6)
        assert trained.info["source"] == max(scores, key=lambda c: scores[c])
        assert trained.model.source == trained.info["source"]  # the choice reloads

    # scramble every SIM-C outcome outside the validation parts (same splits): choice and scores stay
    table = pd.read_csv(root / "cohort.csv")
    others = (table["cohort"] == "SIM-C") & ~table["patient_id"].astype(str).isin(validation)
    ids = table.loc[others, "patient_id"].drop_duplicates().to_numpy()
    times = table.drop_duplicates("patient_id").set_index("patient_id").loc[ids, "time"]
    shuffled = dict(zip(ids, np.random.default_rng(0).permutation(times.to_numpy()), strict=True))
    table.loc[others, "time"] = table.loc[others, "patient_id"].map(shuffled)
    (tmp_path / "scrambled").mkdir()
    scrambled = _target(root, tmp_path / "scrambled", "SIM-C", table)
    cross_validate(load_cohort(scrambled, root / "features"), _config("zoo_probe", zoo),
                   tmp_path / "run2", splits=run.splits)  # same parts  # fmt: skip
    for fold in (0, 1):
        first, second = _fold(tmp_path / "run", fold).info, _fold(tmp_path / "run2", fold).info
        for key in ("source", "val_score_SIM-A", "val_score_SIM-B"):
            assert first[key] == second[key]


def test_probe_trains_only_its_head_and_finetune_moves_the_source(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    root, zoo = world
    cohort = load_cohort(_target(root, tmp_path, "SIM-C"), root / "features")
    zoo_models = {c: load_zoo(zoo).model(c).model for c in ("SIM-A", "SIM-B")}
    for name, moves in (("zoo_probe", False), ("zoo_finetune", True)):
        cross_validate(cohort, _config(name, zoo, source="SIM-A"), tmp_path / name)
        trained = load_model_folder(tmp_path / name / "folds" / "seed0-fold0" / "model").model
        assert trained.source == "SIM-A" and trained.candidates() == ["SIM-A"]
        before = zoo_models["SIM-A"].state_dict()
        after = trained.net.state_dict()
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same is not moves, name


def test_a_source_that_saw_the_target_is_refused(world: tuple[Path, Path], tmp_path: Path) -> None:
    root, zoo = world
    cohort = load_cohort(_target(root, tmp_path, "SIM-C"), root / "features")
    config = make_config(task="survival", model="zoo_finetune", folds=2, epochs=1, n_boot=0,
                         progress=False, model_kwargs={"experts": str(zoo)})  # fmt: skip
    with pytest.raises(ConfigError, match=r"would leak.*SIM-C"):
        cross_validate(cohort, config, tmp_path / "run")
    with pytest.raises(ConfigError, match="source 'SIM-Z' is not in the zoo"):
        cross_validate(cohort, _config("zoo_probe", zoo, source="SIM-Z"), tmp_path / "run2")


def test_transfer_baselines_run_as_benchmark_cells(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    """A benchmark entry of a zoo model: its cells train and record the chosen source's scores
    (the name of the source stays in the model folders; the cell info holds numbers only)."""
    from oncoslide.bench.runner import run_benchmark
    from oncoslide.bench.spec import spec_from_dict

    root, zoo = world
    kwargs = {"experts": str(zoo), "exclude": "auto"}  # SIM-C's own zoo model saw the task
    raw = {
        "name": "transfer", "cohort": str(root / "cohort.csv"), "folds": 2, "seeds": [0],
        "val_fraction": 0.5, "n_boot": 100,
        "feature_sets": [{"name": "f", "features": str(root / "features")}],
        "tasks": [{"name": "os-C", "kind": "survival", "filter": {"cohort": ["SIM-C"]}}],
        "models": [
            {"name": "probe", "protocol": "mil", "model": "zoo_probe", "kwargs": kwargs,
             "train": {"epochs": 1}},
        ],
        "keep_models": True,
    }  # fmt: skip
    run = run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=0, progress=False)
    assert run.n_ran == 2 and not run.failures, run.failures
    kept = sorted((tmp_path / "b" / "models").iterdir())
    assert len(kept) == 2
    for folder in kept:  # the saved folders name the left-out cancer and reload
        trained = load_model_folder(folder)
        assert trained.config.model_kwargs["exclude"] == ["SIM-C"]
        assert trained.model.candidates() == ["SIM-A", "SIM-B"]


def test_exclude_auto_leaves_out_the_sources_that_saw_the_task(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    root, zoo = world
    cohort = load_cohort(_target(root, tmp_path, "SIM-C"), root / "features")
    config = _config("zoo_probe", zoo, exclude="auto", source="SIM-A")
    cross_validate(cohort, config, tmp_path / "run")
    trained = _fold(tmp_path / "run", 0)
    assert trained.config.model_kwargs["exclude"] == ["SIM-C"]
    # without it, SIM-C's own model (trained on every SIM-C patient) is refused as a leak
    with pytest.raises(ConfigError, match=r"would leak.*SIM-C"):
        cross_validate(cohort, _config("zoo_probe", zoo, exclude=[]), tmp_path / "run2")


def test_a_composition_zoo_finetunes_with_its_own_loss(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    """A zoo of composition models (the matrix's zoo, docs/transfer.md): its models reload with
    their clusters, and fine-tuning one keeps its training loss (the one-cluster views)."""
    from oncoslide.models import create_model

    root, _ = world
    cohort = load_cohort(root / "cohort.csv", root / "features")
    train = {**ZOO_TRAIN, "model": "composition", "model_kwargs": {"clusters": 3}}
    build_zoo(cohort, make_config(**train), tmp_path / "zoo", by="cohort", min_patients=10)
    source = load_zoo(tmp_path / "zoo").model("SIM-A").model
    assert int(source.fitted) > 0
    tuned = create_model("zoo_finetune", in_dim=16, n_outputs=1,
                         experts=str(tmp_path / "zoo"), source="SIM-A")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    features, mask = torch.randn(2, 12, 16, generator=gen), torch.ones(2, 12, dtype=torch.bool)
    out, own = tuned(features, mask), source(features, mask)
    assert out.loss_views is not None and own.loss_views is not None
    torch.testing.assert_close(out.loss_views, own.loss_views)
    torch.testing.assert_close(out.logits, own.logits)
