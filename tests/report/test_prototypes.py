"""Morphological prototypes: the top-risk prototype is the simulator's planted high-hazard patch
type (checked with the planted patch labels), nothing is fitted on test patients, and the
tables agree with the run and the model."""

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
from oncoslide.features.schema import PatchGrid, write_feature_file
from oncoslide.report import prototypes as protomod
from oncoslide.report.attention import load_fold_model
from oncoslide.report.prototypes import PATIENT_COLUMNS, PROTOTYPE_COLUMNS, ExplainConfig
from oncoslide.training import cross_validate, make_config

from .conftest import ExplainedWorld, make_explained_world


def planted_hazard(sim: Path) -> dict[int, tuple[str, float]]:
    """Each planted prototype's log hazard ratio per unit of its mix log-odds (its loadings on
    the latents times the latents' hazard coefficients), from truth.json."""
    truth = json.loads((sim / "truth.json").read_text())
    coefs = truth["parameters"]["hazard_coefs"]
    names = truth["parameters"]["latent_names"]
    out = {}
    for p in truth["prototypes"]:
        hazard = sum(w * coefs.get(n, 0.0) for w, n in zip(p["loadings"], names, strict=False))
        out[int(p["index"])] = (p["role"], float(hazard))
    return out


def with_labels(sim: Path, patches: pd.DataFrame) -> pd.DataFrame:
    labels = np.load(sim / "truth_patch_labels.npz")
    out = patches.copy()
    out["label"] = [
        int(labels[s][i]) for s, i in zip(out["slide_id"], out["patch_index"], strict=True)
    ]
    return out


def top_risk_match(world: ExplainedWorld) -> tuple[str, int, float, set[int]]:
    """The top-risk prototype, its majority planted label, that label's share of its patches
    (purity) and the planted high-hazard labels: those whose planted hazard is at least half
    the largest (necrosis and the high-grade tumour, both driven by aggressiveness)."""
    hazard = planted_hazard(world.sim)
    top = max(h for _, h in hazard.values())
    high = {k for k, (_, h) in hazard.items() if h >= 0.5 * top}
    patches = with_labels(world.sim, world.explained.patches)
    mine = patches[patches["prototype"] == world.explained.top_risk]
    counts = mine["label"].value_counts()
    label = int(counts.index[0])
    return world.explained.top_risk, label, float(counts.iloc[0] / len(mine)), high


def nearest_centre_accuracy(sim: Path) -> float:
    """How often the TRUE centres put a patch in its own prototype: the ceiling of purity."""
    centres = np.load(sim / "truth_prototypes.npy").astype(np.float64)
    labels = np.load(sim / "truth_patch_labels.npz")
    right = total = 0
    for path in sorted((sim / "features").glob("*.h5")):
        with h5py.File(path, "r") as f:
            x = f["features"][:].astype(np.float64)
        d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        right += int((d.argmin(1) == labels[path.stem]).sum())
        total += len(x)
    return right / total


def test_top_risk_prototype_is_the_planted_high_hazard_type(
    explained_world: ExplainedWorld,
) -> None:
    world = explained_world
    # the world lets patch types be told apart at all (else purity 0.8 is out of reach)
    assert nearest_centre_accuracy(world.sim) >= 0.85
    name, label, purity, high = top_risk_match(world)
    hazard = planted_hazard(world.sim)
    assert name == "P1"
    assert label in high, (label, hazard[label], high)
    assert purity >= 0.8, purity
    row = world.explained.prototypes.iloc[0]
    # it goes with the observed outcome, and the model's out-of-fold risk goes with it too
    assert row["outcome_log_ratio"] > 0 and row["outcome_p"] < 0.01
    assert row["risk_corr"] > 0 and row["mean_contribution"] > 0
    # the most protective prototype is a planted protective type (low grade or immune)
    bottom = world.explained.prototypes.iloc[-1]["prototype"]
    patches = with_labels(world.sim, world.explained.patches)
    majority = int(patches.loc[patches["prototype"] == bottom, "label"].mode().iloc[0])
    assert hazard[majority][1] < 0, hazard[majority]


