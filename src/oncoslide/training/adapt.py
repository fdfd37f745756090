"""Test-time adaptation of a trained model to an unseen site's unlabelled slides (``predict --adapt``).

The idea of Smart-CCS (seed 003): a model trained on some scanners and stains meets a site it has
never seen; before predicting, it adapts to that site's slides without any of its labels. Each
site of the cohort (its ``site`` column; the whole cohort when there is none) is adapted on its
own, starting from the trained model every time:

1. **Re-standardisation.** The site's patch features are mapped onto the training part's
   statistics, dimension by dimension: ``x -> m_train + s_train * (x - m_site) / s_site``, with
   ``m_site, s_site`` the mean and sd over every patch of the site's slides and
   ``m_train, s_train`` those stored in the model folder at fit time (``feature_stats.npz``).
2. **Entropy minimisation (Tent).** ``steps`` full-batch Adam updates of normalisation
   parameters only, minimising the mean entropy of the model's predictive distributions over
   the site's bags. ABMIL (and the other pooling models) have no normalisation layer, so every
   model gets a per-feature affine on the re-standardised input, ``z -> gamma * z + beta``
   (identity at the start, in units of the training sd); models with LayerNorm or BatchNorm
   layers also adapt those layers' affine parameters. Nothing else moves.

   The distribution whose entropy is minimised: the class probabilities (classification); the
   distribution of the event-time bin (K bins and "after the last bin") of a discrete-time
   survival model (``--loss nll``). A Cox model outputs one risk, not a distribution, so it
   gets the re-standardisation only (recorded as such). ``diversity`` (default 1) subtracts
   that weight times the entropy of the site's mean prediction (SHOT's information
   maximisation): entropy alone (``diversity`` 0, plain Tent) collapsed every bag of the
   shifted site onto one class in the site-shift world (balanced accuracy 0.5), while the
   diversity term keeps the site's predictions spread over the classes, as the balanced class
   weights of training expect.

Only features and the site column are read; the cohort's labels are never touched while
adapting (a test plants helpful labels and checks that the adapted predictions do not change).
When the cohort has targets, ``adaptation.json`` and ``adaptation.csv`` report the metrics
before and after adaptation, computed afterwards, for evaluation only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oncoslide._io import write_json, write_table
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.evaluation.classification import classification_metrics
from oncoslide.features.cache import FeatureCache
from oncoslide.models import MODELS, MILModel, MILOutput
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training.data import BagDataset, BagTargets, collate_bags, length_sorted_order
from oncoslide.training.feature_stats import FeatureStats
from oncoslide.training.model_folder import TrainedModel
from oncoslide.training.module import model_inputs

ADAPTATION_FILE = "adaptation.json"
ADAPTATION_TABLE = "adaptation.csv"
UNADAPTED_FILE = "predictions_unadapted.parquet"
ALL_SITES = "(all)"  # the site name when the cohort has no site column

_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True, kw_only=True)
class AdaptConfig:
    """Settings of test-time adaptation (see the module docstring).

    Attributes:
        restandardise: map each site's feature statistics onto the training part's.
        steps: entropy-minimisation updates per site (0: re-standardisation only).
        lr: Adam learning rate of the adapted parameters (the input affine is in training-sd
            units, so 0.01 moves a feature by at most about 0.01 sd per step).
        diversity: weight of the entropy of the site's mean prediction (0: plain Tent, which
            may collapse onto one class).
        batch_size: bags per forward pass (gradients of all bags are summed before a step).
        site_col: the cohort column naming each patient's site.
    """

    restandardise: bool = True
    steps: int = 10
    lr: float = 0.01
    diversity: float = 1.0
    batch_size: int = 16
    site_col: str = "site"

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            problems.append(f"steps must be a non-negative integer, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be positive, got {self.lr!r}")
        if not (math.isfinite(self.diversity) and self.diversity >= 0):
            problems.append(f"diversity must be >= 0, got {self.diversity!r}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size!r}")
        if problems:
            raise ConfigError("adaptation settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "restandardise": self.restandardise,
            "steps": self.steps,
            "lr": self.lr,
            "diversity": self.diversity,
            "batch_size": self.batch_size,
            "site_col": self.site_col,
        }


class SiteAdaptedModel(MILModel):
    """A trained model behind a per-site input map: re-standardisation, then ``gamma z + beta``.

    ``gamma`` and ``beta`` (and the wrapped model's normalisation affines) are what adaptation
    trains; everything else is frozen.
    """

    train_mean: Tensor
    train_std: Tensor
    site_mean: Tensor
    site_std: Tensor

    def __init__(
        self, base: MILModel, train: FeatureStats, site_mean: np.ndarray, site_std: np.ndarray
    ) -> None:
        super().__init__(base.in_dim, base.n_outputs, base.dropout, base.hidden_dim)
        self.base = base
        self.register_buffer("train_mean", torch.as_tensor(train.mean, dtype=torch.float32))
        self.register_buffer("train_std", torch.as_tensor(train.std, dtype=torch.float32))
        self.register_buffer("site_mean", torch.as_tensor(site_mean, dtype=torch.float32))
        self.register_buffer("site_std", torch.as_tensor(site_std, dtype=torch.float32))
        self.gamma = nn.Parameter(torch.ones(base.in_dim))
        self.beta = nn.Parameter(torch.zeros(base.in_dim))

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    def adapted_parameters(self) -> list[nn.Parameter]:
        """The input affine and the affine parameters of the model's normalisation layers."""
        params = [self.gamma, self.beta]
        for module in self.base.modules():
            if isinstance(module, _NORM_LAYERS):
                params += [p for p in (module.weight, module.bias) if p is not None]
        return params

    def forward(
        self, features: Tensor, mask: Tensor, coords: Tensor | None = None, **kwargs: Any
    ) -> MILOutput:
        z = (features.float() - self.site_mean) / self.site_std
        x = self.train_mean + self.train_std * (z * self.gamma + self.beta)
        out: MILOutput = self.base(x, mask, coords, **kwargs)
        return out


def _entropy(logp: Tensor) -> Tensor:
    """Entropy of each row of log-probabilities, (B,)."""
    return -(logp.exp() * logp).sum(dim=-1)


def _log_distribution(logits: Tensor, kind: str) -> Tensor:
    """Log-probabilities of the predicted outcome: classes, or event-time bins plus "later"."""
    if kind == "classes":
        return F.log_softmax(logits, dim=-1)
    # discrete-time hazards: P(bin k) = h_k S_{k-1}, P(after the last bin) = S_K
    log_h = F.logsigmoid(logits)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=-1)
    before = F.pad(log_s[:, :-1], (1, 0))
    return torch.cat([log_h + before, log_s[:, -1:]], dim=-1)


