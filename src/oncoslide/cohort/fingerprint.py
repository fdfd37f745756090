"""What data a run (or a benchmark cell) was computed on, cheap to compare and to explain.

A run folder and a benchmark cell are keyed by their settings; this record keys them by their
data too, so that the same command on an edited cohort table or on other feature files never
returns (or resumes) the earlier results. It holds, per patient the run uses, a digest of the
values it reads (the target columns, the site when splits keep sites apart, the slide ids),
per slide the content digest of its feature file (:mod:`oncoslide.features.scan`, cached),
and per side table (omics, mutations) a digest of the used patients' rows. Comparing two
records names what changed ("the targets of 3 patients changed: P1, P2, P7").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide.cohort.omics import Omics
from oncoslide.cohort.table import DIGEST_COLUMN, Cohort
from oncoslide.errors import ConfigError, DataChangedError
from oncoslide.features.scan import scan_feature_file

__all__ = [
    "DataRecord",
    "check_recorded_data",
    "data_record",
    "describe_changes",
    "read_record",
]

RECORD_VERSION = 1
_SHOWN = 5


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DataRecord:
    """Per-patient, per-slide and per-side-table digests of a run's data."""

    rows: dict[str, str]  # patient id -> digest of the values the run reads
    features: dict[str, str]  # slide id -> feature file digest
    side: dict[str, str] = field(default_factory=dict)  # side input name -> digest

    @property
    def key(self) -> str:
        """One digest of the whole record (equal records, equal keys)."""
        return _digest(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "rows": dict(sorted(self.rows.items())),
            "features": dict(sorted(self.features.items())),
            "side": dict(sorted(self.side.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataRecord:
        return cls(
            rows={str(k): str(v) for k, v in dict(data.get("rows", {})).items()},
            features={str(k): str(v) for k, v in dict(data.get("features", {})).items()},
            side={str(k): str(v) for k, v in dict(data.get("side", {})).items()},
        )

    def changes(self, earlier: DataRecord) -> list[str]:
        """What differs from ``earlier``, one phrase per kind of change (empty when equal)."""
        return describe_changes(earlier, self)


def _value_text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "NA"
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer | np.bool_):
        return repr(value.item())
    return f"{type(value).__name__}:{value}"


def data_record(
    cohort: Cohort,
    patients: Sequence[str],
    columns: Iterable[str],
    *,
    side: Mapping[str, Omics] | None = None,
    stamp_mpp: float | None = None,
) -> DataRecord:
    """The data record of a run on ``patients`` reading ``columns`` of the patient table.

    Feature digests come from the cohort's ``feature_digest`` column (set when it was loaded);
    slides without one are scanned now (once, then cached).
    """
    columns = [c for c in dict.fromkeys(columns) if c in cohort.patients.columns]
    table = cohort.patients.loc[list(patients), columns]
    slides = cohort.slides.loc[cohort.slides["patient_id"].isin(set(patients))]
    by_patient: dict[str, list[str]] = {}
    for pid, sid in zip(slides["patient_id"], slides["slide_id"], strict=True):
        by_patient.setdefault(str(pid), []).append(str(sid))
    rows = {}
    for pid, values in zip(table.index, table.itertuples(index=False), strict=True):
        parts = [f"{c}={_value_text(v)}" for c, v in zip(columns, values, strict=True)]
        parts.append("slides=" + ",".join(sorted(by_patient.get(str(pid), []))))
        rows[str(pid)] = _digest("\n".join(parts))
    features = {}
    digests = slides[DIGEST_COLUMN] if DIGEST_COLUMN in slides.columns else None
    for i, (sid, path) in enumerate(zip(slides["slide_id"], slides["feature_path"], strict=True)):
        known = None if digests is None else digests.iloc[i]
        if isinstance(known, str) and known:
            features[str(sid)] = known
        elif isinstance(path, str) and path:
            features[str(sid)] = scan_feature_file(Path(path), stamp_mpp=stamp_mpp).digest
    side_digests = {}
    for name, omics in sorted((side or {}).items()):
        ids = sorted(set(patients) & set(omics.patient_ids))
        values = np.ascontiguousarray(omics.values.loc[ids].to_numpy(dtype=np.float64))
        h = hashlib.sha256()
        h.update(json.dumps([ids, list(map(str, omics.genes))]).encode())
        h.update(values.tobytes())
        h.update(json.dumps(omics.groups, sort_keys=True).encode())
        side_digests[name] = h.hexdigest()[:16]
    return DataRecord(rows=rows, features=features, side=side_digests)


def _listed(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    shown = ", ".join(ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def describe_changes(earlier: DataRecord, now: DataRecord) -> list[str]:
    """Phrases naming what differs between two records."""
    out = []
    for what, a, b, edited in (
        ("patient", earlier.rows, now.rows, "target, site or slide values"),
        ("slide", earlier.features, now.features, "feature files"),
    ):
        added = set(b) - set(a)
        removed = set(a) - set(b)
        changed = {k for k in set(a) & set(b) if a[k] != b[k]}
        if added:
            out.append(f"{_count(len(added), what)} added ({_listed(added)})")
        if removed:
            out.append(f"{_count(len(removed), what)} removed ({_listed(removed)})")
        if changed:
            out.append(f"the {edited} of {_count(len(changed), what)} changed ({_listed(changed)})")
    for name in sorted(set(earlier.side) | set(now.side)):
        if earlier.side.get(name) != now.side.get(name):
            state = (
                "added"
                if name not in earlier.side
                else "removed"
                if name not in now.side
                else "changed"
            )
            out.append(f"the {name} table {state}")
    return out


def read_record(path: str | Path) -> DataRecord | None:
    """The record saved at ``path``; None when there is none (folders older than records)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return DataRecord.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the data record {path}: {exc}") from None


def check_recorded_data(path: str | Path, now: DataRecord | None, *, what: str) -> None:
    """Raise :class:`DataChangedError` when the record at ``path`` differs from ``now``.

    A folder without a record (written before records existed) is not checked.
    """
    if now is None:
        return
    earlier = read_record(path)
    if earlier is None or earlier.key == now.key:
        return
    folder = Path(path).parent
    changes = describe_changes(earlier, now)
    raise DataChangedError(
        f"{folder} holds this {what} on other data: {'; '.join(changes)}. Pass --overwrite "
        f"to start it again on the current data, or choose a new --out"
    )
