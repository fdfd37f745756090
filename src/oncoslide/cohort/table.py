"""Cohort tables: one row per slide, validated all at once, with the feature files they name.

:func:`load_cohort` reads a CSV or Parquet table (or takes a DataFrame), normalises it and checks
everything that can be wrong before any model sees it. Every problem found is collected and
raised together in one :class:`~oncoslide.errors.CohortValidationError`, so a user fixes a table
in one pass instead of one error per run.

Patient-level columns (``cohort``, ``site``, the survival columns and the label columns) must agree
across a patient's slides; a slide left empty in such a column takes the patient's value. A
missing target is not an error: the patient is just left out of tasks that need that target
(:meth:`Cohort.patients_with`).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from oncoslide._io import read_table_file, separator_hint
from oncoslide.cohort.tcga import parse_tcga_barcode
from oncoslide.errors import (
    AmbiguousFeatureFileError,
    CohortValidationError,
    ConfigError,
    FeatureFileError,
)
from oncoslide.features.readers import FeatureIndex, inspect_features
from oncoslide.features.scan import scan_feature_file
from oncoslide.survival.target import make_survival

PathLike = str | os.PathLike[str]
ID_COLUMNS = ("patient_id", "slide_id")
GROUP_COLUMNS = ("cohort", "site")
# the content digest of each slide's feature file (oncoslide.features.scan), keys runs by data
DIGEST_COLUMN = "feature_digest"
_MAX_EXAMPLES = 10
_TRUE = frozenset({"1", "1.0", "true"})
_FALSE = frozenset({"0", "0.0", "false"})


@dataclass(frozen=True, eq=False)
class Cohort:
    """A validated cohort: slides, patients and (optionally) their feature files.

    Attributes:
        slides: one row per slide (table order), with every input column plus ``feature_path``
            (``None`` when unknown) and ``n_patches`` (``pd.NA`` when not checked).
        patients: one row per patient, indexed by sorted ``patient_id``: the patient-level
            columns, ``n_slides`` and ``n_patches``.
        feature_dim: the common feature dimension, ``None`` when features were not checked.
        notes: facts worth telling the user that are not errors (derived columns, files passed
            over in favour of others).
        table_path: the table file it was read from (None for a DataFrame); runs record it so
            that later commands (heatmap) find the cohort again.
    """

    slides: pd.DataFrame
    patients: pd.DataFrame
    feature_dim: int | None = None
    time_col: str = "time"
    event_col: str = "event"
    label_cols: tuple[str, ...] = ()
    features_dir: Path | None = None
    notes: tuple[str, ...] = field(default=())
    dropped: tuple[tuple[str, str, str], ...] = field(default=())
    table_path: Path | None = None

    @property
    def dropped_slides(self) -> pd.DataFrame:
        """Slides left out for unusable features (``bad_features="drop"``): patient_id,
        slide_id, reason."""
        return pd.DataFrame(list(self.dropped), columns=["patient_id", "slide_id", "reason"])

    @property
    def dropped_patients(self) -> list[str]:
        """Patients left with no usable slide (absent from :attr:`patients`), sorted."""
        return sorted({pid for pid, _, _ in self.dropped} - set(self.patients.index))

    @property
    def drop_note(self) -> str:
        """The line of :attr:`notes` that counts the slides and patients left out ("" if none)."""
        return _drop_note(self.dropped, self.dropped_patients) if self.dropped else ""

    @property
    def patient_ids(self) -> list[str]:
        """All patient ids, sorted."""
        return list(self.patients.index)

    @property
    def has_survival(self) -> bool:
        return self.time_col in self.patients.columns and self.event_col in self.patients.columns

    def __len__(self) -> int:
        return len(self.patients)

    def slide_ids(self, patient_id: str) -> list[str]:
        """The patient's slide ids, sorted (the order of :meth:`slide_paths` and patient bags)."""
        self._check_known([patient_id])
        return [sid for sid, _ in self._slides_by_patient[patient_id]]

    def slide_paths(self, patient_id: str) -> list[Path]:
        """The patient's feature files, in :meth:`slide_ids` order.

        Raises:
            FeatureFileError: a slide of the patient has no known feature file.
        """
        self._check_known([patient_id])
        paths = []
        for sid, p in self._slides_by_patient[patient_id]:
            if p is None:
                where = self.features_dir if self.features_dir is not None else "(no features_dir)"
                raise FeatureFileError(Path(str(where)) / sid, "no feature file for this slide")
            paths.append(Path(p))
        return paths

    @cached_property
    def _slides_by_patient(self) -> dict[str, list[tuple[str, str | None]]]:
        by_patient: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        for pid, sid, p in zip(
            self.slides["patient_id"],
            self.slides["slide_id"],
            self.slides["feature_path"],
            strict=True,
        ):
            by_patient[pid].append((sid, None if p is None or pd.isna(p) else str(p)))
        return {pid: sorted(v) for pid, v in by_patient.items()}

    def patients_with(self, *columns: str) -> list[str]:
        """Sorted ids of the patients with a value in every one of ``columns``."""
        missing = [c for c in columns if c not in self.patients.columns]
        if missing:
            raise ConfigError(f"cohort has no column(s) {', '.join(map(repr, missing))}")
        ok = self.patients[list(columns)].notna().all(axis=1)
        return list(self.patients.index[ok])

    def survival(self, patient_ids: Sequence[str] | None = None) -> np.ndarray:
        """Structured (event, time) array for ``patient_ids`` (default: all), in that order."""
        if not self.has_survival:
            raise ConfigError(
                f"cohort has no survival columns {self.time_col!r} and {self.event_col!r}"
            )
        rows = self._rows(patient_ids, (self.time_col, self.event_col))
        return make_survival(rows[self.event_col].to_numpy(bool), rows[self.time_col].to_numpy())

    def labels(self, column: str, patient_ids: Sequence[str] | None = None) -> np.ndarray:
        """Values of a patient-level column for ``patient_ids`` (default: all), in that order."""
        if column not in self.patients.columns:
            raise ConfigError(f"cohort has no patient-level column {column!r}")
        return self._rows(patient_ids, (column,))[column].to_numpy()

    def subset(self, patient_ids: Iterable[str]) -> Cohort:
        """The same cohort restricted to ``patient_ids``."""
        ids = sorted(set(patient_ids))
        self._check_known(ids)
        slides = self.slides[self.slides["patient_id"].isin(ids)].reset_index(drop=True)
        return Cohort(
            slides=slides,
            patients=self.patients.loc[ids],
            feature_dim=self.feature_dim,
            time_col=self.time_col,
            event_col=self.event_col,
            label_cols=self.label_cols,
            features_dir=self.features_dir,
            notes=self.notes,
            table_path=self.table_path,
        )

    def _check_known(self, ids: Iterable[str]) -> None:
        unknown = [p for p in ids if p not in self.patients.index]
        if unknown:
            raise ConfigError(f"unknown patient id(s): {_examples(unknown)}")

    def _rows(self, patient_ids: Sequence[str] | None, columns: Sequence[str]) -> pd.DataFrame:
        ids = self.patient_ids if patient_ids is None else list(patient_ids)
        self._check_known(ids)
        rows = self.patients.loc[ids, list(columns)]
        lacking = rows.index[rows.isna().any(axis=1)]
        if len(lacking):
            raise ConfigError(
                f"{len(lacking)} patient(s) have no value in {', '.join(columns)}: "
                f"{_examples(list(lacking))} (select them with patients_with())"
            )
        return rows


