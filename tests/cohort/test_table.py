"""Cohort tables: normalisation, one error listing every problem, and the Cohort accessors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncoslide.cohort import Cohort, load_cohort
from oncoslide.errors import CohortValidationError, ConfigError, FeatureFileError
from oncoslide.features import PatchGrid, write_feature_file
from oncoslide.survival import make_survival

GRID = PatchGrid(
    patch_size=224,
    patch_size_level0=224,
    target_mpp=0.5,
    level0_mpp=0.5,
    level0_width=1000,
    level0_height=1000,
)


def _features(folder: Path, slide_id: str, n: int, d: int = 4) -> Path:
    feats = np.full((n, d), len(slide_id), dtype=np.float32)
    coords = np.zeros((n, 2), dtype=np.int64)
    return write_feature_file(folder / f"{slide_id}.h5", feats, coords, grid=GRID, encoder="e")


# Patient P2 has two slides; P3 has no time (excluded from survival, not an error).
ROWS = [
    # patient, slide, time, event, msi, n_patches
    ("P2", "s2b", 5.0, 1, "MSI", 3),
    ("P1", "s1", 10.0, 0, "MSS", 2),
    ("P2", "s2a", 5.0, 1, "MSI", 4),
    ("P3", "s3", None, None, "MSS", 1),
    ("P4", "s4", 7.5, 0, None, 5),
]


@pytest.fixture
def good(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    feat_dir = tmp_path / "features"
    for _, sid, *_, n in ROWS:
        _features(feat_dir, sid, n)
    df = pd.DataFrame(
        [r[:5] for r in ROWS], columns=["patient_id", "slide_id", "time", "event", "msi"]
    )
    df["cohort"] = "CRC"
    return df, feat_dir


def _problems(exc: pytest.ExceptionInfo[CohortValidationError]) -> str:
    return "\n".join(exc.value.problems)


# ---------------------------------------------------------------------------------------------
# a valid cohort


def test_valid_cohort_tables_and_accessors(good: tuple[pd.DataFrame, Path]) -> None:
    df, feat_dir = good
    c = load_cohort(df, feat_dir, label_cols=["msi"])
    assert isinstance(c, Cohort)
    assert c.patient_ids == ["P1", "P2", "P3", "P4"]
    assert c.feature_dim == 4
    assert list(c.patients["n_slides"]) == [1, 2, 1, 1]
    assert list(c.patients["n_patches"]) == [2, 7, 1, 5]
    assert list(c.slides["slide_id"]) == ["s2b", "s1", "s2a", "s3", "s4"]  # table order kept
    assert list(c.slides["n_patches"]) == [3, 2, 4, 1, 5]
    assert c.slide_ids("P2") == ["s2a", "s2b"]
    assert c.slide_paths("P2") == [feat_dir / "s2a.h5", feat_dir / "s2b.h5"]
    assert c.patients.loc["P2", "cohort"] == "CRC"
    assert c.notes == ()


def test_survival_labels_and_missing_targets(good: tuple[pd.DataFrame, Path]) -> None:
    df, feat_dir = good
    c = load_cohort(df, feat_dir, label_cols=["msi"])
    assert c.patients_with("time", "event") == ["P1", "P2", "P4"]
    assert c.patients_with("msi") == ["P1", "P2", "P3"]
    y = c.survival(["P4", "P1", "P2"])
    expected = make_survival([0, 0, 1], [7.5, 10.0, 5.0])
    np.testing.assert_array_equal(y, expected)
    assert list(c.labels("msi", ["P3", "P1"])) == ["MSS", "MSS"]
    with pytest.raises(ConfigError, match="P3"):
        c.survival()  # P3 has no time: the caller must select with patients_with
    with pytest.raises(ConfigError, match="no patient-level column"):
        c.labels("kras")
    with pytest.raises(ConfigError, match="unknown patient"):
        c.slide_paths("P9")


def test_subset(good: tuple[pd.DataFrame, Path]) -> None:
    df, feat_dir = good
    c = load_cohort(df, feat_dir).subset(["P2", "P4"])
    assert c.patient_ids == ["P2", "P4"]
    assert sorted(c.slides["slide_id"]) == ["s2a", "s2b", "s4"]
    assert c.feature_dim == 4
    np.testing.assert_array_equal(c.survival(), make_survival([1, 0], [5.0, 7.5]))
    with pytest.raises(ConfigError, match="unknown patient"):
        c.subset(["P1"])


def test_patient_value_given_on_one_slide_only_is_the_patients(tmp_path: Path) -> None:
    df = pd.DataFrame({"patient_id": ["A", "A"], "slide_id": ["a1", "a2"], "msi": ["MSI", None]})
    c = load_cohort(df, label_cols=["msi"])
    assert c.labels("msi") == ["MSI"]


def test_csv_and_parquet_keep_ids_as_strings(tmp_path: Path) -> None:
    df = pd.DataFrame({"patient_id": ["007", "008"], "slide_id": ["001", "002 "], "time": [1, 2],
                       "event": [True, False]})  # fmt: skip
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet", index=False)
    for name in ("t.csv", "t.parquet"):
        c = load_cohort(tmp_path / name)
        assert c.patient_ids == ["007", "008"]
        assert list(c.slides["slide_id"]) == ["001", "002"]  # whitespace stripped
        assert c.feature_dim is None
        np.testing.assert_array_equal(c.survival(), make_survival([1, 0], [1.0, 2.0]))


def test_events_accept_bools_strings_and_floats() -> None:
    df = pd.DataFrame(
        {
            "patient_id": list("abcdef"),
            "slide_id": list("ABCDEF"),
            "time": [1, 2, 3, 4, 5, 6],
            "event": [True, "0", "1", 0.0, 1.0, "false"],
        }
    )
    c = load_cohort(df)
    assert list(c.survival()["event"]) == [True, False, True, False, True, False]


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CohortValidationError, match=r"unsupported table format '\.xlsx'"):
        load_cohort(tmp_path / "t.xlsx")
    with pytest.raises(CohortValidationError, match="file not found"):
        load_cohort(tmp_path / "t.csv")


# ---------------------------------------------------------------------------------------------
# TCGA


def test_tcga_barcodes_give_patient_and_site(tmp_path: Path) -> None:
    slides = [
        "TCGA-A2-A0CM-01Z-00-DX1.AC6A2D9D-6A6E-4E3E-9F59-5B8C6B5E1F0A",
        "TCGA-A2-A0CM-01Z-00-DX2.11111111-6A6E-4E3E-9F59-5B8C6B5E1F0A",
        "TCGA-BH-A0B3-01Z-00-DX1.22222222-6A6E-4E3E-9F59-5B8C6B5E1F0A",
    ]
    for s in slides:
        _features(tmp_path, s, 2)
    c = load_cohort(pd.DataFrame({"slide_id": slides}), tmp_path)
    assert c.patient_ids == ["TCGA-A2-A0CM", "TCGA-BH-A0B3"]
    assert list(c.patients["site"]) == ["A2", "BH"]
    assert c.slide_paths("TCGA-A2-A0CM") == [tmp_path / f"{s}.h5" for s in slides[:2]]
    assert any("patient_id derived" in n for n in c.notes)
    assert any("site derived" in n for n in c.notes)


def test_site_is_not_derived_from_non_barcodes() -> None:
    c = load_cohort(pd.DataFrame({"patient_id": ["p1"], "slide_id": ["s1"]}))
    assert "site" not in c.patients.columns


def test_slide_barcode_of_another_patient_is_a_problem() -> None:
    df = pd.DataFrame({"patient_id": ["TCGA-A2-A0CM"], "slide_id": ["TCGA-A2-A0CN-01Z-00-DX1"]})
    with pytest.raises(CohortValidationError, match="belong to another patient"):
        load_cohort(df)


# ---------------------------------------------------------------------------------------------
# every problem at once


def test_malformed_table_lists_every_problem_in_one_error(tmp_path: Path) -> None:
    feat_dir = tmp_path / "features"
    for sid in ("ok1", "ok2", "dup", "shared", "conf1", "conf2", "neg", "inf", "txt", "ev"):
        _features(feat_dir, sid, 3, d=4)
    _features(feat_dir, "wide", 3, d=8)
    (feat_dir / "broken.h5").write_bytes(b"truncated")
    rows = [
        ("p1", "ok1", 1.0, 0, "a"),
        ("p2", "ok2", 2.0, 1, "b"),
        ("p3", "dup", 3.0, 0, "a"),
        ("p3", "dup", 3.0, 0, "a"),  # duplicate slide id
        ("p4", "shared", 4.0, 0, "a"),
        ("p5", "shared", 4.0, 0, "a"),  # one slide, two patients
        ("p6", "conf1", 5.0, 1, "a"),
        ("p6", "conf2", 6.0, 1, "b"),  # conflicting time and label for p6
        ("p7", "neg", -1.0, 0, "a"),  # negative time
        ("p8", "inf", np.inf, 0, "a"),  # infinite time
        ("p9", "txt", "soon", 0, "a"),  # non-numeric time
        ("p10", "ev", 1.0, 2, "a"),  # event not 0/1
        ("p11", "nofile", 1.0, 0, "a"),  # no feature file
        ("p12", "broken", 1.0, 0, "a"),  # unreadable feature file
        ("p13", "wide", 1.0, 0, "a"),  # D=8 where the others have D=4
    ]
    df = pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event", "msi"])
    path = tmp_path / "cohort.csv"
    df.to_csv(path, index=False)
    with pytest.raises(CohortValidationError) as exc:
        load_cohort(path, feat_dir, label_cols=["msi", "kras"])
    problems = exc.value.problems
    text = _problems(exc)
    expected = {
        "missing label column 'kras'": "missing label column 'kras'",
        "non-numeric": "txt ('soon')",
        "negative": "neg (-1)",
        "non-finite": "inf (inf)",
        "not 0/1": "ev (2)",
        "duplicate slide id": "dup (2 rows)",
        "more than one patient": "shared -> p4, p5",
        "conflicting 'time'": "p6 (5.0, 6.0)",
        "conflicting 'msi'": "p6 (a, b)",
        "no feature file": "nofile",
        "unreadable": "broken: cannot read HDF5",
        "feature dimensions disagree": "D=8 in 1 slide(s) (e.g. wide)",
    }
    for key, detail in expected.items():
        hits = [p for p in problems if key in p]
        assert len(hits) == 1, f"{key!r} not reported once in:\n{text}"
        assert detail in hits[0], f"{detail!r} missing from {hits[0]!r}"
    assert len(problems) == len(expected)
    assert str(path) in str(exc.value) and f"{len(expected)} problems" in str(exc.value)


def test_missing_columns_and_required_survival() -> None:
    df = pd.DataFrame({"slide_id": ["s1", "s2"], "time": [1, 2]})
    with pytest.raises(CohortValidationError) as exc:
        load_cohort(df, require_survival=True)
    text = _problems(exc)
    assert "missing required column 'patient_id'" in text
    assert "missing survival column 'event'" in text
    assert "missing survival column 'time'" not in text
    with pytest.raises(CohortValidationError, match="missing required column 'slide_id'"):
        load_cohort(pd.DataFrame({"patient_id": ["p"]}))


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("semi.csv", "slide_id;patient_id;time;event\ns1;p1;3;1\n", "separated by ';'"),
        ("pipe.csv", "slide_id|patient_id\ns1|p1\n", "separated by '|'"),
        ("commas.tsv", "slide_id,patient_id\ns1,p1\n", "rename it to .csv"),
        ("tabs.csv", "slide_id\tpatient_id\ns1\tp1\n", "rename it to .tsv"),
    ],
)
def test_another_separator_is_named_beside_the_missing_columns(
    tmp_path: Path, name: str, text: str, said: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CohortValidationError) as exc:
        load_cohort(path)
    problems = exc.value.problems
    assert "missing required column 'slide_id'" in problems
    hints = [p for p in problems if "seems to be separated by" in p]
    assert len(hints) == 1 and said in hints[0], problems
    assert "comma-separated .csv and tab-separated .tsv" in hints[0]
    # no hint when the header was split right: a ';' in a value is data, not a separator
    right = tmp_path / "right.csv"
    right.write_text("patient_id,time\np1;x,3\n")
    with pytest.raises(CohortValidationError) as exc:
        load_cohort(right)
    assert not [p for p in exc.value.problems if "separated" in p]


def test_time_without_event_is_a_problem_even_when_not_required() -> None:
    df = pd.DataFrame({"patient_id": ["p"], "slide_id": ["s"], "time": [3.0]})
    with pytest.raises(CohortValidationError, match="missing survival column 'event'"):
        load_cohort(df)


def test_empty_ids_are_reported() -> None:
    df = pd.DataFrame({"patient_id": ["p1", " ", None], "slide_id": ["s1", "s2", "s3"]})
    with pytest.raises(CohortValidationError, match="2 row\\(s\\) with an empty patient_id"):
        load_cohort(df)


def test_long_lists_are_cut_after_ten_examples() -> None:
    n = 25
    df = pd.DataFrame(
        {
            "patient_id": [f"p{i}" for i in range(n)],
            "slide_id": [f"s{i:02d}" for i in range(n)],
            "time": [-1.0] * n,
            "event": [0] * n,
        }
    )
    with pytest.raises(CohortValidationError) as exc:
        load_cohort(df)
    (problem,) = exc.value.problems
    assert problem.startswith("'time': 25 negative")
    assert "s09 (-1)" in problem and "s10" not in problem and problem.endswith("and 15 more")


def test_patient_without_any_patch_is_a_problem(tmp_path: Path) -> None:
    _features(tmp_path, "s1", 0)
    _features(tmp_path, "s2", 2)
    df = pd.DataFrame({"patient_id": ["a", "b"], "slide_id": ["s1", "s2"]})
    with pytest.raises(CohortValidationError, match=r"1 patient\(s\) have no patches.*: a"):
        load_cohort(df, tmp_path)


def test_missing_features_dir(tmp_path: Path) -> None:
    df = pd.DataFrame({"patient_id": ["a"], "slide_id": ["s1"]})
    with pytest.raises(CohortValidationError, match="features folder not found"):
        load_cohort(df, tmp_path / "nowhere")


def test_stamp_files_without_resolution_are_caught_at_validation(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "s1.h5", "w") as f:
        f["feats"] = np.zeros((2, 4), np.float16)
        f["coords"] = np.zeros((2, 2))
        f.attrs["unit"] = "um"
    df = pd.DataFrame({"patient_id": ["a"], "slide_id": ["s1"]})
    with pytest.raises(CohortValidationError, match="pass stamp_mpp"):
        load_cohort(df, tmp_path)
    assert load_cohort(df, tmp_path, stamp_mpp=0.5).feature_dim == 4


def test_check_features_false_opens_no_file(tmp_path: Path) -> None:
    (tmp_path / "s1.h5").write_bytes(b"not hdf5")  # would be a problem if it were opened
    df = pd.DataFrame({"patient_id": ["a", "b"], "slide_id": ["s1", "s2"]})
    c = load_cohort(df, tmp_path, check_features=False)
    assert c.feature_dim is None
    assert c.slide_paths("a") == [tmp_path / "s1.h5"]
    with pytest.raises(FeatureFileError, match="no feature file"):
        c.slide_paths("b")


def test_several_files_for_a_slide_are_noted(tmp_path: Path) -> None:
    _features(tmp_path, "s1", 2)
    (tmp_path / "s1.pt").write_bytes(b"")
    c = load_cohort(pd.DataFrame({"patient_id": ["a"], "slide_id": ["s1"]}), tmp_path)
    assert c.slide_paths("a") == [tmp_path / "s1.h5"]
    assert any("several feature files" in n for n in c.notes)


def test_bad_feature_files_are_listed_or_dropped(good: tuple[pd.DataFrame, Path]) -> None:
    df, feat_dir = good
    (feat_dir / "s2b.h5").write_bytes(b"not hdf5")  # P2 keeps its other slide
    (feat_dir / "s3.h5").unlink()  # P3's only slide
    _features(feat_dir, "s4", 0)  # an empty bag: P4's only slide
    with pytest.raises(CohortValidationError) as info:
        load_cohort(df, feat_dir)
    text = _problems(info)
    assert "s3" in text and "s2b" in text  # error mode: every problem listed

    cohort = load_cohort(df, feat_dir, bad_features="drop")
    assert cohort.patient_ids == ["P1", "P2"]
    assert cohort.slide_ids("P2") == ["s2a"] and cohort.patients.loc["P2", "n_patches"] == 4
    dropped = cohort.dropped_slides.set_index("slide_id")
    assert sorted(dropped.index) == ["s2b", "s3", "s4"]
    assert dropped.loc["s3", "reason"].startswith("missing")
    assert dropped.loc["s2b", "reason"].startswith("unreadable")
    assert dropped.loc["s4", "reason"].startswith("empty")
    assert cohort.dropped_patients == ["P3", "P4"]
    note = next(n for n in cohort.notes if "left out for unusable features" in n)
    assert "3 slide(s)" in note and "2 patient(s)" in note
    assert cohort.drop_note == note

    for sid in ("s1", "s2a"):
        (feat_dir / f"{sid}.h5").unlink()
    with pytest.raises(CohortValidationError, match="no slide has usable features"):
        load_cohort(df, feat_dir, bad_features="drop")


def test_feature_files_in_two_encoder_folders_are_one_problem_with_one_hint(
    good: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    df, _ = good
    root = tmp_path / "trident"
    for sub in ("features_uni", "features_conch"):
        for _, sid, *_, n in ROWS:
            _features(root / "20x_256px_0px_overlap" / sub, sid, n)
    features = root / "20x_256px_0px_overlap"
    # a set-up mistake, not a bad file: refused with --skip-bad-features too
    for bad in ("error", "drop"):
        with pytest.raises(CohortValidationError) as exc:
            load_cohort(df, features, bad_features=bad)
        assert len(exc.value.problems) == 1, exc.value.problems
        problem = exc.value.problems[0]
        assert problem.startswith(
            f"5 slide(s) have feature files in several subfolders of {features} "
            "(features_conch/, features_uni/): "
        )
        assert problem.count("point the features folder at one of them") == 1
        assert problem.endswith(f"e.g. {features / 'features_conch'}")
        for sid in ("s1", "s2a", "s2b", "s3", "s4"):
            assert problem.count(f"{sid},") + problem.count(f"{sid};") == 1, (sid, problem)
    c = load_cohort(df, features / "features_uni")  # the way out the hint names
    assert c.feature_dim == 4
