"""Morphological prototypes of a trained run: which kinds of tissue the model attends to, which
go with risk, and which move each patient's prediction (the S-XAI prototype idea).

Prototypes are k-means clusters of patch features. Nothing is fitted on a test row: in each
fold of the chosen seed, the scaler and k-means are fitted on the patches of that fold's
*training part* (train and validation patients), and only the fold's *test* patients are
assigned with them, by the model of the same fold. Every patient is a test patient of exactly
one fold, so each patient's prototypes, attention, occlusion effects and predicted risk are all
out-of-fold. The folds' cluster centres are matched to the first fold's (Hungarian matching on
centre distances in that fold's standardised space), which makes prototype ``P1`` of one fold
the same prototype as ``P1`` of another; the matched distances are kept in ``explain.json``.

Per patient and prototype: the share of the patient's patches, the attention mass on them,
and the occlusion *contribution*: the model's score on the whole bag minus its score with that
prototype's patches removed (positive: the prototype raises the predicted risk). Per prototype:
the mean share and attention mass; the model's view, the Spearman correlation of the patients'
share with their out-of-fold score (scores as percentiles within their fold's test part, since
each fold's model has its own scale), the same for the attention mass, and the mean occlusion
contribution; and the prognostic view, a univariate Cox log hazard ratio (survival) or logistic
log odds ratio (binary) per SD of the share against the observed outcome. Prototypes are
numbered ``P1, P2, ...`` by decreasing outcome association (``rank_by="outcome"``, the
default: the prognostic prototypes, whatever the model learnt) or by decreasing share-risk
correlation (``rank_by="model"``): ``P1`` is the top-risk prototype.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from oncoslide._io import atomic_path, write_json, write_table
from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.splits import fold_parts
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError, OncoslideError
from oncoslide.features.cache import FeatureCache
from oncoslide.models import MODELS
from oncoslide.report.attention import (
    FoldModel,
    find_slide_file,
    load_fold_model,
    patient_attention,
    read_run,
)

EXPLAIN_DIR = "explain"
PROTOTYPE_COLUMNS = (
    "prototype",
    "rank",
    "n_patches",
    "n_patients",
    "patch_share",
    "attention_share",
    "attention_enrichment",
    "risk_corr",
    "risk_corr_p",
    "attention_risk_corr",
    "attention_risk_corr_p",
    "outcome_log_ratio",
    "outcome_p",
    "mean_contribution",
)
PATIENT_COLUMNS = (
    "patient_id",
    "seed",
    "fold",
    "prototype",
    "n_patches",
    "share",
    "attention_share",
    "contribution",
)


@dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    """Settings of :func:`explain_run`.

    ``n_prototypes``: k of k-means. ``seed``: which of the run's seeds (its splits and fold
    models). ``max_fit_patches``: at most this many training patches (drawn at random, the same
    per patient share) fit each fold's k-means. ``n_representatives``: patches shown per
    prototype (nearest its centre, one per patient). ``crop_px``: side of their images.
    """

    n_prototypes: int = 8
    seed: int = 0
    kmeans_seed: int = 0
    n_init: int = 4
    max_fit_patches: int = 50_000
    standardize: bool = True
    n_representatives: int = 6
    crop_px: int = 128
    rank_by: Literal["outcome", "model"] = "outcome"
    cache_gb: float = 2.0  # feature files held in memory at once (a slide re-read beyond it)

    def __post_init__(self) -> None:
        problems = []
        if self.n_prototypes < 2:
            problems.append(f"n_prototypes must be at least 2, got {self.n_prototypes}")
        if self.max_fit_patches < self.n_prototypes:
            problems.append("max_fit_patches must be at least n_prototypes")
        if self.n_init < 1:
            problems.append(f"n_init must be at least 1, got {self.n_init}")
        if self.n_representatives < 0:
            problems.append("n_representatives must be >= 0")
        if self.crop_px < 8:
            problems.append(f"crop_px must be at least 8, got {self.crop_px}")
        if not self.cache_gb > 0:
            problems.append(f"cache_gb must be positive, got {self.cache_gb}")
        if self.rank_by not in ("outcome", "model"):
            problems.append(f"rank_by must be 'outcome' or 'model', got {self.rank_by!r}")
        if problems:
            raise ConfigError("invalid explain settings: " + "; ".join(problems))


@dataclass
class ExplainResult:
    """What :func:`explain_run` computed and wrote (``out_dir``)."""

    out_dir: Path
    prototypes: pd.DataFrame  # PROTOTYPE_COLUMNS, one row per prototype, P1 first
    patients: pd.DataFrame  # PATIENT_COLUMNS, one row per patient x prototype present
    patches: pd.DataFrame  # one row per out-of-fold patch: its prototype and attention
    representatives: pd.DataFrame
    figure: Path
    notes: list[str] = field(default_factory=list)

    @property
    def top_risk(self) -> str:
        return str(self.prototypes["prototype"].iloc[0])


# ------------------------------------------------------------------------------ clustering


@dataclass(frozen=True, eq=False)
class _FoldClusters:
    mean: np.ndarray
    scale: np.ndarray
    centres: np.ndarray  # (k, D) in this fold's standardised space
    order: np.ndarray  # fold cluster j is aligned prototype order[j]

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligned prototype index and distance to its centre, for each row of ``x``."""
        z = self.transform(x)
        d2 = (z * z).sum(1)[:, None] - 2 * z @ self.centres.T + (self.centres**2).sum(1)[None]
        j = np.argmin(d2, axis=1)
        dist = np.sqrt(np.maximum(d2[np.arange(len(j)), j], 0.0))
        return self.order[j], dist


