"""Cross-validation runs end to end on a tiny simulated cohort: outputs, leakage, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncoslide.cohort.splits import audit_splits, fold_parts
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training import cross_validate, make_config
from oncoslide.training.tasks import fit_fold_task, resolve_task

FAST = dict(epochs=2, folds=3, batch_size=4, n_boot=50, progress=False)


def _cohort(root: Path, table: str = "cohort.csv", labels: tuple[str, ...] = ("msi", "subtype")):
    return load_cohort(root / table, root / "features", label_cols=labels)


@pytest.mark.parametrize("loss", ["cox", "nll"])
def test_survival_run_writes_the_contracted_outputs(
    tiny_cohort: Path, tmp_path: Path, loss: str
) -> None:
    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", model="abmil", survival_loss=loss, **FAST)
    result = cross_validate(cohort, cfg, tmp_path / "run")
    out = tmp_path / "run"
    for name in ("splits.csv", "predictions.parquet", "metrics.csv", "summary.csv", "config.json"):
        assert (out / name).is_file(), name

    splits = pd.read_csv(out / "splits.csv", dtype={"patient_id": str})
    assert list(splits.columns) == ["patient_id", "seed", "fold", "part"]
    audit_splits(splits, patient_ids=cohort.patient_ids)

    preds = pd.read_parquet(out / "predictions.parquet")
    assert {"patient_id", "seed", "fold", "risk", "time", "event"} <= set(preds.columns)
    # one row per test patient per fold, every patient tested exactly once per seed
    assert sorted(preds["patient_id"]) == sorted(cohort.patient_ids)
    for (seed, fold), rows in preds.groupby(["seed", "fold"]):
        assert sorted(rows["patient_id"]) == fold_parts(splits, seed, fold)["test"]

    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["seed", "fold", "metric", "value"]
    assert set(metrics["metric"]) == {"c_index", "c_index_uno", "td_auc", "ibs"}
    assert len(metrics) == 3 * 4
    # the stored C-index is Harrell's C of the stored predictions, fold by fold
    for (seed, fold), rows in preds.groupby(["seed", "fold"]):
        expected = concordance_index_censored(
            rows["event"].to_numpy(bool), rows["time"].to_numpy(), rows["risk"].to_numpy()
        ).cindex
        sel = (
            (metrics["seed"] == seed) & (metrics["fold"] == fold) & (metrics["metric"] == "c_index")
        )
        got = metrics.loc[sel, "value"]
        assert got.item() == pytest.approx(expected, abs=1e-12)
    assert set(result.summary["metric"]) == set(metrics["metric"])
    c = result.summary.set_index("metric").loc["c_index"]
    assert c["ci_lower"] <= c["mean"] <= c["ci_upper"]


def test_classification_run_writes_class_probabilities(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="subtype", model="mean", **FAST)
    result = cross_validate(cohort, cfg, tmp_path / "run")
    preds = result.predictions
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    assert prob_cols == [f"prob_{c}" for c in result.task.classes]
    np.testing.assert_allclose(preds[prob_cols].sum(axis=1), 1.0, atol=1e-9)
    assert set(result.metrics["metric"]) == {"auc", "balanced_accuracy"}
    assert result.task.kind == "multiclass"


def test_same_seed_gives_identical_metrics(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", model="abmil", **FAST)
    cross_validate(cohort, cfg, tmp_path / "a")
    cross_validate(cohort, cfg, tmp_path / "b")
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == (
        tmp_path / "b" / "metrics.csv"
    ).read_bytes()
    other = make_config(task="survival", model="abmil", **{**FAST, "seed": 1})
    cross_validate(cohort, other, tmp_path / "c")
    assert (tmp_path / "a" / "metrics.csv").read_bytes() != (
        tmp_path / "c" / "metrics.csv"
    ).read_bytes()


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oncoslide.training.cv as cv

    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", model="abmil", **FAST)
    cross_validate(cohort, cfg, tmp_path / "whole")

    real_run_fold = cv._run_fold
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(args[5])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_fold(*args, **kwargs)

    monkeypatch.setattr(cv, "_run_fold", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(cohort, cfg, tmp_path / "resumed")
    done = sorted(p.parent.name for p in (tmp_path / "resumed").glob("folds/*/done.json"))
    assert done == ["seed0-fold0", "seed0-fold1"]
    assert not (tmp_path / "resumed" / "metrics.csv").exists()

    monkeypatch.setattr(cv, "_run_fold", real_run_fold)
    resumed_calls = []
    monkeypatch.setattr(
        cv, "_run_fold", lambda *a, **k: (resumed_calls.append(a[5]), real_run_fold(*a, **k))[1]
    )
    cross_validate(cohort, cfg, tmp_path / "resumed")
    assert resumed_calls == [2]  # only the missing fold ran
    # run.log continues across the interruption: two invocations, each fold's lines once
    log = (tmp_path / "resumed" / "run.log").read_text()
    assert log.count("==== cross-validation") == 2 and "interrupted" in log
    assert "2 fold(s) already done" in log
    for fold in range(3):
        assert log.count(f"seed 0 fold {fold} epoch 1/") == 1
        assert log.count(f"seed 0 fold {fold} done") == 1
    assert (tmp_path / "resumed" / "metrics.csv").read_bytes() == (
        tmp_path / "whole" / "metrics.csv"
    ).read_bytes()


def test_another_run_in_the_same_folder_is_refused(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = _cohort(tiny_cohort)
    cross_validate(cohort, make_config(task="survival", **FAST), tmp_path / "run")
    changed = make_config(task="survival", **{**FAST, "epochs": 3})
    # the message names what differs, stored value first, and the ways out
    with pytest.raises(
        ConfigError,
        match=r"holds another run with other settings \(stored -> requested: epochs 2 -> 3\); "
        r"choose a new --out or pass --overwrite",
    ):
        cross_validate(cohort, changed, tmp_path / "run")
    result = cross_validate(cohort, changed, tmp_path / "run", overwrite=True)
    assert result.config.epochs == 3


def test_each_feature_file_is_read_once_across_folds_and_seeds(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort)
    cache = FeatureCache()
    cfg = make_config(task="survival", **{**FAST, "repeats": 2})
    cross_validate(cohort, cfg, tmp_path / "run", cache=cache)
    cross_validate(cohort, make_config(task="msi", **FAST), tmp_path / "run2", cache=cache)
    assert cache.stats.reads == len(cohort.slides)
    cache.close()


def test_fold_preprocessing_is_fitted_on_the_training_part_only(tiny_cohort: Path) -> None:
    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", survival_loss="nll", n_bins=4, **FAST)
    task = resolve_task(cohort, cfg)
    ids = cohort.patient_ids
    train, other = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    y_train = cohort.survival(train)
    bins = fit_fold_task(task, cfg, cohort, train).bins
    assert bins is not None
    expected = np.quantile(y_train["time"][y_train["event"]], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(bins.edges[1:-1], expected)
    # fitting on other patients gives other edges: nothing leaks in from outside the part
    other_bins = fit_fold_task(task, cfg, cohort, other).bins
    assert other_bins is not None and not np.allclose(other_bins.edges[1:-1], expected)

    cls = make_config(task="msi", **FAST)
    msi = resolve_task(cohort, cls)
    weights = fit_fold_task(msi, cls, cohort, train).class_weight
    labels = cohort.labels("msi", train).astype(int)
    counts = np.bincount(labels, minlength=2)
    np.testing.assert_allclose(weights.numpy(), len(labels) / (2 * counts), rtol=1e-6)


def test_unknown_task_and_too_few_patients_are_config_errors(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort)
    with pytest.raises(ConfigError, match="neither 'survival' nor a column"):
        cross_validate(cohort, make_config(task="grade", **FAST), tmp_path / "x")
    with pytest.raises(ConfigError, match="too few"):
        cross_validate(
            cohort.subset(cohort.patient_ids[:5]),
            make_config(task="survival", **FAST),
            tmp_path / "y",
        )
    unloaded = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    with pytest.raises(ConfigError, match="label_cols"):
        cross_validate(unloaded, make_config(task="msi", **FAST), tmp_path / "z")


def test_last_checkpoint_without_validation_part(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", val_fraction=0.0, checkpoint="last", **FAST)
    result = cross_validate(cohort, cfg, tmp_path / "run")
    assert set(result.splits["part"]) == {"train", "test"}
    fold = tmp_path / "run" / "folds" / "seed0-fold0"
    info = json.loads((fold / "model" / "model.json").read_text())["info"]
    assert info["n_val"] == 0 and info["chosen_epoch"] == info["epochs_run"] - 1  # the last epoch
    assert not (fold / "checkpoints").exists()  # the model folder replaces Lightning's checkpoint
    with pytest.raises(ConfigError, match="needs a validation part"):
        make_config(task="survival", val_fraction=0.0, checkpoint="best")


def test_site_preserving_run_keeps_sites_out_of_training(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", site_preserving=True, val_fraction=0.5, **FAST)
    result = cross_validate(cohort, cfg, tmp_path / "run")
    site = cohort.patients["site"]
    for (seed, fold), _ in result.splits.groupby(["seed", "fold"]):
        parts = fold_parts(result.splits, seed, fold)
        test_sites = set(site.loc[parts["test"]])
        assert not test_sites & set(site.loc[parts["train"] + parts["val"]])
        assert not set(site.loc[parts["val"]]) & set(site.loc[parts["train"]])


def test_a_resumed_run_re_audits_its_splits(tiny_cohort: Path, tmp_path: Path) -> None:
    """An edited splits.csv that mixes sites is refused when the run resumes."""
    from oncoslide.errors import SplitLeakageError

    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", site_preserving=True, val_fraction=0.5, **FAST)
    result = cross_validate(cohort, cfg, tmp_path / "run")
    splits = result.splits.copy()
    site = cohort.patients["site"]
    # move one validation patient of fold 0 into training, where its site does not belong
    parts = fold_parts(splits, 0, 0)
    val_sites = site.loc[parts["val"]]
    moved = next(p for p in parts["val"] if (val_sites == site[p]).sum() >= 2)
    row = (splits["seed"] == 0) & (splits["fold"] == 0) & (splits["patient_id"] == moved)
    splits.loc[row, "part"] = "train"
    assert site[moved] not in set(site.loc[parts["train"]])  # the tampering mixes sites
    splits.to_csv(tmp_path / "run" / "splits.csv", index=False)
    (tmp_path / "run" / "folds" / "seed0-fold0" / "done.json").unlink()  # force a resume
    with pytest.raises(SplitLeakageError, match="training and validation"):
        cross_validate(cohort, cfg, tmp_path / "run")
