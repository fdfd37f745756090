"""Runs are keyed by their data: the same command on edited outcomes or on other feature files
never returns (or resumes into) the earlier run's results; degenerate folds are refused first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError, DataChangedError
from oncoslide.training import cross_validate, make_config
from oncoslide.training.fit_all import fit_all

runner = CliRunner()
FAST = dict(task="survival", folds=2, epochs=1, n_boot=0, progress=False, max_patches=32)


def _args(table: Path, features: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--cohort", str(table), "--features", str(features), "--out", str(out),
        "--folds", "2", "--epochs", "1", "--no-progress", *extra,
    ]  # fmt: skip


def _edited_table(tiny_cohort: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the cohort table with one patient's outcome changed."""
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    pid = str(table.loc[0, "patient_id"])
    table.loc[table["patient_id"] == pid, "time"] = table.loc[0, "time"] + 100.0
    out = tmp_path / "edited.csv"
    table.to_csv(out, index=False)
    return out, pid


def test_edited_outcomes_are_refused_by_name_and_overwrite_starts_fresh(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    features, run = tiny_cohort / "features", tmp_path / "run"
    first = runner.invoke(app, _args(tiny_cohort / "cohort.csv", features, run))
    assert first.exit_code == 0, first.output
    before = (run / "predictions.parquet").read_bytes()
    edited, pid = _edited_table(tiny_cohort, tmp_path)

    again = runner.invoke(app, _args(edited, features, run))
    assert again.exit_code == 2, again.output
    text = " ".join(again.output.split())
    assert "other data" in text and pid in text and "--overwrite" in text
    assert "Traceback" not in again.output
    assert (run / "predictions.parquet").read_bytes() == before  # nothing replaced

    fresh = runner.invoke(app, [*_args(edited, features, run), "--overwrite"])
    assert fresh.exit_code == 0, fresh.output
    times = pd.read_parquet(run / "predictions.parquet").set_index("patient_id")["time"]
    assert times.loc[pid] == pd.read_csv(edited).set_index("patient_id").loc[pid, "time"]
    # the same command on the same (edited) data now resumes
    resumed = runner.invoke(app, _args(edited, features, run))
    assert resumed.exit_code == 0, resumed.output


def test_other_feature_files_are_refused_naming_the_slides(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(**FAST)
    cross_validate(cohort, config, tmp_path / "run")
    other = tmp_path / "other-features"
    shutil.copytree(tiny_cohort / "features", other)
    slide = str(cohort.slides["slide_id"].iloc[3])
    with h5py.File(other / f"{slide}.h5", "r+") as f:
        f["features"][0] = f["features"][0][...] + 1.0  # same size, other content
    moved = load_cohort(tiny_cohort / "cohort.csv", other)
    with pytest.raises(DataChangedError, match=rf"feature files of 1 slide changed.*{slide}"):
        cross_validate(moved, config, tmp_path / "run")
    # a byte-identical copy elsewhere is the same data: the run resumes
    same = tmp_path / "same-features"
    shutil.copytree(tiny_cohort / "features", same)
    result = cross_validate(load_cohort(tiny_cohort / "cohort.csv", same), config, tmp_path / "run")
    assert len(result.predictions) == len(cohort.patient_ids)


def test_a_killed_run_resumed_on_edited_outcomes_is_refused(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(**FAST)
    run = tmp_path / "run"
    cross_validate(cohort, config, run)
    # as if killed during the second fold: its completion marker and the run tables are gone
    (run / "folds" / "seed0-fold1" / "done.json").unlink()
    for name in ("predictions.parquet", "metrics.csv", "summary.csv"):
        (run / name).unlink()
    edited, pid = _edited_table(tiny_cohort, tmp_path)
    with pytest.raises(
        DataChangedError, match=rf"target, site or slide values of 1 patient.*{pid}"
    ):
        cross_validate(load_cohort(edited, tiny_cohort / "features"), config, run)
    assert not (run / "folds" / "seed0-fold1" / "done.json").exists()  # no fold trained


def test_run_folder_records_its_data(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    result = cross_validate(cohort, make_config(**FAST), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    assert set(record["rows"]) == set(result.predictions["patient_id"])
    assert set(record["features"]) == set(cohort.slides["slide_id"])
    payload = json.loads((tmp_path / "run" / "config.json").read_text())
    assert isinstance(payload["data_key"], str) and len(payload["data_key"]) == 16


def test_fit_all_model_folder_is_keyed_by_its_data(tiny_cohort: Path, tmp_path: Path) -> None:
    features, out = tiny_cohort / "features", tmp_path / "model"
    fit = runner.invoke(app, [*_args(tiny_cohort / "cohort.csv", features, out), "--fit-all"])
    assert fit.exit_code == 0, fit.output
    edited, pid = _edited_table(tiny_cohort, tmp_path)
    again = runner.invoke(app, [*_args(edited, features, out), "--fit-all"])
    assert again.exit_code == 2, again.output
    assert pid in " ".join(again.output.split())


# ------------------------------------------------------------------- degenerate folds


def _small_table(tiny_cohort: Path, tmp_path: Path, n: int, events: int) -> Path:
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    keep = table["patient_id"].drop_duplicates().iloc[:n]
    table = table[table["patient_id"].isin(keep)].copy()
    first = table["patient_id"].drop_duplicates().iloc[:events]
    table["event"] = table["patient_id"].isin(first).astype(int)
    out = tmp_path / f"small-{n}-{events}.csv"
    table.to_csv(out, index=False)
    return out


def test_two_events_in_five_folds_are_refused_before_training(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    table = _small_table(tiny_cohort, tmp_path, 10, 2)
    result = runner.invoke(
        app,
        ["train", "--cohort", str(table), "--features", str(tiny_cohort / "features"),
         "--out", str(tmp_path / "run"), "--folds", "5", "--epochs", "1", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "2 events are too few for 5 folds" in text and "--folds 2" in text
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_an_all_censored_cohort_is_refused_before_the_first_fold(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    table = _small_table(tiny_cohort, tmp_path, 20, 0)
    cohort = load_cohort(table, tiny_cohort / "features")
    with pytest.raises(ConfigError, match="all 20 are censored"):
        cross_validate(cohort, make_config(**FAST), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="censored"):
        fit_all(cohort, make_config(**FAST), tmp_path / "model")


def test_a_test_part_without_a_comparable_pair_is_refused(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """Enough events overall, but given splits put every event of fold 1 in training."""
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    ids = sorted(cohort.patient_ids)
    y = cohort.survival(ids)
    censored = [p for p, e in zip(ids, y["event"], strict=True) if not e]
    rest = [p for p in ids if p not in censored[:5]]
    rows = [(p, 0, 0, "test") for p in rest] + [(p, 0, 0, "train") for p in censored[:5]]
    rows += [(p, 0, 1, "test") for p in censored[:5]] + [(p, 0, 1, "train") for p in rest]
    splits = pd.DataFrame(rows, columns=["patient_id", "seed", "fold", "part"])
    with pytest.raises(ConfigError, match=r"seed 0 fold 1 .*no event"):
        cross_validate(cohort, make_config(**FAST), tmp_path / "run", splits=splits)
    assert not (tmp_path / "run" / "splits.csv").exists()


def test_nan_features_are_found_at_load_and_left_out_when_asked(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    features = tmp_path / "features"
    shutil.copytree(tiny_cohort / "features", features)
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    single = table.groupby("patient_id")["slide_id"].transform("size") == 1
    slide, patient = (str(v) for v in table.loc[single, ["slide_id", "patient_id"]].iloc[2])
    with h5py.File(features / f"{slide}.h5", "r+") as f:
        f["features"][2, 0] = np.nan
        f["features"][4, 1] = np.inf
    args = _args(tiny_cohort / "cohort.csv", features, tmp_path / "run")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    text = " ".join(refused.output.split())
    assert slide in text and "2 of" in text and "NaN or infinite" in text
    assert "--skip-bad-features" in text
    assert not (tmp_path / "run").exists()  # found before the run folder is written

    checked = runner.invoke(
        app, ["validate", "--cohort", str(tiny_cohort / "cohort.csv"), "--features", str(features)]
    )
    assert checked.exit_code == 2 and slide in " ".join(checked.output.split())

    skipped = runner.invoke(app, [*args, "--skip-bad-features"])
    assert skipped.exit_code == 0, skipped.output
    used = pd.read_parquet(tmp_path / "run" / "predictions.parquet")["patient_id"]
    assert patient not in set(used)  # a one-slide patient is left out
    assert slide in " ".join(skipped.output.split())