def _training_sample(
    cohort: Cohort, ids: list[str], cache: FeatureCache, limit: int, rng: np.random.Generator
) -> np.ndarray:
    """The training patients' patches, at most ``limit`` of them, each patient thinned by the
    same factor."""
    counts = [int(cohort.patients.loc[pid, "n_patches"]) for pid in ids]
    total = sum(counts)
    keep = 1.0 if total <= limit else limit / total
    rows = []
    for pid in ids:
        feats = np.asarray(load_bag(cohort, pid, cache).features, dtype=np.float32)
        if keep < 1.0:
            n = max(1, round(len(feats) * keep))
            feats = feats[np.sort(rng.choice(len(feats), size=min(n, len(feats)), replace=False))]
        rows.append(feats)
    return np.concatenate(rows, axis=0)


def _fit_fold(x: np.ndarray, settings: ExplainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    if len(x) < settings.n_prototypes:
        raise ConfigError(
            f"a fold's training part has {len(x)} patches, fewer than the {settings.n_prototypes} "
            "prototypes asked for"
        )
    mean = x.mean(0, dtype=np.float64)
    scale = x.std(0, dtype=np.float64) if settings.standardize else np.ones(x.shape[1])
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    km = KMeans(settings.n_prototypes, n_init=settings.n_init, random_state=settings.kmeans_seed)
    with warnings.catch_warnings():  # duplicate points in a tiny fold: still a valid fit
        warnings.simplefilter("ignore")
        km.fit(z)
    return mean, scale, np.asarray(km.cluster_centers_, dtype=np.float64)


def _align(reference: tuple[np.ndarray, np.ndarray, np.ndarray], other: tuple) -> np.ndarray:
    """order[j]: the reference cluster that ``other``'s cluster j is matched to (Hungarian
    matching of centres, both put in the reference's standardised space)."""
    mean_r, scale_r, centres_r = reference
    mean_o, scale_o, centres_o = other
    raw = centres_o * scale_o + mean_o
    in_ref = (raw - mean_r) / scale_r
    cost = np.linalg.norm(in_ref[:, None, :] - centres_r[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return order


# ------------------------------------------------------------------------------ scoring


def score_column(fold_model: FoldModel) -> str:
    """The prediction column a prototype's effect is measured on: ``risk`` (survival) or the
    positive class's probability (binary)."""
    task = fold_model.task
    if task.is_survival:
        return "risk"
    if task.kind == "binary":
        return f"prob_{task.classes[-1]}"
    raise ConfigError(
        f"explain supports survival and binary tasks; {task.name!r} is {task.kind} "
        f"({len(task.classes)} classes)"
    )


def bag_score(
    fold_model: FoldModel,
    features: np.ndarray,
    coords: np.ndarray,
    slide_index: np.ndarray | None = None,
) -> float:
    """The fold model's score for one bag (a subset of a patient's patches).

    ``slide_index`` (each patch's slide, as in :class:`~oncoslide.features.cache.Bag`) reaches
    models that declare ``uses_slide_index`` (e.g. slide-finetune embeds each slide in its own
    coordinate frame), as in training and predict; it is required for them.
    """
    x = torch.tensor(np.asarray(features, dtype=np.float32))[None]
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    c = torch.tensor(np.asarray(coords, dtype=np.float32))[None]
    inputs: dict[str, Any] = {}
    if MODELS.metadata(fold_model.config.model).get("uses_slide_index"):
        if slide_index is None:
            raise ConfigError(
                f"model {fold_model.config.model!r} needs each patch's slide index to score a bag"
            )
        inputs["slide_index"] = torch.tensor(np.asarray(slide_index, dtype=np.int64))[None]
    with torch.no_grad():
        out = fold_model.model(x, mask, c, **inputs)
    frame = fold_model.fold_task.prediction_frame(out.logits)
    return float(frame[score_column(fold_model)].iloc[0])


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return math.nan, math.nan
    rho, p = spearmanr(a[ok], b[ok])
    return float(rho), float(p)


def _cox(share: np.ndarray, time: np.ndarray, event: np.ndarray) -> tuple[float, float]:
    """Univariate Cox log hazard ratio per SD of ``share`` and its Wald p-value."""
    from lifelines import CoxPHFitter

    sd = share.std()
    if not sd > 0 or event.sum() < 2:
        return math.nan, math.nan
    frame = pd.DataFrame({"x": (share - share.mean()) / sd, "time": time, "event": event})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = CoxPHFitter().fit(frame, "time", "event")
    except Exception:  # lifelines raises several types on degenerate data (convergence)
        return math.nan, math.nan
    return float(fit.params_["x"]), float(fit.summary.loc["x", "p"])


def _logistic(share: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """Univariate logistic log odds ratio per SD of ``share`` and its Wald p-value."""
    from scipy.stats import norm
    from sklearn.linear_model import LogisticRegression

    sd = share.std()
    if not sd > 0 or label.min() == label.max():
        return math.nan, math.nan
    x = ((share - share.mean()) / sd)[:, None]
    fit = LogisticRegression(penalty=None).fit(x, label)
    p = fit.predict_proba(x)[:, 1]
    design = np.column_stack([np.ones(len(x)), x[:, 0]])
    info = design.T @ (design * (p * (1 - p))[:, None])
    try:
        se = float(np.sqrt(np.linalg.inv(info)[1, 1]))
    except np.linalg.LinAlgError:
        return float(fit.coef_[0, 0]), math.nan
    beta = float(fit.coef_[0, 0])
    return beta, float(2 * norm.sf(abs(beta / se)))


# ------------------------------------------------------------------------------ main


def explain_run(
    run_dir: str | Path,
    cohort: Cohort,
    *,
    settings: ExplainConfig | None = None,
    out_dir: str | Path | None = None,
    slides_dir: str | Path | None = None,
    on_fold: Callable[[int, int], None] | None = None,
) -> ExplainResult:
    """Find the run's morphological prototypes and write ``explain/`` (see the module doc):
    ``prototypes.csv``, ``patients.csv``, ``patches.parquet``, ``representatives.csv``,
    ``patches/P<k>_<r>.png`` (where the slide files exist), ``prototypes.png`` and
    ``explain.json``.

    Raises:
        ConfigError: not a run folder, a fold not finished, a model without attention, a
            multiclass task, or the seed not in the run.
    """
    settings = settings or ExplainConfig()
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / EXPLAIN_DIR
    config, splits = read_run(run)
    seed = settings.seed
    folds = sorted(int(f) for f in splits.loc[splits["seed"] == seed, "fold"].unique())
    if not folds:
        seeds = sorted(int(s) for s in splits["seed"].unique())
        raise ConfigError(f"seed {seed} is not in the run (seeds: {seeds})")
    stored = _stored_predictions(run, seed)
    rng = np.random.default_rng([settings.kmeans_seed, seed])
    notes: list[str] = []
    cache = FeatureCache(max_bytes=int(settings.cache_gb * 2**30))
    try:
        fitted: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        models: dict[int, FoldModel] = {}
        for fold in folds:
            models[fold] = load_fold_model(run, cohort, seed=seed, fold=fold)
            parts = fold_parts(splits, seed, fold)
            training = sorted(set(parts["train"]) | set(parts.get("val", [])))
            sample = _training_sample(cohort, training, cache, settings.max_fit_patches, rng)
            fitted[fold] = _fit_fold(sample, settings)
        reference = fitted[folds[0]]
        clusters: dict[int, _FoldClusters] = {}
        alignment: dict[str, float] = {}
        for fold in folds:
            order = _align(reference, fitted[fold])
            mean, scale, centres = fitted[fold]
            clusters[fold] = _FoldClusters(mean, scale, centres, order)
            raw = centres * scale + mean
            in_ref = (raw - reference[0]) / reference[1]
            matched = np.linalg.norm(in_ref - reference[2][order], axis=1)
            alignment[str(fold)] = float(matched.mean())
        column = score_column(models[folds[0]])
        patch_rows, patient_rows, reproduced = [], [], []
        for i, fold in enumerate(folds):
            fm = models[fold]
            for pid in sorted(fm.test_ids):
                att = patient_attention(fm, cohort, pid, cache)
                bag = load_bag(cohort, pid, cache)
                proto, dist = clusters[fold].assign(np.asarray(bag.features))
                full = att.prediction[column]
                want = stored.get(pid)
                if want is not None:
                    reproduced.append(abs(full - want))
                weights = att.table["attention"].to_numpy(dtype=float)
                within = _within_slide_index(bag.slide_index)
                patch_rows.append(
                    pd.DataFrame(
                        {
                            "patient_id": pid,
                            "slide_id": att.table["slide_id"].to_numpy(),
                            "patch_index": within,
                            "x": att.table["x"].to_numpy(),
                            "y": att.table["y"].to_numpy(),
                            "fold": fold,
                            "cluster": proto,
                            "distance": dist,
                            "attention": weights,
                        }
                    )
                )
                for k in np.unique(proto):
                    keep = proto != k
                    contribution = (
                        full
                        - bag_score(fm, bag.features[keep], bag.coords[keep], bag.slide_index[keep])
                        if keep.any()
                        else math.nan  # the whole bag is this prototype: nothing left to score
                    )
                    patient_rows.append(
                        {
                            "patient_id": pid,
                            "seed": seed,
                            "fold": fold,
                            "cluster": int(k),
                            "n_patches": int((~keep).sum()),
                            "share": float((~keep).mean()),
                            "attention_share": float(weights[~keep].sum()),
                            "contribution": float(contribution),
                        }
                    )
            if on_fold is not None:
                on_fold(i + 1, len(folds))
    finally:
        cache.close()
    if reproduced and max(reproduced) > 1e-4:
        notes.append(
            f"the fold models reproduce the stored predictions only to {max(reproduced):.2g} "
            f"({column})"
        )
    patches = pd.concat(patch_rows, ignore_index=True)
    patients = pd.DataFrame(patient_rows)
    prototypes, names = _prototype_table(patients, stored, splits, cohort, config, seed, settings)
    patients["prototype"] = patients["cluster"].map(names)
    patches["prototype"] = patches["cluster"].map(names)
    patients = patients.loc[:, list(PATIENT_COLUMNS)]
    patches = patches.drop(columns="cluster")
    patients = patients.sort_values(["patient_id", "contribution"], ascending=[True, False])
    representatives = _representatives(patches, cohort, settings, out, slides_dir, notes)
    write_table(out / "prototypes.csv", prototypes)
    write_table(out / "patients.csv", patients.reset_index(drop=True))
    write_table(out / "patches.parquet", patches)
    write_table(out / "representatives.csv", representatives)
    figure = out / "prototypes.png"
    _figure(prototypes, representatives, out, figure, config.model)
    write_json(
        out / "explain.json",
        {
            "run": str(run.resolve()),
            "model": config.model,
            "task": config.task,
            "score": column,
            "settings": asdict(settings),
            "fit_on": "each fold's training part (train + validation patients); test patients "
            "assigned by their own fold",
            "folds": folds,
            "alignment_mean_distance": alignment,
            "top_risk_prototype": str(prototypes["prototype"].iloc[0]),
            "n_patients": int(patients["patient_id"].nunique()),
            "n_patches": len(patches),
            "max_abs_reproduction_error": float(max(reproduced)) if reproduced else None,
            "notes": notes,
        },
    )
    return ExplainResult(
        out, prototypes, patients.reset_index(drop=True), patches, representatives, figure, notes
    )


def _within_slide_index(slide_index: np.ndarray) -> np.ndarray:
    """Each patch's row in its own slide's feature file (bags keep file order per slide)."""
    out = np.empty(len(slide_index), dtype=np.int64)
    for s in np.unique(slide_index):
        where = np.flatnonzero(slide_index == s)
        out[where] = np.arange(len(where))
    return out


def _stored_predictions(run: Path, seed: int) -> dict[str, float]:
    """The run's out-of-fold scores of one seed, by patient (``risk``, or the positive class's
    probability of a binary task)."""
    path = run / "predictions.parquet"
    if not path.exists():
        raise ConfigError(f"{run} has no predictions.parquet: the run has not finished")
    preds = pd.read_parquet(path)
    preds = preds[preds["seed"] == seed]
    if "risk" in preds.columns:
        column = "risk"
    else:
        probs = [c for c in preds.columns if c.startswith("prob_")]
        if len(probs) != 2:
            raise ConfigError(
                "explain supports survival and binary tasks; the run's predictions have "
                f"{len(probs)} class columns"
            )
        column = probs[-1]
    return dict(zip(preds["patient_id"].astype(str), preds[column].astype(float), strict=True))


def _prototype_table(
    patients: pd.DataFrame,
    stored: dict[str, float],
    splits: pd.DataFrame,
    cohort: Cohort,
    config: Any,
    seed: int,
    settings: ExplainConfig,
) -> tuple[pd.DataFrame, dict[int, str]]:
    """One row per prototype, and the names P1.. by decreasing outcome association (or, with
    ``rank_by="model"``, share-risk correlation)."""
    ids = sorted(patients["patient_id"].unique())
    k = settings.n_prototypes
    share = (
        patients.pivot_table(index="patient_id", columns="cluster", values="share", aggfunc="sum")
        .reindex(index=ids, columns=range(k))
        .fillna(0.0)
    )
    attention = (
        patients.pivot_table(
            index="patient_id", columns="cluster", values="attention_share", aggfunc="sum"
        )
        .reindex(index=ids, columns=range(k))
        .fillna(0.0)
    )
    fold_of = patients.groupby("patient_id")["fold"].first().reindex(ids)
    score = pd.Series([stored.get(p, math.nan) for p in ids], index=ids, dtype=float)
    # each fold's model has its own scale: compare patients through their rank in their fold
    percentile = score.groupby(fold_of).rank(pct=True)
    survival = config.is_survival
    time = event = label = np.zeros(len(ids))
    if survival:
        y = cohort.survival(ids)
        time, event = y["time"].astype(float), y["event"].astype(float)
    else:  # binary: the positive class is the last (as the score's column)
        classes = sorted(pd.unique(cohort.labels(config.task, ids)).astype(str))
        label = (cohort.labels(config.task, ids).astype(str) == classes[-1]).astype(float)
    rows = []
    for j in range(k):
        s, a = share[j].to_numpy(), attention[j].to_numpy()
        rho, p = _spearman(s, percentile.to_numpy())
        arho, ap = _spearman(a, percentile.to_numpy())
        log_ratio, out_p = _cox(s, time, event) if survival else _logistic(s, label)
        present = patients[patients["cluster"] == j]
        rows.append(
            {
                "cluster": j,
                "n_patches": int(present["n_patches"].sum()),
                "n_patients": len(present),
                "patch_share": float(s.mean()),
                "attention_share": float(a.mean()),
                "attention_enrichment": float(a.mean() / s.mean()) if s.mean() > 0 else math.nan,
                "risk_corr": rho,
                "risk_corr_p": p,
                "attention_risk_corr": arho,
                "attention_risk_corr_p": ap,
                "outcome_log_ratio": log_ratio,
                "outcome_p": out_p,
                "mean_contribution": float(present["contribution"].mean())
                if len(present)
                else math.nan,
            }
        )
    table = pd.DataFrame(rows)
    # a prototype no patient shows (NaN association) goes last
    key = "outcome_log_ratio" if settings.rank_by == "outcome" else "risk_corr"
    table = table.sort_values(key, ascending=False, na_position="last", kind="stable")
    table["rank"] = np.arange(1, k + 1)
    names = {int(c): f"P{r}" for c, r in zip(table["cluster"], table["rank"], strict=True)}
    table["prototype"] = table["cluster"].map(names)
    return table.loc[:, list(PROTOTYPE_COLUMNS)].reset_index(drop=True), names


# ------------------------------------------------------------------------------ patches


def _representatives(
    patches: pd.DataFrame,
    cohort: Cohort,
    settings: ExplainConfig,
    out: Path,
    slides_dir: str | Path | None,
    notes: list[str],
) -> pd.DataFrame:
    """Per prototype, the patches nearest its centre, one per patient; their crops from the
    slide where the slide file exists (``image`` empty otherwise)."""
    rows = []
    for name, group in patches.groupby("prototype", sort=True):
        best = group.sort_values("distance", kind="stable").drop_duplicates("patient_id")
        for r, row in enumerate(best.head(settings.n_representatives).itertuples(), start=1):
            rows.append(
                {
                    "prototype": name,
                    "rank": r,
                    "patient_id": row.patient_id,
                    "slide_id": row.slide_id,
                    "x": int(row.x),
                    "y": int(row.y),
                    "distance": float(row.distance),
                    "attention": float(row.attention),
                    "image": "",
                }
            )
    table = pd.DataFrame(
        rows,
        columns=[
            "prototype", "rank", "patient_id", "slide_id", "x", "y", "distance", "attention",
            "image",
        ],
    )  # fmt: skip
    if table.empty:
        return table
    paths = dict(zip(cohort.slides["slide_id"], cohort.slides["feature_path"], strict=True))
    missing: set[str] = set()
    for i, row in table.iterrows():
        sid = str(row["slide_id"])
        feature_path = paths.get(sid)
        slide_file = (
            None
            if feature_path is None or pd.isna(feature_path)
            else find_slide_file(
                Path(str(feature_path)), sid, None if slides_dir is None else Path(slides_dir)
            )
        )
        if slide_file is None or row["x"] < 0:
            missing.add(sid)
            continue
        target = out / "patches" / f"{row['prototype']}_{row['rank']}.png"
        try:
            _crop(
                slide_file, Path(str(feature_path)), int(row["x"]), int(row["y"]), settings, target
            )
        except OncoslideError as exc:
            notes.append(f"{sid}: no patch image ({exc})")
            continue
        table.loc[i, "image"] = str(target.relative_to(out))
    if missing:
        notes.append(
            f"{len(missing)} slide file(s) not found: their representative patches are listed "
            "by slide and coordinates only (representatives.csv)"
        )
    return table


def _crop(
    slide_file: Path, feature_path: Path, x: int, y: int, settings: ExplainConfig, target: Path
) -> None:
    """The patch at level-0 (x, y) from the slide, ``crop_px`` square, as a PNG."""
    from PIL import Image

    from oncoslide.features.readers import read_features
    from oncoslide.slides.reader import open_slide

    grid = read_features(feature_path).grid
    size = grid.patch_size_level0 if grid is not None else settings.crop_px
    with open_slide(slide_file, mpp_override=None if grid is None else grid.level0_mpp) as slide:
        # the patch's level-0 square, drawn crop_px wide from the coarsest level fine enough
        target_mpp = slide.info.level0_mpp * size / settings.crop_px
        region = slide.read_patch(x, y, settings.crop_px, target_mpp, allow_upsample=True)
    image = Image.fromarray(region)
    with atomic_path(target, suffix=".png.tmp") as tmp:
        image.save(tmp, format="PNG")


# ------------------------------------------------------------------------------ figure


def _figure(
    prototypes: pd.DataFrame, representatives: pd.DataFrame, out: Path, target: Path, model: str
) -> None:
    """Bars of patch share and attention share, outcome association and share-risk correlation;
    a row of representative patches per prototype where images exist."""
    from PIL import Image

    names = prototypes["prototype"].tolist()
    images: dict[str, list[np.ndarray]] = {}
    for row in representatives.itertuples():
        if row.image:
            images.setdefault(str(row.prototype), []).append(
                np.asarray(Image.open(out / row.image))
            )
    n_img = max((len(v) for v in images.values()), default=0)
    fig = Figure(figsize=(10, 3.2 + (0.6 * len(names) if n_img else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    if n_img:
        grid = fig.add_gridspec(2, 2, height_ratios=(3.2, 0.6 * len(names)))
    else:
        grid = fig.add_gridspec(1, 2)
    ax1, ax2 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    y = np.arange(len(names))
    ax3_ = ax2.twiny()
    ax1.barh(y - 0.2, prototypes["patch_share"], height=0.4, label="share of patches")
    ax1.barh(y + 0.2, prototypes["attention_share"], height=0.4, label="share of attention")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.legend(fontsize=8)
    ax1.set_title(f"prototypes of {model} (mean over patients)", fontsize=9)
    outcome = prototypes["outcome_log_ratio"].fillna(0)
    colours = ["#c0392b" if v > 0 else "#2471a3" for v in outcome]
    ax2.barh(y, outcome, color=colours, alpha=0.8, label="outcome: log ratio per SD of share")
    ax2.set_yticks(y, names)
    ax2.invert_yaxis()
    ax2.axvline(0, color="black", linewidth=0.8)
    bound = max(0.1, float(outcome.abs().max()) * 1.1)
    ax2.set_xlim(-bound, bound)
    ax2.set_xlabel("log hazard (or odds) ratio per SD of the patient's share", fontsize=8)
    ax3_.plot(prototypes["risk_corr"], y, "kD", markersize=5, label="model: Spearman with risk")
    ax3_.set_xlim(-1, 1)
    ax3_.set_xlabel("Spearman: share vs out-of-fold risk (diamonds)", fontsize=8)
    ax2.set_title("association with the outcome (bars) and the model's risk", fontsize=9)
    if n_img:
        ax3 = fig.add_subplot(grid[1, :])
        side = images[next(iter(images))][0].shape[0]
        canvas = np.full((len(names) * side, n_img * side, 3), 255, dtype=np.uint8)
        for r, name in enumerate(names):
            for c, img in enumerate(images.get(name, [])):
                canvas[r * side : (r + 1) * side, c * side : (c + 1) * side] = img[..., :3]
        ax3.imshow(canvas)
        ax3.set_yticks((np.arange(len(names)) + 0.5) * side, names)
        ax3.set_xticks([])
        ax3.set_title("patches nearest each prototype's centre (one per patient)", fontsize=9)
    with atomic_path(target, suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# ------------------------------------------------------------------------------ reading


def read_explanation(run_dir: str | Path) -> dict[str, Any]:
    """``explain.json`` of a run with the tables beside it (``prototypes``, ``patients``,
    ``representatives``), or raise ``ConfigError`` when ``oncoslide explain`` has not run."""
    folder = Path(run_dir) / EXPLAIN_DIR
    meta = folder / "explain.json"
    if not meta.exists():
        raise ConfigError(f"{Path(run_dir)} has no {EXPLAIN_DIR}/: run `oncoslide explain` first")
    payload: dict[str, Any] = json.loads(meta.read_text())
    payload["prototypes"] = pd.read_csv(folder / "prototypes.csv")
    payload["patients"] = pd.read_csv(folder / "patients.csv", dtype={"patient_id": str})
    payload["representatives"] = pd.read_csv(
        folder / "representatives.csv",
        dtype={"patient_id": str, "image": str},
        keep_default_na=False,
    )
    payload["folder"] = folder
    return payload


__all__ = [
    "EXPLAIN_DIR",
    "PATIENT_COLUMNS",
    "PROTOTYPE_COLUMNS",
    "ExplainConfig",
    "ExplainResult",
    "bag_score",
    "explain_run",
    "read_explanation",
    "score_column",
]
