"""Omics tables (expression or pathway scores per patient) and their gene groups.

The table has one row per patient (``patient_id``) and one numeric column per gene or score. Gene
groups (pathways, signatures) come as JSON ``{"group": ["GENE1", "GENE2"]}``, as a CSV (or TSV)
with columns ``gene`` and ``group`` (one row per membership; a gene may belong to several
groups), or as a GMT file (MSigDB's format: one group per line, tab-separated name, description,
then its genes).

No scaling happens here: scalers are fitted on the training part of each fold, never on the
whole cohort, or test patients would leak into training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from oncoslide._io import read_table_file
from oncoslide.errors import ConfigError, OmicsValidationError

PathLike = str | os.PathLike[str]
GroupsLike = PathLike | Mapping[str, Sequence[str]]
_MAX_EXAMPLES = 10


@dataclass(frozen=True, eq=False)
class Omics:
    """A validated omics table.

    Attributes:
        values: float64 DataFrame indexed by sorted ``patient_id``, one column per gene.
        groups: group name -> its genes (table order of the definition, duplicates dropped).
        table_path, groups_path: the files they were read from (None when given as data);
            runs record them beside the cohort's.
    """

    values: pd.DataFrame
    groups: dict[str, list[str]]
    table_path: Path | None = None
    groups_path: Path | None = None

    @property
    def genes(self) -> list[str]:
        """All gene (column) names, in table order."""
        return list(self.values.columns)

    @property
    def patient_ids(self) -> list[str]:
        return list(self.values.index)

    def __len__(self) -> int:
        return len(self.values)

    def subset(self, patient_ids: Iterable[str]) -> Omics:
        """The table restricted to ``patient_ids`` (sorted); groups unchanged."""
        ids = sorted(set(patient_ids))
        self._check_known(ids)
        return dataclasses.replace(self, values=self.values.loc[ids])

    def matrix(self, patient_ids: Sequence[str], genes: Sequence[str] | None = None) -> np.ndarray:
        """(patients, genes) float64 matrix with rows in ``patient_ids`` order."""
        ids = list(patient_ids)
        self._check_known(ids)
        cols = self.genes if genes is None else list(genes)
        unknown = [g for g in cols if g not in self.values.columns]
        if unknown:
            raise ConfigError(f"unknown gene(s): {_examples(unknown)}")
        return self.values.loc[ids, cols].to_numpy(dtype=np.float64, copy=True)

    def group_matrix(self, group: str, patient_ids: Sequence[str]) -> np.ndarray:
        """The matrix of one group's genes."""
        if group not in self.groups:
            raise ConfigError(f"unknown gene group {group!r}; known: {', '.join(self.groups)}")
        return self.matrix(patient_ids, self.groups[group])

    def _check_known(self, ids: Sequence[str]) -> None:
        unknown = [p for p in ids if p not in self.values.index]
        if unknown:
            raise ConfigError(f"no omics values for patient(s): {_examples(unknown)}")


def load_omics(
    table: PathLike | pd.DataFrame,
    groups: GroupsLike | None = None,
    *,
    patient_col: str = "patient_id",
) -> Omics:
    """Read and validate an omics table and, optionally, its gene-group definition.

    Args:
        table: ``.csv``, ``.tsv`` or ``.parquet`` file, or a DataFrame; one row per patient.
        groups: a ``.json`` or ``.csv`` group file, or a mapping group -> genes.
        patient_col: the column holding patient ids.

    Raises:
        OmicsValidationError: listing every problem found in the table and the groups.
    """
    source = None if isinstance(table, pd.DataFrame) else str(table)
    problems: list[str] = []
    df = _read(table, problems, patient_col)
    values = _validate_table(df, patient_col, problems) if df is not None else None
    group_map = _read_groups(groups, problems) if groups is not None else {}
    if values is not None:
        _check_groups(group_map, set(values.columns), problems)
    if problems or values is None:
        raise OmicsValidationError(problems, source)
    return Omics(
        values=values,
        groups=group_map,
        table_path=None if source is None else Path(source),
        groups_path=Path(groups) if isinstance(groups, str | os.PathLike) else None,
    )


def _read(
    table: PathLike | pd.DataFrame, problems: list[str], patient_col: str
) -> pd.DataFrame | None:
    if isinstance(table, pd.DataFrame):
        return table.copy()
    return read_table_file(table, problems, string_columns=(patient_col,))


def _validate_table(df: pd.DataFrame, patient_col: str, problems: list[str]) -> pd.DataFrame:
    df.columns = [str(c).strip() for c in df.columns]
    dupes = sorted(c for c, n in Counter(df.columns).items() if n > 1)
    if dupes:
        problems.append(f"duplicate column names: {_examples(dupes)}")
        df = df.loc[:, ~df.columns.duplicated()]
    if patient_col not in df.columns:
        problems.append(f"missing patient column {patient_col!r}")
        ids = None
    else:
        ids = _patient_ids(df[patient_col], patient_col, problems)
    genes = df.drop(columns=[patient_col], errors="ignore")
    if genes.shape[1] == 0:
        problems.append("no value columns (genes or scores) besides the patient column")
    numeric, non_numeric = _numeric_columns(genes, problems)
    _check_finite(numeric.drop(columns=non_numeric), problems)
    if ids is None or problems:
        return numeric  # still lets the gene groups be checked against the columns
    numeric.index = pd.Index(ids, name="patient_id")
    return numeric.sort_index()