# --------------------------------------------------------------------------------------------
# loading


def load_cohort(
    table: PathLike | pd.DataFrame,
    features_dir: PathLike | None = None,
    *,
    time_col: str = "time",
    event_col: str = "event",
    label_cols: Sequence[str] = (),
    check_features: bool = True,
    stamp_mpp: float | None = None,
    require_survival: bool = False,
    progress: Callable[[int, int], None] | None = None,
    bad_features: Literal["error", "drop"] = "error",
) -> Cohort:
    """Read and validate a cohort table and, optionally, the feature files it names.

    Args:
        table: a ``.csv``, ``.tsv`` or ``.parquet`` file, or a DataFrame; one row per slide.
        features_dir: folder of per-slide feature files (see
            :func:`~oncoslide.features.readers.find_feature_file` for what is searched).
        time_col, event_col: survival columns, validated when present.
        label_cols: label columns that must exist (patient-level).
        check_features: open every feature file's metadata (shapes, layout) and check that all
            slides agree on the feature dimension. When False, or without ``features_dir``, no
            file is opened and ``feature_dim`` is ``None`` (files are still located by name when
            ``features_dir`` is given).
        stamp_mpp: level-0 µm per pixel for STAMP files that do not record it.
        require_survival: the survival columns must exist.
        progress: called as ``progress(done, total)`` while feature files are checked.
        bad_features: what a slide whose feature file is missing, unreadable or empty does:
            ``"error"`` (listed with every other problem) or ``"drop"``: the slide is left out
            (a patient keeps its other slides; one without any left is left out) and each is
            listed in :attr:`Cohort.dropped` and the notes. Disagreeing feature dimensions
            are always an error.

    Raises:
        CohortValidationError: listing every problem found.
    """
    source = None if isinstance(table, pd.DataFrame) else str(table)
    problems: list[str] = []
    notes: list[str] = []
    df = _read_table(table, problems)
    if df is None:
        raise CohortValidationError(problems, source)
    if not isinstance(table, pd.DataFrame) and "slide_id" not in df.columns:
        # another separator reads the header as one column: say why the columns are missing
        hint = separator_hint(table)
        if hint is not None:
            problems.append(hint)
    label_cols = tuple(label_cols)
    _normalise_ids(df, problems, notes)
    _check_survival(df, time_col, event_col, require_survival, problems)
    for col in label_cols:
        if col not in df.columns:
            problems.append(f"missing label column {col!r}")
        elif df[col].isna().all():
            problems.append(f"label column {col!r} has no values")
    level_cols = [c for c in (*GROUP_COLUMNS, time_col, event_col, *label_cols) if c in df.columns]
    level_cols = list(dict.fromkeys(level_cols))
    if "slide_id" in df.columns and "patient_id" in df.columns:
        _check_slide_ids(df, problems)
        _check_patient_values(df, level_cols, problems)
    feature_dim: int | None = None
    df["feature_path"] = None
    df["n_patches"] = pd.array([pd.NA] * len(df), dtype="Int64")
    if bad_features not in ("error", "drop"):
        problems.append(f"bad_features must be 'error' or 'drop', got {bad_features!r}")
    dropped: list[tuple[str, str, str]] = []
    if features_dir is not None and "slide_id" in df.columns:
        if check_features:
            bad: dict[str, str] = {}
            feature_dim = _attach_features(
                df,
                Path(features_dir),
                stamp_mpp,
                problems,
                notes,
                progress,
                bad if bad_features == "drop" else None,
            )
            if bad and not problems:
                df, dropped = _drop_slides(df, bad, notes)
                if df.empty:
                    problems.append(
                        f"no slide has usable features in {features_dir} "
                        f"({len(dropped)} left out, e.g. {dropped[0][1]}: {dropped[0][2]})"
                    )
        else:
            _locate_features(df, Path(features_dir))
    if problems:
        raise CohortValidationError(problems, source)
    patients = _patient_table(df, level_cols)
    if features_dir is not None and check_features:
        _check_empty_patients(patients, problems)
        if problems:
            raise CohortValidationError(problems, source)
    return Cohort(
        slides=df.reset_index(drop=True),
        patients=patients,
        feature_dim=feature_dim,
        time_col=time_col,
        event_col=event_col,
        label_cols=label_cols,
        features_dir=Path(features_dir) if features_dir is not None else None,
        notes=tuple(notes),
        dropped=tuple(dropped),
        table_path=None if source is None else Path(source),
    )


