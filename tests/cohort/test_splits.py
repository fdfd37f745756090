from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from oncoslide.cohort.splits import (
    audit_splits,
    fold_parts,
    load_splits,
    make_splits,
    save_splits,
    survival_strata,
)
from oncoslide.errors import ConfigError, SplitLeakageError


def _ids(n: int) -> list[str]:
    return [f"P{i:04d}" for i in range(n)]


def test_folds_partition_patients_and_val_is_carved_from_training() -> None:
    ids = _ids(103)
    splits = make_splits(ids, n_folds=5, seeds=(0, 1), val_fraction=0.2)
    assert list(splits.columns) == ["patient_id", "seed", "fold", "part"]
    for seed in (0, 1):
        s = splits[splits.seed == seed]
        test = s[s.part == "test"]
        assert sorted(test.patient_id) == sorted(ids)  # each patient tested exactly once
        sizes = test.groupby("fold").size()
        assert sizes.max() - sizes.min() <= 1
        for k in range(5):
            parts = fold_parts(splits, seed, k)
            assert not set(parts["test"]) & set(parts["train"])
            assert not set(parts["test"]) & set(parts["val"])
            assert not set(parts["val"]) & set(parts["train"])
            n_rest = len(parts["train"]) + len(parts["val"])
            assert abs(len(parts["val"]) - 0.2 * n_rest) <= 2
    # different seeds give different folds
    a = splits[(splits.seed == 0) & (splits.part == "test")].set_index("patient_id").fold
    b = splits[(splits.seed == 1) & (splits.part == "test")].set_index("patient_id").fold
    assert (a.sort_index() != b.sort_index()).any()


def test_stratification_balances_labels() -> None:
    rng = np.random.default_rng(0)
    ids = _ids(200)
    labels = np.where(rng.random(200) < 0.2, "pos", "neg")
    splits = make_splits(ids, n_folds=5, strata=labels, val_fraction=0.0)
    lab = dict(zip(ids, labels, strict=True))
    test = splits[splits.part == "test"].copy()
    test["label"] = test.patient_id.map(lab)
    pos_per_fold = test[test.label == "pos"].groupby("fold").size()
    assert pos_per_fold.max() - pos_per_fold.min() <= 1
    assert (splits.part != "val").all()


def test_survival_strata_cross_event_and_time() -> None:
    time = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    event = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    strata = survival_strata(time, event, n_time_bins=2)
    assert list(strata) == ["e1t0", "e1t0", "e1t1", "e1t1", "e0t0", "e0t0", "e0t1", "e0t1"]


def test_site_preserving_keeps_each_site_in_one_fold() -> None:
    rng = np.random.default_rng(1)
    ids = _ids(150)
    sites = rng.choice([f"S{i}" for i in range(15)], size=150)
    splits = make_splits(ids, n_folds=5, sites=sites, val_fraction=0.2)
    site_of = dict(zip(ids, sites, strict=True))
    test = splits[splits.part == "test"].copy()
    test["site"] = test.patient_id.map(site_of)
    assert (test.groupby("site").fold.nunique() == 1).all()
    for k in range(5):
        fold = splits[splits.fold == k].copy()
        fold["site"] = fold.patient_id.map(site_of)
        by_part = fold.groupby("part").site.apply(set)
        assert not by_part["test"] & by_part["train"]
        assert not by_part["val"] & by_part["train"]


def test_site_preserving_needs_enough_sites() -> None:
    with pytest.raises(ConfigError, match="at least 5 sites"):
        make_splits(_ids(40), n_folds=5, sites=["A", "B", "C"] * 13 + ["A"])
    # two folds of two sites leave one site outside each test fold: no site-disjoint carve
    with pytest.raises(ConfigError, match="single site outside the test fold"):
        make_splits(_ids(40), n_folds=2, sites=["A", "B"] * 20)


