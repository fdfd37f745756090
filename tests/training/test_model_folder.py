"""Self-describing models: fold models and --fit-all folders, predict, --init and --freeze."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.features.slide_embeddings import load_slide_embeddings
from oncoslide.training import cross_validate, make_config
from oncoslide.training.fit_all import fit_all
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.predict import predict_cohort
from oncoslide.training.run_folder import RunFolder
from oncoslide.training.tasks import FoldTask, resolve_task

FAST = dict(epochs=2, folds=3, batch_size=4, n_boot=20, progress=False)


def _cohort(root: Path, table: str = "cohort.csv", labels: tuple[str, ...] = ("msi",)):
    return load_cohort(root / table, root / "features", label_cols=labels)


@pytest.fixture(scope="module")
def cv_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cv") / "run"
    cross_validate(
        _cohort(tiny_cohort), make_config(task="survival", survival_loss="nll", **FAST), out
    )
    return out


@pytest.fixture(scope="module")
def fitted(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "model"
    fit_all(_cohort(tiny_cohort), make_config(task="survival", **FAST), out)
    return out


def test_fold_models_reproduce_the_runs_test_predictions_exactly(
    cv_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort)
    run_preds = pd.read_parquet(cv_run / "predictions.parquet")
    for fold in range(3):
        folder = RunFolder(cv_run).fold(0, fold)
        assert not folder.checkpoints.exists()  # the model folder is the checkpoint
        trained = load_model_folder(folder.model_dir)
        assert trained.task.kind == "survival" and trained.fold_task.bins is not None
        expected = run_preds[run_preds["fold"] == fold].set_index("patient_id")
        out = predict_cohort(trained, cohort, tmp_path / f"p{fold}", embeddings=False)
        got = out.predictions.set_index("patient_id").loc[expected.index]
        # bit for bit on the CPU, the discrete survival columns included
        for column in [c for c in expected.columns if c == "risk" or c.startswith("surv_bin")]:
            assert np.array_equal(got[column].to_numpy(), expected[column].to_numpy()), column
        assert np.array_equal(got["risk_threshold"].unique(), expected["risk_threshold"].unique())
        # the fold model records who it saw: its training and validation patients only
        seen = trained.patients()
        assert set(seen["part"]) == {"train", "val"}
        assert not set(seen["patient_id"]) & set(expected.index)


def test_model_folder_describes_everything_needed(fitted: Path, tiny_cohort: Path) -> None:
    meta = json.loads((fitted / "model.json").read_text())
    assert meta["format"] == "oncoslide-model" and meta["version"] == 1
    assert meta["model"]["name"] == "abmil" and meta["model"]["in_dim"] == 16
    assert meta["task"]["kind"] == "survival"
    assert meta["features"]["encoder"] == "simulated" and meta["features"]["feature_dim"] == 16
    assert meta["features"]["patch_size"] == 224 and meta["features"]["target_mpp"] == 0.5
    assert meta["fitted"]["risk_threshold"] is not None
    assert meta["fitted"]["breslow"]["event_times"]  # Cox models keep their baseline hazard
    assert meta["info"]["fit_all"] == 1
    splits = pd.read_csv(fitted / "splits.csv")
    assert set(splits["part"]) == {"train", "val"}  # no test part
    cohort = _cohort(tiny_cohort)
    assert sorted(splits["patient_id"]) == sorted(cohort.patient_ids)
    assert (fitted / "history.csv").is_file() and not (fitted / "work").exists()
    # the fitted task survives the round trip
    trained = load_model_folder(fitted)
    again = FoldTask.from_state_dict(trained.task, trained.config, trained.fold_task.state_dict())
    assert again.state_dict() == trained.fold_task.state_dict()


def test_fit_all_resumes_and_refuses_another_config(fitted: Path, tiny_cohort: Path) -> None:
    cohort = _cohort(tiny_cohort)
    weights = (fitted / "weights.pt").read_bytes()
    again = fit_all(cohort, make_config(task="survival", **FAST), fitted)
    assert again.resumed and (fitted / "weights.pt").read_bytes() == weights
    with pytest.raises(
        ConfigError,
        match=r"holds another model with other settings \(stored -> requested: "
        r"epochs 2 -> 3\)",
    ):
        fit_all(cohort, make_config(task="survival", **{**FAST, "epochs": 3}), fitted)


def test_predict_writes_predictions_and_slide_level_embeddings(
    fitted: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort)
    trained = load_model_folder(fitted)
    out = predict_cohort(trained, cohort, tmp_path / "p")
    preds = pd.read_parquet(tmp_path / "p" / "predictions.parquet")
    assert sorted(preds["patient_id"]) == cohort.patient_ids
    assert {"risk", "risk_threshold", "time", "event"} <= set(preds.columns)
    slides = list(cohort.slides["slide_id"])
    # both folders are read by the benchmark's slide-level reader
    per_patient = load_slide_embeddings(out.patient_embeddings_dir, slides)
    per_slide = load_slide_embeddings(out.slide_embeddings_dir, slides)
    assert per_patient.dim == per_slide.dim == trained.model.embed_dim
    for pid in cohort.patient_ids:
        ids = cohort.slide_ids(pid)
        vectors = per_patient.vectors(ids)
        np.testing.assert_allclose(vectors, out.patient_embeddings.loc[[pid] * len(ids)].to_numpy())
        if len(ids) == 1:  # a one-slide patient: the slide's bag is the patient's bag
            np.testing.assert_allclose(per_slide.vectors(ids), vectors, rtol=1e-5, atol=1e-6)
    two = next(p for p in cohort.patient_ids if len(cohort.slide_ids(p)) == 2)
    assert not np.allclose(*per_slide.vectors(cohort.slide_ids(two)))
    # the embedding is what the head reads: head(embedding) gives the prediction
    emb = torch.tensor(out.patient_embeddings.loc[preds["patient_id"]].to_numpy())
    with torch.no_grad():
        risk = trained.fold_task.risk(trained.model.head(emb))
    np.testing.assert_allclose(risk, preds["risk"], rtol=1e-5, atol=1e-6)


def test_predict_refuses_features_of_another_encoder(
    fitted: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    feats = tmp_path / "features"
    feats.mkdir()
    for f in (tiny_cohort / "features").glob("*.h5"):
        target = feats / f.name
        target.write_bytes(f.read_bytes())
        with h5py.File(target, "r+") as h5:
            h5["features"].attrs["encoder"] = "uni2-h"
    cohort = load_cohort(tiny_cohort / "cohort.csv", feats)
    with pytest.raises(ConfigError) as err:
        predict_cohort(load_model_folder(fitted), cohort, tmp_path / "p")
    assert "simulated" in str(err.value) and "uni2-h" in str(err.value)
    assert not (tmp_path / "p").exists()  # nothing half-written


def test_init_copies_weights_and_freeze_keeps_groups_fixed(
    fitted: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort)
    source = load_model_folder(fitted)
    cfg = make_config(task="msi", init=str(fitted), freeze=["encoder"], **{**FAST, "folds": 2})
    cross_validate(cohort, cfg, tmp_path / "run")
    tuned = load_model_folder(RunFolder(tmp_path / "run").fold(0, 0).model_dir)
    before, after = source.model.state_dict(), tuned.model.state_dict()
    encoder = tuned.model.parameter_groups()["encoder"]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    # the head is new (2 classes instead of 1 Cox output) and trained
    assert after["head.weight"].shape != before["head.weight"].shape
    info = json.loads((RunFolder(tmp_path / "run").fold(0, 0).model_dir / "model.json").read_text())
    assert 0 < info["info"]["trainable_share"] < 0.01  # only the head trains
    with pytest.raises(ConfigError, match="no parameter group"):
        cross_validate(
            cohort,
            make_config(task="msi", init=str(fitted), freeze=["decoder"], **FAST),
            tmp_path / "bad",
        )
    with pytest.raises(ConfigError, match="holds a 'abmil' model"):
        cross_validate(
            cohort,
            make_config(task="msi", model="mean", init=str(fitted), **FAST),
            tmp_path / "bad2",
        )


def test_fixed_bins_balanced_sampler_adam_and_accumulation_train(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cohort = _cohort(tiny_cohort)
    cfg = make_config(
        task="survival",
        survival_loss="nll",
        bin_scheme="fixed",
        n_bins=6,
        bin_width=365.0,
        sampler="balanced",
        optimizer="adam",
        accumulate_grad_batches=2,
        **FAST,
    )
    run = cross_validate(cohort, cfg, tmp_path / "run")
    trained = load_model_folder(RunFolder(run.out_dir).fold(0, 0).model_dir)
    edges = trained.fold_task.bins.edges
    np.testing.assert_array_equal(edges, [0, 365, 730, 1095, 1460, 1825, np.inf])
    assert trained.model.n_outputs == 6
    assert np.isfinite(run.summary.set_index("metric").loc["c_index", "mean"])


def test_balanced_sampler_equalises_strata(tiny_cohort: Path) -> None:
    from oncoslide.training.data import BagDataset, BagTargets, BalancedSampler

    cohort = _cohort(tiny_cohort)
    ids = cohort.patient_ids
    strata = np.array([0] * 30 + [1] * (len(ids) - 30))
    ds = BagDataset(cohort, ids, FeatureCache(), BagTargets())
    sampler = BalancedSampler(ds, strata, seed=1)
    draws = np.concatenate([strata[sampler.order(e)] for e in range(200)])
    assert abs(draws.mean() - 0.5) < 0.02  # rare stratum drawn as often as the common one
    assert sampler.order(3) == BalancedSampler(ds, strata, seed=1).order(3)


def test_new_settings_at_their_defaults_keep_run_keys() -> None:
    """Keys as the first release computed them: adding settings never invalidates results."""
    recorded = {
        "298897fcd8612bd8": dict(task="survival"),
        "735c5afa3673f2bb": dict(
            task="msi", model="transmil", epochs=3, model_kwargs={"dropout": 0.1}
        ),
        "4b00e8c70f1132c5": dict(task="survival", survival_loss="nll", n_bins=8),
    }
    for key, settings in recorded.items():
        assert make_config(**settings).run_key() == key
        # execution-only settings and new settings at their defaults change nothing
        same = make_config(
            **settings, num_threads=1, sampler="shuffle", optimizer="adamw", freeze=[]
        )
        assert same.run_key() == key
        two = make_config(**settings, accumulate_grad_batches=2)
        assert two.run_key() != key  # a new setting away from its default joins the key
        assert (
            make_config(**settings, accumulate_grad_batches=2, devices=2).run_key() == two.run_key()
        )
        assert make_config(**settings, sampler="balanced").run_key() != key
        assert make_config(**settings, init="model/").run_key() != key


def test_task_round_trip(tiny_cohort: Path) -> None:
    cohort = _cohort(tiny_cohort)
    task = resolve_task(cohort, make_config(task="msi", **FAST))
    from oncoslide.training.tasks import TaskSpec

    assert TaskSpec.from_dict(task.to_dict()) == task


def test_breslow_and_risk_threshold_use_whole_bag_training_risks(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """The training risks behind the Breslow baseline and the risk-group threshold are
    computed as test risks are (whole bags), not from the patch samples of training steps."""
    cohort = _cohort(tiny_cohort)
    cfg = make_config(task="survival", max_patches=3, **FAST)  # Cox; 3 of ~40 patches per step
    run = cross_validate(cohort, cfg, tmp_path / "run")
    trained = load_model_folder(RunFolder(run.out_dir).fold(0, 0).model_dir)
    seen = trained.patients()
    train_ids = list(seen.loc[seen["part"] == "train", "patient_id"])
    preds = predict_cohort(trained, cohort, tmp_path / "p", embeddings=False).predictions
    risk = preds.set_index("patient_id").loc[train_ids, "risk"].to_numpy()
    assert trained.fold_task.breslow is not None
    assert trained.fold_task.breslow.offset_ == risk.max()  # the largest whole-bag risk
    assert trained.fold_task.risk_threshold == np.median(risk)
