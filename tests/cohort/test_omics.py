"""Omics tables and gene groups: exact values back, every problem listed at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncoslide.cohort import load_omics
from oncoslide.errors import ConfigError, OmicsValidationError


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": ["P3", "P1", "P2"],
            "TP53": [3.0, 1.0, 2.0],
            "KRAS": [30, 10, 20],
            "EGFR": [-0.5, 0.25, 1e6],
        }
    )


def test_values_are_sorted_float64_and_unscaled(table: pd.DataFrame) -> None:
    om = load_omics(table)
    assert om.patient_ids == ["P1", "P2", "P3"]
    assert om.genes == ["TP53", "KRAS", "EGFR"]
    assert (om.values.dtypes == np.float64).all()
    assert om.values.loc["P3", "EGFR"] == -0.5 and om.values.loc["P2", "EGFR"] == 1e6
    expected = np.array([[3.0, 30.0], [1.0, 10.0]])
    np.testing.assert_array_equal(om.matrix(["P3", "P1"], ["TP53", "KRAS"]), expected)
    assert om.matrix(["P2"]).shape == (1, 3)
    assert om.groups == {}


def test_json_and_csv_groups(tmp_path: Path, table: pd.DataFrame) -> None:
    (tmp_path / "g.json").write_text(
        json.dumps({"p53": ["TP53"], "mapk": ["KRAS", "EGFR", "KRAS"]})
    )
    om = load_omics(table, tmp_path / "g.json")
    assert om.groups == {"p53": ["TP53"], "mapk": ["KRAS", "EGFR"]}  # duplicates dropped
    pd.DataFrame(
        {"gene": ["TP53", "KRAS", "KRAS", "EGFR"], "group": ["p53", "mapk", "ras", "mapk"]}
    ).to_csv(tmp_path / "g.csv", index=False)
    om = load_omics(table, tmp_path / "g.csv")
    assert om.groups == {"p53": ["TP53"], "mapk": ["KRAS", "EGFR"], "ras": ["KRAS"]}
    np.testing.assert_array_equal(om.group_matrix("ras", ["P1", "P2"]), [[10.0], [20.0]])


def test_csv_table_keeps_patient_ids_as_strings(tmp_path: Path) -> None:
    pd.DataFrame({"pid": ["007", "010"], "g1": [1.5, 2.5]}).to_csv(tmp_path / "o.csv", index=False)
    om = load_omics(tmp_path / "o.csv", patient_col="pid")
    assert om.patient_ids == ["007", "010"]
    np.testing.assert_array_equal(om.matrix(["010"]), [[2.5]])


def test_subset_and_unknown_ids(table: pd.DataFrame) -> None:
    om = load_omics(table, {"g": ["TP53"]})
    sub = om.subset(["P2", "P1"])
    assert sub.patient_ids == ["P1", "P2"] and sub.groups == {"g": ["TP53"]}
    with pytest.raises(ConfigError, match="P3"):
        sub.matrix(["P3"])
    with pytest.raises(ConfigError, match="unknown gene"):
        om.matrix(["P1"], ["BRAF"])


def test_every_problem_is_listed_at_once() -> None:
    df = pd.DataFrame(
        {
            "patient_id": ["A", "B", "B", "C"],  # B twice
            "G1": [1.0, np.nan, 2.0, np.inf],  # 2 non-finite
            "G2": ["1.0", "high", "2", "3"],  # non-numeric
            "G3": [1.0, 2.0, 3.0, np.nan],  # 1 missing
        }
    )
    groups = {"good": ["G1"], "ghost": ["G1", "BRCA1", "BRCA2"], "none": []}
    with pytest.raises(OmicsValidationError) as exc:
        load_omics(df, groups)
    problems = exc.value.problems
    text = "\n".join(problems)
    expected = {
        "duplicate patient id": "B (2 rows)",
        "non-numeric column": "G2 (e.g. 'high')",
        "non-finite": "G1 (2), G3 (1)",
        "empty gene group": "none",
        "not in the table": "BRCA1, BRCA2",
    }
    for key, detail in expected.items():
        hits = [p for p in problems if key in p]
        assert len(hits) == 1, f"{key!r} not reported once in:\n{text}"
        assert detail in hits[0], f"{detail!r} missing from {hits[0]!r}"
    assert len(problems) == len(expected)


def test_missing_patient_column_and_bad_group_files(tmp_path: Path) -> None:
    (tmp_path / "g.csv").write_text("name,set\nTP53,x\n")
    with pytest.raises(OmicsValidationError) as exc:
        load_omics(pd.DataFrame({"id": ["a"], "G": [1.0]}), tmp_path / "g.csv")
    text = "\n".join(exc.value.problems)
    assert "missing patient column 'patient_id'" in text
    assert "missing column(s) gene, group" in text
    (tmp_path / "g.json").write_text("[1, 2]")
    with pytest.raises(OmicsValidationError, match="expected a JSON object"):
        load_omics(pd.DataFrame({"patient_id": ["a"], "G": [1.0]}), tmp_path / "g.json")
    with pytest.raises(OmicsValidationError, match="file not found"):
        load_omics(pd.DataFrame({"patient_id": ["a"], "G": [1.0]}), tmp_path / "none.json")


def test_table_without_value_columns() -> None:
    with pytest.raises(OmicsValidationError, match="no value columns"):
        load_omics(pd.DataFrame({"patient_id": ["a"]}))
