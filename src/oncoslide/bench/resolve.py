"""A benchmark spec checked against its data: cohorts per feature set, tasks, splits, exclusions.

Everything that can be wrong with the data is found here, before any training, and reported in
one :class:`~oncoslide.errors.ConfigError` (or the cohort's own validation error, which also
lists every problem): unknown columns, filters that keep nobody, too few patients, events or
class members per test part, split audits, exclusion lists that cannot be read.

Splits depend only on the task (its patients, targets, policy), the benchmark's folds, seeds and
validation fraction: every feature set and model of a task sees the same splits, which makes
paired comparisons possible and keeps patients from crossing folds whatever the encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedShuffleSplit

from oncoslide._io import read_table_file
from oncoslide.bench.spec import BenchSpec, FeatureSetSpec, SplitSpec, TaskSpecEntry
from oncoslide.cohort.exclusions import Exclusions, pretrain_slides_of, read_exclusions
from oncoslide.cohort.omics import Omics, load_omics
from oncoslide.cohort.splits import (
    audit_splits,
    leave_one_site_out,
    make_splits,
    survival_strata,
)
from oncoslide.cohort.table import GROUP_COLUMNS, Cohort, load_cohort
from oncoslide.errors import (
    ConfigError,
    FeatureFileError,
    OmicsValidationError,
    SplitLeakageError,
)
from oncoslide.features.slide_embeddings import (
    SlideEmbeddingError,
    SlideEmbeddings,
    load_slide_embeddings,
)
from oncoslide.models import MODELS
from oncoslide.survival.target import make_survival
from oncoslide.training.tasks import TaskSpec, label_str


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """A feature set loaded against the cohort table, with its pre-training exclusions."""

    spec: FeatureSetSpec
    cohort: Cohort
    excluded: frozenset[str] = frozenset()  # patients never to be scored as test patients
    exclude_digest: str = ""
    exclude_note: str = ""
    slide_embeddings: SlideEmbeddings | None = None  # slide-level feature sets only
    missing: frozenset[str] = frozenset()  # patients without usable features: never used
    missing_note: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def level(self) -> Literal["patch", "slide"]:
        return self.spec.level


@dataclass(frozen=True, eq=False)
class BenchTask:
    """A task resolved on the cohort: its patients, classes and (audited) splits."""

    spec: TaskSpecEntry
    target: TaskSpec  # what training and metrics need (name = label column)
    patients: tuple[str, ...]
    splits: pd.DataFrame
    n_events: int | None
    left_out: int  # patients kept by the filter but lacking a target value
    side: dict[str, Omics] = field(default_factory=dict)  # omics, mutations

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> Literal["survival", "binary", "multiclass"]:
        return self.spec.kind

    @property
    def classes(self) -> tuple[str, ...]:
        return self.target.classes

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.splits["seed"].unique())

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in self.splits["fold"].unique())

    def split_digest(self) -> str:
        """Identifies the patients and splits: a changed cohort or split gives new cells."""
        table = self.splits.sort_values(["seed", "fold", "patient_id"]).to_csv(index=False)
        return hashlib.sha256(table.encode()).hexdigest()[:16]

    def describe_split(self) -> str:
        s = self.spec.split
        if s.policy == "train_test":
            test = int((self.splits.query("seed == @self.seeds[0]")["part"] == "test").sum())
            return f"train/test, external test set {_filter_text(s.test_filter)} ({test} patients)"
        if s.policy == "leave_one_site_out":
            return f"leave-one-site-out ({len(self.folds)} sites), seeds {self.seeds}"
        site = ", site-preserving" if s.site_preserving else ""
        return f"{len(self.folds)}-fold patient-level CV{site}, seeds {self.seeds}"


@dataclass(frozen=True, eq=False)
class ResolvedBench:
    spec: BenchSpec
    feature_sets: dict[str, FeatureSet]
    tasks: dict[str, BenchTask]
    notes: tuple[str, ...] = field(default=())
    cohort: Cohort | None = None  # every patient of the table (labels only, no features)

    def exclusion_report(self, task: BenchTask) -> str:
        """One line per task: what each feature set's exclusion list removed from its tests."""
        parts = []
        patients = set(task.patients)
        for fs in self.feature_sets.values():
            n = len(fs.excluded & patients)
            if fs.spec.exclude is not None:
                parts.append(f"{fs.name}: {n} patient(s) excluded from test parts")
            lost = len(fs.missing & patients)
            if lost:
                parts.append(f"{fs.name}: {lost} patient(s) without usable features, left out")
        return "; ".join(parts) if parts else "no exclusion lists"