def adaptation_objective(trained: TrainedModel) -> str:
    """``classes``, ``time_bins`` or ``none`` (Cox: one risk, no distribution to sharpen)."""
    if not trained.task.is_survival:
        return "classes"
    if trained.config.survival_loss == "nll":
        return "time_bins"
    return "none"


@dataclass
class SiteRecord:
    site: str
    patients: list[str]
    n_slides: int
    n_patches: int
    shift: dict[str, float]
    objective: list[float] = field(default_factory=list)
    seconds: float = 0.0
    n_adapted: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "patients": len(self.patients),
            "slides": self.n_slides,
            "patches": self.n_patches,
            "shift": self.shift,
            "objective": self.objective,
            "adapted_parameters": self.n_adapted,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class AdaptResult:
    """Adapted and unadapted outputs of every patient (in the order given), per-site models."""

    config: AdaptConfig
    objective: str
    logits: Tensor
    embeddings: Tensor
    before_logits: Tensor
    site_of: dict[str, str]
    models: dict[str, TrainedModel]
    records: list[SiteRecord]


def site_groups(cohort: Cohort, patients: Sequence[str], site_col: str) -> dict[str, list[str]]:
    """Patients per site (in the given order); one group when the cohort has no site column."""
    if site_col not in cohort.patients.columns:
        return {ALL_SITES: list(patients)}
    values = cohort.patients.loc[list(patients), site_col]
    if values.isna().any():
        missing = [p for p, v in zip(patients, values, strict=True) if pd.isna(v)]
        raise ConfigError(
            f"{len(missing)} patient(s) have no {site_col!r} value to adapt by, e.g. "
            f"{', '.join(missing[:5])}"
        )
    groups: dict[str, list[str]] = {}
    for pid, site in zip(patients, values, strict=True):
        groups.setdefault(str(site), []).append(pid)
    return dict(sorted(groups.items()))


