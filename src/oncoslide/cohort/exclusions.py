"""Patients a model or encoder has already seen, who must not be scored as test patients.

An encoder pre-trained on a cohort's slides (``oncoslide pretrain``) has seen those patients:
scoring them in a test part flatters the encoder. Three kinds of source name them:

* a table (``.csv``/``.tsv``/``.parquet``) with a ``patient_id`` or a ``slide_id`` column;
* an encoder folder: ``pretrain_slides.csv``, which every pre-training run writes
  (:data:`PRETRAIN_SLIDES_FILE`);
* a slide-embedding folder (``oncoslide embed-slides``): its manifest copies the encoder's
  list (``pretrain_slides``).

Slides are mapped to the evaluated cohort's patients through its own table, so a list written
on one cohort applies to another that shares slides.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oncoslide._io import read_table_file
from oncoslide.errors import ConfigError

if TYPE_CHECKING:
    from oncoslide.cohort.table import Cohort

PRETRAIN_SLIDES_FILE = "pretrain_slides.csv"
"""In an encoder folder: one row per slide the pre-training read (slide_id, patient_id)."""

EMBEDDINGS_MANIFEST = "slide_embeddings.json"  # oncoslide.pretrain.embed.MANIFEST (no import cycle)


@dataclass(frozen=True)
class Exclusions:
    """The patients of a cohort that a source names, and where they came from."""

    patients: frozenset[str]  # patients of the cohort to keep out of test parts
    n_named: int  # ids the source names (some may not be in this cohort)
    what: str  # "patient" or "slide"
    digest: str  # of the named ids: keys results by the list's content
    source: str

    def note(self, label: str) -> str:
        return (
            f"{label}: exclusion list {Path(self.source).name} names {self.n_named} {self.what}(s); "
            f"{len(self.patients)} patient(s) of this cohort are excluded from its test parts"
        )


def pretrain_slides_of(folder: str | os.PathLike[str]) -> list[str] | None:
    """The slides an encoder folder or a slide-embedding folder records as pre-trained on;
    None when it records none (written before the list was kept, or not an encoder's)."""
    path = Path(folder)
    listed = path / PRETRAIN_SLIDES_FILE
    if listed.is_file():
        problems: list[str] = []
        df = read_table_file(listed, problems, string_columns=("slide_id", "patient_id"))
        if df is None or "slide_id" not in df.columns:
            raise ConfigError(f"{listed}: unreadable pre-training slide list {problems}")
        return [str(s) for s in df["slide_id"].dropna()]
    manifest = path / EMBEDDINGS_MANIFEST
    if manifest.is_file():
        try:
            seen = json.loads(manifest.read_text()).get("pretrain_slides")
        except (OSError, ValueError) as err:
            raise ConfigError(f"{manifest}: unreadable ({err})") from err
        return None if seen is None else [str(s) for s in seen]
    return None


def _patients_of_slides(cohort: Cohort, slides: Iterable[str]) -> frozenset[str]:
    by_slide = dict(
        zip(
            cohort.slides["slide_id"].astype(str),
            cohort.slides["patient_id"].astype(str),
            strict=True,
        )
    )
    return frozenset(by_slide[s] for s in slides if s in by_slide)


def _of_slides(cohort: Cohort, slides: list[str], source: Path) -> Exclusions:
    return Exclusions(
        _patients_of_slides(cohort, slides), len(set(slides)), "slide", _digest(slides), str(source)
    )


def read_exclusions(source: str | os.PathLike[str], cohort: Cohort) -> Exclusions:
    """The cohort's patients that ``source`` (a table, an encoder folder or a slide-embedding
    folder; see the module docstring) names.

    Raises:
        ConfigError: the source is missing, unreadable, lacks the columns, or is a folder that
            records no pre-training slides.
    """
    path = Path(source)
    if path.is_dir():
        slides = pretrain_slides_of(path)
        if slides is None:
            raise ConfigError(
                f"exclusion list {path}: the folder records no pre-training slides (an encoder "
                f"folder has {PRETRAIN_SLIDES_FILE}; a slide-embedding folder's manifest names "
                "them): give a table with a patient_id or slide_id column"
            )
        return _of_slides(cohort, slides, path)
    problems: list[str] = []
    df = read_table_file(path, problems, string_columns=("patient_id", "slide_id"))
    if df is None:
        raise ConfigError(f"exclusion list {path}: {'; '.join(problems)}")
    if "patient_id" in df.columns:
        ids = {str(v) for v in df["patient_id"].dropna()}
        known = frozenset(ids & {str(p) for p in cohort.patient_ids})
        return Exclusions(known, len(ids), "patient", _digest(ids), str(path))
    if "slide_id" in df.columns:
        slides = [str(v) for v in df["slide_id"].dropna()]
        return _of_slides(cohort, slides, path)
    raise ConfigError(f"exclusion list {path} needs a patient_id or slide_id column")


def _digest(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest()[:16]


__all__ = [
    "EMBEDDINGS_MANIFEST",
    "PRETRAIN_SLIDES_FILE",
    "Exclusions",
    "pretrain_slides_of",
    "read_exclusions",
]
