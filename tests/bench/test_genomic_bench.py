"""G-HANet and PathLUPI in a benchmark beside ABMIL, and PathLUPI's genome-anchored slide
embeddings (exported by `predict`) as a slide-level feature set of the linear protocol."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
from typer.testing import CliRunner

from oncoslide.bench.report import build_leaderboard
from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.bench.store import ResultStore
from oncoslide.cli import app
from oncoslide.training.model_folder import load_model_folder

runner = CliRunner()
SMALL = {"hidden_dim": 16, "heads": 2}


def test_genomic_models_run_beside_abmil_and_reach_the_leaderboard(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_cohort, root)
    raw = {
        "name": "genomic",
        "cohort": "cohort.csv",
        "folds": 2,
        "seeds": [0],
        "n_boot": 100,
        "keep_models": True,
        "train": {"epochs": 1, "batch_size": 4},
        "feature_sets": [{"name": "sim", "features": "features"}],
        "tasks": [
            {
                "name": "os",
                "kind": "survival",
                "omics": "omics.csv",
                "gene_groups": "gene_groups.gmt",
            },
            {
                "name": "msi",
                "kind": "binary",
                "target": "msi",
                "omics": "omics.csv",
                "gene_groups": "gene_groups.gmt",
            },
        ],
        "models": [
            {"name": "abmil", "protocol": "mil"},
            {"name": "ghanet", "protocol": "mil", "model": "ghanet", "kwargs": SMALL},
            {"name": "pathlupi", "protocol": "mil", "model": "pathlupi", "kwargs": SMALL},
        ],
    }
    spec = spec_from_dict(raw, base_dir=root, source="genomic")
    run = run_benchmark(spec, tmp_path / "bench", workers=0, progress=False)
    assert not run.failures, run.failures
    assert run.n_ran == 2 * 3 * 2
    with ResultStore.in_dir(tmp_path / "bench") as store:
        cells = store.cells()
    ghanet = cells[cells["model"] == "ghanet"]
    for key in ghanet["cell_key"]:
        trained = load_model_folder(tmp_path / "bench" / "models" / key)
        assert trained.fold_task.side_scalers["omics"].selection == "welch"
    board = build_leaderboard(tmp_path / "bench", n_boot=50)
    models = set(board.data.scores["model"])
    assert {"abmil", "ghanet", "pathlupi"} <= models


def test_pathlupi_slide_embeddings_feed_the_linear_protocol(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    args = [
        "train", "--cohort", str(tiny_cohort / "cohort.csv"), "--features",
        str(tiny_cohort / "features"), "--model", "pathlupi", "--omics",
        str(tiny_cohort / "omics.csv"), "--gene-groups", str(tiny_cohort / "gene_groups.gmt"),
        "--epochs", "2", "--no-progress", "--fit-all", "--out", str(model),
        "--model-arg", "hidden_dim=16", "--model-arg", "heads=2",
    ]  # fmt: skip
    fit = runner.invoke(app, args)
    assert fit.exit_code == 0, fit.output
    out = tmp_path / "pred"
    pred = runner.invoke(
        app,
        ["predict", str(model), "--cohort", str(tiny_cohort / "cohort.csv"),
         "--features", str(tiny_cohort / "features"), "--out", str(out)],
    )  # fmt: skip
    assert pred.exit_code == 0, pred.output
    files = sorted((out / "slide_embeddings").glob("*.h5"))
    assert len(files) == 50
    with h5py.File(files[0]) as f:
        assert np.asarray(f["features"]).reshape(-1).shape == (16,)  # the anchored embedding

    raw = {
        "name": "anchored",
        "cohort": str(tiny_cohort / "cohort.csv"),
        "folds": 2,
        "seeds": [0],
        "n_boot": 100,
        "feature_sets": [
            {"name": "pathlupi", "features": str(out / "slide_embeddings"), "level": "slide"}
        ],
        "tasks": [{"name": "os", "kind": "survival"}],
        "models": [{"name": "linear", "protocol": "linear"}],
    }
    run = run_benchmark(spec_from_dict(raw), tmp_path / "bench", workers=0, progress=False)
    assert not run.failures and run.n_ran == 2
    with ResultStore.in_dir(tmp_path / "bench") as store:
        preds = store.predictions()
    assert preds["patient_id"].nunique() == 40 and np.isfinite(preds["risk"]).all()