def _drop_slides(
    df: pd.DataFrame, bad: dict[str, str], notes: list[str]
) -> tuple[pd.DataFrame, list[tuple[str, str, str]]]:
    """Leave out the slides in ``bad`` (slide id -> reason), with a note that counts them."""
    gone = df["slide_id"].isin(list(bad))
    dropped = [
        (str(pid), str(sid), bad[sid])
        for pid, sid in zip(df.loc[gone, "patient_id"], df.loc[gone, "slide_id"], strict=True)
    ]
    kept = df.loc[~gone].copy()
    lost = sorted({pid for pid, _, _ in dropped} - set(kept["patient_id"]))
    notes.append(_drop_note(dropped, lost))
    return kept, dropped


def _drop_note(dropped: Sequence[tuple[str, str, str]], lost: Sequence[str]) -> str:
    """One line counting the slides left out by reason and the patients left without any."""
    reasons = Counter(reason.split(":")[0] for _, _, reason in dropped)
    return (
        f"{len(dropped)} slide(s) left out for unusable features "
        f"({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))}): "
        f"{_examples([sid for _, sid, _ in dropped])}; "
        f"{len(lost)} patient(s) left with no slide are left out"
        + (f": {_examples(lost)}" if lost else "")
    )


def _read_table(table: PathLike | pd.DataFrame, problems: list[str]) -> pd.DataFrame | None:
    if isinstance(table, pd.DataFrame):
        df = table.copy()
    else:
        # Ids stay strings: "007" must not become 7.
        read = read_table_file(table, problems, string_columns=(*ID_COLUMNS, *GROUP_COLUMNS))
        if read is None:
            return None
        df = read
    df.columns = [str(c).strip() for c in df.columns]
    dupes = sorted(c for c, n in Counter(df.columns).items() if n > 1)
    if dupes:
        problems.append(f"duplicate column names: {', '.join(dupes)}")
        return None
    if df.empty:
        problems.append("the table has no rows")
    return df


