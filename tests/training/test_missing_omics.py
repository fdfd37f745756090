"""The test-omics baselines through the one training path: omics reach every part (test and
predict included), patients without omics work, and the missing-at-test evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.omics import load_omics
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.models import create_model
from oncoslide.training.missing import hidden_patients, missing_omics_evaluation
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.predict import predict_logits

runner = CliRunner()
NAMES = ("omics_snn", "fusion_late", "mome")
SMALL = {
    "omics_snn": ["hidden_dim=16"],
    "fusion_late": ["hidden_dim=16", "attn_dim=8", "omics_dim=16"],
    "mome": ["hidden_dim=16", "attn_dim=8", "omics_dim=16"],
}


@dataclasses.dataclass
class Run:
    model: str
    out: Path
    omics: Path
    groups: Path
    without: list[str]  # patients whose row was removed from the omics table

    @property
    def fold0(self) -> Path:
        return self.out / "folds" / "seed0-fold0" / "model"

    def predictions(self, fold: int = 0) -> pd.DataFrame:
        preds = pd.read_parquet(self.out / "predictions.parquet")
        return preds[(preds["seed"] == 0) & (preds["fold"] == fold)].set_index("patient_id")


def _cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module", params=NAMES)
def run(request: pytest.FixtureRequest, tiny_cohort: Path, tmp_path_factory: Any) -> Run:
    """Each baseline cross-validated through the CLI (3 folds, 2 epochs) with 8 of the 40
    patients' omics rows removed, so every part holds patients without omics."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"run-{name}")
    table = pd.read_csv(tiny_cohort / "omics.csv", dtype={"patient_id": str})
    without = sorted(table["patient_id"])[::5]
    table[~table["patient_id"].isin(without)].to_csv(tmp / "omics.csv", index=False)
    model_args = [a for kv in SMALL[name] for a in ("--model-arg", kv)]
    result = _cli(
        "train", "--cohort", tiny_cohort / "cohort.csv", "--features", tiny_cohort / "features",
        "--model", name, "--omics", tmp / "omics.csv", "--gene-groups",
        tiny_cohort / "gene_groups.gmt", "--folds", 3, "--epochs", 2, "--no-progress",
        "--out", tmp / "run", *model_args,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return Run(name, tmp / "run", tmp / "omics.csv", tiny_cohort / "gene_groups.gmt", without)


def _cohort(tiny_cohort: Path) -> Any:
    return load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")


def _slide_path_risks(trained: Any, cohort: Any, ids: list[str]) -> np.ndarray:
    """The closed form of "no omics" for the fusion models: ``abmil`` with their slide weights."""
    model = trained.model
    abmil = create_model(
        "abmil", in_dim=model.in_dim, n_outputs=model.n_outputs, hidden_dim=16, attn_dim=8
    )
    own = model.state_dict()
    abmil.load_state_dict({k: own[k] for k in abmil.state_dict()})
    logits, _ = predict_logits(dataclasses.replace(trained, model=abmil.eval()), cohort, ids,
                               FeatureCache())  # fmt: skip
    return trained.fold_task.prediction_frame(logits)["risk"].to_numpy()


# ------------------------------------------------------------------ the training path


def test_the_run_scored_every_patient_and_kept_the_layout(run: Run) -> None:
    preds = pd.read_parquet(run.out / "predictions.parquet")
    assert len(preds) == 40 and np.isfinite(preds["risk"]).all()
    spec = json.loads((run.fold0 / "model.json").read_text())["model"]
    layout = spec["kwargs"]["side_layout"]["omics"]
    assert layout["n_columns"] == 24  # no gene selection for these models: every gene
    fold = run.predictions(0)
    missing = fold.index.isin(run.without)
    assert missing.any() and (~missing).any()  # the check below has both kinds of patients
    if run.model == "omics_snn":
        # test patients reach the model with their omics (distinct risks), those without a row
        # share the missing embedding's risk
        assert fold.loc[missing, "risk"].nunique() == 1
        assert fold.loc[~missing, "risk"].nunique() == (~missing).sum()


def test_predict_reads_the_omics_table_as_the_run_did(
    run: Run, tiny_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    result = _cli(
        "predict", run.fold0, "--cohort", tiny_cohort / "cohort.csv", "--features",
        tiny_cohort / "features", "--out", out, "--omics", run.omics, "--gene-groups", run.groups,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    again = pd.read_parquet(out / "predictions.parquet").set_index("patient_id")
    test = run.predictions(0)
    np.testing.assert_allclose(again.loc[test.index, "risk"], test["risk"], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "prediction.json").read_text())["side_inputs"] == {"omics": 32}
    refused = _cli(
        "predict", run.fold0, "--cohort", tiny_cohort / "cohort.csv", "--features",
        tiny_cohort / "features", "--out", tmp_path / "no",
    )  # fmt: skip
    assert refused.exit_code != 0 and "reads the side input 'omics'" in refused.output


def test_a_table_without_the_models_genes_is_refused(run: Run, tiny_cohort: Path) -> None:
    from oncoslide.training.predict import prediction_side

    trained = load_model_folder(run.fold0)
    table = load_omics(run.omics)
    fewer = dataclasses.replace(table, values=table.values.drop(columns=["SIMG00003"]))
    with pytest.raises(ConfigError, match="lacks 1 column"):
        prediction_side(trained, {"omics": fewer}, ["TCGA-2H-3PKX"])


# ---------------------------------------------------------------- missing at test time


def test_hidden_patients_are_a_nested_seeded_draw() -> None:
    ids = [f"p{i}" for i in range(9)]
    half, full = hidden_patients(ids, 0.5, 0), hidden_patients(ids, 1.0, 0)
    assert len(half) == 5 and set(half) < set(full) == set(ids)  # 4.5 rounds up
    assert hidden_patients(ids, 0.0, 0) == [] and hidden_patients(ids[::-1], 0.5, 0) == half
    assert hidden_patients(ids, 0.5, 1) != half


def test_missing_at_test_time(run: Run, tiny_cohort: Path) -> None:
    cohort = _cohort(tiny_cohort)
    omics = load_omics(run.omics, run.groups)
    result = missing_omics_evaluation(run.fold0, cohort, omics, seed=3)
    fold = run.predictions(0)
    assert sorted(result.test_ids) == sorted(fold.index)
    with_omics = [p for p in result.test_ids if p not in run.without]
    scores = result.scores.set_index(["missing_share", "metric"])
    counts = result.scores.groupby("missing_share")["n_hidden"].first()
    assert counts.to_dict() == {0.0: 0, 0.5: int(np.floor(len(with_omics) / 2 + 0.5)),
                                1.0: len(with_omics)}  # fmt: skip
    preds = {s: p.set_index("patient_id") for s, p in result.predictions.groupby("missing_share")}

    # 0 % hidden is the run itself: same predictions, same metrics
    np.testing.assert_allclose(preds[0.0].loc[fold.index, "risk"], fold["risk"], rtol=1e-6)
    run_metrics = pd.read_csv(run.out / "metrics.csv")
    c_run = run_metrics.query("seed == 0 and fold == 0 and metric == 'c_index'")["value"].item()
    assert scores.loc[(0.0, "c_index"), "value"] == pytest.approx(c_run, abs=1e-12)

    # 100 % hidden: the model's rule for missing omics, checked in closed form
    full = preds[1.0].loc[result.test_ids]
    assert not full["omics_present"].any()
    if run.model == "omics_snn":
        assert full["risk"].nunique() == 1
        assert scores.loc[(1.0, "c_index"), "value"] == 0.5
    else:
        slide = _slide_path_risks(load_model_folder(run.fold0), cohort, result.test_ids)
        np.testing.assert_allclose(full["risk"], slide, rtol=1e-6, atol=1e-7)
        # ... and omics did matter when shown: the closed form is not trivially true
        shown = preds[0.0].loc[with_omics, "risk"].to_numpy()
        assert np.abs(shown - full.loc[with_omics, "risk"].to_numpy()).max() > 1e-6

    # 50 %: each patient is predicted alone, so hidden ones match 100 %, the others 0 %
    half = preds[0.5]
    hidden = half.index[half["omics_hidden"]]
    shown = half.index[~half["omics_hidden"]]
    np.testing.assert_allclose(half.loc[hidden, "risk"], preds[1.0].loc[hidden, "risk"], rtol=1e-6)
    np.testing.assert_allclose(half.loc[shown, "risk"], preds[0.0].loc[shown, "risk"], rtol=1e-6)
    assert set(hidden) == set(hidden_patients(with_omics, 0.5, 3))


@pytest.mark.parametrize("run", ["omics_snn"], indirect=True)
def test_bad_requests_and_slide_only_models_are_refused(
    run: Run, tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort)
    omics = load_omics(run.omics, run.groups)
    with pytest.raises(ConfigError, match="no test patient"):
        missing_omics_evaluation(run.fold0, cohort, omics, test_ids=[])
    with pytest.raises(ConfigError, match="shares"):
        missing_omics_evaluation(run.fold0, cohort, omics, shares=(0.0, 1.5))
    slide_only = tmp_path / "abmil"
    result = _cli(
        "train", "--cohort", tiny_cohort / "cohort.csv", "--features", tiny_cohort / "features",
        "--model", "abmil", "--folds", 2, "--epochs", 1, "--no-progress", "--out", slide_only,
        "--model-arg", "hidden_dim=8", "--model-arg", "attn_dim=4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    abmil_fold = slide_only / "folds" / "seed0-fold0" / "model"
    with pytest.raises(ConfigError, match="does not read omics at test time"):
        missing_omics_evaluation(abmil_fold, cohort, omics)
    # a slide-only model predicts without a table, and refuses one it would not read
    base = ["predict", abmil_fold, "--cohort", tiny_cohort / "cohort.csv", "--features",
            tiny_cohort / "features"]  # fmt: skip
    plain = _cli(*base, "--out", tmp_path / "p1", "--no-embeddings")
    assert plain.exit_code == 0, plain.output
    given = _cli(*base, "--out", tmp_path / "p2", "--omics", run.omics)
    assert given.exit_code != 0 and "does not read it when predicting" in given.output


def test_classification_with_test_omics(tiny_cohort: Path, tmp_path: Path) -> None:
    from oncoslide.training import cross_validate, make_config

    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features", label_cols=["msi"])
    omics = load_omics(tiny_cohort / "omics.csv", tiny_cohort / "gene_groups.gmt")
    config = make_config(
        task="msi", model="mome", epochs=2, folds=2, batch_size=4, n_boot=0, progress=False,
        model_kwargs={"hidden_dim": 16, "attn_dim": 8, "omics_dim": 16},
    )  # fmt: skip
    run = cross_validate(cohort, config, tmp_path / "run", side={"omics": omics})
    probs = [c for c in run.predictions.columns if c.startswith("prob_")]
    np.testing.assert_allclose(run.predictions[probs].sum(axis=1), 1.0, atol=1e-6)
    result = missing_omics_evaluation(
        tmp_path / "run" / "folds" / "seed0-fold0" / "model", cohort, omics, shares=(0.0, 1.0)
    )
    assert set(result.scores["metric"]) == {"auc", "balanced_accuracy"}
    assert np.isfinite(result.scores["value"]).all()
