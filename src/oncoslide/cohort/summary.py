"""What a validated cohort holds, in a few numbers: patients, slides, survival events or class
balance, and what its feature files are (layout, encoder, dimension, patch grid)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from oncoslide.cohort.table import Cohort
from oncoslide.errors import FeatureFileError


@dataclass(frozen=True)
class CohortSummary:
    """Counts of a cohort and a description of its features.

    Attributes:
        events: ``(events, censored, without)`` over the patients when the cohort has
            survival columns: patients with event 1, with event 0, and without time or event.
        classes: label column -> class -> patients (``"(missing)"`` for patients without one).
        layout, encoder, patch_size, target_mpp: read from the first slide's feature file
            (``None`` when the files do not say, or no features were checked).
    """

    n_patients: int
    n_slides: int
    events: tuple[int, int, int] | None = None
    classes: dict[str, dict[str, int]] = field(default_factory=dict)
    feature_dim: int | None = None
    layout: str | None = None
    encoder: str | None = None
    patch_size: int | None = None
    target_mpp: float | None = None


def summarise_cohort(cohort: Cohort, stamp_mpp: float | None = None) -> CohortSummary:
    """The summary of ``cohort`` (``stamp_mpp`` as given to load it, for STAMP files)."""
    patients = cohort.patients
    events = None
    if cohort.has_survival:
        time = pd.to_numeric(patients[cohort.time_col], errors="coerce")
        event = pd.to_numeric(patients[cohort.event_col], errors="coerce")
        known = time.notna() & event.notna()
        n_events = int((event[known] == 1).sum())
        events = (n_events, int(known.sum()) - n_events, int((~known).sum()))
    classes = {}
    for col in cohort.label_cols:
        if col in patients.columns:
            counts = patients[col].astype(object).where(patients[col].notna(), "(missing)")
            tally = counts.astype(str).value_counts()
            classes[col] = {k: int(tally[k]) for k in sorted(tally.index)}
    summary = CohortSummary(
        n_patients=len(cohort.patient_ids),
        n_slides=len(cohort.slides),
        events=events,
        classes=classes,
        feature_dim=cohort.feature_dim,
    )
    return _with_features(summary, cohort, stamp_mpp)


def _with_features(
    summary: CohortSummary, cohort: Cohort, stamp_mpp: float | None
) -> CohortSummary:
    """Add what the first slide's feature file says of the features (the cohort checked that
    every file has the same dimension; their metadata is not read again)."""
    from dataclasses import replace

    from oncoslide.features.readers import read_features

    paths = [p for p in cohort.slides.get("feature_path", pd.Series(dtype=object)) if _known(p)]
    if not paths:
        return summary
    try:
        sf = read_features(paths[0], stamp_mpp=stamp_mpp, mmap=True)
    except FeatureFileError:
        return summary
    grid = sf.grid
    return replace(
        summary,
        layout=sf.layout,
        encoder=sf.encoder,
        patch_size=None if grid is None else int(grid.patch_size),
        target_mpp=None if grid is None else float(grid.target_mpp),
    )


def _known(path: object) -> bool:
    return isinstance(path, str) and bool(path)


def summary_lines(summary: CohortSummary) -> list[tuple[str, str]]:
    """(label, text) rows for printing: patients, survival or classes, features."""
    rows = [("patients", f"{summary.n_patients} ({summary.n_slides} slides)")]
    if summary.events is not None:
        n_events, censored, without = summary.events
        known = n_events + censored
        share = f" ({n_events / known:.0%})" if known else ""
        text = f"{n_events} events{share}, {censored} censored"
        if without:
            text += f", {without} without time or event"
        rows.append(("survival", text))
    for col, counts in summary.classes.items():
        total = sum(counts.values())
        shown = ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in counts.items())
        rows.append((f"classes of {col}", shown))
    if summary.feature_dim is not None:
        parts = [f"{summary.layout} layout"] if summary.layout else []
        parts.append(f"encoder {summary.encoder or 'not recorded'}")
        parts.append(f"dim {summary.feature_dim}")
        if summary.patch_size is not None and summary.target_mpp is not None:
            parts.append(f"{summary.patch_size} px patches at {summary.target_mpp:g} µm/px")
        rows.append(("features", ", ".join(parts)))
    else:
        rows.append(("features", "not checked (give --features)"))
    return rows


__all__ = ["CohortSummary", "summarise_cohort", "summary_lines"]
