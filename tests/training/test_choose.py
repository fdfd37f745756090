"""Hyperparameters chosen on each fold's validation part (``choose``): the test part is never
read for the choice, the kept combination is the best recorded one and reproduces a plain run
with its values fixed, bad grids are refused with every problem listed, and a benchmark entry
with a grid runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from oncoslide.cohort.splits import fold_parts
from oncoslide.cohort.table import Cohort, load_cohort
from oncoslide.errors import ConfigError
from oncoslide.training import cross_validate, make_config
from oncoslide.training.choose import combinations, parse_choose
from oncoslide.training.model_folder import load_model_folder

FAST = dict(epochs=2, folds=2, batch_size=4, n_boot=20, progress=False)
GRID = {"dropout": [0.0, 0.5], "lr": [1e-3, 2e-4]}


def _cohort(table: Path, root: Path) -> Cohort:
    return load_cohort(table, root / "features", label_cols=("msi",))


def _fold_dir(run: Path, fold: int) -> Path:
    return run / "folds" / f"seed0-fold{fold}"


def test_scrambled_test_outcomes_leave_choices_and_validation_scores_unchanged(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort / "cohort.csv", tiny_cohort)
    config = make_config(task="survival", model="abmil", choose=GRID, **FAST)
    first = cross_validate(cohort, config, tmp_path / "run")
    choices = pd.read_csv(tmp_path / "run" / "choices.csv")
    assert len(choices) == 2 * 4  # folds x combinations
    assert choices.groupby("fold")["kept"].sum().tolist() == [1, 1]
    # the same grid resumes (nothing left to train); another grid is another run
    done = (_fold_dir(tmp_path / "run", 0) / "done.json").stat().st_mtime_ns
    cross_validate(cohort, config, tmp_path / "run")
    assert (_fold_dir(tmp_path / "run", 0) / "done.json").stat().st_mtime_ns == done
    other = make_config(task="survival", model="abmil", choose={"lr": [1e-3]}, **FAST)
    with pytest.raises(ConfigError, match="holds another run"):
        cross_validate(cohort, other, tmp_path / "run")

    # every outcome of fold 0's test part (all but its training and validation parts) permuted
    test = set(fold_parts(first.splits, 0, 0)["test"])
    table = pd.read_csv(tiny_cohort / "cohort.csv", dtype={"patient_id": str})
    rows = table["patient_id"].isin(test)
    per_patient = table[rows].drop_duplicates("patient_id").set_index("patient_id")
    order = np.random.default_rng(0).permutation(len(per_patient))
    for col in ("time", "event"):
        shuffled = dict(zip(per_patient.index, per_patient[col].to_numpy()[order], strict=True))
        table.loc[rows, col] = table.loc[rows, "patient_id"].map(shuffled)
    assert not table[rows].equals(pd.read_csv(tiny_cohort / "cohort.csv")[rows])
    table.to_csv(tmp_path / "scrambled.csv", index=False)
    scrambled = _cohort(tmp_path / "scrambled.csv", tiny_cohort)
    cross_validate(scrambled, config, tmp_path / "run2", splits=first.splits)  # same parts

    again = pd.read_csv(tmp_path / "run2" / "choices.csv")
    f0 = choices[choices["fold"] == 0].reset_index(drop=True)
    g0 = again[again["fold"] == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(f0, g0)  # values, validation scores, epochs, kept: all equal
    one, two = (
        json.loads((_fold_dir(r, 0) / "done.json").read_text())
        for r in (tmp_path / "run", tmp_path / "run2")
    )
    for key in ("chosen_dropout", "chosen_lr", "choice_index", "choice0_val_loss"):
        assert one[key] == two[key]
    # the kept model is the same: the same risks for the (re-labelled) test patients
    p1, p2 = (
        pd.read_parquet(_fold_dir(r, 0) / "predictions.parquet")
        for r in (tmp_path / "run", tmp_path / "run2")
    )
    np.testing.assert_array_equal(p1["risk"].to_numpy(), p2["risk"].to_numpy())


def test_no_test_outcome_is_read_before_the_kept_model_predicts(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read of outcomes is watched: none touches a test patient until the one kept
    combination predicts the test part (the other combinations never reach it)."""
    from oncoslide.cohort.splits import make_splits
    from oncoslide.cohort.table import Cohort
    from oncoslide.features.cache import FeatureCache
    from oncoslide.training import cv
    from oncoslide.training.tasks import resolve_task

    cohort = _cohort(tiny_cohort / "cohort.csv", tiny_cohort)
    config = make_config(task="survival", model="abmil", choose=GRID, **FAST)
    splits = make_splits(cohort.patient_ids, n_folds=2, seeds=[0], val_fraction=0.3)
    test = set(fold_parts(splits, 0, 0)["test"])
    reads: list[set[str]] = []
    survival = Cohort.survival

    def watched(self: Cohort, patient_ids: Any = None) -> Any:
        reads.append(set(map(str, self.patient_ids if patient_ids is None else patient_ids)))
        return survival(self, patient_ids)

    finishing: list[int] = []
    finish = cv._finish_fold

    def counted(*args: Any, **kwargs: Any) -> Any:
        finishing.append(len(reads))
        return finish(*args, **kwargs)

    monkeypatch.setattr(Cohort, "survival", watched)
    monkeypatch.setattr(cv, "_finish_fold", counted)
    cache = FeatureCache()
    try:
        outcome = cv.train_fold(cohort, resolve_task(cohort, config), config, splits, 0, 0,
                                tmp_path, cache)  # fmt: skip
    finally:
        cache.close()
    assert len(finishing) == 1 and outcome.choices is not None and len(outcome.choices) == 4
    before, after = reads[: finishing[0]], reads[finishing[0] :]
    assert before and not any(ids & test for ids in before)
    assert any(ids & test for ids in after)  # the watch does see the test part's reads


