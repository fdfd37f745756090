"""`oncoslide fewshot`: few-shot probes of named feature sets (slide embeddings, mean-pooled patch
features) on one cohort, the same patient-level splits and draws for every set; checked against
the simulator's planted latents, a direct re-computation and a direct mean of the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.splits import fold_parts
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.evaluation.fewshot import FewShotConfig, few_shot_classification
from oncoslide.evaluation.fewshot_sets import (
    FeatureSetSource,
    detect_level,
    few_shot_sets,
    parse_feature_set,
    patient_vectors,
)
from oncoslide.features.readers import find_feature_file, read_features
from oncoslide.simulate import make_simulation_config, simulate_cohort

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small histogenomic world (120 patients, 24 with two slides), its planted latents z
    (what MSI and survival are drawn from) as a slide-embedding table, and a noise table."""
    out = tmp_path_factory.mktemp("fewshot")
    cfg = make_simulation_config(
        "histogenomic",
        {
            "n_patients": 120,
            "feature_dim": 8,
            "within_prototype_rank": 2,
            "patches_median": 12,
            "patches_min": 6,
            "n_genes": 30,
            "n_mutation_genes": 0,
        },
    )
    simulate_cohort(out / "sim", cfg)
    truth = json.loads((out / "sim" / "truth.json").read_text())
    z = {p["patient_id"]: p["z"] for p in truth["patients"]}
    table = pd.read_csv(out / "sim" / "cohort.csv", dtype={"patient_id": str})
    latents = pd.DataFrame([z[p] for p in table["patient_id"]])
    latents.columns = [f"z{i}" for i in range(latents.shape[1])]
    latents.insert(0, "slide_id", table["slide_id"])
    latents.to_csv(out / "latents.csv", index=False)
    rng = np.random.default_rng(0)
    noise = pd.DataFrame(rng.normal(size=(len(table), 4)), columns=list("abcd"))
    noise.insert(0, "slide_id", table["slide_id"])
    noise.to_csv(out / "noise.csv", index=False)
    return out