def test_tables_agree_with_the_run_and_the_model(explained_world: ExplainedWorld) -> None:
    world, result = explained_world, explained_world.explained
    assert list(result.prototypes.columns) == list(PROTOTYPE_COLUMNS)
    assert list(result.patients.columns) == list(PATIENT_COLUMNS)
    assert result.prototypes["prototype"].tolist() == [f"P{i}" for i in range(1, 9)]
    assert result.prototypes["outcome_log_ratio"].is_monotonic_decreasing
    # every patient once, out of fold, with all of its patches
    cohort = world.cohort
    assert result.patches.groupby("patient_id").size().to_dict() == {
        p: int(n) for p, n in cohort.patients["n_patches"].items()
    }
    per = result.patients.groupby("patient_id")
    assert np.allclose(per["share"].sum(), 1.0) and np.allclose(per["attention_share"].sum(), 1.0)
    meta = json.loads((world.run / "explain" / "explain.json").read_text())
    assert meta["max_abs_reproduction_error"] < 1e-5  # the stored out-of-fold risks
    splits = pd.read_csv(world.run / "splits.csv", dtype={"patient_id": str})
    test_fold = splits[splits["part"] == "test"].set_index("patient_id")["fold"]
    assert (result.patients["fold"] == result.patients["patient_id"].map(test_fold)).all()
    # a contribution is the held-out model's risk minus its risk without that prototype
    row = result.patients.iloc[3]
    fm = load_fold_model(world.run, cohort, seed=0, fold=int(row["fold"]))
    mine = result.patches[result.patches["patient_id"] == row["patient_id"]]
    keep = (mine["prototype"] != row["prototype"]).to_numpy()
    parts = []
    for path in cohort.slide_paths(row["patient_id"]):  # bag order: the slides, file order
        with h5py.File(path, "r") as f:
            parts.append(f["features"][:])
    feats = np.concatenate(parts).astype(np.float32)
    x = torch.tensor(feats)[None]
    with torch.no_grad():
        full = fm.model(x, torch.ones(x.shape[:2], dtype=torch.bool)).logits
        part = fm.model(x[:, keep], torch.ones((1, int(keep.sum())), dtype=torch.bool)).logits
    want = float(fm.fold_task.risk(full)[0] - fm.fold_task.risk(part)[0])
    assert row["contribution"] == pytest.approx(want, abs=1e-5)
    # the tables and the figure are on disk
    folder = world.run / "explain"
    for name in ("prototypes.csv", "patients.csv", "patches.parquet", "representatives.csv"):
        assert (folder / name).is_file()
    assert (folder / "prototypes.png").stat().st_size > 10_000
    reps = pd.read_csv(folder / "representatives.csv")
    assert len(reps) == 8 * 6 and (reps.groupby("prototype")["patient_id"].nunique() == 6).all()