def adapt_and_predict(
    trained: TrainedModel,
    cohort: Cohort,
    patients: Sequence[str],
    cache: FeatureCache,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]],
    batch_size: int,
    config: AdaptConfig,
) -> AdaptResult:
    """Adapt ``trained`` to each site of ``patients`` and predict them; labels are not read."""
    from oncoslide.training.predict import predict_logits

    train_stats = FeatureStats.load(trained.path)
    if train_stats.dim != trained.model.in_dim:
        raise ConfigError(
            f"{trained.path}: feature statistics of dimension {train_stats.dim} for a model "
            f"of input dimension {trained.model.in_dim}"
        )
    objective = adaptation_objective(trained)
    patients = list(patients)
    row = {pid: i for i, pid in enumerate(patients)}
    before, _ = predict_logits(trained, cohort, patients, cache, side, batch_size)
    logits = torch.empty_like(before)
    embeddings = torch.empty(len(patients), trained.model.embed_dim)
    site_of: dict[str, str] = {}
    models: dict[str, TrainedModel] = {}
    records = []
    for site, ids in site_groups(cohort, patients, config.site_col).items():
        started = time.perf_counter()
        arrays = [cache.get(p).features for pid in ids for p in cohort.slide_paths(pid)]
        stats = FeatureStats.of(arrays)
        mean, std = (
            (stats.mean, stats.std) if config.restandardise else (train_stats.mean, train_stats.std)
        )
        model = SiteAdaptedModel(copy.deepcopy(trained.model), train_stats, mean, std)
        rows = [row[p] for p in ids]
        site_side = {k: (v[rows], present[rows]) for k, (v, present) in side.items()}
        record = SiteRecord(
            site=site,
            patients=ids,
            n_slides=len(arrays),
            n_patches=stats.n_patches,
            shift={
                # how far the site sits from training, in training sd: what step 1 removes
                "mean_abs_offset_sd": float(
                    np.mean(np.abs(stats.mean - train_stats.mean) / train_stats.std)
                ),
                "mean_abs_log_sd_ratio": float(
                    np.mean(np.abs(np.log(stats.std / train_stats.std)))
                ),
            },
        )
        if objective != "none" and config.steps > 0:
            record.objective, record.n_adapted = _minimise_entropy(
                model, trained, cohort, ids, cache, site_side, config, objective
            )
        model.eval()
        site_model = replace(trained, model=model)
        site_logits, site_emb = predict_logits(
            site_model, cohort, ids, cache, site_side, batch_size
        )
        logits[rows] = site_logits
        embeddings[rows] = site_emb
        site_of.update(dict.fromkeys(ids, site))
        models[site] = site_model
        record.seconds = time.perf_counter() - started
        records.append(record)
    return AdaptResult(config, objective, logits, embeddings, before, site_of, models, records)


def _minimise_entropy(
    model: SiteAdaptedModel,
    trained: TrainedModel,
    cohort: Cohort,
    ids: list[str],
    cache: FeatureCache,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]],
    config: AdaptConfig,
    kind: str,
) -> tuple[list[float], int]:
    """Full-batch Adam steps on the adapted parameters; the objective before each step and after.

    Eval mode throughout (no dropout, stored normalisation statistics), whole bags in a fixed
    order: the same slides give the same adapted model.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.adapted_parameters()
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=config.lr)
    ds = BagDataset(cohort, ids, cache, BagTargets(), max_patches=None, side=dict(side))
    order = length_sorted_order(ds)
    chunks = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    uses_slide_index = bool(MODELS.metadata(trained.name).get("uses_slide_index", False))
    n = len(ids)
    model.eval()

    def forward(chunk: Sequence[int]) -> Tensor:
        batch = collate_bags([ds[i] for i in chunk])
        out = model(
            batch["features"],
            batch["mask"],
            batch["coords"],
            **model_inputs(batch, uses_slide_index),
        )
        return _log_distribution(out.logits.float(), kind)

    def mean_prediction() -> Tensor:
        with torch.no_grad():
            return torch.cat([forward(c).exp() for c in chunks]).mean(dim=0)

    history = []
    for step in range(config.steps + 1):
        # the diversity term's gradient is linear in each bag's prediction once the mean is known
        p_bar = mean_prediction() if config.diversity > 0 else None
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in chunks:
            with torch.set_grad_enabled(step < config.steps):
                logp = forward(chunk)
            loss = _entropy(logp).sum() / n
            if p_bar is not None:
                grad_h = -(torch.log(p_bar.clamp_min(1e-12)) + 1.0)  # dH(p_bar)/dp_bar
                loss = loss - config.diversity * (logp.exp() * grad_h).sum() / n
            total += float(_entropy(logp.detach()).sum()) / n
            if step < config.steps:
                loss.backward()
        if p_bar is not None:
            total -= config.diversity * float(_entropy(torch.log(p_bar.clamp_min(1e-12))[None])[0])
        history.append(total)
        if step < config.steps:
            optimiser.step()
    for p in params:
        p.requires_grad_(False)
    return history, sum(p.numel() for p in params)


def adapted_slide_embeddings(
    result: AdaptResult,
    slides: Sequence[tuple[str, str, Path]],
    cache: FeatureCache,
    batch_size: int,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]],
    rows: Mapping[str, int],
) -> Tensor:
    """Each slide alone as a bag, through its site's adapted model."""
    from oncoslide.training.predict import _slide_embeddings

    first = next(iter(result.models.values()))
    out = torch.empty(len(slides), first.model.embed_dim)
    for site, model in result.models.items():
        idx = [k for k, (pid, _, _) in enumerate(slides) if result.site_of[pid] == site]
        if idx:
            out[idx] = _slide_embeddings(
                model, [slides[k] for k in idx], cache, batch_size, side, rows
            )
    return out