def _as_id_strings(col: pd.Series) -> pd.Series:
    """Ids as stripped strings (None when empty); integral floats lose their '.0'."""
    if pd.api.types.is_float_dtype(col):
        vals = col.dropna()
        if (vals == np.round(vals)).all():
            col = col.astype("Int64")  # ids read through a NaN come back as floats
    out = [None if pd.isna(v) else str(v).strip() or None for v in col]
    return pd.Series(out, index=col.index, dtype=object)


def _normalise_ids(df: pd.DataFrame, problems: list[str], notes: list[str]) -> None:
    if "slide_id" not in df.columns:
        problems.append("missing required column 'slide_id'")
    else:
        df["slide_id"] = _as_id_strings(df["slide_id"])
        _report_empty(df, "slide_id", problems)
    for col in GROUP_COLUMNS:
        if col in df.columns:
            df[col] = _as_id_strings(df[col])
    barcodes = _barcodes(df["slide_id"]) if "slide_id" in df.columns else None
    if "patient_id" in df.columns:
        df["patient_id"] = _as_id_strings(df["patient_id"])
        _report_empty(df, "patient_id", problems)
    elif barcodes is not None:
        df["patient_id"] = [b.patient_id for b in barcodes]
        notes.append("patient_id derived from the TCGA slide barcodes (first 12 characters)")
    else:
        problems.append(
            "missing required column 'patient_id' (it is derived only when every slide_id is "
            "a TCGA barcode)"
        )
    if "patient_id" in df.columns and barcodes is not None:
        _check_barcode_patients(df, barcodes, problems)
    if "site" not in df.columns and "patient_id" in df.columns:
        _derive_site(df, barcodes, notes)


def _report_empty(df: pd.DataFrame, col: str, problems: list[str]) -> None:
    empty = df.index[df[col].isna()]
    if len(empty):
        rows = [f"row {i}" for i in empty]
        problems.append(f"{len(empty)} row(s) with an empty {col}: {_examples(rows)}")


def _barcodes(ids: pd.Series) -> list | None:
    """Parsed TCGA barcodes when every id is one, else None."""
    parsed = [parse_tcga_barcode(s) for s in ids]
    if not parsed or any(b is None for b in parsed):
        return None
    return parsed