def test_clusters_are_fitted_on_training_patients_only(
    explained_world: ExplainedWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    world = explained_world
    seen: list[set[str]] = []
    original = protomod._training_sample

    def spy(cohort, ids, cache, limit, rng):  # type: ignore[no-untyped-def]
        seen.append(set(ids))
        return original(cohort, ids, cache, limit, rng)

    monkeypatch.setattr(protomod, "_training_sample", spy)
    protomod.explain_run(
        world.run, world.cohort, settings=ExplainConfig(n_prototypes=4), out_dir=tmp_path / "e"
    )
    splits = pd.read_csv(world.run / "splits.csv", dtype={"patient_id": str})
    assert len(seen) == 3
    for fold, ids in enumerate(seen):
        rows = splits[(splits["fold"] == fold) & (splits["seed"] == 0)]
        test = set(rows.loc[rows["part"] == "test", "patient_id"])
        assert ids and not ids & test
        assert ids == set(rows.loc[rows["part"] != "test", "patient_id"])


def test_bad_settings_and_runs_are_refused(explained_world: ExplainedWorld, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_prototypes"):
        ExplainConfig(n_prototypes=1)
    with pytest.raises(ConfigError, match="seed 4 is not in the run"):
        protomod.explain_run(
            explained_world.run, explained_world.cohort, settings=ExplainConfig(seed=4)
        )
    with pytest.raises(ConfigError, match="not an `oncoslide train` run folder"):
        protomod.explain_run(tmp_path, explained_world.cohort)


def test_representative_patches_are_cropped_from_the_real_slide(
    svs_path: Path, tmp_path: Path
) -> None:
    w, h, mpp, patch = 2220, 2967, 0.499, 256
    grid = PatchGrid(
        patch_size=patch,
        patch_size_level0=patch,
        target_mpp=mpp,
        level0_mpp=mpp,
        level0_width=w,
        level0_height=h,
    )
    xs, ys = np.meshgrid(np.arange(0, w - patch, patch), np.arange(0, h - patch, patch))
    coords = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.int64)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        feats = rng.normal(size=(len(coords), 6)).astype(np.float32)
        feats[: len(coords) // 2, 0] += 4.0  # two tissue types
        sid = f"P{i:02d}-S1"
        write_feature_file(
            tmp_path / "features" / f"{sid}.h5",
            feats,
            coords,
            grid=grid,
            encoder="planted",
            attrs={"slide_path": str(svs_path)},
        )
        rows.append({"patient_id": f"P{i:02d}", "slide_id": sid, "time": 1.0 + i, "event": 1})
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    cohort = load_cohort(tmp_path / "cohort.csv", tmp_path / "features")
    config = make_config(
        task="survival",
        model="abmil",
        folds=3,
        epochs=2,
        early_stopping_patience=None,
        progress=False,
        n_boot=0,
        num_threads=1,
        model_kwargs={"hidden_dim": 8, "attn_dim": 4},
    )
    cross_validate(cohort, config, tmp_path / "run")
    result = protomod.explain_run(
        tmp_path / "run",
        cohort,
        settings=ExplainConfig(n_prototypes=2, n_representatives=3, crop_px=64),
    )
    assert result.notes == []
    reps = result.representatives
    assert len(reps) == 6 and (reps["image"] != "").all()
    from PIL import Image

    from oncoslide.slides.reader import open_slide

    first = reps.iloc[0]
    image = np.asarray(Image.open(result.out_dir / first["image"]))
    assert image.shape == (64, 64, 3)
    # the crop is the slide's own pixels there (level 0, 256 px box-averaged to 64)
    with open_slide(svs_path) as slide:
        region = slide.read_region(int(first["x"]), int(first["y"]), 0, patch, patch)
    want = region.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(image.astype(float) - want).mean() < 3.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_top_risk_prototype_recovered_in_other_worlds(seed: int, tmp_path: Path) -> None:
    world = make_explained_world(tmp_path, seed=seed)
    name, label, purity, high = top_risk_match(world)
    print(f"seed {seed}: {name} label {label} purity {purity:.3f} high {sorted(high)}")
    assert label in high and purity >= 0.8


def test_cli_explain(explained_world: ExplainedWorld, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from oncoslide.cli import app

    world = explained_world
    data = ["--cohort", str(world.sim / "cohort.csv"), "--features", str(world.sim / "features")]
    out = tmp_path / "ex"
    args = ["explain", str(world.run), "-k", "3", "--rank-by", "model", "--out", str(out), *data]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    table = pd.read_csv(out / "prototypes.csv")
    assert table["prototype"].tolist() == ["P1", "P2", "P3"]
    assert table["risk_corr"].is_monotonic_decreasing
    bad = CliRunner().invoke(app, ["explain", str(world.run), "--rank-by", "luck", *data])
    assert bad.exit_code == 2 and "rank_by" in bad.output
