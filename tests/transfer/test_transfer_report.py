"""Router weights beside the predictions (the generic ``describes_patients`` hook) in
cross-validation, ``predict`` and benchmark cells, and the transfer report built from a matrix,
a benchmark and the world's truth (a small simulated world with two planted families)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import cast

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from oncoslide.bench.stats import TaskInfo, paired_comparison, paired_replicate_diffs
from oncoslide.bench.store import CellRecord, ResultStore
from oncoslide.cli import app
from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.models.roupkt import ROUPKT
from oncoslide.simulate import SimulationConfig, simulate_cohort
from oncoslide.training import cross_validate, make_config
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.predict import predict_cohort
from oncoslide.transfer import build_zoo, load_zoo, transfer_matrix
from oncoslide.transfer.report import (
    OWN_EXPERT,
    ROUTING_PREFIX,
    transfer_report,
)

runner = CliRunner()
SMALL = {"hidden_dim": 8, "attn_dim": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four cancers of 30 patients in two planted families (A, C | B, D), a zoo of all four,
    its transfer matrix, and a benchmark of abmil and roupkt on targets SIM-C and SIM-D."""
    from oncoslide.bench.runner import run_benchmark
    from oncoslide.bench.spec import spec_from_dict

    root = tmp_path_factory.mktemp("report-world")
    sim = simulate_cohort(root / "world", SimulationConfig(
        n_patients=120, n_cohorts=4, prognosis_families=2, feature_dim=16, patches_median=30,
        patches_min=10, patches_max=60, n_genes=24, seed=7))  # fmt: skip
    cohort = load_cohort(sim.cohort_table, sim.features_dir)
    zoo_config = make_config(task="survival", folds=2, epochs=1, n_boot=0, progress=False,
                             model_kwargs={"hidden_dim": 16, "attn_dim": 8})  # fmt: skip
    build_zoo(cohort, zoo_config, root / "zoo", by="cohort", min_patients=10)
    transfer_matrix(load_zoo(root / "zoo"), cohort, root / "tm", n_boot=50)
    kwargs = {"experts": str(root / "zoo"), "exclude": "auto", **SMALL}
    raw = {
        "name": "t", "cohort": str(sim.cohort_table), "folds": 2, "seeds": [0], "n_boot": 100,
        "val_fraction": 0.25,
        "feature_sets": [{"name": "f", "features": str(sim.features_dir)}],
        "tasks": [{"name": f"os-{c}", "kind": "survival", "filter": {"cohort": [c]}}
                  for c in ("SIM-C", "SIM-D")],
        "models": [
            {"name": "abmil", "protocol": "mil", "model": "abmil", "kwargs": SMALL,
             "train": {"epochs": 1}},
            {"name": "roupkt", "protocol": "mil", "model": "roupkt", "kwargs": kwargs,
             "train": {"epochs": 1}},
        ],
    }  # fmt: skip
    bench = run_benchmark(spec_from_dict(raw), root / "bench", workers=0, progress=False)
    assert bench.n_ran == 8 and not bench.failures, bench.failures
    return {"root": root, "world": root / "world", "zoo": root / "zoo", "tm": root / "tm",
            "bench": root / "bench"}  # fmt: skip


def _target(world: dict[str, Path], cancer: str) -> Path:
    table = pd.read_csv(world["world"] / "cohort.csv")
    out = world["root"] / f"{cancer}.csv"
    table[table["cohort"] == cancer].to_csv(out, index=False)
    return out