def resolve_bench(
    spec: BenchSpec, *, progress: Callable[[str, int, int], None] | None = None
) -> ResolvedBench:
    """Load the cohort with every feature set, resolve every task and make its splits."""
    problems: list[str] = []
    cohort_path = spec.path(spec.cohort)
    table = read_table_file(cohort_path, problems, string_columns=("patient_id", "slide_id"))
    if table is None:
        raise ConfigError(f"cohort table {cohort_path}: " + "; ".join(problems))
    problems += _column_problems(spec, table)
    if problems:
        raise ConfigError(_problem_text(f"benchmark {spec.name}", problems))

    label_cols = _patient_level_columns(spec)
    first = next((t for t in spec.tasks if t.kind == "survival"), None)
    time_col, event_col = (first.time, first.event) if first else ("time", "event")
    feature_sets: dict[str, FeatureSet] = {}
    for fs_spec in spec.feature_sets:

        def step(done: int, total: int, name: str = fs_spec.name) -> None:
            if progress is not None:
                progress(name, done, total)

        slide_level = fs_spec.level == "slide"
        cohort = load_cohort(
            table,
            None if slide_level else spec.path(fs_spec.features),
            time_col=time_col,
            event_col=event_col,
            label_cols=label_cols,
            stamp_mpp=fs_spec.stamp_mpp,
            progress=None if slide_level else step,
            bad_features=spec.bad_features,
        )
        fs = _with_exclusions(spec, fs_spec, cohort, problems)
        if slide_level:
            fs = _with_slide_embeddings(spec, fs, problems)
        if cohort.dropped:
            fs = dataclasses.replace(
                fs,
                missing=frozenset(cohort.dropped_patients),
                missing_note=f"{fs.name}: {cohort.drop_note}",
            )
        feature_sets[fs_spec.name] = fs

    # tasks are resolved on every patient of the table, whatever features each set lacks
    reference = load_cohort(
        table, None, time_col=time_col, event_col=event_col, label_cols=label_cols
    )
    tasks: dict[str, BenchTask] = {}
    for t in spec.tasks:
        task = _resolve_task(spec, t, reference, problems)
        if task is not None:
            tasks[t.name] = dataclasses.replace(task, side=_side_tables(spec, t, problems))
    problems += _side_input_problems(spec, tasks)
    if problems:
        raise ConfigError(_problem_text(f"benchmark {spec.name}", problems))
    notes = [
        f"task {t.name}: {t.left_out} patient(s) lack a target value and are left out"
        for t in tasks.values()
        if t.left_out
    ]
    notes += [fs.missing_note for fs in feature_sets.values() if fs.missing_note]
    return ResolvedBench(spec, feature_sets, tasks, tuple(notes), reference)


def _side_input_problems(spec: BenchSpec, tasks: dict[str, BenchTask]) -> list[str]:
    """A mil model that declares a side input needs it in every task it runs on."""
    from oncoslide.training.side_inputs import declared_side_inputs

    problems = []
    for m in spec.models:
        if m.protocol != "mil" or m.registry_name not in MODELS:
            continue  # unknown names are reported where the models are checked
        for name in declared_side_inputs(m.registry_name):
            lacking = [t.name for t in tasks.values() if name not in t.side]
            if lacking:
                problems.append(
                    f"model {m.name} uses the side input {name!r}, which tasks "
                    f"{', '.join(lacking)} do not name (add `{name}: TABLE` to those tasks)"
                )
    return problems


def _side_tables(spec: BenchSpec, t: TaskSpecEntry, problems: list[str]) -> dict[str, Omics]:
    """The task's omics and mutation tables (for models that declare them as side inputs)."""
    tables: dict[str, Omics] = {}
    for name, path, groups in (
        ("omics", t.omics, t.gene_groups),
        ("mutations", t.mutations, None),
    ):
        if path is None:
            continue
        try:
            tables[name] = load_omics(
                spec.path(path), None if groups is None else spec.path(groups)
            )
        except OmicsValidationError as exc:
            problems.append(f"task {t.name}: {name}: {exc}")
    return tables


# ------------------------------------------------------------------------------ columns


def _column_problems(spec: BenchSpec, table: pd.DataFrame) -> list[str]:
    cols = set(table.columns)
    problems = []
    for t in spec.tasks:
        used = [*t.target_columns, *(t.filter or {}), *(t.split.test_filter or {})]
        if t.split.uses_sites:
            used.append("site")
        missing = [c for c in dict.fromkeys(used) if c not in cols]
        if t.split.uses_sites and "site" in missing and "slide_id" in cols:
            missing.remove("site")  # may come from TCGA barcodes; checked after loading
        if missing:
            problems.append(
                f"task {t.name}: unknown column(s) {missing} (the cohort table has: "
                f"{', '.join(map(str, table.columns))})"
            )
    return problems


def _patient_level_columns(spec: BenchSpec) -> tuple[str, ...]:
    """Columns that must agree across a patient's slides (loaded as patient-level labels)."""
    cols: list[str] = []
    first = next((t for t in spec.tasks if t.kind == "survival"), None)
    for t in spec.tasks:
        cols += [*(t.filter or {}), *(t.split.test_filter or {})]
        if t.kind != "survival":
            cols.append(str(t.target))
        elif first is not None and (t.time, t.event) != (first.time, first.event):
            cols += [t.time, t.event]
    skip = {*GROUP_COLUMNS, *((first.time, first.event) if first else ())}
    return tuple(c for c in dict.fromkeys(cols) if c not in skip)


# ------------------------------------------------------------------------------ exclusions


def _with_exclusions(
    spec: BenchSpec, fs: FeatureSetSpec, cohort: Cohort, problems: list[str]
) -> FeatureSet:
    """The feature set with the patients its encoder saw: those its ``exclude`` source names
    (a table, an encoder folder or a slide-embedding folder), and, for slide embeddings whose
    manifest records the encoder's pre-training slides, those too (by construction)."""
    found: list[Exclusions] = []
    if fs.exclude is not None:
        try:
            found.append(read_exclusions(spec.path(fs.exclude), cohort))
        except ConfigError as exc:
            problems.append(f"feature set {fs.name}: {exc}")
            return FeatureSet(fs, cohort)
    if fs.level == "slide" and fs.pretraining == "exclude" and spec.path(fs.features).is_dir():
        try:
            seen = pretrain_slides_of(spec.path(fs.features))
        except ConfigError as exc:
            problems.append(f"feature set {fs.name}: {exc}")
            return FeatureSet(fs, cohort)
        if seen is not None and not (found and found[0].source == str(spec.path(fs.features))):
            found.append(read_exclusions(spec.path(fs.features), cohort))
    if not found:
        return FeatureSet(fs, cohort)
    patients = frozenset().union(*(e.patients for e in found))
    digest = found[0].digest if len(found) == 1 else "+".join(e.digest for e in found)
    note = "; ".join(
        e.note(fs.name if e.source != str(spec.path(fs.features)) else f"{fs.name} (encoder's "
               "pre-training slides, from its manifest)")
        for e in found
    )  # fmt: skip
    return FeatureSet(fs, cohort, patients, digest, note)


def _with_slide_embeddings(spec: BenchSpec, fs: FeatureSet, problems: list[str]) -> FeatureSet:
    try:
        embeddings = load_slide_embeddings(
            spec.path(fs.spec.features), list(fs.cohort.slides["slide_id"])
        )
    except (SlideEmbeddingError, FeatureFileError) as exc:
        problems.append(f"feature set {fs.name}: {exc}")
        return fs
    return dataclasses.replace(fs, slide_embeddings=embeddings)


# ------------------------------------------------------------------------------ tasks


def _matches(cohort: Cohort, ids: Sequence[str], flt: dict[str, list]) -> np.ndarray:
    keep = np.ones(len(ids), dtype=bool)
    for col, allowed in flt.items():
        wanted = {label_str(v) for v in allowed}
        values = cohort.patients.loc[list(ids), col]
        keep &= np.array([pd.notna(v) and label_str(v) in wanted for v in values])
    return keep


def _filter_text(flt: dict[str, list] | None) -> str:
    if not flt:
        return ""
    return ", ".join(f"{c} in {sorted(map(label_str, v))}" for c, v in flt.items())


def _task_tree(
    spec: BenchSpec,
    t: TaskSpecEntry,
    cohort: Cohort,
    patients: list[str],
    classes: tuple[str, ...],
    problems: list[str],
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The task's label tree (``hierarchy``), checked against its patients' labels."""
    from oncoslide.cohort.label_tree import LabelTreeError, load_label_tree

    assert t.hierarchy is not None
    try:
        tree = load_label_tree(spec.path(t.hierarchy))
    except LabelTreeError as exc:
        problems.extend(f"task {t.name}: hierarchy {p}" for p in exc.problems)
        return ()
    found = tree.cohort_problems(cohort.labels(str(t.target), patients), task=str(t.target))
    problems.extend(f"task {t.name}: hierarchy: {p}" for p in found)
    return tree.restricted(classes).tree


def _resolve_task(
    spec: BenchSpec, t: TaskSpecEntry, cohort: Cohort, problems: list[str]
) -> BenchTask | None:
    n_before = len(problems)
    ids = cohort.patient_ids
    if t.filter:
        ids = [p for p, k in zip(ids, _matches(cohort, ids, t.filter), strict=True) if k]
        if not ids:
            problems.append(f"task {t.name}: the filter {_filter_text(t.filter)} keeps no patient")
            return None
    if t.kind == "survival":
        if (t.time, t.event) != (cohort.time_col, cohort.event_col):
            cohort = dataclasses.replace(cohort, time_col=t.time, event_col=t.event)
        with_target = set(cohort.patients_with(t.time, t.event))
    else:
        with_target = set(cohort.patients_with(str(t.target)))
    patients = [p for p in ids if p in with_target]
    left_out = len(ids) - len(patients)
    if not patients:
        problems.append(f"task {t.name}: no patient has {', '.join(t.target_columns)}")
        return None

    n_events = None
    if t.kind == "survival":
        try:
            y = cohort.survival(patients)
        except Exception as exc:  # bad extra survival columns: report, do not crash
            problems.append(f"task {t.name}: {exc}")
            return None
        n_events = int(y["event"].sum())
        strata = survival_strata(y["time"], y["event"])
        target = TaskSpec("survival", "survival", time_col=t.time, event_col=t.event)
    else:
        strata = np.array([label_str(v) for v in cohort.labels(str(t.target), patients)])
        classes = tuple(sorted(set(strata)))
        if t.kind == "binary" and len(classes) != 2:
            problems.append(f"task {t.name}: binary target has {len(classes)} class(es) {classes}")
        if t.kind == "multiclass" and len(classes) < 3:
            problems.append(
                f"task {t.name}: multiclass target has {len(classes)} class(es) {classes}; "
                "use kind: binary"
            )
        tree: tuple[tuple[str, tuple[str, ...]], ...] = ()
        if t.hierarchy is not None:
            tree = _task_tree(spec, t, cohort, patients, classes, problems)
        target = TaskSpec(str(t.target), t.kind, classes=classes, tree=tree)
    if len(problems) > n_before:
        return None

    sites = None
    if t.split.uses_sites:
        if "site" not in cohort.patients.columns:
            problems.append(f"task {t.name}: site-preserving splits need a 'site' column")
            return None
        sites = np.array([str(s) for s in cohort.patients.loc[patients, "site"]])
    try:
        if t.split.policy == "kfold":
            splits = _kfold(spec, t, patients, strata, sites, problems)
        elif t.split.policy == "leave_one_site_out":
            assert sites is not None
            splits = leave_one_site_out(
                patients, sites, seeds=spec.seeds, strata=strata, val_fraction=spec.val_fraction
            )
        else:
            splits = _train_test(spec, t, cohort, patients, strata, problems)
    except (ConfigError, SplitLeakageError) as exc:
        problems.append(f"task {t.name}: {exc}")
        return None
    if splits is None:
        return None
    _check_test_parts(t, splits, dict(zip(patients, strata, strict=True)), cohort, problems)
    if len(problems) > n_before:
        return None
    return BenchTask(t, target, tuple(patients), splits, n_events, left_out)


def _kfold(
    spec: BenchSpec,
    t: TaskSpecEntry,
    patients: list[str],
    strata: np.ndarray,
    sites: np.ndarray | None,
    problems: list[str],
) -> pd.DataFrame | None:
    folds = t.split.folds or spec.folds
    if len(patients) < 2 * folds:
        problems.append(f"task {t.name}: {len(patients)} patients are too few for {folds} folds")
        return None
    return make_splits(
        patients,
        n_folds=folds,
        seeds=spec.seeds,
        strata=strata,
        sites=sites,
        val_fraction=spec.val_fraction,
    )


def _train_test(
    spec: BenchSpec,
    t: TaskSpecEntry,
    cohort: Cohort,
    patients: list[str],
    strata: np.ndarray,
    problems: list[str],
) -> pd.DataFrame | None:
    split: SplitSpec = t.split
    assert split.test_filter is not None
    is_test = _matches(cohort, patients, split.test_filter)
    n_test, n_fit = int(is_test.sum()), int((~is_test).sum())
    if n_test == 0 or n_fit < 4:
        problems.append(
            f"task {t.name}: the test filter {_filter_text(split.test_filter)} leaves "
            f"{n_test} test and {n_fit} training patients"
        )
        return None
    ids = np.asarray(patients)
    fit_idx = np.flatnonzero(~is_test)
    rows = []
    for seed in spec.seeds:
        part = np.where(is_test, "test", "train").astype(object)
        n_val = max(1, round(spec.val_fraction * len(fit_idx)))
        fit_strata = strata[fit_idx]
        _, counts = np.unique(fit_strata, return_counts=True)
        stratify = fit_strata if counts.min() >= 2 and n_val >= len(counts) else None
        sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=int(seed))
        if stratify is None:
            rng = np.random.default_rng(int(seed))
            val_local = rng.choice(len(fit_idx), size=n_val, replace=False)
        else:
            _, val_local = next(sss.split(np.zeros(len(fit_idx)), stratify))
        part[fit_idx[val_local]] = "val"
        rows.append(pd.DataFrame({"patient_id": ids, "seed": int(seed), "fold": 0, "part": part}))
    splits = pd.concat(rows, ignore_index=True)
    splits["part"] = splits["part"].astype(str)
    audit_train_test(splits, test_ids=set(ids[is_test]))
    return splits


def audit_train_test(splits: pd.DataFrame, *, test_ids: set[str]) -> None:
    """A fixed train/test split: one fold, the same test set for every seed, no overlap."""
    problems = []
    if set(splits["fold"].unique()) != {0}:
        problems.append("a train/test split has exactly one fold (0)")
    dup = splits.duplicated(["seed", "fold", "patient_id"])
    if dup.any():
        problems.append(f"{int(dup.sum())} rows repeat a patient within a seed")
    for seed, rows in splits.groupby("seed"):
        test = set(rows.loc[rows["part"] == "test", "patient_id"])
        if test != test_ids:
            problems.append(f"seed {seed}: the test set differs from the test filter's patients")
        if not (rows["part"] == "train").any():
            problems.append(f"seed {seed}: no training patients")
    if problems:
        raise SplitLeakageError("split audit failed:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_test_parts(
    t: TaskSpecEntry,
    splits: pd.DataFrame,
    stratum_of: dict[str, str],
    cohort: Cohort,
    problems: list[str],
) -> None:
    """Every test part must be scoreable: enough events, or every class present."""
    tests = splits[splits["part"] == "test"]
    worst: tuple[int, int, int] | None = None
    for (seed, fold), rows in tests.groupby(["seed", "fold"]):
        pids = list(rows["patient_id"])
        if t.kind == "survival":
            y = make_survival(
                cohort.patients.loc[pids, t.event].to_numpy(),
                cohort.patients.loc[pids, t.time].to_numpy(),
            )
            n = int(y["event"].sum())
            if n < t.min_events_per_fold and (worst is None or n < worst[2]):
                worst = (int(seed), int(fold), n)
        else:
            counts = pd.Series([stratum_of[p] for p in pids]).value_counts()
            classes = sorted(set(stratum_of.values()))
            n = min(int(counts.get(c, 0)) for c in classes)
            if n < t.min_per_class_per_fold and (worst is None or n < worst[2]):
                worst = (int(seed), int(fold), n)
    if worst is not None:
        seed, fold, n = worst
        need = (
            f"{t.min_events_per_fold} events"
            if t.kind == "survival"
            else f"{t.min_per_class_per_fold} patient(s) of every class"
        )
        problems.append(
            f"task {t.name}: too few {'events' if t.kind == 'survival' else 'class members'} "
            f"per test part (seed {seed} fold {fold} has {n}; each needs {need}); "
            "use fewer folds or a larger cohort"
        )


def _problem_text(where: str, problems: list[str]) -> str:
    n = len(problems)
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{where} has {n} problem{'s' if n != 1 else ''}:\n{lines}"


def audit_bench_splits(bench: ResolvedBench) -> None:
    """Re-audit every task's splits (run before any training)."""
    for task in bench.tasks.values():
        if task.spec.split.policy in ("kfold", "leave_one_site_out"):
            sites = None
            if task.spec.split.uses_sites:
                cohort = bench.cohort or next(iter(bench.feature_sets.values())).cohort
                sites = {p: str(cohort.patients.loc[p, "site"]) for p in task.patients}
            audit_splits(task.splits, patient_ids=list(task.patients), sites=sites)
        else:
            test = set(task.splits.loc[task.splits["part"] == "test", "patient_id"])
            audit_train_test(task.splits, test_ids=test)


__all__ = [
    "BenchTask",
    "FeatureSet",
    "ResolvedBench",
    "audit_bench_splits",
    "audit_train_test",
    "resolve_bench",
]
