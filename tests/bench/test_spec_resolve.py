"""Benchmark specs: validation of the YAML, and resolution against the cohort's data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from oncoslide.bench.resolve import audit_bench_splits, audit_train_test, resolve_bench
from oncoslide.bench.shuffle import shuffle_features
from oncoslide.bench.spec import load_spec, spec_from_dict
from oncoslide.errors import ConfigError, SplitLeakageError


def test_yaml_paths_are_relative_to_the_spec_file(
    bench_data: Path, tmp_path: Path, small_spec: Any, write_spec: Any
) -> None:
    spec = small_spec(bench_data)
    spec["cohort"] = "cohort.csv"
    spec["feature_sets"][0]["features"] = "features"
    path = write_spec(bench_data / "tmp-spec.yaml", spec)
    try:
        loaded = load_spec(path)
        assert loaded.path(loaded.cohort) == (bench_data / "cohort.csv").resolve()
        assert loaded.path(loaded.feature_sets[0].features).is_dir()
    finally:
        path.unlink()


def test_every_spec_problem_is_listed_at_once(bench_data: Path, small_spec: Any) -> None:
    spec = small_spec(bench_data)
    spec["models"].append({"name": "linear", "protocol": "linear"})  # duplicate name
    spec["tasks"].append({"name": "grade", "kind": "binary"})  # no target
    spec["models"][1]["train"]["epochs"] = 0  # invalid TrainConfig value
    spec["models"][1]["train"]["seed"] = 3  # owned by the benchmark
    spec["unknown_key"] = 1
    with pytest.raises(ConfigError) as info:
        spec_from_dict(spec)
    text = str(info.value)
    for fragment in ("unique", "target", "epochs", "seed", "unknown_key"):
        assert fragment in text, fragment


def test_bad_yaml_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)


def test_unknown_columns_of_every_task_are_reported_together(
    bench_data: Path, small_spec: Any
) -> None:
    spec = small_spec(bench_data)
    spec["tasks"] = [
        {"name": "a", "kind": "binary", "target": "nope"},
        {"name": "b", "kind": "survival", "filter": {"stage": ["I"]}},
        {"name": "c", "kind": "survival", "time": "pfs_time", "event": "pfs_event"},
    ]
    with pytest.raises(ConfigError) as info:
        resolve_bench(spec_from_dict(spec))
    text = str(info.value)
    assert "3 problems" in text
    assert "'nope'" in text and "'stage'" in text and "'pfs_time'" in text


def test_too_few_events_or_class_members_per_fold_is_refused(
    bench_data: Path, small_spec: Any
) -> None:
    spec = small_spec(bench_data, folds=3)
    spec["tasks"] = [
        {"name": "os", "kind": "survival", "min_events_per_fold": 30},
        {"name": "msi", "kind": "binary", "target": "msi", "min_per_class_per_fold": 30},
    ]
    with pytest.raises(ConfigError) as info:
        resolve_bench(spec_from_dict(spec))
    assert "too few events" in str(info.value) and "too few class members" in str(info.value)


def test_a_filter_that_keeps_nobody_is_an_error(bench_data: Path, small_spec: Any) -> None:
    spec = small_spec(bench_data)
    spec["tasks"] = [{"name": "os", "kind": "survival", "filter": {"cohort": ["NOPE"]}}]
    with pytest.raises(ConfigError, match="keeps no patient"):
        resolve_bench(spec_from_dict(spec))


def test_resolved_tasks_share_splits_across_feature_sets(bench_data: Path, small_spec: Any) -> None:
    bench = resolve_bench(spec_from_dict(small_spec(bench_data)))
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str})
    os_task, msi = bench.tasks["os"], bench.tasks["msi"]
    assert set(os_task.patients) == set(table["patient_id"])
    assert msi.classes == ("0", "1") and msi.kind == "binary"
    assert os_task.n_events == int(table.drop_duplicates("patient_id")["event"].sum())
    # one split per task, patient-level: every patient tested exactly once per seed
    tests = os_task.splits[os_task.splits["part"] == "test"]
    assert tests["patient_id"].is_unique and len(tests) == len(os_task.patients)
    audit_bench_splits(bench)
    assert "3-fold" in os_task.describe_split()


def test_filtered_task_and_external_test_split(bench_data: Path, small_spec: Any) -> None:
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str})
    a, b = sorted(table["cohort"].unique())
    spec = small_spec(bench_data, seeds=[0, 1])
    spec["tasks"] = [
        {"name": "os-a", "kind": "survival", "filter": {"cohort": [a]}, "split": {"folds": 2}},
        {
            "name": "os-ext",
            "kind": "survival",
            "split": {"policy": "train_test", "test_filter": {"cohort": [b]}},
        },
    ]
    bench = resolve_bench(spec_from_dict(spec))
    in_a = set(table.loc[table["cohort"] == a, "patient_id"])
    in_b = set(table.loc[table["cohort"] == b, "patient_id"])
    assert set(bench.tasks["os-a"].patients) == in_a
    ext = bench.tasks["os-ext"].splits
    assert set(ext["fold"]) == {0}
    for _, rows in ext.groupby("seed"):
        assert set(rows.loc[rows["part"] == "test", "patient_id"]) == in_b
        assert set(rows.loc[rows["part"] != "test", "patient_id"]) == in_a
        assert (rows["part"] == "val").sum() > 0
    # validation carves differ between seeds; the external test set never does
    v0 = set(ext[(ext["seed"] == 0) & (ext["part"] == "val")]["patient_id"])
    v1 = set(ext[(ext["seed"] == 1) & (ext["part"] == "val")]["patient_id"])
    assert v0 != v1
    with pytest.raises(SplitLeakageError):
        audit_train_test(ext.assign(part="train"), test_ids=in_b)


def test_exclusion_lists_by_patient_or_slide(
    bench_data: Path, tmp_path: Path, small_spec: Any
) -> None:
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    by_patient = tmp_path / "seen.csv"
    pd.DataFrame({"patient_id": [*table["patient_id"].unique()[:3], "NOT-HERE"]}).to_csv(
        by_patient, index=False
    )
    by_slide = tmp_path / "seen_slides.csv"
    pd.DataFrame({"slide_id": table["slide_id"].iloc[:2]}).to_csv(by_slide, index=False)
    spec = small_spec(bench_data)
    spec["feature_sets"][0]["exclude"] = str(by_patient)
    spec["feature_sets"][1]["exclude"] = str(by_slide)
    bench = resolve_bench(spec_from_dict(spec))
    real, shuffled = bench.feature_sets["real"], bench.feature_sets["shuffled"]
    assert real.excluded == set(table["patient_id"].unique()[:3])
    assert shuffled.excluded == set(table["patient_id"].iloc[:2])
    assert (
        "4 patient(s)" in real.exclude_note and "3 patient(s) of this cohort" in real.exclude_note
    )
    assert "real: 3 patient(s) excluded" in bench.exclusion_report(bench.tasks["os"])
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"case": ["x"]}).to_csv(bad, index=False)
    spec["feature_sets"][1]["exclude"] = str(bad)
    with pytest.raises(ConfigError, match="patient_id or slide_id"):
        resolve_bench(spec_from_dict(spec))


def test_shuffled_features_give_every_slide_another_patients_file(
    bench_data: Path, tmp_path: Path
) -> None:
    mapping = shuffle_features(
        bench_data / "cohort.csv", bench_data / "features", tmp_path / "shuf", seed=4, copy=True
    )
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    assert sorted(mapping["slide_id"]) == sorted(table["slide_id"])
    assert (mapping["patient_id"] != mapping["source_patient_id"]).all()
    assert mapping["source_slide_id"].isin(table["slide_id"]).all()
    # each file is byte-identical to its source
    row = mapping.iloc[0]
    got = (tmp_path / "shuf" / f"{row['slide_id']}.h5").read_bytes()
    assert got == (bench_data / "features" / f"{row['source_slide_id']}.h5").read_bytes()
    again = shuffle_features(
        bench_data / "cohort.csv", bench_data / "features", tmp_path / "shuf2", seed=4
    )
    pd.testing.assert_frame_equal(mapping, again)  # deterministic given the seed


def test_site_preserving_splits_keep_each_site_in_one_test_fold(
    bench_data: Path, small_spec: Any
) -> None:
    table = pd.read_csv(bench_data / "cohort.csv", dtype={"patient_id": str})
    site_of = table.drop_duplicates("patient_id").set_index("patient_id")["site"].astype(str)
    assert site_of.nunique() >= 3
    spec = small_spec(bench_data, seeds=[0, 1])
    spec["tasks"] = [
        {"name": "os", "kind": "survival", "split": {"site_preserving": True}},
        {"name": "os-plain", "kind": "survival"},
    ]
    bench = resolve_bench(spec_from_dict(spec))
    splits = bench.tasks["os"].splits
    assert "site-preserving" in bench.tasks["os"].describe_split()
    for _, rows in splits.groupby("seed"):
        test = rows.loc[rows["part"] == "test"]
        assert test["patient_id"].is_unique and len(test) == len(site_of)
        # every site is tested in exactly one fold, and never trained or validated on there
        assert (test.groupby(test["patient_id"].map(site_of))["fold"].nunique() == 1).all()
        for _, fold in rows.groupby("fold"):
            tested = set(fold.loc[fold["part"] == "test", "patient_id"].map(site_of))
            fitted = set(fold.loc[fold["part"] != "test", "patient_id"].map(site_of))
            assert tested and fitted and not tested & fitted
    plain = bench.tasks["os-plain"].splits
    plain_test = plain[(plain["part"] == "test") & (plain["seed"] == 0)]
    assert (plain_test.groupby(plain_test["patient_id"].map(site_of))["fold"].nunique() > 1).any()
    audit_bench_splits(bench)

    # a split that puts one patient of a tested site into training is caught before training
    seed0 = splits["seed"] == 0
    victim = splits.loc[seed0 & (splits["part"] == "test")].iloc[0]
    fold = victim["fold"]
    partner = splits.loc[
        seed0
        & (splits["fold"] == fold)
        & (splits["part"] == "test")
        & (splits["patient_id"].map(site_of) == site_of[victim["patient_id"]])
        & (splits["patient_id"] != victim["patient_id"])
    ].index[0]
    tampered = splits.copy()
    tampered.loc[partner, "part"] = "train"
    bench.tasks["os"] = dataclasses.replace(bench.tasks["os"], splits=tampered)
    with pytest.raises(SplitLeakageError):
        audit_bench_splits(bench)

    too_many_folds = small_spec(bench_data, folds=site_of.nunique() + 1)
    too_many_folds["tasks"] = [
        {"name": "os", "kind": "survival", "split": {"site_preserving": True}}
    ]
    with pytest.raises(ConfigError, match="sites"):
        resolve_bench(spec_from_dict(too_many_folds))
