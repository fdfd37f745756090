"""G-HANet and PathLUPI through the one training path: omics in training steps only, the
fold's gene selection on its training part, slide-only predictions and saved models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.omics import Omics, load_omics
from oncoslide.cohort.splits import fold_parts, make_splits
from oncoslide.cohort.table import load_cohort
from oncoslide.features.cache import FeatureCache
from oncoslide.models.genomic import GHANet, PathLUPI
from oncoslide.training import make_config
from oncoslide.training.cv import train_fold
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.side_inputs import welch_selection
from oncoslide.training.tasks import fit_fold_task, resolve_task

runner = CliRunner()
SMALL = {"hidden_dim": 16, "heads": 2, "dropout": 0.0}
FAST = dict(epochs=2, folds=3, batch_size=4, n_boot=0, progress=False, model_kwargs=SMALL)


# ------------------------------------------------------------------------ gene selection


def _planted_omics(
    ids: list[str], time: np.ndarray, event: np.ndarray, where: set[str], seed: int = 0
) -> Omics:
    """20 noise genes, 'signal' (high in early deaths everywhere) and 'planted' (high in early
    deaths among ``where`` only, noise elsewhere)."""
    rng = np.random.default_rng(seed)
    early = event.astype(bool) & (time <= np.median(time[event.astype(bool)]))
    values = rng.normal(size=(len(ids), 22))
    values[:, 0] += 2.5 * early
    inside = np.array([p in where for p in ids])
    values[:, 1] += 4.0 * (early & inside)
    genes = ["signal", "planted", *(f"noise{i}" for i in range(20))]
    frame = pd.DataFrame(values, index=pd.Index(ids, name="patient_id"), columns=genes)
    return Omics(values=frame.sort_index(), groups={})


def test_a_gene_separating_risk_only_in_the_test_part_is_never_selected(
    tiny_cohort: Path,
) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    ids = sorted(cohort.patient_ids)
    y = cohort.survival(ids)
    splits = make_splits(ids, n_folds=4, seeds=[0, 1], val_fraction=0.0)
    config = make_config(task="survival", model="ghanet", folds=4, val_fraction=0.0,
                         checkpoint="last", omics_min_genes=1)  # fmt: skip
    task = resolve_task(cohort, config)
    for (seed, fold), _ in splits.groupby(["seed", "fold"]):
        parts = fold_parts(splits, int(seed), int(fold))
        in_test = _planted_omics(ids, y["time"], y["event"], set(parts["test"]))
        ftask = fit_fold_task(task, config, cohort, parts["train"], side={"omics": in_test})
        kept = ftask.side_scalers["omics"].columns
        assert "planted" not in kept and "signal" in kept, (seed, fold, kept)
        # the same gene planted in the training part is found: the check can fail
        in_train = _planted_omics(ids, y["time"], y["event"], set(parts["train"]))
        ftask = fit_fold_task(task, config, cohort, parts["train"], side={"omics": in_train})
        assert "planted" in ftask.side_scalers["omics"].columns


def test_welch_selection_matches_scipy_and_keeps_a_floor() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    ids = [f"p{i:02d}" for i in range(40)]
    time = rng.uniform(1, 100, 40)
    event = rng.random(40) < 0.7
    omics = _planted_omics(ids, time, event, set(ids))
    kept, p = welch_selection(omics, ids, survival=(time, event), p_threshold=0.05, min_genes=1)
    cut = np.median(time[event])
    x = omics.values.loc[ids].to_numpy()
    high, low = x[event & (time <= cut)], x[time > cut]
    expected = stats.ttest_ind(high, low, equal_var=False).pvalue
    np.testing.assert_allclose(p, expected)
    assert kept == [g for g, q in zip(omics.genes, expected, strict=True) if q < 0.05]
    floor, _ = welch_selection(omics, ids, survival=(time, event), p_threshold=1e-12, min_genes=5)
    assert len(floor) == 5 and floor[0] in ("signal", "planted")
    labels = np.where(event, "a", "b")
    by_class, _ = welch_selection(omics, ids, labels=labels, min_genes=1)
    assert set(by_class) <= set(omics.genes)


# ------------------------------------------------------------------ training-only privacy


@pytest.mark.parametrize("model", ["ghanet", "pathlupi"])
def test_omics_reach_training_steps_only(
    model: str, tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(task="survival", model=model, **FAST)
    task = resolve_task(cohort, config)
    splits = make_splits(cohort.patient_ids, n_folds=3, val_fraction=0.25)
    table = pd.read_csv(tiny_cohort / "omics.csv", dtype={"patient_id": str})
    genes = [c for c in table.columns if c != "patient_id"]
    parts = fold_parts(splits, 0, 1)
    held = table["patient_id"].isin(parts["val"] + parts["test"])
    table.loc[held, genes] = 1.0e6  # sentinels: any of these in a loss would show
    seen: list[torch.Tensor] = []
    cls = GHANet if model == "ghanet" else PathLUPI
    method = "_reconstruction" if model == "ghanet" else "_anchor"
    original = getattr(cls, method)

    def spy(self, tokens, side):  # type: ignore[no-untyped-def]
        seen.append(side["omics"].detach().clone())
        return original(self, tokens, side)

    monkeypatch.setattr(cls, method, spy)
    outcome = train_fold(
        cohort, task, config, splits, 0, 1, tmp_path / "f", FeatureCache(),
        side={"omics": load_omics(table, tiny_cohort / "gene_groups.gmt")},
    )  # fmt: skip
    assert seen and float(torch.cat(seen).abs().max()) < 50
    assert len(torch.cat(seen)) == outcome.info["epochs_run"] * len(parts["train"])
    history = pd.DataFrame(outcome.history)
    aux = "train_aux_recon" if model == "ghanet" else "train_aux_anchor"
    assert np.isfinite(history[aux]).all()
    scaler = outcome.fold_task.side_scalers["omics"]
    assert scaler.selection == ("welch" if model == "ghanet" else "none")


# ------------------------------------------------------------------------- the CLI path


@pytest.mark.parametrize("model", ["ghanet", "pathlupi"])
def test_train_and_predict_through_the_cli(model: str, tiny_cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "train", "--cohort", str(tiny_cohort / "cohort.csv"), "--features",
        str(tiny_cohort / "features"), "--model", model, "--omics",
        str(tiny_cohort / "omics.csv"), "--gene-groups", str(tiny_cohort / "gene_groups.gmt"),
        "--folds", "3", "--epochs", "2", "--no-progress", "--out", str(run),
        "--model-arg", "hidden_dim=16", "--model-arg", "heads=2",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    preds = pd.read_parquet(run / "predictions.parquet")
    assert len(preds) == 40 and np.isfinite(preds["risk"]).all()
    fold_model = run / "folds" / "seed0-fold0" / "model"
    spec = json.loads((fold_model / "model.json").read_text())["model"]
    layout = spec["kwargs"]["side_layout"]["omics"]
    assert layout["n_columns"] >= 1 and set(layout["groups"]) >= {"oncogenes"}
    trained = load_model_folder(fold_model)  # rebuilt with the fold's layout, no omics given
    assert trained.model.embed_dim > 0
    out = tmp_path / "pred"
    predicted = runner.invoke(
        app,
        ["predict", str(fold_model), "--cohort", str(tiny_cohort / "cohort.csv"),
         "--features", str(tiny_cohort / "features"), "--out", str(out)],
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    again = pd.read_parquet(next(out.glob("predictions.*")))
    test = preds[(preds["seed"] == 0) & (preds["fold"] == 0)].set_index("patient_id")["risk"]
    np.testing.assert_allclose(
        again.set_index("patient_id").loc[test.index, "risk"], test, rtol=1e-5, atol=1e-6
    )


def test_classification_with_training_only_omics(tiny_cohort: Path, tmp_path: Path) -> None:
    from oncoslide.training import cross_validate

    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features", label_cols=["msi"])
    omics = load_omics(tiny_cohort / "omics.csv", tiny_cohort / "gene_groups.gmt")
    run = cross_validate(
        cohort,
        make_config(task="msi", model="ghanet", **{**FAST, "folds": 2}),
        tmp_path / "run",
        side={"omics": omics},
    )
    probs = [c for c in run.predictions.columns if c.startswith("prob_")]
    assert len(probs) == 2
    np.testing.assert_allclose(run.predictions[probs].sum(axis=1), 1.0, atol=1e-6)
    assert np.isfinite(run.summary.set_index("metric").loc["auc", "mean"])