# ------------------------------------------------------------------ evaluation (after adapting)


def _scores(frame: pd.DataFrame, trained: TrainedModel) -> dict[str, float]:
    """Metrics of one predictions frame that holds targets (NaN where undefined)."""
    task = trained.task
    if task.is_survival:
        if "time" not in frame or "event" not in frame:
            return {}
        ok = frame["time"].notna() & frame["event"].notna()
        f = frame[ok]
        if not len(f) or not f["event"].astype(bool).any():
            return {"c_index": float("nan")}
        c = concordance_index_censored(
            f["event"].astype(bool).to_numpy(), f["time"].to_numpy(float), f["risk"].to_numpy()
        )
        return {"c_index": float(c.cindex)}
    if "label" not in frame:
        return {}
    f = frame[frame["label"].notna()]
    classes = list(task.classes)
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([lookup[v] for v in f["label"]], dtype=np.int64)
    probs = f[[f"prob_{c}" for c in classes]].to_numpy(float)
    if len(np.unique(labels)) < 2:
        return {"auc": float("nan"), "balanced_accuracy": float("nan")}
    out = classification_metrics(labels, probs, classes=list(range(len(classes))))
    return {k: float(v) for k, v in out.items()}


def adaptation_table(
    before: pd.DataFrame, after: pd.DataFrame, result: AdaptResult, trained: TrainedModel
) -> pd.DataFrame:
    """Rows (site, metric, before, after, change, patients): every site and all patients."""
    rows = []
    sites = pd.Series(result.site_of)
    scopes = [("all", list(before["patient_id"]))]
    if len(result.records) > 1:
        scopes += [(r.site, r.patients) for r in result.records]
    b, a = before.set_index("patient_id"), after.set_index("patient_id")
    for scope, ids in scopes:
        ids = [p for p in ids if p in sites.index]
        mb = _scores(b.loc[ids].reset_index(), trained)
        ma = _scores(a.loc[ids].reset_index(), trained)
        for metric in mb:
            rows.append(
                {
                    "site": scope,
                    "metric": metric,
                    "before": mb[metric],
                    "after": ma[metric],
                    "change": ma[metric] - mb[metric],
                    "patients": len(ids),
                }
            )
    return pd.DataFrame(rows, columns=["site", "metric", "before", "after", "change", "patients"])


def _objective_note(result: AdaptResult) -> str:
    if result.objective == "none":
        return "Cox model: one risk per patient, no distribution; re-standardisation only"
    what = {
        "classes": "the class probabilities",
        "time_bins": "the predicted event-time bin (K bins + after the last)",
    }[result.objective]
    if result.config.steps == 0:
        return "re-standardisation only (0 steps)"
    note = f"mean entropy of {what}"
    if result.config.diversity > 0:
        note += f" minus {result.config.diversity:g} x the entropy of the site's mean prediction"
    return note


def write_adaptation(
    out: Path,
    result: AdaptResult,
    before: pd.DataFrame,
    after: pd.DataFrame,
    trained: TrainedModel,
) -> pd.DataFrame:
    """``predictions_unadapted.parquet``, ``adaptation.json`` and, with targets, ``adaptation.csv``."""
    write_table(out / UNADAPTED_FILE, before)
    table = adaptation_table(before, after, result, trained)
    if len(table):
        write_table(out / ADAPTATION_TABLE, table)
    write_json(
        out / ADAPTATION_FILE,
        {
            "settings": result.config.to_dict(),
            "objective": result.objective,
            "objective_note": _objective_note(result),
            "labels_read": False,
            "sites": [r.to_dict() for r in result.records],
            "metrics": table.to_dict(orient="records"),
        },
    )
    return table


__all__ = [
    "ADAPTATION_FILE",
    "ADAPTATION_TABLE",
    "UNADAPTED_FILE",
    "AdaptConfig",
    "AdaptResult",
    "SiteAdaptedModel",
    "adapt_and_predict",
    "adaptation_objective",
    "adapted_slide_embeddings",
    "site_groups",
    "write_adaptation",
]
