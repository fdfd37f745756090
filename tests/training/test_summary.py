"""The run summary's bootstrap intervals on fixed predictions written as fold folders.

No training here: the fold folders (eval.npz, predictions.parquet, metrics.csv) are written
directly, as cv.py's _write_fold does, so the interval can be checked against predictions
chosen by the test and against an independent patient bootstrap (lifelines' concordance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index

from oncoslide.errors import ConfigError
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training.run_folder import RunFolder
from oncoslide.training.summary import EXPENSIVE, summarise_run
from oncoslide.training.tasks import SURVIVAL_METRICS, TaskSpec

SURVIVAL = TaskSpec("survival", "survival")
N_FOLDS = 4


def _cohort(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Patients with a survival outcome driven by a latent x; ids in no particular order."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t, c = rng.exponential(np.exp(-x)), rng.exponential(1.5, size=n)
    ids = [f"P{i:03d}" for i in rng.permutation(n)]
    return pd.DataFrame({"patient_id": ids, "x": x, "time": np.minimum(t, c), "event": t <= c})


def _write_fold(
    out: Path, seed: int, fold: int, test: pd.DataFrame, fit: pd.DataFrame, *, grid: bool
) -> None:
    """One fold folder as cv._write_fold leaves it: rows of every file in test-patient order."""
    fdir = RunFolder(out).fold(seed, fold).path
    fdir.mkdir(parents=True)
    time, event, risk = (test[k].to_numpy() for k in ("time", "event", "risk"))
    if grid:
        lo, hi = np.quantile(test["time"], [0.2, 0.7])
        times = np.linspace(lo, hi, 5)
    else:
        times = np.empty(0)  # the IPCW metrics are then undefined: Harrell's C alone is used
    np.savez(
        fdir / "eval.npz",
        test_time=time,
        test_event=event,
        fit_time=fit["time"].to_numpy(),
        fit_event=fit["event"].to_numpy(),
        risk=risk,
        grid=times,
    )
    preds = pd.DataFrame({"patient_id": test["patient_id"], "seed": seed, "fold": fold})
    preds.assign(risk=risk, time=time, event=event.astype(int)).to_parquet(
        fdir / "predictions.parquet", index=False
    )
    c = concordance_index_censored(event, time, risk).cindex
    values = {m: (c if m == "c_index" else np.nan) for m in SURVIVAL_METRICS}
    rows = [{"seed": seed, "fold": fold, "metric": m, "value": v} for m, v in values.items()]
    pd.DataFrame(rows).to_csv(fdir / "metrics.csv", index=False)


def _write_run(
    out: Path,
    cohort: pd.DataFrame,
    fold_of: dict[int, np.ndarray],
    risk_of: dict[int, np.ndarray],
    *,
    grid: bool = False,
    order_seed: int | None = None,
) -> None:
    """A run folder: per seed a fold index and a risk per patient (cohort row order)."""
    rng = np.random.default_rng(order_seed)
    for seed, folds in fold_of.items():
        frame = cohort.assign(risk=risk_of[seed])
        for k in range(N_FOLDS):
            test, fit = frame.loc[folds == k], frame.loc[folds != k]
            if order_seed is not None:  # rows of the fold files in another order
                test = test.iloc[rng.permutation(len(test))]
            _write_fold(out, seed, k, test, fit, grid=grid)


def _partition(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).permutation(np.arange(n) % N_FOLDS)


def _summary(out: Path, seeds: list[int], n_boot: int, seed: int = 0) -> pd.DataFrame:
    table = summarise_run(out, SURVIVAL, seeds, list(range(N_FOLDS)), n_boot=n_boot, seed=seed)
    return table.set_index("metric")


def _width(row: pd.Series) -> float:
    return float(row["ci_upper"] - row["ci_lower"])


def test_repeating_the_same_predictions_does_not_narrow_the_interval(tmp_path: Path) -> None:
    # R = 5 seeds that all hold the R = 1 predictions: no new patient, no new model. Drawing
    # the test patients independently per seed would shrink the interval about sqrt(5)-fold.
    cohort = _cohort()
    risk = cohort["x"].to_numpy() + np.random.default_rng(1).normal(size=len(cohort))
    folds = _partition(len(cohort), 0)
    _write_run(tmp_path / "r1", cohort, {0: folds}, {0: risk})
    _write_run(
        tmp_path / "r5", cohort, dict.fromkeys(range(5), folds), dict.fromkeys(range(5), risk)
    )
    one = _summary(tmp_path / "r1", [0], n_boot=1000).loc["c_index"]
    five = _summary(tmp_path / "r5", list(range(5)), n_boot=1000).loc["c_index"]
    assert five["mean"] == pytest.approx(one["mean"])
    assert five["n_folds"] == 5 * one["n_folds"] == 5 * N_FOLDS
    assert _width(one) > 0.05
    ratio = _width(five) / _width(one)
    assert ratio >= 0.9, f"R=5 interval is {ratio:.2f} x the R=1 interval"
    assert five["ci_lower"] <= five["mean"] <= five["ci_upper"]


def test_repeated_cv_with_new_partitions_keeps_the_patient_level_width(tmp_path: Path) -> None:
    # Realistic repeats: every seed partitions the same patients anew and its models differ a
    # little. The seeds' fold metrics then share their patients, so averaging over 5 seeds
    # removes little of the patient-sampling uncertainty the interval is about.
    cohort = _cohort(seed=3)
    rng = np.random.default_rng(4)
    signal = cohort["x"].to_numpy() + rng.normal(size=len(cohort))
    fold_of = {s: _partition(len(cohort), s) for s in range(5)}
    risk_of = {s: signal + 0.3 * rng.normal(size=len(cohort)) for s in range(5)}
    _write_run(tmp_path / "r1", cohort, {0: fold_of[0]}, {0: risk_of[0]})
    _write_run(tmp_path / "r5", cohort, fold_of, risk_of)
    one = _summary(tmp_path / "r1", [0], n_boot=1000).loc["c_index"]
    five = _summary(tmp_path / "r5", list(range(5)), n_boot=1000).loc["c_index"]
    # Averaging over partitions does remove the noise of which pairs share a fold (here the
    # ratio is about 0.83-0.95 over bootstrap seeds), but nothing like sqrt(5): independent
    # draws per seed give about 0.44.
    ratio = _width(five) / _width(one)
    assert 0.7 <= ratio <= 1.1, f"R=5 interval is {ratio:.2f} x the R=1 interval"


def test_one_seed_interval_is_the_patient_bootstrap_of_the_fold_mean(tmp_path: Path) -> None:
    # Oracle: draw patients with replacement, score every fold on its drawn patients (a patient
    # drawn twice counts twice) with lifelines, average over folds, take percentiles.
    cohort = _cohort(n=100, seed=5)
    risk = cohort["x"].to_numpy() + np.random.default_rng(6).normal(size=len(cohort))
    folds = _partition(len(cohort), 0)
    _write_run(tmp_path / "run", cohort, {0: folds}, {0: risk})
    row = _summary(tmp_path / "run", [0], n_boot=2000, seed=11).loc["c_index"]

    time, event = cohort["time"].to_numpy(), cohort["event"].to_numpy()
    rng = np.random.default_rng(12)
    means = []
    for _ in range(2000):
        drawn = rng.integers(0, len(cohort), size=len(cohort))
        per_fold = []
        for k in range(N_FOLDS):
            idx = drawn[folds[drawn] == k]
            per_fold.append(concordance_index(time[idx], -risk[idx], event[idx]))
        means.append(np.mean(per_fold))
    lower, upper = np.quantile(means, [0.025, 0.975])
    width = upper - lower
    assert row["n_boot"] == 2000
    assert row["ci_lower"] == pytest.approx(lower, abs=0.12 * width)
    assert row["ci_upper"] == pytest.approx(upper, abs=0.12 * width)
    assert _width(row) == pytest.approx(width, rel=0.15)


def test_patients_are_matched_by_id_not_by_row_position(tmp_path: Path) -> None:
    # A second seed with the same folds and risks, its fold files written in another row order:
    # shared patient draws give every replicate the same two fold means, so the interval is
    # exactly the one-seed interval. Any mix-up of ids and rows would break the equality.
    cohort = _cohort(n=80, seed=7)
    risk = cohort["x"].to_numpy() + np.random.default_rng(8).normal(size=len(cohort))
    folds = _partition(len(cohort), 0)
    _write_run(tmp_path / "r1", cohort, {0: folds}, {0: risk})
    _write_run(tmp_path / "r2", cohort, {0: folds}, {0: risk})
    _write_run(tmp_path / "r2", cohort, {1: folds}, {1: risk}, order_seed=9)
    one = _summary(tmp_path / "r1", [0], n_boot=400, seed=2).loc["c_index"]
    two = _summary(tmp_path / "r2", [0, 1], n_boot=400, seed=2).loc["c_index"]
    assert (two["ci_lower"], two["ci_upper"]) == pytest.approx(
        (one["ci_lower"], one["ci_upper"]), abs=1e-12
    )


def test_ipcw_metrics_keep_their_replicate_cap_and_shared_draws(tmp_path: Path) -> None:
    cohort = _cohort(n=80, seed=13)
    risk = cohort["x"].to_numpy() + np.random.default_rng(14).normal(size=len(cohort))
    folds = _partition(len(cohort), 0)
    _write_run(tmp_path / "r1", cohort, {0: folds}, {0: risk}, grid=True)
    _write_run(
        tmp_path / "r3",
        cohort,
        dict.fromkeys(range(3), folds),
        dict.fromkeys(range(3), risk),
        grid=True,
    )
    one = _summary(tmp_path / "r1", [0], n_boot=300)
    three = _summary(tmp_path / "r3", [0, 1, 2], n_boot=300)
    assert one.loc["c_index", "n_boot"] == 300
    for metric in ("c_index_uno", "td_auc"):
        # the replicate cap holds; replicates where the censoring support fails are skipped
        assert 0.5 * EXPENSIVE[metric] <= one.loc[metric, "n_boot"] <= EXPENSIVE[metric]
        assert np.isfinite(one.loc[metric, ["ci_lower", "ci_upper"]].astype(float)).all()
        assert _width(three.loc[metric]) >= 0.9 * _width(one.loc[metric]), metric
    # ibs needs predicted survival curves, which these folds do not have
    assert one.loc["ibs", "n_boot"] == 0 and np.isnan(one.loc["ibs", "ci_lower"])


def test_fold_files_that_disagree_on_the_patients_are_refused(tmp_path: Path) -> None:
    cohort = _cohort(n=40, seed=15)
    _write_run(tmp_path / "run", cohort, {0: _partition(40, 0)}, {0: cohort["x"].to_numpy()})
    path = RunFolder(tmp_path / "run").fold(0, 2).path / "predictions.parquet"
    pd.read_parquet(path).iloc[1:].to_parquet(path, index=False)
    with pytest.raises(ConfigError, match="seed0-fold2"):
        _summary(tmp_path / "run", [0], n_boot=20)


def test_patient_ids_stored_in_eval_npz_are_used_where_present(tmp_path: Path) -> None:
    cohort = _cohort(n=60, seed=16)
    risk = cohort["x"].to_numpy() + np.random.default_rng(17).normal(size=len(cohort))
    folds = _partition(len(cohort), 0)
    _write_run(tmp_path / "run", cohort, {0: folds, 1: folds}, {0: risk, 1: risk}, order_seed=18)
    before = _summary(tmp_path / "run", [0, 1], n_boot=200).loc["c_index"]
    for seed in (0, 1):
        for k in range(N_FOLDS):
            fdir = RunFolder(tmp_path / "run").fold(seed, k).path
            with np.load(fdir / "eval.npz") as z:
                payload = {key: z[key] for key in z.files}
            ids = pd.read_parquet(fdir / "predictions.parquet")["patient_id"].to_numpy(dtype=str)
            np.savez(fdir / "eval.npz", patient_id=ids, **payload)
            (fdir / "predictions.parquet").unlink()
    after = _summary(tmp_path / "run", [0, 1], n_boot=200).loc["c_index"]
    assert (after["ci_lower"], after["ci_upper"]) == (before["ci_lower"], before["ci_upper"])
