"""Few-shot probes over named feature sets of one cohort (``oncoslide fewshot``).

A feature set is either slide embeddings (``level: slide``: a folder from ``oncoslide
embed-slides`` or ``predict``, or a table with ``slide_id`` and one column per dimension; a
patient's vector is the mean of its slides', as the benchmark's slide-level protocol) or patch
features (a folder of per-slide feature files; a patient's vector is the mean of every patch of
its slides, the benchmark's ``linear`` protocol with ``pooling: mean``). Every set must cover
every patient with the task's targets, so all sets are probed on the same patients.

The patients are split once (patient-level stratified K-fold: the label, or event x time for
survival; :func:`oncoslide.cohort.splits.make_splits` without a validation part), the same
splits for every set; each fold's training part is where the few-shot draws come from
(:mod:`oncoslide.evaluation.fewshot`), and its test part scores every probe. The draws depend on
the labels, fold, k, draw and seed only, so every set sees the same patients in every draw and
the per-k comparison against a reference set is paired.

Patients an encoder saw in pre-training are kept out of every test part (they may still be
drawn as labelled shots: pre-training read no label): those of ``exclude`` (patient ids), and,
by construction, those of a slide-level set whose folder records its encoder's pre-training
slides (:mod:`oncoslide.cohort.exclusions`). They are excluded for every set alike, so the
comparison stays paired.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from oncoslide._io import TABLE_SUFFIXES, write_json, write_table
from oncoslide.cohort.exclusions import pretrain_slides_of, read_exclusions
from oncoslide.errors import ConfigError
from oncoslide.evaluation.fewshot import (
    FewShotConfig,
    compare_few_shot,
    few_shot_classification,
    few_shot_survival,
    summarise_few_shot,
    write_few_shot,
)

PathLike = str | os.PathLike[str]
Level = Literal["patch", "slide"]
#: The marker file ``embed-slides`` writes into its folder (a slide-level set).
SLIDE_MANIFEST = "slide_embeddings.json"


@dataclass(frozen=True, kw_only=True)
class FeatureSetSource:
    """A named feature set: where it is and whether it holds patch features or slide vectors."""

    name: str
    path: Path
    level: Level


def detect_level(path: PathLike) -> Level:
    """``slide`` for a table file or a folder that ``embed-slides`` wrote (its manifest),
    ``patch`` for any other folder."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES:
        return "slide"
    if p.is_dir():
        return "slide" if (p / SLIDE_MANIFEST).is_file() else "patch"
    raise ConfigError(f"feature set {p}: not found (a folder, or a table of slide embeddings)")