def _check_barcode_patients(df: pd.DataFrame, barcodes: list, problems: list[str]) -> None:
    """A slide barcode names its patient; when patient ids are barcodes too, they must agree."""
    if _barcodes(df["patient_id"]) is None:
        return
    bad = [
        f"{sid} (patient {pid})"
        for sid, pid, b in zip(df["slide_id"], df["patient_id"], barcodes, strict=True)
        if b.patient_id != parse_tcga_barcode(pid).patient_id  # type: ignore[union-attr]
    ]
    if bad:
        problems.append(
            f"{len(bad)} slide barcode(s) belong to another patient than their row says: "
            f"{_examples(bad)}"
        )


def _derive_site(df: pd.DataFrame, slide_barcodes: list | None, notes: list[str]) -> None:
    patient_barcodes = _barcodes(df["patient_id"])
    barcodes = patient_barcodes or slide_barcodes
    if barcodes is not None:
        df["site"] = [b.site for b in barcodes]
        notes.append("site derived from the TCGA barcodes (tissue source site code)")


def _check_survival(
    df: pd.DataFrame, time_col: str, event_col: str, required: bool, problems: list[str]
) -> None:
    has_time, has_event = time_col in df.columns, event_col in df.columns
    if required or has_time != has_event:
        for col, has in ((time_col, has_time), (event_col, has_event)):
            if not has:
                problems.append(f"missing survival column {col!r}")
    ids = _row_names(df)
    if has_time:
        df[time_col] = _check_times(df[time_col], time_col, ids, problems)
    if has_event:
        df[event_col] = _check_events(df[event_col], event_col, ids, problems)


def _row_names(df: pd.DataFrame) -> pd.Series:
    if "slide_id" in df.columns:
        return df["slide_id"].fillna(pd.Series([f"row {i}" for i in df.index], index=df.index))
    return pd.Series([f"row {i}" for i in df.index], index=df.index)


def _check_times(col: pd.Series, name: str, ids: pd.Series, problems: list[str]) -> pd.Series:
    if pd.api.types.is_bool_dtype(col):
        problems.append(f"column {name!r} holds booleans, not times")
        return col
    values = pd.to_numeric(col, errors="coerce").astype(float)
    bad_type = values.isna() & col.notna()
    if bad_type.any():
        shown = [f"{i} ({_fmt(v)})" for i, v in zip(ids[bad_type], col[bad_type], strict=True)]
        problems.append(f"{name!r}: {bad_type.sum()} non-numeric value(s): {_examples(shown)}")
    for mask, what in (
        (np.isinf(values), "non-finite (inf)"),
        (values < 0, "negative"),
    ):
        if mask.any():
            shown = [f"{i} ({v:g})" for i, v in zip(ids[mask], values[mask], strict=True)]
            problems.append(f"{name!r}: {mask.sum()} {what} value(s): {_examples(shown)}")
    return values


def _check_events(col: pd.Series, name: str, ids: pd.Series, problems: list[str]) -> pd.Series:
    def to_event(v: object) -> float | None:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return np.nan
        if isinstance(v, bool | np.bool_):
            return float(v)
        if isinstance(v, int | float | np.integer | np.floating):
            return float(v) if v in (0, 1) else None
        text = str(v).strip().lower()
        return 1.0 if text in _TRUE else 0.0 if text in _FALSE else None

    converted = [to_event(v) for v in col]
    bad = [i for i, c in zip(col.index, converted, strict=True) if c is None]
    if bad:
        shown = [f"{ids[i]} ({_fmt(col[i])})" for i in bad]
        problems.append(
            f"{name!r}: {len(bad)} value(s) not 0/1 (accepted: 0, 1, true, false): "
            f"{_examples(shown)}"
        )
    return pd.Series([np.nan if c is None else c for c in converted], index=col.index, dtype=float)