@pytest.mark.parametrize("monitor", ["loss", "metric"])
def test_kept_combination_is_the_best_on_validation_and_equals_a_plain_run(
    tiny_cohort: Path, tmp_path: Path, monitor: str
) -> None:
    cohort = _cohort(tiny_cohort / "cohort.csv", tiny_cohort)
    grid: dict[str, list[Any]] = {"hidden_dim": [8, 32], "lr": [1e-3, 2e-2]}
    settings = dict(FAST, monitor=monitor, val_fraction=0.4)
    config = make_config(task="msi", model="abmil", choose=grid, **settings)
    run = cross_validate(cohort, config, tmp_path / "run")
    choices = pd.read_csv(tmp_path / "run" / "choices.csv")
    combos = combinations(grid)
    # the quantity the checkpoint choice monitors, at each combination's chosen epoch
    key = "val_loss" if monitor == "loss" else "val_score"
    kept_any = set()
    for fold, rows in choices.groupby("fold"):
        rows = rows.sort_values("combination")
        assert list(rows["combination"]) == list(range(len(combos)))
        scores = rows[key].to_numpy() * (1 if monitor == "loss" else -1)
        best = int(rows["combination"].iloc[int(np.argmin(scores))])  # first best wins ties
        assert rows.loc[rows["kept"], "combination"].tolist() == [best]
        kept_any.add(best)
        info = json.loads((_fold_dir(tmp_path / "run", int(fold)) / "done.json").read_text())
        assert info["choice_index"] == best
        for k, v in combos[best].items():
            assert info[f"chosen_{k}"] == v
        for r in rows.itertuples():
            assert info[f"choice{r.combination}_{key}"] == pytest.approx(getattr(r, key))

        # a plain run with the kept values fixed (same seed, same splits) predicts the same
        chosen = combos[best]
        plain_cfg = make_config(
            task="msi", model="abmil", model_kwargs={"hidden_dim": chosen["hidden_dim"]},
            lr=chosen["lr"], **settings,
        )  # fmt: skip
        plain_dir = tmp_path / f"plain{fold}"
        cross_validate(cohort, plain_cfg, plain_dir, splits=run.splits)
        ours = pd.read_parquet(_fold_dir(tmp_path / "run", int(fold)) / "predictions.parquet")
        theirs = pd.read_parquet(_fold_dir(plain_dir, int(fold)) / "predictions.parquet")
        pd.testing.assert_frame_equal(ours, theirs)
        history = pd.read_csv(_fold_dir(plain_dir, int(fold)) / "history.csv")
        kept = rows[rows["kept"]].iloc[0]
        epoch_row = history[history["epoch"] == kept["chosen_epoch"]].iloc[0]
        assert epoch_row[key] == pytest.approx(kept[key])

        # the model folder holds the chosen values: it reloads without the grid
        folder = _fold_dir(tmp_path / "run", int(fold)) / "model"
        trained = load_model_folder(folder)
        assert trained.config.choose == {}
        assert trained.config.model_kwargs["hidden_dim"] == chosen["hidden_dim"]
        assert trained.config.lr == chosen["lr"]
        meta = json.loads((folder / "model.json").read_text())
        assert meta["info"]["choose"] == grid
        assert (
            meta["run_key"] == json.loads((tmp_path / "run" / "config.json").read_text())["run_key"]
        )
    if monitor == "loss":  # the choice is not a tie broken by order in every fold
        assert kept_any != {0}, choices