def test_command_probes_every_set_on_the_same_splits_and_draws(world: Path) -> None:
    sim = world / "sim"
    out = world / "fs"
    result = runner.invoke(
        app,
        [
            "fewshot", "--cohort", str(sim / "cohort.csv"), "--task", "msi",
            "--set", f"latents={world / 'latents.csv'}", "--set", f"meanpool={sim / 'features'}",
            "--set", f"noise={world / 'noise.csv'}", "--k", "4,16", "--draws", "5",
            "--folds", "3", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mean auc over 3 folds x 5 draws" in result.output
    assert "patch features" in result.output
    for name in ("draws", "summary", "comparison"):
        assert (out / f"fewshot_{name}.csv").is_file()
    assert (out / "fewshot_curves.png").read_bytes()[:4] == b"\x89PNG"
    settings = json.loads((out / "fewshot.json").read_text())
    assert [s["level"] for s in settings["feature_sets"]] == ["slide", "patch", "slide"]
    assert settings["reference"] == "latents" and settings["patients"] == 120

    # patient-level splits: every patient tested exactly once
    splits = pd.read_csv(out / "splits.csv", dtype={"patient_id": str})
    tested = splits[splits["part"] == "test"]["patient_id"]
    assert tested.is_unique and len(tested) == 120
    assert set(splits["part"]) == {"train", "test"}

    # paired: every other set against the reference over the same 3 folds x 5 draws
    cmp = pd.read_csv(out / "fewshot_comparison.csv")
    auc = cmp[cmp["metric"] == "auc"].set_index(["a", "k"])
    assert set(auc.index) == {(n, k) for n in ("meanpool", "noise") for k in (4, 16)}
    assert (auc["n"] == 15).all() and (auc["b"] == "latents").all()
    # planted truth: the latents carry MSI (oracle AUC about 0.88), the noise carries nothing
    summary = pd.read_csv(out / "fewshot_summary.csv")
    mean = summary[summary["metric"] == "auc"].set_index(["embedding", "k"])["mean"]
    assert mean["latents", 16] > 0.75
    assert abs(mean["noise", 16] - 0.5) < 0.15
    assert auc.loc[("noise", 16), "diff"] < -0.1
    assert auc.loc[("noise", 16), "p_wilcoxon"] < 0.05

    # the rows are the library's probe on these splits, redone directly
    draws = pd.read_csv(out / "fewshot_draws.csv")
    cohort = load_cohort(sim / "cohort.csv", label_cols=("msi",))
    parts = fold_parts(splits, 0, 1)
    src = parse_feature_set(f"latents={world / 'latents.csv'}")
    x_tr = patient_vectors(src, sim / "cohort.csv", parts["train"])
    x_te = patient_vectors(src, sim / "cohort.csv", parts["test"])
    y_tr = cohort.labels("msi", parts["train"]).astype(int).astype(str)
    y_te = cohort.labels("msi", parts["test"]).astype(int).astype(str)
    direct = few_shot_classification(
        {"latents": (x_tr, x_te)},
        y_tr,
        y_te,
        config=FewShotConfig(shots=(4, 16), draws=5, seed=0),
        task="msi",
        fold=1,
    )
    got = draws[(draws["embedding"] == "latents") & (draws["fold"] == 1)]
    np.testing.assert_allclose(
        got.sort_values(["k", "draw", "metric"])["value"].to_numpy(),
        direct.sort_values(["k", "draw", "metric"])["value"].to_numpy(),
        rtol=0,
        atol=1e-12,
    )


def test_patch_sets_are_the_mean_of_every_patch_and_slide_sets_the_mean_of_slides(
    world: Path,
) -> None:
    sim = world / "sim"
    table = pd.read_csv(sim / "cohort.csv", dtype={"patient_id": str})
    two = table.groupby("patient_id")["slide_id"].count()
    ids = [two.index[two == 2][0], two.index[two == 1][0]]
    patch = patient_vectors(parse_feature_set(f"m={sim / 'features'}"), sim / "cohort.csv", ids)
    for row, pid in zip(patch, ids, strict=True):
        feats = [
            np.asarray(read_features(find_feature_file(sim / "features", s)).features)  # type: ignore[arg-type]
            for s in table.loc[table["patient_id"] == pid, "slide_id"]
        ]
        np.testing.assert_allclose(row, np.concatenate(feats).astype(np.float64).mean(0))
    lat = pd.read_csv(world / "latents.csv").set_index("slide_id")
    lat.iloc[table.index[table["patient_id"] == ids[0]][0]] += 1.0  # the two slides now differ
    lat.to_csv(world / "latents_shifted.csv")
    vec = patient_vectors(
        parse_feature_set(f"s={world / 'latents_shifted.csv'}"), sim / "cohort.csv", ids[:1]
    )
    slides = table.loc[table["patient_id"] == ids[0], "slide_id"]
    np.testing.assert_allclose(vec[0], lat.loc[slides].to_numpy().mean(0), rtol=1e-6)


def test_survival_task_skips_k1_and_ranks_the_latents_first(world: Path) -> None:
    sim = world / "sim"
    sources = [
        parse_feature_set(f"noise={world / 'noise.csv'}"),
        parse_feature_set(f"latents={world / 'latents.csv'}"),
    ]
    run = few_shot_sets(
        sim / "cohort.csv",
        "survival",
        sources,
        config=FewShotConfig(shots=(1, 16), draws=4),
        folds=3,
    )
    assert run.metric == "c_index" and run.reference == "noise"
    assert set(run.rows["k"]) == {16} and set(run.rows["metric"]) == {"c_index"}
    c = run.summary.set_index("embedding")["mean"]
    assert c["latents"] > 0.65 > c["noise"]
    assert run.comparison["diff"].item() > 0.1


def test_feature_set_forms_and_levels(world: Path, tmp_path: Path) -> None:
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "slide_embeddings.json").write_text("{}")  # what embed-slides writes
    assert detect_level(emb) == "slide"
    assert detect_level(world / "latents.csv") == "slide"
    assert detect_level(world / "sim" / "features") == "patch"
    forced = parse_feature_set(f"x=slide:{world / 'sim' / 'features'}")
    assert forced == FeatureSetSource(name="x", path=world / "sim" / "features", level="slide")
    for bad in ("nopath", "=a", f"x={tmp_path / 'absent'}"):
        with pytest.raises(ConfigError):
            parse_feature_set(bad)
    sources = [parse_feature_set(f"a={world / 'noise.csv'}")]
    with pytest.raises(ConfigError, match="reference"):
        few_shot_sets(world / "sim" / "cohort.csv", "msi", sources, reference="b")
    with pytest.raises(ConfigError, match="smaller --k"):
        few_shot_sets(
            world / "sim" / "cohort.csv", "msi", sources, config=FewShotConfig(shots=(500,))
        )
    result = runner.invoke(
        app,
        [
            "fewshot", "-c", str(world / "sim" / "cohort.csv"), "-t", "msi",
            "--set", f"a={world / 'noise.csv'}", "--set", f"a={world / 'latents.csv'}",
            "--out", str(tmp_path / "o"),
        ],
    )  # fmt: skip
    assert result.exit_code == 2 and "unique" in result.output


def test_patients_seen_in_pre_training_are_never_scored(world: Path, tmp_path: Path) -> None:
    """A slide-embedding folder whose manifest names its encoder's pre-training slides keeps
    those patients out of every test part by itself; --exclude adds an encoder folder's list.
    The scores are the probe redone on the test parts without them, for every set alike."""
    import h5py

    sim = world / "sim"
    table = pd.read_csv(sim / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    latents = pd.read_csv(world / "latents.csv", dtype={"slide_id": str}).set_index("slide_id")
    emb = tmp_path / "emb"
    emb.mkdir()
    for sid in table["slide_id"]:
        with h5py.File(emb / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=latents.loc[sid].to_numpy(np.float32))
    patients = sorted(table["patient_id"].unique())
    seen_by_encoder = set(patients[:30])
    seen_slides = table[table["patient_id"].isin(seen_by_encoder)]["slide_id"].tolist()
    (emb / "slide_embeddings.json").write_text(json.dumps({"pretrain_slides": seen_slides}))
    enc = tmp_path / "enc"  # another encoder's folder, as `oncoslide pretrain` writes it
    enc.mkdir()
    other = set(patients[30:40])
    table[table["patient_id"].isin(other)][["slide_id", "patient_id"]].to_csv(
        enc / "pretrain_slides.csv", index=False
    )
    out = tmp_path / "fs"
    result = runner.invoke(
        app,
        [
            "fewshot", "--cohort", str(sim / "cohort.csv"), "--task", "msi",
            "--set", f"emb={emb}", "--set", f"meanpool={sim / 'features'}",
            "--exclude", str(enc), "--k", "4", "--draws", "3", "--folds", "3",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "40 patient(s) seen in pre-training" in result.output
    settings = json.loads((out / "fewshot.json").read_text())
    assert set(settings["excluded_from_test"]) == seen_by_encoder | other

    splits = pd.read_csv(out / "splits.csv", dtype={"patient_id": str})
    draws = pd.read_csv(out / "fewshot_draws.csv")
    cohort = load_cohort(sim / "cohort.csv", label_cols=("msi",))
    for fold in range(3):
        parts = fold_parts(splits, 0, fold)
        test = [p for p in parts["test"] if p not in seen_by_encoder | other]
        assert len(test) < len(parts["test"])
        sources = {
            n: parse_feature_set(f"{n}={p}")
            for n, p in (("emb", emb), ("meanpool", sim / "features"))
        }
        direct = few_shot_classification(
            {
                n: (
                    patient_vectors(s, sim / "cohort.csv", parts["train"]),
                    patient_vectors(s, sim / "cohort.csv", test),
                )
                for n, s in sources.items()
            },
            cohort.labels("msi", parts["train"]).astype(int).astype(str),
            cohort.labels("msi", test).astype(int).astype(str),
            config=FewShotConfig(shots=(4,), draws=3, seed=0),
            task="msi",
            fold=fold,
        )
        got = draws[draws["fold"] == fold]
        keys = ["embedding", "k", "draw", "metric"]
        np.testing.assert_allclose(
            got.sort_values(keys)["value"].to_numpy(),
            direct.sort_values(keys)["value"].to_numpy(),
            rtol=0,
            atol=1e-12,
        )

    # a folder that records no pre-training slides is refused as an exclusion source
    with pytest.raises(ConfigError, match="records no pre-training slides"):
        few_shot_sets(
            sim / "cohort.csv", "msi", [sources["meanpool"]], folds=3, exclude_from=[tmp_path]
        )
