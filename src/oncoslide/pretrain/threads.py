"""Threads-style molecular contrastive slide encoder (seed 004, Vaidya et al. 2025).

A slide encoder (multi-head gated ABMIL over patch features) is pre-trained so that a slide's
embedding lies close to the embedding of its patient's molecular profile: an expression encoder
(MLP over standardised expression) and, optionally, a mutation encoder (multi-hot -> MLP). The
loss is a symmetric InfoNCE (slide -> profile and profile -> slide) per modality, averaged over
the modalities present in the batch. Pairing is per patient: every slide of a patient maps to
the patient's profile, and two slides of one patient in a batch are never each other's
negatives. A patient without one modality is masked out of that modality's loss (and one with
neither is not a pre-training item at all).

Leakage: the expression scaler is fitted on the pre-training patients only, and the caller
chooses those patients (e.g. the training part of an outer fold, never its test part).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oncoslide.cohort.omics import Omics, load_omics
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.pretrain.base import PRETRAINERS, SLIDE_ENCODERS, Bag, PretrainMethod, SlideEncoder

PathLike = str | os.PathLike[str]

if TYPE_CHECKING:
    from oncoslide.pretrain.runner import PretrainResult

_REFERENCE = (
    "Vaidya et al., Molecular-driven Foundation Model for Oncologic Pathology (Threads), "
    "arXiv 2501.16652, 2025"
)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class ThreadsConfig:
    """Sizes and loss settings of the Threads-style method (CPU-small defaults).

    The paper's encoder is much wider (CONCH v1.5 patch features, a 1024-d slide embedding,
    47,171 slides); these defaults fit a 2-core CPU and the simulated worlds. ``patch_keep``
    (a random share of each bag's patches per step, a view augmentation), ``dropout`` 0.25 and
    ``weight_decay`` 0.05 were set after a first run (all patches, dropout 0.1, weight decay
    1e-4) memorised its 200 pre-training patients (training loss 0.02) and did not beat mean
    pooling (docs/pretrain.md).
    """

    embed_dim: int = 128
    hidden_dim: int = 256
    attn_dim: int = 128
    heads: int = 4
    dropout: float = 0.25
    profile_hidden: int = 256
    temperature: float = 0.1
    learn_temperature: bool = True
    mutation_weight: float = 1.0
    patch_keep: float = 0.5
    max_patches: int | None = 512
    lr: float = 1e-3
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        problems = []
        for name in ("embed_dim", "hidden_dim", "attn_dim", "heads", "profile_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if not self.mutation_weight >= 0:
            problems.append(f"mutation_weight must be >= 0, got {self.mutation_weight!r}")
        if not 0.0 < self.patch_keep <= 1.0:
            problems.append(f"patch_keep must be in (0, 1], got {self.patch_keep!r}")
        if self.max_patches is not None and self.max_patches < 1:
            problems.append(f"max_patches must be >= 1 or None, got {self.max_patches!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if problems:
            raise ConfigError("ThreadsConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- slide encoder


class _GatedHead(nn.Module):
    """One gated attention head: logits w^T (tanh(V h) * sigmoid(U h))."""

    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = nn.Sequential(
            nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, rows: Tensor) -> Tensor:
        return self.score(self.tanh_branch(rows) * self.gate_branch(rows)).squeeze(-1)


@SLIDE_ENCODERS.register("threads", reference=_REFERENCE)
class ThreadsSlideEncoder(SlideEncoder):
    """Multi-head gated ABMIL: per-patch Linear(D -> hidden) + GELU; each head pools the
    projected patches with its own gated attention; the heads' pooled vectors are concatenated
    and projected (LayerNorm, Linear) to the ``embed_dim`` slide embedding.

    ``forward(features (N, D), coords (N, 2) | None) -> (embed_dim,)`` embeds one slide (the
    SlideEncoder contract; coordinates are not used); :meth:`encode` embeds a padded batch.
    """

    name = "threads"
    uses_coords = False

    def __init__(
        self,
        in_dim: int,
        *,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        attn_dim: int = 128,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(in_dim, int) or in_dim < 1:
            raise ConfigError(
                f"ThreadsSlideEncoder: in_dim must be a positive integer, got {in_dim!r}"
            )
        self.in_dim = in_dim
        self.embed_dim = embed_dim
        self._config = {
            "in_dim": in_dim,
            "embed_dim": embed_dim,
            "hidden_dim": hidden_dim,
            "attn_dim": attn_dim,
            "heads": heads,
            "dropout": dropout,
        }
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.heads = nn.ModuleList(_GatedHead(hidden_dim, attn_dim, dropout) for _ in range(heads))
        self.out = nn.Sequential(
            nn.LayerNorm(heads * hidden_dim), nn.Linear(heads * hidden_dim, embed_dim)
        )

    def config(self) -> dict[str, Any]:
        """JSON-able constructor keywords (``ThreadsSlideEncoder(**config())`` rebuilds it)."""
        return dict(self._config)

    def encode(
        self, features: Tensor, mask: Tensor, *, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, D) features and (B, N) bool mask -> (B, E) embeddings (and (B, H, N)
        attention). Padding never influences an output; every bag needs a valid patch."""
        if features.dim() != 3 or mask.shape != features.shape[:2]:
            raise ConfigError(
                f"ThreadsSlideEncoder.encode: expected features (B, N, D) and mask (B, N), got "
                f"{tuple(features.shape)} and {tuple(mask.shape)}"
            )
        if features.shape[-1] != self.in_dim:
            raise ConfigError(
                f"ThreadsSlideEncoder: features have dimension {features.shape[-1]}, "
                f"the encoder expects {self.in_dim}"
            )
        if not bool(mask.any(dim=1).all()):
            raise ConfigError("ThreadsSlideEncoder: every bag needs at least one valid patch")
        dtype = next(self.parameters()).dtype
        mask = mask.bool()
        # project valid patches only (padding may hold anything, even NaN)
        rows = self.proj(features[mask].to(dtype))
        hidden = rows.new_zeros((*mask.shape, rows.shape[-1]))
        hidden[mask] = rows
        pooled, maps = [], []
        for head in self.heads:
            logits = rows.new_full(mask.shape, float("-inf"))
            logits[mask] = head(rows)
            weights = torch.softmax(logits, dim=1)  # exactly 0 on padding
            pooled.append(torch.einsum("bn,bnh->bh", weights, hidden))
            maps.append(weights)
        emb = self.out(torch.cat(pooled, dim=-1))
        if return_attention:
            return emb, torch.stack(maps, dim=1)
        return emb

    def forward(self, features: Tensor, coords: Tensor | None = None) -> Tensor:
        """One slide: (N, D) features -> (embed_dim,) embedding (coords unused)."""
        if features.dim() != 2:
            raise ConfigError(
                f"ThreadsSlideEncoder: expected one slide's features (N, D), got "
                f"{tuple(features.shape)}"
            )
        mask = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
        out = self.encode(features[None], mask[None])
        assert isinstance(out, Tensor)
        return out[0]


# --------------------------------------------------------------------------- profile encoders


class ProfileEncoder(nn.Module):
    """MLP over one molecular profile: optional standardisation (a scaler kept as buffers,
    fitted on the pre-training patients only), Linear -> LayerNorm -> GELU -> Dropout -> Linear.
    """

    mean: Tensor
    scale: Tensor

    def __init__(
        self,
        in_dim: int,
        *,
        embed_dim: int,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        m = torch.zeros(in_dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        s = torch.ones(in_dim) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        if m.shape != (in_dim,) or s.shape != (in_dim,):
            raise ConfigError(f"ProfileEncoder: scaler must have {in_dim} values")
        self.register_buffer("mean", m)
        self.register_buffer("scale", s)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, embed_dim),
        )

    def set_scaler(self, mean: np.ndarray, scale: np.ndarray) -> None:
        m = torch.as_tensor(np.asarray(mean, dtype=np.float32))
        s = torch.as_tensor(np.asarray(scale, dtype=np.float32))
        if m.shape != (self.in_dim,) or s.shape != (self.in_dim,) or not bool((s > 0).all()):
            raise ConfigError(f"ProfileEncoder: the scaler needs {self.in_dim} means and sds > 0")
        self.mean.copy_(m)
        self.scale.copy_(s)

    def forward(self, values: Tensor) -> Tensor:
        """(P, G) raw values -> (P, embed_dim)."""
        x = (values.to(self.mean.dtype) - self.mean) / self.scale
        return self.net(x)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- loss


def paired_info_nce(
    slide_emb: Tensor, profile_emb: Tensor, owner: Tensor, logit_scale: Tensor | float
) -> Tensor:
    """Symmetric InfoNCE between slides and their patients' profiles.

    Args:
        slide_emb: (S, E) slide embeddings.
        profile_emb: (P, E) one profile embedding per distinct patient of the batch.
        owner: (S,) long, the row of ``profile_emb`` holding each slide's patient.
        logit_scale: 1 / temperature.

    Slide -> profile: cross-entropy over the P profiles (one positive per slide). Profile ->
    slide: every slide of the patient is a positive (-log of the summed softmax mass of its
    slides); with one slide per patient this is the usual CLIP loss. Both directions are
    averaged; embeddings are L2-normalised here.
    """
    s = F.normalize(slide_emb, dim=-1)
    p = F.normalize(profile_emb, dim=-1)
    logits = logit_scale * s @ p.T  # (S, P)
    to_profile = F.cross_entropy(logits, owner)
    positive = owner[:, None] == torch.arange(p.shape[0], device=owner.device)[None, :]
    col_all = torch.logsumexp(logits, dim=0)
    col_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=0)
    to_slide = (col_all - col_pos).mean()
    return 0.5 * (to_profile + to_slide)


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True, eq=False)
class Profiles:
    """The pre-training patients' molecular profiles, aligned on ``patient_ids``.

    ``expression`` / ``mutations`` hold zeros in the rows of patients without the modality,
    marked False in ``has_expression`` / ``has_mutations``. The expression scaler (mean, sd per
    gene) is fitted on the rows present: only pre-training patients are ever in here.
    """

    patient_ids: tuple[str, ...]
    expression: np.ndarray  # (P, G) float32
    has_expression: np.ndarray  # (P,) bool
    genes: tuple[str, ...]
    expr_mean: np.ndarray
    expr_scale: np.ndarray
    mutations: np.ndarray | None = None  # (P, M) float32 0/1
    has_mutations: np.ndarray | None = None
    mutation_genes: tuple[str, ...] = ()

    def row(self, patient_id: str) -> int:
        return self.patient_ids.index(patient_id)

    @property
    def usable(self) -> list[str]:
        """Patients with at least one modality (the others add nothing to the loss)."""
        ok = self.has_expression.copy()
        if self.has_mutations is not None:
            ok |= self.has_mutations
        return [p for p, k in zip(self.patient_ids, ok, strict=True) if k]

    def method_kwargs(self) -> dict[str, Any]:
        """The :class:`ThreadsMethod` keywords these profiles fix (sizes and the scaler)."""
        return {
            "n_genes": len(self.genes),
            "n_mutation_genes": len(self.mutation_genes),
            "expression_mean": self.expr_mean.tolist(),
            "expression_scale": self.expr_scale.tolist(),
        }

    def extras(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-patient vectors for :class:`~oncoslide.pretrain.bags.PretrainBags` (``extras``):
        a patient lacking a modality has no entry in it."""
        out = {
            "expression": {
                p: self.expression[i]
                for i, p in enumerate(self.patient_ids)
                if self.has_expression[i]
            }
        }
        if self.mutations is not None and self.has_mutations is not None:
            out["mutations"] = {
                p: self.mutations[i]
                for i, p in enumerate(self.patient_ids)
                if self.has_mutations[i]
            }
        return out

    def summary(self) -> dict[str, int]:
        out = {
            "patients": len(self.patient_ids),
            "with_expression": int(self.has_expression.sum()),
            "genes": len(self.genes),
        }
        if self.has_mutations is not None:
            out["with_mutations"] = int(self.has_mutations.sum())
            out["mutation_genes"] = len(self.mutation_genes)
        return out


def load_mutations(table: PathLike | pd.DataFrame) -> Omics:
    """A 0/1 mutation table (``patient_id`` + one column per gene), validated like omics."""
    muts = load_omics(table)
    values = muts.values.to_numpy()
    ok: list[bool] = np.asarray(np.isin(values, (0.0, 1.0)).all(axis=0)).tolist()
    bad = [c for c, good in zip(muts.genes, ok, strict=True) if not good]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ConfigError(f"mutation table: columns must hold 0/1 calls; not so in {shown}")
    return muts


def build_profiles(
    patient_ids: Sequence[str],
    expression: Omics,
    mutations: Omics | None = None,
) -> Profiles:
    """Profiles of ``patient_ids`` (the pre-training patients), scaler fitted on them only."""
    ids = tuple(sorted(set(map(str, patient_ids))))
    if not ids:
        raise ConfigError("Threads pre-training needs at least one patient")
    known = set(expression.patient_ids)
    has_e = np.array([p in known for p in ids])
    genes = tuple(expression.genes)
    expr = np.zeros((len(ids), len(genes)), dtype=np.float32)
    present = [p for p in ids if p in known]
    if present:
        expr[has_e] = expression.matrix(present).astype(np.float32)
    if has_e.sum() >= 2:
        mean = expr[has_e].mean(axis=0)
        scale = expr[has_e].std(axis=0)
    else:
        mean, scale = np.zeros(len(genes), np.float32), np.ones(len(genes), np.float32)
    scale = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)
    mut = has_m = None
    mgenes: tuple[str, ...] = ()
    if mutations is not None:
        mknown = set(mutations.patient_ids)
        has_m = np.array([p in mknown for p in ids])
        mgenes = tuple(mutations.genes)
        mut = np.zeros((len(ids), len(mgenes)), dtype=np.float32)
        mpresent = [p for p in ids if p in mknown]
        if mpresent:
            mut[has_m] = mutations.matrix(mpresent).astype(np.float32)
    profiles = Profiles(
        patient_ids=ids,
        expression=expr,
        has_expression=has_e,
        genes=genes,
        expr_mean=mean.astype(np.float32),
        expr_scale=scale,
        mutations=mut,
        has_mutations=has_m,
        mutation_genes=mgenes,
    )
    if not profiles.usable:
        raise ConfigError("no pre-training patient has an expression or mutation profile")
    return profiles


# --------------------------------------------------------------------------- the method


@PRETRAINERS.register(
    "threads",
    encoder="threads",
    reference=_REFERENCE,
    needs=("omics",),
    description="multi-head gated ABMIL trained contrastively against expression (and "
    "mutation) profiles",
)
class ThreadsMethod(PretrainMethod):
    """Slide encoder + profile encoders + temperature: everything that is trained.

    ``n_genes`` / ``n_mutation_genes`` size the profile encoders (0 mutation genes: no mutation
    encoder). The expression scaler lives in buffers (``expression_mean`` / ``_scale`` or
    :meth:`set_scaler`, saved with the weights): fit it on the pre-training patients only. Bags carry their
    patient's profiles as ``extras["expression"]`` / ``extras["mutations"]`` (absent when the
    patient lacks the modality).
    """

    name = "threads"
    encoder: ThreadsSlideEncoder

    def __init__(
        self,
        *,
        in_dim: int,
        n_genes: int,
        n_mutation_genes: int = 0,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        attn_dim: int = 128,
        heads: int = 4,
        dropout: float = 0.25,
        profile_hidden: int = 256,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        mutation_weight: float = 1.0,
        patch_keep: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        expression_mean: Sequence[float] | None = None,
        expression_scale: Sequence[float] | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_fraction=warmup_fraction)
        settings = ThreadsConfig(
            embed_dim=embed_dim,
            hidden_dim=hidden_dim,
            attn_dim=attn_dim,
            heads=heads,
            dropout=dropout,
            profile_hidden=profile_hidden,
            temperature=temperature,
            learn_temperature=learn_temperature,
            mutation_weight=mutation_weight,
            patch_keep=patch_keep,
            lr=lr,
            weight_decay=weight_decay,
        )
        if not isinstance(n_genes, int) or n_genes < 1:
            raise ConfigError(f"threads: n_genes must be a positive integer, got {n_genes!r}")
        if not isinstance(n_mutation_genes, int) or n_mutation_genes < 0:
            raise ConfigError(f"threads: n_mutation_genes must be >= 0, got {n_mutation_genes!r}")
        self.settings = settings
        self.n_genes = n_genes
        self.n_mutation_genes = n_mutation_genes
        self.encoder = ThreadsSlideEncoder(
            in_dim,
            embed_dim=embed_dim,
            hidden_dim=hidden_dim,
            attn_dim=attn_dim,
            heads=heads,
            dropout=dropout,
        )
        self.expression_encoder = ProfileEncoder(
            n_genes, embed_dim=embed_dim, hidden_dim=profile_hidden, dropout=dropout
        )
        self.mutation_encoder = (
            ProfileEncoder(
                n_mutation_genes, embed_dim=embed_dim, hidden_dim=profile_hidden, dropout=dropout
            )
            if n_mutation_genes
            else None
        )
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self.last_terms: dict[str, float] = {}
        if (expression_mean is None) != (expression_scale is None):
            raise ConfigError("threads: give both expression_mean and expression_scale, or neither")
        if expression_mean is not None and expression_scale is not None:
            # kept in buffers (saved with the weights), not in config(): 1 number per gene
            self.set_scaler(np.asarray(expression_mean), np.asarray(expression_scale))

    def config(self) -> dict[str, Any]:
        out = self.settings.to_dict()
        out.pop("max_patches")
        return {
            **out,
            "n_genes": self.n_genes,
            "n_mutation_genes": self.n_mutation_genes,
            "warmup_fraction": self.warmup_fraction,
        }

    def set_scaler(self, mean: np.ndarray, scale: np.ndarray) -> None:
        """The expression scaler (fitted on the pre-training patients only)."""
        self.expression_encoder.set_scaler(mean, scale)

    @property
    def logit_scale(self) -> Tensor:
        # clamped at 100 as CLIP does, so the temperature never collapses
        return self.log_logit_scale.exp().clamp(max=100.0)

    def loss(self, bags: list[Bag], generator: torch.Generator) -> Tensor:
        feats = [b.features for b in bags]
        keep = self.settings.patch_keep
        if self.training and keep < 1.0:
            # view augmentation: a random share of each bag's patches per step (drawn from the
            # step's generator, so a resumed run draws the same)
            feats = [
                f[
                    torch.randperm(f.shape[0], generator=generator)[
                        : max(1, round(keep * f.shape[0]))
                    ]
                ]
                for f in feats
            ]
        features, mask = pad_bags(feats, device=self.device)
        patients = list(dict.fromkeys(b.patient_id for b in bags))
        owner = torch.tensor(
            [patients.index(b.patient_id) for b in bags], dtype=torch.long, device=self.device
        )
        first = {pid: next(b for b in bags if b.patient_id == pid) for pid in patients}
        profiles: dict[str, tuple[Tensor, Tensor]] = {}
        for name, size in (("expression", self.n_genes), ("mutations", self.n_mutation_genes)):
            if not size:
                continue
            present = torch.tensor([name in first[p].extras for p in patients], device=self.device)
            values = torch.stack(
                [
                    first[p].extras[name].to(self.device)
                    if name in first[p].extras
                    else torch.zeros(size, device=self.device)
                    for p in patients
                ]
            )
            profiles[name] = (values, present)
        expr = profiles.get("expression")
        muts = profiles.get("mutations")
        # dropout draws from the step's generator too (a forked RNG seeded by it), so a run
        # resumed from a checkpoint draws what the uninterrupted run drew
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(dropout_seed)
            terms = self.losses(
                features,
                mask,
                owner,
                expr[0] if expr else None,
                expr[1] if expr else None,
                muts[0] if muts else None,
                muts[1] if muts else None,
            )
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        for k, v in terms.items():
            if k != "loss" and self._trainer is not None:
                self.log(f"loss_{k}", v.detach(), batch_size=len(bags))
        return terms["loss"]

    def losses(
        self,
        features: Tensor,
        mask: Tensor,
        owner: Tensor,
        expression: Tensor | None,
        has_expression: Tensor | None,
        mutations: Tensor | None = None,
        has_mutations: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-modality InfoNCE of a batch and their weighted mean, ``loss``.

        ``features`` (S, N, D) / ``mask`` (S, N) are the batch's slides; ``owner`` (S,) the row
        of its patient in the (P, ...) profile tensors. A modality with fewer than two present
        patients in the batch gives no term (no negatives)."""
        emb = self.encoder.encode(features, mask)
        assert isinstance(emb, Tensor)
        terms: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        pairs = [
            ("expression", self.expression_encoder, expression, has_expression, 1.0),
            (
                "mutations",
                self.mutation_encoder,
                mutations,
                has_mutations,
                self.settings.mutation_weight,
            ),
        ]
        for name, encoder, values, present, weight in pairs:
            if encoder is None or values is None or present is None or weight == 0:
                continue
            present = present.bool()
            if int(present.sum()) < 2:
                continue
            keep = present[owner]
            rows = torch.nonzero(present).squeeze(1)
            remap = torch.full((present.shape[0],), -1, dtype=torch.long, device=owner.device)
            remap[rows] = torch.arange(rows.numel(), device=owner.device)
            prof = encoder(values[rows])
            terms[name] = paired_info_nce(emb[keep], prof, remap[owner[keep]], self.logit_scale)
            weights[name] = float(weight)
        if terms:
            total = sum(weights[k] * v for k, v in terms.items()) / sum(weights.values())
        else:  # a batch without two patients sharing a modality: a zero that backpropagates
            total = emb.sum() * 0.0
        return {"loss": total, **terms}  # type: ignore[dict-item]