def parse_feature_set(text: str) -> FeatureSetSource:
    """``NAME=PATH`` (level detected), ``NAME=slide:PATH`` or ``NAME=patch:PATH``."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise ConfigError(f"feature set {text!r}: expected NAME=PATH (e.g. threads=slide_emb/)")
    level: Level | None = None
    for prefix in ("slide", "patch"):
        if rest.startswith(prefix + ":"):
            level = "slide" if prefix == "slide" else "patch"
            rest = rest[len(prefix) + 1 :]
    path = Path(rest)
    if not path.exists():
        raise ConfigError(f"feature set {name}: {path} does not exist")
    return FeatureSetSource(name=name, path=path, level=level or detect_level(path))


@dataclass(frozen=True)
class FewShotRun:
    """What :func:`few_shot_sets` computed: per-draw rows, their summary, the paired
    comparison of every set against the reference, and the splits used."""

    rows: pd.DataFrame
    summary: pd.DataFrame
    comparison: pd.DataFrame
    splits: pd.DataFrame
    reference: str
    metric: str
    n_patients: int
    excluded: tuple[str, ...] = ()  # patients kept out of every test part


def patient_vectors(
    source: FeatureSetSource,
    table: PathLike | pd.DataFrame,
    patients: Sequence[str],
    *,
    on_patient: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """(len(patients), D) float64: the mean of each patient's slide embeddings (slide level)
    or of all its patches (patch level). Raises typed errors naming missing or bad files."""
    from oncoslide.cohort.table import load_cohort

    ids = [str(p) for p in patients]
    if source.level == "slide":
        from oncoslide.features.slide_embeddings import load_slide_embeddings

        cohort = load_cohort(table).subset(ids)
        emb = load_slide_embeddings(source.path, list(cohort.slides["slide_id"]))
        return np.stack([emb.vectors(cohort.slide_ids(p)).mean(axis=0) for p in ids]).astype(
            np.float64
        )
    from oncoslide.cohort.bags import load_bag
    from oncoslide.features.cache import FeatureCache

    cohort = load_cohort(table, source.path).subset(ids)
    rows = []
    with FeatureCache(max_bytes=2**30) as cache:
        for i, pid in enumerate(ids):
            bag = load_bag(cohort, pid, cache)
            rows.append(np.asarray(bag.features, dtype=np.float64).mean(axis=0))
            if on_patient is not None:
                on_patient(i + 1, len(ids))
    return np.stack(rows)


def few_shot_sets(
    table: PathLike | pd.DataFrame,
    task: str,
    sources: Sequence[FeatureSetSource],
    *,
    config: FewShotConfig = FewShotConfig(),
    folds: int = 5,
    reference: str | None = None,
    time_col: str = "time",
    event_col: str = "event",
    exclude: Collection[str] = (),
    exclude_from: Sequence[PathLike] = (),
    on_step: Callable[[str], None] | None = None,
) -> FewShotRun:
    """Few-shot probes of every feature set on the same patient-level splits and draws.

    ``task`` is ``"survival"`` or a label column of the cohort table. ``reference`` (default:
    the first set) is what every other set is compared with, per k (paired over draws).
    ``exclude``: patients never scored; ``exclude_from``: sources naming more (tables, encoder
    or slide-embedding folders: :func:`oncoslide.cohort.exclusions.read_exclusions`); a
    slide-level set's own pre-training patients are added (see the module docstring).
    """
    from oncoslide.cohort.splits import fold_parts, make_splits, survival_strata
    from oncoslide.cohort.table import load_cohort
    from oncoslide.training.tasks import label_str

    names = [s.name for s in sources]
    if not names:
        raise ConfigError("few-shot probing needs at least one feature set")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"feature set names must be unique: {dups}")
    ref = names[0] if reference is None else reference
    if ref not in names:
        raise ConfigError(f"--reference {ref!r} is not a feature set ({', '.join(names)})")
    survival = task == "survival"
    cohort = load_cohort(
        table,
        time_col=time_col,
        event_col=event_col,
        label_cols=() if survival else (task,),
        require_survival=survival,
    )
    patients = sorted(cohort.patients_with(*((time_col, event_col) if survival else (task,))))
    if len(patients) < 2 * folds:
        raise ConfigError(f"{len(patients)} patients with targets are too few for {folds} folds")
    if survival:
        y = cohort.survival(patients)
        time, event = y["time"].astype(np.float64), y["event"].astype(bool)
        strata: np.ndarray = survival_strata(time, event)
        metric = "c_index"
    else:
        labels = np.array([label_str(v) for v in cohort.labels(task, patients)])
        if len(set(labels.tolist())) < 2:
            raise ConfigError(f"label column {task!r} has fewer than 2 classes")
        strata = labels
        metric = "auc"
    splits = make_splits(
        patients, n_folds=folds, seeds=(config.seed,), strata=strata, val_fraction=0.0
    )
    excluded = set(map(str, exclude))
    for source in exclude_from:
        excluded |= read_exclusions(source, cohort).patients
    for src in sources:
        if src.level == "slide" and src.path.is_dir() and pretrain_slides_of(src.path) is not None:
            excluded |= read_exclusions(src.path, cohort).patients
    excluded &= set(patients)
    matrices = {}
    for src in sources:
        if on_step is not None:
            on_step(f"reading {src.name} ({src.level} level)")
        matrices[src.name] = patient_vectors(src, table, patients)
    pos = {p: i for i, p in enumerate(patients)}
    parts_rows = []
    for fold in range(folds):
        if on_step is not None:
            on_step(f"fold {fold + 1} of {folds}")
        parts = fold_parts(splits, config.seed, fold)
        tr = np.array([pos[p] for p in parts["train"]])
        te = np.array([pos[p] for p in parts["test"] if p not in excluded], dtype=np.int64)
        if te.size == 0:
            raise ConfigError(
                f"fold {fold} has no test patient left: all {len(parts['test'])} were seen in "
                "pre-training (excluded); use fewer --folds or evaluate on other patients"
            )
        embeddings = {n: (m[tr], m[te]) for n, m in matrices.items()}
        if survival:
            parts_rows.append(
                few_shot_survival(
                    embeddings,
                    time[tr],
                    event[tr],
                    time[te],
                    event[te],
                    config=config,
                    task=task,
                    fold=fold,
                )
            )
        else:
            parts_rows.append(
                few_shot_classification(
                    embeddings, labels[tr], labels[te], config=config, task=task, fold=fold
                )
            )
    rows = pd.concat(parts_rows, ignore_index=True)
    if rows.empty:
        raise ConfigError(
            f"no k of {list(config.shots)} fits the training parts (a class or event stratum "
            "has fewer patients than k); try smaller --k"
        )
    comparisons = [compare_few_shot(rows, n, ref) for n in names if n != ref]
    comparison = pd.concat(comparisons, ignore_index=True) if comparisons else pd.DataFrame()
    return FewShotRun(
        rows=rows,
        summary=summarise_few_shot(rows, config.interval),
        comparison=comparison,
        splits=splits,
        reference=ref,
        metric=metric,
        n_patients=len(patients),
        excluded=tuple(sorted(excluded)),
    )


def write_few_shot_run(
    run: FewShotRun,
    out: PathLike,
    *,
    sources: Sequence[FeatureSetSource],
    config: FewShotConfig,
    task: str,
) -> dict[str, Path]:
    """Write the draws, summary and curves (:func:`write_few_shot`) plus
    ``fewshot_comparison.csv``, ``splits.csv`` and ``fewshot.json`` (the settings)."""
    folder = Path(out)
    paths = write_few_shot(run.rows, folder, metric=run.metric, interval=config.interval)
    paths["comparison"] = folder / "fewshot_comparison.csv"
    paths["splits"] = folder / "splits.csv"
    paths["settings"] = folder / "fewshot.json"
    write_table(paths["comparison"], run.comparison)
    write_table(paths["splits"], run.splits)
    write_json(
        paths["settings"],
        {
            "task": task,
            "metric": run.metric,
            "reference": run.reference,
            "patients": run.n_patients,
            "excluded_from_test": list(run.excluded),
            "folds": int(run.splits["fold"].nunique()),
            "config": {**asdict(config), "shots": list(config.shots)},
            "feature_sets": [
                {"name": s.name, "path": str(s.path), "level": s.level} for s in sources
            ],
        },
    )
    return paths


__all__ = [
    "FeatureSetSource",
    "FewShotRun",
    "detect_level",
    "few_shot_sets",
    "parse_feature_set",
    "patient_vectors",
    "write_few_shot_run",
]