def test_routing_weights_are_written_beside_the_predictions(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cohort = load_cohort(_target(world, "SIM-C"), world["world"] / "features")
    config = make_config(task="survival", model="roupkt", folds=2, epochs=1, n_boot=0,
                         progress=False, model_kwargs={"experts": str(world["zoo"]),
                                                       "exclude": "auto", **SMALL})  # fmt: skip
    run = cross_validate(cohort, config, tmp_path / "run")
    # SIM-C's zoo model is out (it saw the patients); its trainable own expert comes last
    columns = [f"{ROUTING_PREFIX}{c}" for c in ("SIM-A", "SIM-B", "SIM-D", "own")]
    preds = run.predictions
    assert [c for c in preds.columns if c.startswith("detail_")] == columns
    np.testing.assert_allclose(preds[columns].sum(axis=1), 1.0, atol=1e-5)  # softmax weights
    # each row is the reloaded fold model's router on that patient's whole bag
    cache = FeatureCache()
    fold0 = load_model_folder(tmp_path / "run" / "folds" / "seed0-fold0" / "model")
    rows = preds[preds["fold"] == 0].head(4)
    for _, row in rows.iterrows():
        bag = load_bag(cohort, str(row["patient_id"]), cache)
        f = torch.as_tensor(np.asarray(bag.features, dtype=np.float32))[None]
        router = cast(ROUPKT, fold0.model)
        weights = router.routing(f, torch.ones(f.shape[:2], dtype=torch.bool))
        for name, value in weights.items():
            assert row[ROUTING_PREFIX + name] == pytest.approx(float(value[0]), abs=1e-6)
    cache.close()
    # predict writes the same columns, equal on the fold's test patients
    out = predict_cohort(fold0, cohort, tmp_path / "pred", embeddings=False).predictions
    mine = out.set_index("patient_id").loc[preds.loc[preds["fold"] == 0, "patient_id"], columns]
    np.testing.assert_allclose(mine.to_numpy(), preds.loc[preds["fold"] == 0, columns], atol=1e-6)
    # a model that describes nothing gets no detail column
    plain = make_config(task="survival", model="abmil", folds=2, epochs=1, n_boot=0,
                        progress=False, model_kwargs=SMALL)  # fmt: skip
    other = cross_validate(cohort, plain, tmp_path / "plain")
    assert not [c for c in other.predictions.columns if c.startswith("detail_")]


def test_the_store_keeps_details_and_still_checks_probabilities(tmp_path: Path) -> None:
    frame = pd.DataFrame({"patient_id": ["a", "b"], "time": np.nan, "event": np.nan,
                          "label": ["x", "y"], "prob_x": [0.3, 0.6], "prob_y": [0.7, 0.4],
                          "detail_routing_S": [0.9, 0.2]})  # fmt: skip

    def record(key: str, predictions: pd.DataFrame) -> CellRecord:
        return CellRecord(cell_key=key, task="t", feature_set="f", model="m", protocol="mil",
                          seed=0, fold=0, config={}, metrics={"auc": 0.5},
                          predictions=predictions, seconds=1.0)  # fmt: skip

    with ResultStore.in_dir(tmp_path) as store:
        store.record_cell(record("k1", frame))
        back = store.predictions()
        bad = frame.assign(prob_x=[0.9, 0.6])  # rows no longer sum to 1
        with pytest.raises(ConfigError, match="do not sum to 1"):
            store.record_cell(record("k2", bad))
        with pytest.raises(ConfigError, match="unknown columns"):
            store.record_cell(record("k3", frame.assign(other=1.0)))
    assert list(back.columns[-3:]) == ["prob_x", "prob_y", "detail_routing_S"]
    np.testing.assert_allclose(back["detail_routing_S"], [0.9, 0.2])


def test_transfer_report_from_matrix_benchmark_and_truth(
    world: dict[str, Path], tmp_path: Path
) -> None:
    report = transfer_report(world["tm"], tmp_path / "report", bench=world["bench"],
                             world=world["world"], n_boot=200)  # fmt: skip
    out = tmp_path / "report"
    for name in (
        "index.html",
        "matrix.png",
        "similarity.png",
        "gains.png",
        "routing.png",
        "pairs.csv",
        "gains.csv",
        "routing.csv",
        "concentration.csv",
        "summary.json",
    ):
        assert (out / name).exists(), name  # fmt: skip
    page = (out / "index.html").read_text()
    assert "src='data:image/png;base64," in page and "src='matrix.png'" not in page

    # Spearman over the off-diagonal pairs, recomputed from the matrix and the truth
    truth = json.loads((world["world"] / "truth.json").read_text())["prognosis"]
    cells = pd.read_csv(world["tm"] / "matrix.csv")
    off = cells[~cells["diagonal"]]
    planted = [truth["similarity"][s][t] for s, t in zip(off["source"], off["target"], strict=True)]
    oracle = [truth["oracle_transfer_c_index"][s][t]
              for s, t in zip(off["source"], off["target"], strict=True)]  # fmt: skip
    assert report.summary["n_pairs"] == len(off) == 12
    assert report.summary["spearman_planted"] == pytest.approx(
        stats.spearmanr(planted, off["c_index"]).statistic
    )
    assert report.summary["spearman_oracle_planted"] == pytest.approx(
        stats.spearmanr(planted, oracle).statistic
    )
    # the ceilings of what slides show across a pair: in pairs.csv and summarised
    pairs = pd.read_csv(out / "pairs.csv").set_index(["source", "target"])
    off_keys = list(zip(off["source"], off["target"], strict=True))
    for column, key in (("visible_c_index", "spearman_visible_planted"),
                        ("readout_c_index", "spearman_readout_planted"),
                        ("learned_c_index", "spearman_learned_planted"),
                        ("learned_states_c_index", "spearman_learned_states_planted"),
                        ("learned_marginal_c_index", "spearman_learned_marginal_planted")):  # fmt: skip
        assert report.summary[key] == pytest.approx(
            stats.spearmanr(planted, pairs.loc[off_keys, column]).statistic
        )
    # within a family every tumour morphology is shared and every latent shows: the visible
    # oracle is the planted one (written to 4 decimals)
    same = pairs[pairs["same_family"].astype(bool)]
    assert len(same) > 0
    np.testing.assert_allclose(same["visible_c_index"], same["oracle_c_index"], atol=1e-4)

    # gains: the benchmark's paired comparison, one row per target, all targets rare here
    assert sorted(report.gains["target"]) == ["SIM-C", "SIM-D"]
    assert report.gains["rare"].all() and (report.gains["n_patients"] == 30).all()
    with ResultStore.in_dir(world["bench"]) as store:
        preds = store.predictions(task="os-SIM-C")
    direct = paired_comparison(preds, TaskInfo("os-SIM-C", "survival"), ("f", "roupkt"),
                               ("f", "abmil"), n_boot=200, seed=0)  # fmt: skip
    row = report.gains.set_index("target").loc["SIM-C"]
    assert (row["diff"], row["lower"], row["upper"], row["p_value"]) == pytest.approx(
        (direct.diff, direct.lower, direct.upper, direct.p_value)
    )
    assert row["significant"] == (direct.lower > 0 or direct.upper < 0)
    assert ("not significant" in page) == bool((~report.gains["significant"]).any())

    # the mean over the rare targets: each target's paired replicate differences (those of
    # paired_comparison, drawn with seed i for the i-th target) averaged, then percentiles
    diffs = {}
    for i, target in enumerate(("SIM-C", "SIM-D")):
        with ResultStore.in_dir(world["bench"]) as store:
            sub = store.predictions(task=f"os-{target}")
        info = TaskInfo(f"os-{target}", "survival")
        diffs[target] = paired_replicate_diffs(sub, info, ("f", "roupkt"), ("f", "abmil"),
                                               n_boot=200, seed=i)  # fmt: skip
        direct = paired_comparison(sub, info, ("f", "roupkt"), ("f", "abmil"), n_boot=200,
                                   seed=i)  # fmt: skip
        ok = diffs[target][np.isfinite(diffs[target])]
        assert np.quantile(ok, [0.025, 0.975]) == pytest.approx([direct.lower, direct.upper])
    pooled = (diffs["SIM-C"] + diffs["SIM-D"]) / 2
    pooled = pooled[np.isfinite(pooled)]
    rare = report.summary["rare_mean_diff"]["roupkt"]
    assert rare["mean_diff"] == pytest.approx(report.gains["diff"].mean())
    assert [rare["lower"], rare["upper"]] == pytest.approx(np.quantile(pooled, [0.025, 0.975]))
    assert rare["lower"] <= rare["mean_diff"] <= rare["upper"]

    # routing: the mean over SIM-C's patients of the stored weights, its zoo model left out,
    # its own (trainable) expert in
    routing = report.routing.set_index(["target", "source"])["mean_weight"]
    mine = preds[preds["model"] == "roupkt"]
    for source in ("SIM-A", "SIM-B", "SIM-D", "own"):
        expected = mine.groupby("patient_id")[f"{ROUTING_PREFIX}{source}"].mean().mean()
        assert routing.loc[("SIM-C", source)] == pytest.approx(expected)
    assert ("SIM-C", "SIM-C") not in routing.index
    same = report.routing.set_index(["target", "source"])["same_family"]
    assert bool(same.loc[("SIM-C", "SIM-A")]) and not bool(same.loc[("SIM-C", "SIM-B")])
    assert pd.isna(same.loc[("SIM-C", "own")])  # no source of any family
    # concentration: SIM-C's family has SIM-A among 3 zoo experts (uniform share 1/3); its
    # share of each patient's weight on the zoo (the own expert's left out), averaged
    conc = report.concentration.set_index("target").loc["SIM-C"]
    assert conc["uniform_share"] == pytest.approx(1 / 3) and conc["n_experts"] == 3
    zoo = mine.groupby("patient_id")[[f"{ROUTING_PREFIX}{s}" for s in ("SIM-A", "SIM-B",
                                                                        "SIM-D")]].mean()  # fmt: skip
    assert conc["same_share"] == pytest.approx(
        (zoo[f"{ROUTING_PREFIX}SIM-A"] / zoo.sum(axis=1)).mean()
    )
    assert conc["mean_weight_own"] == pytest.approx(routing.loc[("SIM-C", "own")])
    assert report.summary["concentration"]["n_targets"] == 2


def test_transfer_report_through_the_cli(world: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["transfer", "report", str(world["tm"]), "--world",
                                 str(world["world"]), "--out", str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output and (tmp_path / "r" / "similarity.png").exists()
    assert not (tmp_path / "r" / "gains.csv").exists()  # no benchmark given
    missing = runner.invoke(app, ["transfer", "report", str(tmp_path), "--out",
                                  str(tmp_path / "r2")])  # fmt: skip
    assert missing.exit_code == 2 and "not a transfer matrix folder" in missing.output
    # a benchmark without the baseline entry: no gains (noted), the router weights still shown
    other = runner.invoke(app, ["transfer", "report", str(world["tm"]), "--bench",
                                str(world["bench"]), "--baseline", "nosuch", "--out",
                                str(tmp_path / "r3")])  # fmt: skip
    assert other.exit_code == 0, other.output
    assert pd.read_csv(tmp_path / "r3" / "gains.csv").empty
    assert len(pd.read_csv(tmp_path / "r3" / "routing.csv")) == 8  # 2 targets x (3 zoo + own)
    notes = json.loads((tmp_path / "r3" / "summary.json").read_text())["notes"]
    assert any("no 'nosuch' entry" in n for n in notes)


def test_benchmarks_are_read_together_each_task_once(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from oncoslide.models import roupkt

    assert OWN_EXPERT == roupkt.OWN_EXPERT
    one = transfer_report(world["tm"], tmp_path / "one", bench=world["bench"], n_boot=100)
    listed = transfer_report(world["tm"], tmp_path / "two", bench=[world["bench"]], n_boot=100)
    pd.testing.assert_frame_equal(one.gains, listed.gains)
    with pytest.raises(ConfigError, match="repeats tasks"):
        transfer_report(world["tm"], tmp_path / "three", bench=[world["bench"], world["bench"]])


def test_pooling_benchmarks_of_several_worlds(
    world: dict[str, Path], tmp_path: Path, benchmark_script: Callable[[str], ModuleType]
) -> None:
    """benchmarks/bench_transfer_pooled.py: with one folder, the report's rare-target mean
    (same seeds, same interval and p); with a folder given twice (as two worlds would be), the
    mean over four targets of replicate differences drawn with seeds 0-3."""
    pool = benchmark_script("bench_transfer_pooled")
    report = transfer_report(world["tm"], tmp_path / "report", bench=world["bench"], n_boot=200)
    rare = report.summary["rare_mean_diff"]["roupkt"]
    table, one = pool.pooled([world["bench"]], "roupkt", "abmil", rare_max=60, n_boot=200,
                             seed=0)  # fmt: skip
    assert list(table["task"]) == ["os-SIM-C", "os-SIM-D"]
    assert (one["mean_diff"], one["lower"], one["upper"], one["p_value"]) == pytest.approx(
        (rare["mean_diff"], rare["lower"], rare["upper"], rare["p_value"])
    )
    _, two = pool.pooled([world["bench"]] * 2, "roupkt", "abmil", rare_max=60, n_boot=200,
                         seed=0)  # fmt: skip
    draws = []
    for i, task in enumerate(["os-SIM-C", "os-SIM-D"] * 2):
        with ResultStore.in_dir(world["bench"]) as store:
            sub = store.predictions(task=task)
        draws.append(paired_replicate_diffs(sub, TaskInfo(task, "survival"), ("f", "roupkt"),
                                            ("f", "abmil"), n_boot=200, seed=i))  # fmt: skip
    means = np.mean(np.vstack(draws), axis=0)
    means = means[np.isfinite(means)]
    assert two["n_targets"] == 4 and two["mean_diff"] == pytest.approx(one["mean_diff"])
    assert [two["lower"], two["upper"]] == pytest.approx(np.quantile(means, [0.025, 0.975]))
    # rare_max leaves out targets above it (every target here has 30 patients)
    empty, none = pool.pooled([world["bench"]], "roupkt", "abmil", rare_max=29, n_boot=200,
                              seed=0)  # fmt: skip
    assert empty.empty and none == {}
    # targets="large": the others (the same targets when rare_max is below their size)
    large, above = pool.pooled([world["bench"]], "roupkt", "abmil", rare_max=29, n_boot=200,
                               seed=0, targets="large")  # fmt: skip
    assert list(large["task"]) == ["os-SIM-C", "os-SIM-D"] and above == pytest.approx(one)
    none_large, _ = pool.pooled([world["bench"]], "roupkt", "abmil", rare_max=60, n_boot=200,
                                seed=0, targets="large")  # fmt: skip
    assert none_large.empty