def _check_slide_ids(df: pd.DataFrame, problems: list[str]) -> None:
    rows = df.dropna(subset=["slide_id", "patient_id"])
    n_owners = rows.groupby("slide_id")["patient_id"].nunique()
    shared = sorted(n_owners.index[n_owners > 1])
    if shared:
        owners = rows[rows["slide_id"].isin(shared)].groupby("slide_id")["patient_id"]
        shown = [f"{sid} -> {', '.join(sorted(set(p)))}" for sid, p in owners]
        problems.append(
            f"{len(shared)} slide(s) assigned to more than one patient: {_examples(shown)}"
        )
    counts = rows["slide_id"].value_counts()
    shared_set = set(shared)
    dupes = [s for s in counts.index[counts > 1] if s not in shared_set]
    if dupes:
        shown = [f"{s} ({counts[s]} rows)" for s in sorted(dupes)]
        problems.append(f"{len(dupes)} duplicate slide id(s): {_examples(shown)}")


def _check_patient_values(df: pd.DataFrame, columns: Sequence[str], problems: list[str]) -> None:
    rows = df.dropna(subset=["patient_id"])
    grouped = rows.groupby("patient_id")
    for col in columns:
        counts = grouped[col].nunique(dropna=True)
        clash = sorted(counts.index[counts > 1])
        if clash:
            values = rows[rows["patient_id"].isin(clash)].groupby("patient_id")[col]
            shown = [
                f"{pid} ({', '.join(map(str, sorted(set(v.dropna()), key=str)))})"
                for pid, v in values
            ]
            problems.append(
                f"{len(clash)} patient(s) have conflicting {col!r} values across their slides: "
                f"{_examples(shown)}"
            )


def _locate_features(df: pd.DataFrame, features_dir: Path) -> None:
    """Fill ``feature_path`` by name only (no file opened, nothing reported)."""
    try:
        index = FeatureIndex(features_dir)
    except FeatureFileError:
        return
    paths: list[str | None] = []
    for sid in df["slide_id"]:
        try:
            found = index.find(sid) if sid is not None else None
        except FeatureFileError:
            found = None
        paths.append(None if found is None else str(found))
    df["feature_path"] = pd.Series(paths, index=df.index, dtype=object)


def _attach_features(
    df: pd.DataFrame,
    features_dir: Path,
    stamp_mpp: float | None,
    problems: list[str],
    notes: list[str],
    progress: Callable[[int, int], None] | None = None,
    bad: dict[str, str] | None = None,
) -> int | None:
    """Locate and inspect every slide's feature file; return the common dimension.

    With ``bad`` (a dict to fill), slides whose file is missing, unreadable or empty are
    recorded there (slide id -> reason) instead of being problems.
    """
    try:
        index = FeatureIndex(features_dir)
    except FeatureFileError as exc:
        problems.append(f"features_dir {features_dir}: {exc.reason}")
        return None
    missing: list[str] = []
    unreadable: list[str] = []
    # slides with files in several subfolders, by those subfolders: one hint for them all
    ambiguous: dict[tuple[str, ...], list[str]] = defaultdict(list)
    passed_over = 0
    dims: dict[int, list[str]] = defaultdict(list)
    seen: dict[str, tuple[str | None, int | None]] = {}  # a duplicated row is checked once
    digests: dict[str, str] = {}
    non_finite: list[str] = []
    total = len(df)
    for done, sid in enumerate(df["slide_id"], start=1):
        if progress is not None:
            progress(done, total)
        if sid is None or sid in seen:
            continue
        path, n = None, None
        try:
            found = index.locate(sid)
            if found.path is None:
                missing.append(sid)
            else:
                path, passed_over = found.path, passed_over + bool(found.ignored)
                info = inspect_features(path, stamp_mpp=stamp_mpp, check_units=True)
                n = info.n_patches
                # one full read: the content digest that keys runs, and NaN / inf rows
                scan = scan_feature_file(path, stamp_mpp=stamp_mpp)
                digests[sid] = scan.digest
                if bad is not None and n == 0:
                    bad[sid] = "empty: the feature file has no patches"
                elif scan.n_non_finite:
                    reason = (
                        f"{scan.n_non_finite} of {scan.n_patches} patches have NaN or "
                        "infinite feature values"
                    )
                    if bad is not None:
                        bad[sid] = f"non-finite: {reason}"
                    else:
                        non_finite.append(f"{sid}: {reason}")
                    dims[info.dim].append(sid)
                else:
                    dims[info.dim].append(sid)
        except AmbiguousFeatureFileError as exc:
            # not a bad file to skip: the folder names several feature sets, a setting to fix
            ambiguous[exc.folders].append(sid)
        except FeatureFileError as exc:
            unreadable.append(f"{sid}: {exc.reason}")
            if bad is not None:
                bad[sid] = f"unreadable: {exc.reason}"
        seen[sid] = (None if path is None else str(path), n)
    paths = [seen.get(sid, (None, None))[0] if sid else None for sid in df["slide_id"]]
    counts = [seen.get(sid, (None, None))[1] if sid else None for sid in df["slide_id"]]
    df["feature_path"] = pd.Series(paths, index=df.index, dtype=object)
    df["n_patches"] = pd.array(counts, dtype="Int64")
    df[DIGEST_COLUMN] = pd.Series(
        [digests.get(sid) if sid else None for sid in df["slide_id"]], index=df.index, dtype=object
    )
    if non_finite:
        problems.append(
            f"{len(non_finite)} feature file(s) have NaN or infinite values (--skip-bad-features "
            f"leaves those slides out): {_examples(non_finite)}"
        )
    if passed_over:
        notes.append(
            f"{passed_over} slide(s) have several feature files; the preferred one was used "
            "(.h5 over .hdf5 over .pt)"
        )
    if bad is not None:
        bad.update({sid: "missing: no feature file" for sid in missing})
        missing, unreadable = [], []
    for folders, sids in ambiguous.items():
        shown = ", ".join(f"{f}/" for f in folders)
        problems.append(
            f"{len(sids)} slide(s) have feature files in several subfolders of {features_dir} "
            f"({shown}): {_examples(sids)}; point the features folder at one of them, e.g. "
            f"{features_dir / folders[0]}"
        )
    _report_feature_problems(features_dir, missing, unreadable, dims, problems)
    return next(iter(dims)) if len(dims) == 1 else None