def _patient_ids(col: pd.Series, name: str, problems: list[str]) -> list[str]:
    ids = [None if pd.isna(v) else str(v).strip() or None for v in col]
    empty = [i for i, v in enumerate(ids) if v is None]
    if empty:
        problems.append(f"{len(empty)} row(s) with an empty {name}: rows {_examples(empty)}")
    counts = Counter(v for v in ids if v is not None)
    dupes = sorted(p for p, n in counts.items() if n > 1)
    if dupes:
        shown = [f"{p} ({counts[p]} rows)" for p in dupes]
        problems.append(f"{len(dupes)} duplicate patient id(s): {_examples(shown)}")
    return [v or "" for v in ids]


def _numeric_columns(genes: pd.DataFrame, problems: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Columns as float64 (unparsable cells become NaN) and the names of non-numeric columns."""
    out = {}
    bad: list[str] = []
    names: list[str] = []
    for col in genes.columns:
        raw = genes[col]
        if pd.api.types.is_bool_dtype(raw):
            bad.append(f"{col} (booleans)")
            names.append(col)
            continue
        converted = pd.to_numeric(raw, errors="coerce")
        wrong = converted.isna() & raw.notna()
        if wrong.any():
            bad.append(f"{col} (e.g. {raw[wrong].iloc[0]!r})")
            names.append(col)
        out[col] = converted.astype(np.float64)
    if bad:
        problems.append(f"{len(bad)} non-numeric column(s): {_examples(bad)}")
    return pd.DataFrame(out, index=genes.index, columns=list(genes.columns)), names


def _check_finite(values: pd.DataFrame, problems: list[str]) -> None:
    counts = (~np.isfinite(values)).sum(axis=0) if values.shape[1] else pd.Series(dtype=int)
    counts = counts[counts > 0]
    if len(counts):
        shown = [f"{c} ({n})" for c, n in counts.sort_values(ascending=False).items()]
        problems.append(
            f"{len(counts)} column(s) with missing or non-finite values "
            f"({int(counts.sum())} in all; impute before loading): {_examples(shown)}"
        )


def _read_groups(groups: GroupsLike, problems: list[str]) -> dict[str, list[str]]:
    raw: Mapping[str, object]
    if isinstance(groups, Mapping):
        raw = dict(groups)
    else:
        loaded = _read_group_file(Path(groups), problems)
        if loaded is None:
            return {}
        raw = loaded
    out: dict[str, list[str]] = {}
    for name, genes in raw.items():
        if isinstance(genes, str) or not isinstance(genes, Iterable):
            problems.append(f"group {name!r}: expected a list of genes, got {type(genes).__name__}")
            continue
        out[str(name)] = list(dict.fromkeys(str(g).strip() for g in genes))
    return out


def _read_group_file(path: Path, problems: list[str]) -> dict[str, list[str]] | None:
    where = f"group file {path}"
    if not path.is_file():
        problems.append(f"{where}: file not found")
        return None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                problems.append(f"{where}: expected a JSON object {{group: [genes]}}")
                return None
            return data
        if suffix == ".gmt":
            return _read_gmt(path, where, problems)
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str)
        else:
            problems.append(
                f"{where}: unsupported format {path.suffix!r}; use .json, .csv, .tsv or .gmt"
            )
            return None
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: cannot read it ({type(exc).__name__}: {exc})")
        return None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("gene", "group") if c not in df.columns]
    if missing:
        problems.append(f"{where}: missing column(s) {', '.join(missing)} (needs gene, group)")
        return None
    df = df.dropna(subset=["gene", "group"])
    grouped: dict[str, list[str]] = {}
    for gene, group in zip(df["gene"], df["group"], strict=True):
        grouped.setdefault(group.strip(), []).append(gene)
    return grouped


def _read_gmt(path: Path, where: str, problems: list[str]) -> dict[str, list[str]] | None:
    """GMT: ``name<TAB>description<TAB>gene<TAB>gene...`` per line; blank lines are skipped."""
    grouped: dict[str, list[str]] = {}
    bad = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 3 or not fields[0].strip():
            bad.append(number)
            continue
        genes = [g.strip() for g in fields[2:] if g.strip()]
        grouped.setdefault(fields[0].strip(), []).extend(genes)
    if bad:
        problems.append(
            f"{where}: line(s) {_examples(bad)} are not 'name<TAB>description<TAB>genes...'"
        )
    return grouped


def _check_groups(groups: dict[str, list[str]], genes: set[str], problems: list[str]) -> None:
    empty = [g for g, members in groups.items() if not members]
    if empty:
        problems.append(f"{len(empty)} empty gene group(s): {_examples(empty)}")
    for name, members in groups.items():
        absent = [g for g in members if g not in genes]
        if absent:
            problems.append(
                f"group {name!r}: {len(absent)} gene(s) not in the table: {_examples(absent)}"
            )


def _examples(items: Sequence[object], limit: int = _MAX_EXAMPLES) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    rest = len(items) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown
