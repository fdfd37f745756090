"""The model zoo and the transferability matrix (CROPKT): inclusion rule, self-describing
models, no source model scores a patient it saw, clustered order, CLI."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.models.abmil import ABMIL
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training import make_config
from oncoslide.transfer import build_zoo, clustered_order, load_zoo, transfer_matrix

runner = CliRunner()
FAST = dict(task="survival", folds=2, epochs=2, n_boot=0, progress=False,
            model_kwargs={"hidden_dim": 16, "attn_dim": 8})  # fmt: skip


@pytest.fixture(scope="module")
def zoo_dir(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(cohort, make_config(**FAST), out, by="cohort", min_patients=10)
    return out


def test_zoo_holds_one_described_model_per_included_cancer(
    zoo_dir: Path, tiny_cohort: Path
) -> None:
    zoo = load_zoo(zoo_dir)
    table = pd.read_csv(tiny_cohort / "cohort.csv").drop_duplicates("patient_id")
    counts = table.groupby("cohort").agg(n=("patient_id", "size"), events=("event", "sum"))
    assert zoo.cancers == sorted(counts.index)
    for e in zoo.entries:
        assert (e.n_patients, e.n_events) == tuple(counts.loc[e.cancer])
        assert e.lower <= e.c_index <= e.upper
        model = zoo.model(e.cancer)
        trained_on = set(model.patients()["patient_id"])
        assert trained_on == set(table.loc[table["cohort"] == e.cancer, "patient_id"])
        # read without loading the model (exclude=auto): the same table
        pd.testing.assert_frame_equal(zoo.patients(e.cancer), model.patients())
        # the CV C-index is the out-of-fold one of its run, averaged per patient over seeds
        preds = pd.read_parquet(zoo_dir / e.folder / "cv" / "predictions.parquet")
        c = concordance_index_censored(
            preds["event"].to_numpy().astype(bool),
            preds["time"].to_numpy(),
            preds["risk"].to_numpy(),
        ).cindex
        assert e.c_index == pytest.approx(c)


def test_inclusion_rule_leaves_small_cancers_out(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    with pytest.raises(ConfigError, match="no cancer meets the inclusion rule"):
        build_zoo(cohort, make_config(**FAST), tmp_path / "z", min_patients=200)


def test_matrix_never_scores_a_patient_the_source_saw(
    zoo_dir: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    zoo = load_zoo(zoo_dir)
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    result = transfer_matrix(zoo, cohort, tmp_path / "tm", n_boot=50)
    cells = result.cells.set_index(["source", "target"])
    assert len(cells) == len(zoo.cancers) ** 2
    for source in zoo.cancers:
        seen = set(zoo.model(source).patients()["patient_id"])
        for target in zoo.cancers:
            scored = result.predictions.query("source == @source and target == @target")
            if source == target:  # out-of-fold: each patient scored by a model that never saw it
                assert set(scored["patient_id"]) == seen
            else:
                assert not set(scored["patient_id"]) & seen
                assert len(scored) == cells.loc[(source, target), "n_patients"]
                c = concordance_index_censored(
                    scored["event"].to_numpy().astype(bool),
                    scored["time"].to_numpy(),
                    scored["risk"].to_numpy(),
                ).cindex
                assert cells.loc[(source, target), "c_index"] == pytest.approx(c)
    for name in ("matrix.csv", "matrix_wide.csv", "matrix.png", "index.html"):
        assert (tmp_path / "tm" / name).is_file()


def test_clustered_order_groups_cancers_that_transfer_to_each_other() -> None:
    labels = ["a1", "b1", "a2", "b2"]
    family = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
    values = [[0.7 if family[s] == family[t] else 0.45 for t in labels] for s in labels]
    order = clustered_order(pd.DataFrame(values, index=labels, columns=labels))
    first_two = {family[x] for x in order[:2]}
    assert len(first_two) == 1 and sorted(order) == sorted(labels)


def test_zoo_and_matrix_through_the_cli(tiny_cohort: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    made = runner.invoke(
        app,
        ["zoo", "train", "--cohort", str(tiny_cohort / "cohort.csv"), "--features",
         str(tiny_cohort / "features"), "--out", str(zoo), "--min-patients", "10", "--folds",
         "2", "--epochs", "1", "--no-progress", "--model-arg", "attn_dim=32",
         "--model-arg", "gated=false"],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    built = load_zoo(zoo)
    for cancer in ("SIM-A", "SIM-B"):  # the model keywords reached every model
        source = built.model(cancer)
        assert source.config.model_kwargs == {"attn_dim": 32, "gated": False}
        attention = cast(ABMIL, source.model).attention
        assert attention.gate_branch is None and attention.score.in_features == 32
    listed = runner.invoke(app, ["zoo", "list", str(zoo)])
    assert listed.exit_code == 0 and "SIM-A" in listed.output and "SIM-B" in listed.output
    matrix = runner.invoke(
        app,
        ["transfer", "matrix", "--zoo", str(zoo), "--cohort", str(tiny_cohort / "cohort.csv"),
         "--features", str(tiny_cohort / "features"), "--out", str(tmp_path / "tm"),
         "--n-boot", "50"],
    )  # fmt: skip
    assert matrix.exit_code == 0, matrix.output
    wide = pd.read_csv(tmp_path / "tm" / "matrix_wide.csv")
    assert wide.shape == (2, 3) and np.isfinite(wide.iloc[:, 1:].to_numpy(float)).all()
    bad = runner.invoke(app, ["zoo", "list", str(tmp_path)])
    assert bad.exit_code == 2 and "not a model zoo" in bad.output


def test_a_zoo_refuses_features_of_another_encoder(
    zoo_dir: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    import shutil

    import h5py

    other = tmp_path / "other-encoder"
    shutil.copytree(tiny_cohort / "features", other)
    for path in other.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f["features"].attrs["encoder"] = "uni"
    cohort = load_cohort(tiny_cohort / "cohort.csv", other)
    with pytest.raises(ConfigError, match=r"simulated.*uni|uni.*simulated"):
        transfer_matrix(load_zoo(zoo_dir), cohort, tmp_path / "tm", n_boot=10)
    assert load_zoo(zoo_dir).contract.encoder == "simulated"