def test_grid_is_part_of_the_run_key() -> None:
    plain = make_config(task="survival", **FAST)
    a = make_config(task="survival", choose={"lr": [1e-3, 2e-4]}, **FAST)
    b = make_config(task="survival", choose={"lr": [2e-4, 1e-3]}, **FAST)  # order breaks ties
    assert len({plain.run_key(), a.run_key(), b.run_key()}) == 3
    # YAML 1.1 reads 1e-3 as a string: the grid holds numbers, the key does not change
    c = make_config(task="survival", choose={"lr": ["1e-3", "2e-4"]}, **FAST)
    assert c.choose == {"lr": [1e-3, 2e-4]} and c.run_key() == a.run_key()


def test_bad_grids_list_every_problem_in_one_error(tiny_cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        make_config(
            task="survival", model="abmil", model_kwargs={"hidden_dim": 16},
            choose={"hiddendim": [1], "lr": [-1, 1e-3], "optimizer": ["sgd"], "dropout": 0.3,
                    "hidden_dim": [8, 8], "in_dim": [4]},
        )  # fmt: skip
    text = str(exc.value)
    for needle in (
        "'hiddendim'", "'in_dim'", "lr=-1", "optimizer='sgd'", "dropout: give a list",
        "hidden_dim: candidate values repeat", "hidden_dim is both fixed",
        "keywords of model abmil (dropout, hidden_dim, attn_dim, gated)", "weight_decay",
    ):  # fmt: skip
        assert needle in text, (needle, text)
    with pytest.raises(ConfigError, match="validation part"):
        make_config(task="survival", val_fraction=0, checkpoint="last", choose={"lr": [1e-3]})
    with pytest.raises(ConfigError) as parsed:
        parse_choose(["lr", "top_k=1,2", "top_k=3", "x=[1,"])
    assert "3 problems" in str(parsed.value)
    assert parse_choose(["top_k=1,2,5", "lr=[1e-4, 5e-4]", "optimizer=adam,adamw"]) == {
        "top_k": [1, 2, 5],
        "lr": [1e-4, 5e-4],
        "optimizer": ["adam", "adamw"],
    }

    # candidate model keywords the model refuses: every one listed, before any folder is written
    cohort = _cohort(tiny_cohort / "cohort.csv", tiny_cohort)
    config = make_config(
        task="survival", model="abmil", choose={"dropout": [0.1, 2.0], "hidden_dim": [0, 8]},
        **FAST,
    )  # fmt: skip
    with pytest.raises(ConfigError) as built:
        cross_validate(cohort, config, tmp_path / "run")
    assert "dropout=2.0" in str(built.value) and "hidden_dim=0" in str(built.value)
    assert not (tmp_path / "run").exists()

    # the command line: one message, exit code 2
    from oncoslide.cli import app

    result = CliRunner().invoke(
        app,
        ["train", "-c", str(tiny_cohort / "cohort.csv"), "-f", str(tiny_cohort / "features"),
         "--choose", "topk=1,2", "--choose", "lr=-1,1e-3", "--out", str(tmp_path / "cli"),
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "'topk'" in out and "lr=-1" in out and "keywords of model abmil" in out


def test_fit_all_chooses_on_its_validation_part_and_resumes(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    from oncoslide.training.fit_all import fit_all

    cohort = _cohort(tiny_cohort / "cohort.csv", tiny_cohort)
    config = make_config(task="survival", choose={"lr": [1e-3, 2e-4]}, **FAST)
    result = fit_all(cohort, config, tmp_path / "model")
    choices = pd.read_csv(tmp_path / "model" / "choices.csv")
    assert len(choices) == 2 and choices["kept"].sum() == 1
    kept = choices.loc[choices["kept"]].iloc[0]
    assert kept["val_loss"] == choices["val_loss"].min()
    assert result.model.config.choose == {} and result.model.config.lr == kept["lr"]
    assert fit_all(cohort, config, tmp_path / "model").resumed  # same grid: nothing to do


def test_a_benchmark_entry_with_a_grid_runs(tiny_cohort: Path, tmp_path: Path) -> None:
    from oncoslide.bench.runner import run_benchmark
    from oncoslide.bench.spec import spec_from_dict

    raw = {
        "name": "grid", "cohort": str(tiny_cohort / "cohort.csv"), "folds": 2, "seeds": [0],
        "n_boot": 100, "val_fraction": 0.3,
        "feature_sets": [{"name": "f", "features": str(tiny_cohort / "features")}],
        "tasks": [{"name": "os", "kind": "survival"}],
        "models": [
            {"name": "abmil", "train": {"epochs": 1}},
            {"name": "abmil-grid", "model": "abmil", "train": {"epochs": 1},
             "choose": {"dropout": [0.0, 0.5]}},
        ],
        "keep_models": True,
    }  # fmt: skip
    spec = spec_from_dict(raw)
    run = run_benchmark(spec, tmp_path / "b", workers=0, progress=False)
    assert run.n_ran == 4 and not run.failures, run.failures
    from oncoslide.bench.protocols import plan_cells
    from oncoslide.bench.resolve import resolve_bench

    cells = plan_cells(resolve_bench(spec))
    plain = [c for c in cells if c.model == "abmil"]
    grid = [c for c in cells if c.model == "abmil-grid"]
    # an entry without a grid keys its cells as before; the grid is in the grid's keys
    assert all("choose" not in c.config["model"] and "choose" not in c.config["model"]["train"]
               for c in plain)  # fmt: skip
    assert all(c.config["model"]["train"]["choose"] == {"dropout": [0.0, 0.5]} for c in grid)
    for cell in grid:
        folder = tmp_path / "b" / "models" / cell.key
        trained = load_model_folder(folder)
        assert trained.info["chosen_dropout"] in (0.0, 0.5)
        assert trained.config.model_kwargs["dropout"] == trained.info["chosen_dropout"]

    bad = {**raw, "models": [
        {"name": "g", "model": "abmil", "choose": {"top_k": [1, 2]}},
        {"name": "lin", "protocol": "linear", "choose": {"C": [1]}},
    ]}  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        spec_from_dict(bad)
    text = " ".join(str(exc.value).split())
    assert "'top_k'" in text and "keywords of model abmil" in text
    assert "choose apply to the mil protocol only" in text