def pad_bags(
    bags: Sequence[Tensor], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """(N_i, D) tensors -> (B, max N, D) zero-padded features and the (B, max N) mask."""
    n_max = max(int(b.shape[0]) for b in bags)
    dim = int(bags[0].shape[1])
    features = torch.zeros((len(bags), n_max, dim), dtype=torch.float32, device=device)
    mask = torch.zeros((len(bags), n_max), dtype=torch.bool, device=device)
    for i, b in enumerate(bags):
        features[i, : b.shape[0]] = b.to(device=device, dtype=torch.float32)
        mask[i, : b.shape[0]] = True
    return features, mask


# --------------------------------------------------------------------------- running


def pretrain_threads(
    cohort: Cohort,
    expression: Omics,
    out: PathLike,
    *,
    mutations: Omics | None = None,
    patients: Sequence[str] | None = None,
    config: ThreadsConfig = ThreadsConfig(),
    epochs: int = 30,
    batch_size: int = 32,
    seed: int = 0,
    cache: FeatureCache | None = None,
    **runner: Any,
) -> tuple[PretrainResult, Profiles]:
    """Pre-train a Threads-style encoder on ``patients`` (default: every cohort patient with a
    profile) and write the encoder folder ``out`` through the one runner
    (:func:`~oncoslide.pretrain.runner.run_pretraining`; ``runner`` keywords go to it).

    Only the chosen patients' profiles are read (the scaler is fitted on them): pass the
    training part of an evaluation split, never its test patients. Items are slides; every
    slide of a patient is paired with the patient's profile.
    """
    from oncoslide.pretrain.bags import PretrainBags
    from oncoslide.pretrain.runner import run_pretraining

    if cohort.feature_dim is None:
        raise ConfigError("Threads pre-training needs a cohort loaded with its feature folder")
    ids = cohort.patient_ids if patients is None else [str(p) for p in patients]
    profiles = build_profiles(ids, expression, mutations)
    usable = profiles.usable
    if len(usable) < 2:
        raise ConfigError(
            f"Threads pre-training needs at least 2 patients with a profile, got {len(usable)}"
        )
    dataset = PretrainBags.from_features(
        cohort.features_dir or ".",
        cohort=cohort.subset(usable),
        per="slide",
        max_patches=config.max_patches,
        seed=seed,
        extras=profiles.extras(),
        cache=cache if cache is not None else FeatureCache(max_bytes=4 * 2**30),
    )
    torch.manual_seed(seed)  # the initial weights follow the seed
    method = ThreadsMethod(
        in_dim=int(cohort.feature_dim),
        **profiles.method_kwargs(),
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        attn_dim=config.attn_dim,
        heads=config.heads,
        dropout=config.dropout,
        profile_hidden=config.profile_hidden,
        temperature=config.temperature,
        learn_temperature=config.learn_temperature,
        mutation_weight=config.mutation_weight,
        patch_keep=config.patch_keep,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    result = run_pretraining(
        method, dataset, out, epochs=epochs, batch_size=batch_size, seed=seed, **runner
    )
    return result, profiles


@torch.no_grad()
def patient_embeddings(
    encoder: SlideEncoder,
    cohort: Cohort,
    patient_ids: Sequence[str],
    cache: FeatureCache | None = None,
) -> np.ndarray:
    """(P, E) float64: the mean of each patient's slide embeddings (the benchmark's slide-level
    protocol), every patch of every slide used."""
    cache = cache if cache is not None else FeatureCache(max_bytes=2 * 2**30)
    rows = []
    for pid in patient_ids:
        slides = [cache.get(p) for p in cohort.slide_paths(pid)]
        vecs = []
        for sf in slides:
            feats = torch.from_numpy(np.asarray(sf.features, dtype=np.float32))
            coords = None
            if encoder.uses_coords:
                coords = torch.from_numpy(np.asarray(sf.coords, dtype=np.float32))
            vecs.append(encoder.embed(feats, coords).double().numpy())
        rows.append(np.mean(vecs, axis=0))
    return np.stack(rows)


__all__ = [
    "ProfileEncoder",
    "Profiles",
    "ThreadsConfig",
    "ThreadsMethod",
    "ThreadsSlideEncoder",
    "build_profiles",
    "load_mutations",
    "pad_bags",
    "paired_info_nce",
    "patient_embeddings",
    "pretrain_threads",
]
