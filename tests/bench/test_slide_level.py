"""Slide-level feature sets (embeddings from a slide encoder) in a benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from oncoslide.bench.protocols import plan_cells
from oncoslide.bench.report import build_leaderboard
from oncoslide.bench.resolve import resolve_bench
from oncoslide.bench.runner import run_benchmark
from oncoslide.bench.spec import spec_from_dict
from oncoslide.bench.store import ResultStore
from oncoslide.errors import ConfigError
from oncoslide.features.readers import find_feature_file, read_features


@pytest.fixture(scope="module")
def patient_mean_embeddings(bench_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TRIDENT-style file per slide holding the mean of *all* its patient's patches: averaged
    over a patient's slides it is exactly what mean pooling of the patch features gives."""
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    out = tmp_path_factory.mktemp("slide_features_mean")
    for _, slides in table.groupby("patient_id"):
        feats = [
            read_features(find_feature_file(bench_data / "features", s)).features.astype(np.float32)
            for s in slides["slide_id"]
        ]
        mean = np.concatenate(feats).mean(axis=0)
        for sid in slides["slide_id"]:
            with h5py.File(out / f"{sid}.h5", "w") as f:
                f.create_dataset("features", data=mean[None, :])  # TRIDENT writes (1, D)
    return out


def _spec(bench_data: Path, embeddings: Path, small_spec: Any) -> dict[str, Any]:
    raw = small_spec(bench_data)
    raw["feature_sets"] = [
        raw["feature_sets"][0],
        {"name": "slide-enc", "features": str(embeddings), "level": "slide"},
    ]
    raw["models"][0]["pooling"] = "mean"
    return raw


def test_slide_embeddings_run_with_the_linear_protocol_only(
    bench_data: Path, patient_mean_embeddings: Path, small_spec: Any, tmp_path: Path
) -> None:
    raw = _spec(bench_data, patient_mean_embeddings, small_spec)
    bench = resolve_bench(spec_from_dict(raw))
    cells = plan_cells(bench)
    assert {(c.feature_set, c.model) for c in cells} == {
        ("real", "linear"),
        ("real", "meanpool"),
        ("slide-enc", "linear"),
    }
    run = run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=0, progress=False)
    assert not run.failures and run.n_ran == len(cells) == 3 * 2 * 3
    assert any("slide-enc" in n and "meanpool" in n for n in run.notes)
    with ResultStore.in_dir(tmp_path / "b") as store:
        for task in ("os", "msi"):
            preds = store.predictions(task=task)
            linear = preds[preds["model"] == "linear"].set_index(["seed", "fold", "patient_id"])
            patch = linear[linear["feature_set"] == "real"].sort_index()
            slide = linear[linear["feature_set"] == "slide-enc"].sort_index()
            assert patch.index.equals(slide.index) and len(patch) == 40
            # the same embeddings, splits and model: the same predictions
            outputs = ["risk"] if task == "os" else ["prob_0", "prob_1"]
            np.testing.assert_allclose(
                slide[outputs].to_numpy(float), patch[outputs].to_numpy(float), atol=1e-6
            )
    board = build_leaderboard(tmp_path / "b", n_boot=50)
    entries = set(zip(board.data.scores["feature_set"], board.data.scores["model"], strict=True))
    assert ("slide-enc", "linear") in entries and ("slide-enc", "meanpool") not in entries


def test_slide_level_problems_are_reported(
    bench_data: Path, patient_mean_embeddings: Path, small_spec: Any, tmp_path: Path
) -> None:
    raw = _spec(bench_data, patient_mean_embeddings, small_spec)
    raw["models"] = [m for m in raw["models"] if m["protocol"] == "mil"]
    with pytest.raises(ConfigError, match="need a model with protocol: linear"):
        spec_from_dict(raw)
    raw = _spec(bench_data, patient_mean_embeddings, small_spec)
    raw["feature_sets"][1]["stamp_mpp"] = 0.5
    with pytest.raises(ConfigError, match="stamp_mpp applies to patch features only"):
        spec_from_dict(raw)
    partial = tmp_path / "partial"
    partial.mkdir()
    files = sorted(patient_mean_embeddings.glob("*.h5"))
    for f in files[2:]:
        (partial / f.name).symlink_to(f)
    raw = _spec(bench_data, partial, small_spec)
    with pytest.raises(ConfigError, match="2 slide\\(s\\) have no file"):
        resolve_bench(spec_from_dict(raw))


def test_an_encoders_pretraining_patients_are_excluded_by_construction(
    bench_data: Path, patient_mean_embeddings: Path, small_spec: Any, tmp_path: Path
) -> None:
    """A slide-embedding folder whose manifest names its encoder's pre-training slides keeps
    their patients out of that feature set's test parts without an exclusion list; an
    ``exclude`` naming an encoder folder (pretrain_slides.csv) works as a table does."""
    import json
    import shutil

    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    emb = tmp_path / "emb"
    shutil.copytree(patient_mean_embeddings, emb)
    seen = sorted(table["patient_id"].unique())[:5]
    slides = table[table["patient_id"].isin(seen)]["slide_id"].tolist()
    (emb / "slide_embeddings.json").write_text(json.dumps({"pretrain_slides": slides}))
    raw = _spec(bench_data, emb, small_spec)
    bench = resolve_bench(spec_from_dict(raw))
    fs = bench.feature_sets["slide-enc"]
    assert fs.excluded == set(seen) and bench.feature_sets["real"].excluded == set()
    assert "pre-training slides" in fs.exclude_note and "5 patient(s)" in fs.exclude_note

    enc = tmp_path / "enc"
    enc.mkdir()
    others = sorted(table["patient_id"].unique())[5:8]
    table[table["patient_id"].isin(others)][["slide_id", "patient_id"]].to_csv(
        enc / "pretrain_slides.csv", index=False
    )
    raw["feature_sets"][0]["exclude"] = str(enc)
    raw["feature_sets"][1]["exclude"] = str(enc)
    bench = resolve_bench(spec_from_dict(raw))
    assert bench.feature_sets["real"].excluded == set(others)
    assert bench.feature_sets["slide-enc"].excluded == set(seen) | set(others)
    run = run_benchmark(spec_from_dict(raw), tmp_path / "b", workers=0, progress=False)
    assert not run.failures
    with ResultStore.in_dir(tmp_path / "b") as store:
        preds = store.predictions(task="os")
    scored = set(preds[preds["feature_set"] == "slide-enc"]["patient_id"])
    assert scored and not scored & (set(seen) | set(others))
    assert set(others).isdisjoint(preds[preds["feature_set"] == "real"]["patient_id"])

    # a folder that records nothing is refused with the reason
    raw["feature_sets"][0]["exclude"] = str(patient_mean_embeddings)
    with pytest.raises(ConfigError, match="records no pre-training slides"):
        resolve_bench(spec_from_dict(raw))