def _report_feature_problems(
    features_dir: Path,
    missing: list[str],
    unreadable: list[str],
    dims: dict[int, list[str]],
    problems: list[str],
) -> None:
    if missing:
        problems.append(
            f"{len(missing)} slide(s) have no feature file in {features_dir} (searched "
            f"<slide_id>.h5/.hdf5/.pt there and in its subfolders): {_examples(missing)}"
        )
    if unreadable:
        problems.append(
            f"{len(unreadable)} feature file(s) unreadable or in no known layout: "
            f"{_examples(unreadable)}"
        )
    if len(dims) > 1:
        parts = [
            f"D={d} in {len(sids)} slide(s) (e.g. {', '.join(sids[:3])})"
            for d, sids in sorted(dims.items(), key=lambda kv: -len(kv[1]))
        ]
        problems.append(f"feature dimensions disagree: {'; '.join(parts)}")


def _patient_table(df: pd.DataFrame, level_cols: Sequence[str]) -> pd.DataFrame:
    grouped = df.groupby("patient_id", sort=True)
    # After validation each column has at most one distinct value per patient; first() skips NaN.
    patients = (
        grouped[list(level_cols)].first()
        if level_cols
        else pd.DataFrame(index=grouped.size().index)
    )
    patients["n_slides"] = grouped.size().astype(int)
    patients["n_patches"] = grouped["n_patches"].sum(min_count=1).astype("Int64")
    patients.index = patients.index.astype(object)
    patients.index.name = "patient_id"
    return patients


def _check_empty_patients(patients: pd.DataFrame, problems: list[str]) -> None:
    empty = list(patients.index[patients["n_patches"].fillna(0) == 0])
    if empty:
        problems.append(f"{len(empty)} patient(s) have no patches in any slide: {_examples(empty)}")


def _fmt(value: object) -> str:
    """A cell value as the user typed it (numpy scalars shown as plain Python values)."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _examples(items: Sequence[str], limit: int = _MAX_EXAMPLES) -> str:
    """The first ``limit`` items, then 'and N more'."""
    shown = ", ".join(str(i) for i in items[:limit])
    rest = len(items) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown
