"""Patient-level cross-validation splits with a validation part carved from training only.

A split table has one row per (patient, seed, fold): columns ``patient_id, seed, fold, part`` with
``part`` in {train, val, test}. For every seed the test folds partition the patients; for every
(seed, fold) each patient sits in exactly one part. ``audit_splits`` enforces both, so a split that
leaks a patient into two parts never reaches training; given the patients' sites it also enforces
site-preserving splits, where the test, training and validation parts of a fold share no site.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from oncoslide._io import write_table
from oncoslide.errors import ConfigError, SplitLeakageError

PARTS = ("train", "val", "test")
SPLIT_COLUMNS = ("patient_id", "seed", "fold", "part")


def survival_strata(time: np.ndarray, event: np.ndarray, n_time_bins: int = 2) -> np.ndarray:
    """Strata for survival: event status crossed with quantiles of time (computed per event group)."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    strata = np.empty(len(time), dtype=object)
    for flag in (False, True):
        sel = event == flag
        if not sel.any():
            continue
        if n_time_bins > 1 and sel.sum() >= n_time_bins:
            qs = np.quantile(time[sel], np.linspace(0, 1, n_time_bins + 1)[1:-1])
            bins = np.searchsorted(qs, time[sel], side="right")
        else:
            bins = np.zeros(sel.sum(), dtype=int)
        strata[sel] = [f"e{int(flag)}t{b}" for b in bins]
    return strata.astype(str)


def _merge_rare(strata: np.ndarray, min_count: int) -> np.ndarray:
    """Fold strata smaller than ``min_count`` into their nearest neighbour (sorted by name)."""
    strata = strata.astype(str).copy()
    while True:
        names, counts = np.unique(strata, return_counts=True)
        rare = names[counts < min_count]
        if len(rare) == 0 or len(names) == 1:
            return strata
        # merge the rarest stratum into the next one in sorted order (or the previous at the end)
        worst = names[np.argmin(counts)]
        i = int(np.where(names == worst)[0][0])
        target = names[i + 1] if i + 1 < len(names) else names[i - 1]
        strata[strata == worst] = target


def _kfold_assign(
    n: int,
    n_splits: int,
    strata: np.ndarray | None,
    groups: np.ndarray | None,
    seed: int,
) -> np.ndarray:
    """Fold index (0..n_splits-1) of each of n items, stratified and optionally grouped."""
    y = _merge_rare(strata, n_splits) if strata is not None else np.zeros(n, dtype=int)
    if len(np.unique(y)) == 1:
        y = np.zeros(n, dtype=int)
    fold = np.full(n, -1, dtype=int)
    x = np.zeros((n, 1))
    with warnings.catch_warnings():
        # sklearn warns when a stratum cannot fill every fold; rare strata were merged above
        warnings.simplefilter("ignore", UserWarning)
        if groups is not None:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            parts = splitter.split(x, y, groups)
        else:
            splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            parts = splitter.split(x, y)
        for k, (_, test_idx) in enumerate(parts):
            fold[test_idx] = k
    return fold


def make_splits(
    patient_ids: Sequence[str],
    *,
    n_folds: int = 5,
    seeds: Sequence[int] = (0,),
    strata: Sequence[object] | np.ndarray | None = None,
    sites: Sequence[object] | np.ndarray | None = None,
    val_fraction: float = 0.2,
) -> pd.DataFrame:
    """Patient-level K-fold splits for each seed.

    ``strata`` (one label per patient: a class label, or ``survival_strata``) balances folds;
    ``sites`` (one per patient) keeps every site inside a single fold (site-preserving mode) and
    the validation part site-disjoint from training too. The validation part is carved from the
    non-test patients of each fold only, about ``val_fraction`` of them (0 disables it); in
    site-preserving mode it is made of whole sites, at least one.
    """
    ids = np.asarray([str(p) for p in patient_ids])
    n = len(ids)
    if len(set(ids)) != n:
        raise ConfigError("patient ids given to make_splits must be unique")
    if n_folds < 2:
        raise ConfigError(f"need at least 2 folds, got {n_folds}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    strata_arr = None if strata is None else np.asarray([str(s) for s in strata])
    sites_arr = None if sites is None else np.asarray([str(s) for s in sites])
    for name, arr in (("strata", strata_arr), ("sites", sites_arr)):
        if arr is not None and len(arr) != n:
            raise ConfigError(f"{name} has {len(arr)} entries for {n} patients")
    if n < n_folds:
        raise ConfigError(f"{n} patients cannot fill {n_folds} folds")
    if sites_arr is not None and len(np.unique(sites_arr)) < n_folds:
        raise ConfigError(
            f"site-preserving splits need at least {n_folds} sites, found {len(np.unique(sites_arr))}"
        )

    rows = []
    for seed in seeds:
        fold_of = _kfold_assign(n, n_folds, strata_arr, sites_arr, int(seed))
        for k in range(n_folds):
            part = np.where(fold_of == k, "test", "train").astype(object)
            rest = np.flatnonzero(fold_of != k)
            if val_fraction > 0:
                # about val_fraction of the rest; small cohorts still get at least one patient
                n_val_splits = min(max(2, round(1 / val_fraction)), len(rest))
                if n_val_splits < 2:
                    raise ConfigError(
                        f"seed {seed} fold {k}: {len(rest)} patient(s) outside the test fold "
                        "cannot be split into training and validation parts"
                    )
                sub_strata = None if strata_arr is None else strata_arr[rest]
                sub_sites = None if sites_arr is None else sites_arr[rest]
                if sub_sites is not None:
                    # whole sites go to validation: with few sites it holds one site, which
                    # may be more than val_fraction of the patients
                    n_sub_sites = len(np.unique(sub_sites))
                    if n_sub_sites < 2:
                        raise ConfigError(
                            f"seed {seed} fold {k}: a single site outside the test fold "
                            "cannot be split into site-disjoint training and validation parts"
                        )
                    n_val_splits = min(n_val_splits, n_sub_sites)
                # a separate stream so the validation carve never changes the test folds
                sub_fold = _kfold_assign(
                    len(rest), n_val_splits, sub_strata, sub_sites, int(seed) * 7919 + k + 1
                )
                part[rest[sub_fold == 0]] = "val"
            rows.append(
                pd.DataFrame({"patient_id": ids, "seed": int(seed), "fold": k, "part": part})
            )
    splits = pd.concat(rows, ignore_index=True)
    splits["part"] = splits["part"].astype(str)
    audit_splits(
        splits,
        patient_ids=list(ids),
        sites=None if sites_arr is None else dict(zip(ids, sites_arr, strict=True)),
    )
    return splits


def leave_one_site_out(
    patient_ids: Sequence[str],
    sites: Sequence[object] | np.ndarray,
    *,
    seeds: Sequence[int] = (0,),
    strata: Sequence[object] | np.ndarray | None = None,
    val_fraction: float = 0.2,
) -> pd.DataFrame:
    """One fold per site (in sorted order of the site codes): the site's patients are the
    fold's test part, every other site trains it.

    The validation part is carved from the training sites only, as whole sites (site-disjoint
    from training, at least one; stratified by ``strata`` when given), so checkpoints are
    chosen on a site the model did not train on either; it changes with the seed, the test
    parts do not. The result is audited as a site-preserving split.
    """
    ids = np.asarray([str(p) for p in patient_ids])
    n = len(ids)
    if len(set(ids)) != n:
        raise ConfigError("patient ids given to leave_one_site_out must be unique")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sites_arr = np.asarray([str(s) for s in sites])
    strata_arr = None if strata is None else np.asarray([str(s) for s in strata])
    for name, arr in (("strata", strata_arr), ("sites", sites_arr)):
        if arr is not None and len(arr) != n:
            raise ConfigError(f"{name} has {len(arr)} entries for {n} patients")
    codes = sorted(set(sites_arr))
    need = 3 if val_fraction > 0 else 2
    if len(codes) < need:
        raise ConfigError(
            f"leave-one-site-out needs at least {need} sites"
            + (" (one to test, one to train, one to validate)" if val_fraction > 0 else "")
            + f", found {len(codes)}: {', '.join(codes)}"
        )
    rows = []
    for seed in seeds:
        for k, code in enumerate(codes):
            part = np.where(sites_arr == code, "test", "train").astype(object)
            rest = np.flatnonzero(sites_arr != code)
            if val_fraction > 0:
                n_sub_sites = len(np.unique(sites_arr[rest]))
                n_val_splits = min(max(2, round(1 / val_fraction)), n_sub_sites)
                sub_fold = _kfold_assign(
                    len(rest),
                    n_val_splits,
                    None if strata_arr is None else strata_arr[rest],
                    sites_arr[rest],
                    int(seed) * 7919 + k + 1,
                )
                part[rest[sub_fold == 0]] = "val"
            rows.append(
                pd.DataFrame({"patient_id": ids, "seed": int(seed), "fold": k, "part": part})
            )
    splits = pd.concat(rows, ignore_index=True)
    splits["part"] = splits["part"].astype(str)
    audit_splits(splits, patient_ids=list(ids), sites=dict(zip(ids, sites_arr, strict=True)))
    return splits


def audit_splits(
    splits: pd.DataFrame,
    *,
    patient_ids: Sequence[str] | None = None,
    sites: dict[str, str] | None = None,
) -> None:
    """Refuse any split where a patient could leak between parts.

    Checks, for every seed: each (fold, patient) appears once, each patient is in exactly one test
    fold, every fold holds the same patient set; with ``patient_ids``, that set is exactly those
    patients; with ``sites`` (site-preserving splits), no site appears in the test part and the
    train/val part of a fold, nor in both the training and the validation part of a fold.
    Raises ``SplitLeakageError`` listing every violation found.
    """
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise SplitLeakageError(f"split table lacks columns: {', '.join(missing)}")
    problems: list[str] = []
    bad_parts = sorted(set(splits["part"].astype(str)) - set(PARTS))
    if bad_parts:
        problems.append(f"unknown parts {bad_parts}; allowed: {list(PARTS)}")
    df = splits.assign(patient_id=splits["patient_id"].astype(str))
    dup = df.duplicated(["seed", "fold", "patient_id"], keep=False)
    if dup.any():
        ex = df.loc[dup, ["seed", "fold", "patient_id"]].drop_duplicates().head(5)
        problems.append(
            f"{int(dup.sum())} rows put a patient in two parts of one fold, e.g. "
            + "; ".join(f"seed {r.seed} fold {r.fold}: {r.patient_id}" for r in ex.itertuples())
        )
    expected = None if patient_ids is None else set(map(str, patient_ids))
    for seed, by_seed in df.groupby("seed"):
        folds = sorted(by_seed["fold"].unique())
        test = by_seed[by_seed["part"] == "test"]
        counts = test["patient_id"].value_counts()
        multi = counts[counts > 1]
        if len(multi):
            problems.append(
                f"seed {seed}: {len(multi)} patients are in more than one test fold, e.g. "
                + ", ".join(multi.index[:5])
            )
        everyone = set(by_seed["patient_id"])
        never = everyone - set(test["patient_id"])
        if never:
            problems.append(
                f"seed {seed}: {len(never)} patients are never tested, e.g. {', '.join(sorted(never)[:5])}"
            )
        if expected is not None and everyone != expected:
            extra, lacking = everyone - expected, expected - everyone
            if extra:
                problems.append(
                    f"seed {seed}: {len(extra)} unknown patients, e.g. {sorted(extra)[:5]}"
                )
            if lacking:
                problems.append(
                    f"seed {seed}: {len(lacking)} patients missing, e.g. {sorted(lacking)[:5]}"
                )
        for fold in folds:
            in_fold = by_seed[by_seed["fold"] == fold]
            if set(in_fold["patient_id"]) != everyone:
                problems.append(f"seed {seed} fold {fold}: does not hold every patient of the seed")
            if not (in_fold["part"] == "train").any():
                problems.append(f"seed {seed} fold {fold}: has no training patients")
            if not (in_fold["part"] == "test").any():
                problems.append(f"seed {seed} fold {fold}: has no test patients")
            if sites is not None:
                site_of = in_fold["patient_id"].map(sites)
                part_sites = {p: set(site_of[in_fold["part"] == p]) for p in PARTS}
                shared = part_sites["test"] & (part_sites["train"] | part_sites["val"])
                if shared:
                    problems.append(
                        f"seed {seed} fold {fold}: sites in both test and training parts: "
                        f"{sorted(shared)[:5]}"
                    )
                # validation chooses the checkpoint: it must not share a site with training
                shared = part_sites["train"] & part_sites["val"]
                if shared:
                    problems.append(
                        f"seed {seed} fold {fold}: sites in both training and validation parts: "
                        f"{sorted(shared)[:5]}"
                    )
    if problems:
        raise SplitLeakageError("split audit failed:\n" + "\n".join(f"  - {p}" for p in problems))


def save_splits(path: str | os.PathLike[str], splits: pd.DataFrame) -> Path:
    """Audit, then write the split table atomically (CSV or Parquet by suffix)."""
    audit_splits(splits)
    path = Path(path)
    write_table(
        path, splits.loc[:, list(SPLIT_COLUMNS)].sort_values(["seed", "fold", "patient_id"])
    )
    return path


def load_splits(
    path: str | os.PathLike[str], *, patient_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read a split table and audit it (against ``patient_ids`` when given)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"split file not found: {path}")
    df = (
        pd.read_parquet(path)
        if path.suffix == ".parquet"
        else pd.read_csv(path, dtype={"patient_id": str})
    )
    audit_splits(df, patient_ids=patient_ids)
    return df.loc[:, list(SPLIT_COLUMNS)].reset_index(drop=True)


def fold_parts(splits: pd.DataFrame, seed: int, fold: int) -> dict[str, list[str]]:
    """Sorted patient ids per part for one (seed, fold)."""
    sel = splits[(splits["seed"] == seed) & (splits["fold"] == fold)]
    if sel.empty:
        raise ConfigError(f"no split rows for seed {seed} fold {fold}")
    return {part: sorted(sel.loc[sel["part"] == part, "patient_id"].astype(str)) for part in PARTS}


def carve_validation(
    patient_ids: Sequence[str],
    *,
    strata: Sequence[object] | np.ndarray | None = None,
    sites: Sequence[object] | np.ndarray | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """A train / validation split of every patient, with no test part (``--fit-all``).

    The validation part is carved as cross-validation carves it from a fold's non-test
    patients: about ``val_fraction`` of them, stratified, and made of whole sites when
    ``sites`` are given (site-disjoint from training). Columns as in a split table, with
    ``seed`` = ``seed`` and ``fold`` = 0; ``val_fraction`` = 0 puts everyone in training.
    """
    ids = np.asarray([str(p) for p in patient_ids])
    if len(set(ids)) != len(ids):
        raise ConfigError("patient ids given to carve_validation must be unique")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    strata_arr = None if strata is None else np.asarray([str(s) for s in strata])
    sites_arr = None if sites is None else np.asarray([str(s) for s in sites])
    part = np.full(len(ids), "train", dtype=object)
    if val_fraction > 0:
        n_splits = min(max(2, round(1 / val_fraction)), len(ids))
        if sites_arr is not None:
            n_sites = len(np.unique(sites_arr))
            if n_sites < 2:
                raise ConfigError(
                    "a single site cannot be split into site-disjoint training and validation"
                )
            n_splits = min(n_splits, n_sites)
        if n_splits < 2:
            raise ConfigError(f"{len(ids)} patient(s) cannot be split into training and validation")
        # the stream of cross-validation's carve of fold 0, so both choose alike
        sub_fold = _kfold_assign(len(ids), n_splits, strata_arr, sites_arr, int(seed) * 7919 + 1)
        part[sub_fold == 0] = "val"
    splits = pd.DataFrame({"patient_id": ids, "seed": int(seed), "fold": 0, "part": part})
    splits["part"] = splits["part"].astype(str)
    if sites_arr is not None:
        site_of = dict(zip(ids, sites_arr, strict=True))
        shared = {site_of[p] for p in ids[part == "val"]} & {
            site_of[p] for p in ids[part == "train"]
        }
        if shared:  # cannot happen with grouped folds; a guard against future edits
            raise SplitLeakageError(f"sites in both training and validation: {sorted(shared)[:5]}")
    return splits
