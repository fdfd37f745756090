"""End to end: `bench run` then `bench leaderboard` on simulated data with a negative control.

The must-hold of the benchmark: a feature set carrying the planted signal ranks above the same
features shuffled across patients, on every task, with non-overlapping 95% intervals.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from oncoslide.bench.report import build_leaderboard
from oncoslide.bench.shuffle import shuffle_features
from oncoslide.bench.store import ResultStore
from oncoslide.cli import app
from oncoslide.simulate import SimulationConfig, simulate_cohort

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bench-demo.yaml"


@pytest.fixture(scope="module")
def signal_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 patients, small bags, a clear MSI signal: tight intervals, quick linear models."""
    out = tmp_path_factory.mktemp("signal")
    simulate_cohort(
        out,
        SimulationConfig(
            n_patients=200,
            n_cohorts=2,
            feature_dim=32,
            patches_median=60,
            patches_min=20,
            patches_max=200,
            n_genes=24,
            seed=11,
            label_signal=2.0,
        ),
    )
    shuffle_features(out / "cohort.csv", out / "features", out / "features-shuffled", seed=2)
    return out


def _assert_signal_beats_shuffled(scores: pd.DataFrame, models: list[str]) -> None:
    for (task, model), rows in scores.groupby(["task", "model"]):
        if model not in models:
            continue
        sim = rows[rows["feature_set"] == "sim"].iloc[0]
        shuf = rows[rows["feature_set"] == "shuffled"].iloc[0]
        assert sim["estimate"] > shuf["estimate"], (task, model)
        assert sim["lower"] > shuf["upper"], (task, model, sim.to_dict(), shuf.to_dict())


def _assert_prediction_csvs_and_curves(out: Path, scores: pd.DataFrame) -> None:
    """Beside the page: each task's predictions equal the store's, the binary task's ROC
    curves have the table's AUC as their area, and the page shows and links them."""
    with ResultStore.in_dir(out) as store:
        stored = {task: store.predictions(task=task) for task in ("os", "msi")}
    for task, rows in stored.items():
        exported = pd.read_csv(
            out / "predictions" / f"{task}.csv",
            dtype={"patient_id": str, "label": str, "cell_key": str},
        )
        want = rows.dropna(axis=1, how="all")
        assert set(exported.columns) == set(want.columns)
        assert len(exported) == 4 * 2 * 200  # entries x seeds x patients
        pd.testing.assert_frame_equal(
            exported, want[list(exported.columns)].reset_index(drop=True), check_dtype=False
        )
    roc = pd.read_csv(out / "curves" / "msi-roc.csv")
    msi = scores[scores["task"] == "msi"].set_index(["feature_set", "model"])
    for (fs, model), points in roc.groupby(["feature_set", "model"]):
        x, y = points["fpr"].to_numpy(), points["tpr"].to_numpy()
        area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
        assert area == pytest.approx(msi.loc[(fs, model), "estimate"], abs=1e-9)
    assert (out / "curves" / "msi-calibration.csv").is_file()
    assert not (out / "curves" / "os-roc.csv").exists()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert html.count('<img class="roc"') == 2  # one figure per feature set
    for href in ("predictions/os.csv", "predictions/msi.csv", "curves/msi-roc.csv"):
        assert f'href="{href}"' in html


def test_cli_run_and_leaderboard_rank_signal_above_shuffled(
    signal_cohort: Path, tmp_path: Path
) -> None:
    spec: dict[str, Any] = {
        "name": "signal",
        "cohort": str(signal_cohort / "cohort.csv"),
        "folds": 4,
        "seeds": [0, 1],
        "n_boot": 300,
        "feature_sets": [
            {"name": "sim", "features": str(signal_cohort / "features")},
            {"name": "shuffled", "features": str(signal_cohort / "features-shuffled")},
        ],
        "tasks": [
            {"name": "os", "kind": "survival"},
            {"name": "msi", "kind": "binary", "target": "msi"},
        ],
        "models": [
            {"name": "linear", "protocol": "linear"},
            {"name": "linear-meanmax", "protocol": "linear", "pooling": "meanmax"},
        ],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "bench"
    runner = CliRunner()
    run = runner.invoke(app, ["bench", "run", str(path), "--out", str(out), "--workers", "0"])
    assert run.exit_code == 0, run.output
    assert "64 run now" in " ".join(run.output.split())
    board = runner.invoke(app, ["bench", "leaderboard", str(out)])
    assert board.exit_code == 0, board.output
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "sim · linear" in html and "shuffled · linear" in html
    scores = pd.read_csv(out / "index.csv")
    assert len(scores) == 2 * 4  # tasks x entries
    _assert_signal_beats_shuffled(scores, ["linear", "linear-meanmax"])
    _assert_prediction_csvs_and_curves(out, scores)
    # the ranking puts both signal entries first
    result = build_leaderboard(out, html=tmp_path / "again.html", n_boot=200)
    top = result.data.ranking.head(2)
    assert set(top["feature_set"]) == {"sim"}
    # the paired comparisons with each task's best entry: shuffled entries differ significantly
    cmp = result.comparisons
    shuffled = cmp[cmp["entry"].str.startswith("shuffled")]
    assert len(shuffled) == 2 * 2 and (shuffled["p_value"] < 0.05).all()
    assert (shuffled["diff"] < 0).all() and (shuffled["upper"] < 0).all()


def test_leaderboard_of_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "leaderboard", str(tmp_path)])
    assert result.exit_code == 2
    assert "bench run" in result.output


@pytest.mark.slow
def test_example_benchmark_ranks_signal_above_shuffled_in_under_five_minutes(
    tmp_path: Path,
) -> None:
    """examples/bench-demo.yaml on the default simulated cohort, as its header describes."""
    data = tmp_path / "data"
    simulate_cohort(data, SimulationConfig(n_patients=400, patches_median=80, patches_min=20))
    shuffle_features(data / "cohort.csv", data / "features", data / "features-shuffled")
    spec = shutil.copy(EXAMPLE, tmp_path / "bench-demo.yaml")
    started = time.perf_counter()
    run = CliRunner().invoke(app, ["bench", "run", str(spec), "--out", str(tmp_path / "b")])
    assert run.exit_code == 0, run.output
    seconds = time.perf_counter() - started
    scores = build_leaderboard(tmp_path / "b").data.scores
    # every model ranks the signal feature set above the shuffled one on every task ...
    for (task, model), rows in scores.groupby(["task", "model"]):
        est = rows.set_index("feature_set")["estimate"]
        assert est["sim"] > est["shuffled"], (task, model)
    # ... and, as feature sets (each scored by its best entry), their intervals do not overlap
    # (single weak entries, e.g. the linear model on MSI, may still overlap at this size)
    for task, rows in scores.groupby("task"):
        best = rows.sort_values("estimate").groupby("feature_set").tail(1).set_index("feature_set")
        assert best.loc["sim", "lower"] > best.loc["shuffled", "upper"], (task, best)
    assert seconds < 300, f"the example took {seconds:.0f} s"


def test_bench_run_refuses_a_bad_gpu_list(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    result = CliRunner().invoke(
        app, ["bench", "run", str(spec), "--out", str(tmp_path / "o"), "--gpus", "0,a"]
    )
    assert result.exit_code == 2
    assert "--gpus" in result.output and "device numbers" in result.output
