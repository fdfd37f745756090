"""Leave-one-site-out splits: one fold per site whose test part is that site, validation carved
from the training sites; as a split function, in a training run and as a benchmark policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncoslide.bench.resolve import audit_bench_splits, resolve_bench
from oncoslide.bench.spec import spec_from_dict
from oncoslide.cohort.splits import audit_splits, leave_one_site_out
from oncoslide.errors import ConfigError, SplitLeakageError


def _patients(n_sites: int = 5, per_site: int = 12) -> tuple[list[str], list[str], list[int]]:
    ids = [f"P{i:03d}" for i in range(n_sites * per_site)]
    sites = [f"S{i // per_site}" for i in range(len(ids))]
    labels = [i % 2 for i in range(len(ids))]
    return ids, sites, labels


def test_one_fold_per_site_whose_test_part_is_that_site() -> None:
    ids, sites, labels = _patients()
    site_of = dict(zip(ids, sites, strict=True))
    splits = leave_one_site_out(ids, sites, seeds=(0, 1), strata=labels, val_fraction=0.2)
    for _, by_seed in splits.groupby("seed"):
        assert sorted(by_seed["fold"].unique()) == list(range(5))
        for fold, rows in by_seed.groupby("fold"):
            part_sites = {
                p: set(rows.loc[rows["part"] == p, "patient_id"].map(site_of))
                for p in ("train", "val", "test")
            }
            # fold k tests the k-th site (sorted), all of it and nothing else
            assert part_sites["test"] == {f"S{fold}"}
            assert (rows["part"] == "test").sum() == 12
            # validation: whole training sites, never the tested one nor a training site
            assert len(part_sites["val"]) == 1 and not part_sites["val"] & part_sites["train"]
            assert len(part_sites["train"]) == 3
        # each patient is tested exactly once per seed
        tested = by_seed.loc[by_seed["part"] == "test", "patient_id"]
        assert tested.is_unique and set(tested) == set(ids)
    # the test parts do not depend on the seed; the validation site may
    s0, s1 = (splits[splits["seed"] == s].set_index(["fold", "patient_id"])["part"] for s in (0, 1))
    assert ((s0 == "test") == (s1 == "test")).all()
    audit_splits(splits, patient_ids=ids, sites=site_of)


def test_without_validation_every_other_site_trains() -> None:
    ids, sites, _ = _patients(n_sites=2)
    splits = leave_one_site_out(ids, sites, val_fraction=0.0)
    assert set(splits["part"]) == {"train", "test"}
    assert splits.groupby("fold")["part"].value_counts().unstack().eq(12).all().all()


def test_too_few_sites_are_refused() -> None:
    ids, sites, _ = _patients(n_sites=2)
    with pytest.raises(ConfigError, match="at least 3 sites"):
        leave_one_site_out(ids, sites, val_fraction=0.2)
    with pytest.raises(ConfigError, match="unique"):
        leave_one_site_out([*ids, ids[0]], [*sites, sites[0]])


def test_a_patient_moved_across_sites_is_caught_by_the_audit() -> None:
    ids, sites, _ = _patients()
    site_of = dict(zip(ids, sites, strict=True))
    splits = leave_one_site_out(ids, sites)
    victim = splits.index[(splits["fold"] == 0) & (splits["part"] == "test")][0]
    splits.loc[victim, "part"] = "train"
    with pytest.raises(SplitLeakageError):
        audit_splits(splits, patient_ids=ids, sites=site_of)


def _spec(data: Path, split: object) -> dict[str, object]:
    return {
        "name": "loso",
        "cohort": str(data / "cohort.csv"),
        "folds": 3,
        "seeds": [0],
        "feature_sets": [{"name": "real", "features": str(data / "features")}],
        "tasks": [{"name": "os", "kind": "survival", "min_events_per_fold": 1, "split": split}],
        "models": [{"name": "linear", "protocol": "linear"}],
    }


def test_benchmark_policy_leave_one_site_out(tiny_cohort: Path) -> None:
    table = pd.read_csv(tiny_cohort / "cohort.csv", dtype={"patient_id": str})
    site_of = table.drop_duplicates("patient_id").set_index("patient_id")["site"].astype(str)
    # the shorthand, the hyphenated policy name and the underscore one mean the same
    forms = (
        "leave-one-site-out",
        {"policy": "leave-one-site-out"},
        {"policy": "leave_one_site_out"},
    )
    resolved = [resolve_bench(spec_from_dict(_spec(tiny_cohort, f))) for f in forms]
    task = resolved[0].tasks["os"]
    assert task.spec.split.policy == "leave_one_site_out"
    assert "leave-one-site-out" in task.describe_split()
    splits = task.splits
    assert len(task.folds) == site_of.nunique()  # one fold per site, whatever `folds` says
    for _, rows in splits.groupby("fold"):
        tested = set(rows.loc[rows["part"] == "test", "patient_id"].map(site_of))
        fitted = set(rows.loc[rows["part"] != "test", "patient_id"].map(site_of))
        assert len(tested) == 1 and not tested & fitted
    for other in resolved[1:]:
        pd.testing.assert_frame_equal(other.tasks["os"].splits, splits)
    audit_bench_splits(resolved[0])


def test_benchmark_policy_refuses_folds_and_test_filters(tiny_cohort: Path) -> None:
    for split, message in (
        ({"policy": "leave-one-site-out", "folds": 3}, "one fold per site"),
        ({"policy": "leave_one_site_out", "test_filter": {"cohort": ["SIM-A"]}}, "test_filter"),
    ):
        with pytest.raises(ConfigError, match=message):
            spec_from_dict(_spec(tiny_cohort, split))


def test_training_run_with_leave_one_site_out_splits(tiny_cohort: Path, tmp_path: Path) -> None:
    """A run given these splits (train --splits FILE) trains one model per site."""
    from oncoslide.cohort.splits import save_splits
    from oncoslide.cohort.table import load_cohort
    from oncoslide.training import cross_validate, make_config

    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    sites = cohort.patients.loc[cohort.patient_ids, "site"].astype(str).to_numpy()
    splits = leave_one_site_out(cohort.patient_ids, sites)
    save_splits(tmp_path / "splits.csv", splits)
    config = make_config(
        task="survival", folds=int(splits["fold"].nunique()), epochs=1, batch_size=8,
        n_boot=10, progress=False, site_preserving=True,
    )  # fmt: skip
    result = cross_validate(cohort, config, tmp_path / "run", splits=splits)
    assert sorted(result.metrics["fold"].unique()) == sorted(splits["fold"].unique())
    preds = result.predictions
    site_of = dict(zip(cohort.patient_ids, sites, strict=True))
    assert (
        preds.groupby("fold")["patient_id"].agg(lambda s: len({site_of[p] for p in s})) == 1
    ).all()
    assert np.isfinite(result.metrics["value"]).any()