def test_few_sites_give_a_validation_part_of_one_whole_site() -> None:
    ids = _ids(60)
    sites = np.array(["A", "B", "C", "D"] * 15)
    splits = make_splits(ids, n_folds=2, sites=sites, val_fraction=0.2)
    site_of = dict(zip(ids, sites, strict=True))
    for _, fold in splits.groupby("fold"):
        by_part = fold.groupby("part")["patient_id"].apply(lambda p: {site_of[i] for i in p})
        assert len(by_part["test"]) == 2 and len(by_part["val"]) == 1
        assert len(by_part["train"]) == 1
        # whole sites: every patient of the validation site is in the validation part
        val_site = next(iter(by_part["val"]))
        assert (fold.loc[fold["part"] == "val", "patient_id"].size) == 15
        assert val_site not in by_part["train"]


def test_audit_refuses_hand_made_overlap() -> None:
    ids = _ids(10)
    splits = make_splits(ids, n_folds=2, val_fraction=0.0)
    # put the first test patient of fold 0 into fold 0's training part as well
    leak_id = splits[(splits.fold == 0) & (splits.part == "test")].patient_id.iloc[0]
    leaked = pd.concat(
        [splits, pd.DataFrame([{"patient_id": leak_id, "seed": 0, "fold": 0, "part": "train"}])]
    )
    with pytest.raises(SplitLeakageError, match="two parts") as err:
        audit_splits(leaked)
    assert leak_id in str(err.value)


def test_audit_refuses_patient_in_two_test_folds_and_site_leak() -> None:
    splits = make_splits(_ids(10), n_folds=2, val_fraction=0.0)
    broken = splits.copy()
    pid = broken[(broken.fold == 1) & (broken.part == "train")].patient_id.iloc[0]
    broken.loc[(broken.fold == 1) & (broken.patient_id == pid), "part"] = "test"
    with pytest.raises(SplitLeakageError, match="more than one test fold"):
        audit_splits(broken)
    sites = {p: "same-site" for p in _ids(10)}
    with pytest.raises(SplitLeakageError, match="sites in both"):
        audit_splits(splits, sites=sites)


def test_audit_checks_patient_set() -> None:
    splits = make_splits(_ids(10), n_folds=2, val_fraction=0.0)
    with pytest.raises(SplitLeakageError, match="missing"):
        audit_splits(splits, patient_ids=[*_ids(10), "P9999"])


def test_save_and_reload_roundtrip(tmp_path) -> None:
    ids = _ids(30)
    splits = make_splits(ids, n_folds=3, seeds=(5,), val_fraction=0.25)
    path = save_splits(tmp_path / "splits.csv", splits)
    again = load_splits(path, patient_ids=ids)
    pd.testing.assert_frame_equal(
        again.sort_values(["seed", "fold", "patient_id"]).reset_index(drop=True),
        splits.sort_values(["seed", "fold", "patient_id"]).reset_index(drop=True),
    )
    # the same seed gives the same split
    assert make_splits(ids, n_folds=3, seeds=(5,), val_fraction=0.25).equals(splits)


def test_rejects_impossible_requests() -> None:
    with pytest.raises(ConfigError):
        make_splits(_ids(3), n_folds=5)
    with pytest.raises(ConfigError):
        make_splits(["a", "a", "b"], n_folds=2)
    with pytest.raises(ConfigError):
        make_splits(_ids(10), n_folds=2, val_fraction=1.0)


def test_small_cohorts_still_get_a_validation_part() -> None:
    splits = make_splits(_ids(8), n_folds=2, val_fraction=0.2)
    for k in range(2):
        parts = fold_parts(splits, 0, k)
        assert len(parts["test"]) == 4 and len(parts["val"]) >= 1 and len(parts["train"]) >= 1
    with pytest.raises(ConfigError, match="cannot be split"):
        make_splits(_ids(2), n_folds=2, val_fraction=0.2)


