"""Negative controls: outcomes permuted across patients (the same slides, no signal)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from oncoslide._io import write_table
from oncoslide.errors import CohortValidationError

_ID_COLUMNS = ("patient_id", "slide_id", "cohort", "site")


def permute_outcomes(
    table: pd.DataFrame,
    seed: int,
    columns: Sequence[str] | None = None,
    *,
    within: str | None = None,
) -> pd.DataFrame:
    """Return a copy of a cohort table with outcome columns permuted ACROSS PATIENTS.

    The columns are permuted jointly (time stays paired with its event) at patient level, so all
    slides of a patient keep one consistent value. ``columns`` defaults to every column except
    patient_id, slide_id, cohort and site. ``within`` (e.g. ``"cohort"``) permutes inside each
    group of that patient-level column only. Raises ``CohortValidationError`` listing every problem.
    """
    cols = [c for c in table.columns if c not in _ID_COLUMNS] if columns is None else list(columns)
    problems = _permute_problems(table, cols, within)
    if problems:
        raise CohortValidationError(problems)
    keys = [*cols, within] if within is not None else cols
    per_patient = table.groupby("patient_id", sort=True)[keys].first()
    rng = np.random.default_rng(seed)
    if within is None:
        order = rng.permutation(len(per_patient))
    else:
        order = np.arange(len(per_patient))
        codes, _ = pd.factorize(per_patient[within], use_na_sentinel=False)
        for g in np.unique(codes):
            members = np.flatnonzero(codes == g)
            order[members] = members[rng.permutation(len(members))]
    permuted = per_patient[cols].iloc[order]
    permuted.index = per_patient.index
    result = table.copy()
    for c in cols:
        result[c] = table["patient_id"].map(permuted[c]).astype(table[c].dtype)
    return result


def _permute_problems(table: pd.DataFrame, cols: list[str], within: str | None) -> list[str]:
    problems: list[str] = []
    if "patient_id" not in table.columns:
        return ["missing column 'patient_id'"]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        problems.append(f"columns to permute not in the table: {', '.join(missing)}")
    if not cols:
        problems.append("no outcome columns to permute")
    for c in ("patient_id", "slide_id"):
        if c in cols:
            problems.append(f"{c!r} is an identifier and cannot be permuted")
    if within is not None and within not in table.columns:
        problems.append(f"'within' column {within!r} not in the table")
    if within is not None and within in cols:
        problems.append(f"'within' column {within!r} cannot also be permuted")
    present = [c for c in [*cols, within] if c is not None and c in table.columns]
    if present:
        counts = table.groupby("patient_id")[present].nunique(dropna=False)
        for c in present:
            bad = counts.index[counts[c] > 1].tolist()
            if bad:
                shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
                problems.append(f"column {c!r} differs between slides of patients {shown}")
    return problems


def write_permuted_cohort(
    table_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    seed: int,
    columns: Sequence[str] | None = None,
    *,
    within: str | None = None,
) -> Path:
    """Read a cohort table (CSV or Parquet, or a simulation folder), write a permuted copy.

    The copy (CSV or Parquet by the suffix of ``out_path``) names the same slides, so it reads
    the same feature files: only the patient-outcome pairing is broken.
    """
    src = Path(table_path)
    if src.is_dir():
        src = src / "cohort.csv"
    if not src.is_file():
        raise CohortValidationError([f"cohort table not found: {src}"])
    table = pd.read_parquet(src) if src.suffix == ".parquet" else pd.read_csv(src)
    permuted = permute_outcomes(table, seed, columns, within=within)
    write_table(out_path, permuted)
    return Path(out_path)