def _hand_made(val_of_fold: dict[int, list[str]]) -> pd.DataFrame:
    """Eight patients of four sites (P0000-P0001 at A, ... P0006-P0007 at D), two folds with
    whole sites as test parts (A, B | C, D); the given patients form each fold's validation."""
    ids = _ids(8)
    rows = []
    for fold, test in ((0, ids[:4]), (1, ids[4:])):
        for p in ids:
            part = "test" if p in test else "val" if p in val_of_fold[fold] else "train"
            rows.append({"patient_id": p, "seed": 0, "fold": fold, "part": part})
    return pd.DataFrame(rows)


SITES_OF_EIGHT = dict(zip(_ids(8), ["A", "A", "B", "B", "C", "C", "D", "D"], strict=True))


def test_audit_refuses_a_site_shared_by_training_and_validation() -> None:
    # fold 0 validates on one of D's two patients, fold 1 on one of B's: the other patient of
    # that site trains, so checkpoint choice would see the training sites' batch effects
    split = _hand_made({0: ["P0007"], 1: ["P0003"]})
    audit_splits(split)  # no patient leaks: only the site check can refuse it
    with pytest.raises(SplitLeakageError) as err:
        audit_splits(split, sites=SITES_OF_EIGHT)
    lines = str(err.value).splitlines()
    fold0 = [line for line in lines if "seed 0 fold 0" in line]
    fold1 = [line for line in lines if "seed 0 fold 1" in line]
    assert len(fold0) == 1 and "validation" in fold0[0] and "'D'" in fold0[0]
    assert len(fold1) == 1 and "validation" in fold1[0] and "'B'" in fold1[0]
    assert "test" not in fold0[0] + fold1[0]  # no site crosses the test boundary here
    # whole sites as validation parts pass
    audit_splits(_hand_made({0: ["P0006", "P0007"], 1: ["P0002", "P0003"]}), sites=SITES_OF_EIGHT)
    audit_splits(_hand_made({0: [], 1: []}), sites=SITES_OF_EIGHT)  # no validation part


@pytest.mark.parametrize(
    ("n_patients", "n_sites", "n_folds", "val_fraction"),
    [
        (60, 4, 2, 0.2),  # few sites: one whole site validates
        (45, 4, 3, 0.2),  # n_folds + 1 sites: one site left on each side of the carve
        (90, 6, 5, 0.2),
        (150, 15, 5, 0.2),
        (200, 40, 5, 0.3),
        (120, 12, 3, 0.1),
    ],
)
def test_site_preserving_splits_keep_every_part_site_disjoint(
    n_patients: int, n_sites: int, n_folds: int, val_fraction: float
) -> None:
    rng = np.random.default_rng(n_patients + n_sites)
    ids = _ids(n_patients)
    # every site has patients; uneven sizes
    sites = np.array([f"S{i}" for i in range(n_sites)] + [
        f"S{i}" for i in rng.integers(0, n_sites, n_patients - n_sites)
    ])  # fmt: skip
    rng.shuffle(sites)
    strata = survival_strata(rng.exponential(size=n_patients), rng.random(n_patients) < 0.5)
    site_of = dict(zip(ids, sites, strict=True))
    seeds = (0, 1, 2, 3)
    splits = make_splits(
        ids, n_folds=n_folds, seeds=seeds, strata=strata, sites=sites, val_fraction=val_fraction
    )
    audit_splits(splits, patient_ids=ids, sites=site_of)
    for (seed, fold), in_fold in splits.groupby(["seed", "fold"]):
        site_sets = {
            part: {site_of[p] for p in in_fold.loc[in_fold["part"] == part, "patient_id"]}
            for part in ("train", "val", "test")
        }
        where = f"seed {seed} fold {fold}"
        assert site_sets["train"] and site_sets["val"] and site_sets["test"], where
        assert not site_sets["train"] & site_sets["val"], where
        assert not site_sets["train"] & site_sets["test"], where
        assert not site_sets["val"] & site_sets["test"], where
        # whole sites: every patient of a validation site validates
        n_val = int((in_fold["part"] == "val").sum())
        assert n_val == sum(site_of[p] in site_sets["val"] for p in ids), where
