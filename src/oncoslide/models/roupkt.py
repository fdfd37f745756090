"""ROUPKT: routing over off-the-shelf cancer models (seed 000, CROPKT's second stage).

The experts are the frozen survival models of a zoo (``experts=<zoo folder>``): each maps the
target patient's bag to its slide embedding, which a per-expert adapter (Linear + ReLU +
Dropout) brings to a common width. A router (gated attention over the raw patches, then
Linear -> one logit per expert) gives softmax weights; each patient keeps its ``top_k``
experts (the weights are not renormalised, as in the paper) and the weighted sum of the adapted
embeddings feeds the survival head. Two auxiliary losses (0.01 each) keep the router healthy:
load balance, K * sum_j mean(p_j) * (share of patients whose top-1 is j), and the router
z-loss, mean(logsumexp(logits)^2).

The target's own model is one more expert (``own_expert=True``, the default, as in the paper:
"the frozen source models' embeddings plus the target's own model"): a cancer-specific ABMIL
slide path (:class:`~oncoslide.models.abmil.AttentionSlidePath`, with its own adapter) trained
jointly with the router on the fold's training part. It never leaks (it only sees the fold's
training patients), and it lets the router fall back on the target's own morphology where no
source helps. Its router weight is the detail column ``routing_own``.

The source-risk path (``source_risk``, on by default for a zoo of survival models since
revision 3) also uses what the experts predict, not only their embeddings: each zoo expert's
own survival-head output on the target patient, ``r_j`` (a Cox head's logit, the log relative
hazard; a discrete-time head's risk ``-sum_k S_k``, as the training path reduces it), is
standardised, routed by the same top-k weights and added to the output,
``logits = head(mixed) + scale * sum_j w_j (r_j - mean_j) / sd_j`` (broadcast over a
discrete-time target head's bins: shifting every hazard logit is monotone in risk).

- ``source_risk_standardise`` (default: with the path): a router weight is not an expert's
  influence when the experts' risks spread differently (up to ten-fold on a target), so each
  zoo expert's risk is standardised by its mean and standard deviation over the fold's training
  patients. They are computed once before training (:meth:`ROUPKT.fit_to_training`, the
  generic hook the training path calls with the training part's bags only, never validation or
  test) and kept as buffers, so a saved model predicts the same. A model used outside the
  training path must be given them (``fit_to_training``) before its first forward pass.
- ``scale`` is one learned scalar, initialised at 1 (``source_risk_scale="shared"``, the
  default): the router already weighs each expert, so one number only sets how much the zoo's
  prediction counts against the fresh head. ``source_risk_scale="per_expert"`` learns one scale
  per zoo expert instead (all starting at 1), which can also turn the sign of a source that
  predicts the target backwards, at the price of k more parameters fitted on a few dozen
  patients.
- ``risk_scale_lr`` (default 100 with the path): a learning-rate multiplier of the scale(s)
  (through ``lr_scales``), so that they can move within the few dozen steps a rare target
  gives; at the training path's learning rate the scale hardly moved from 1.

The own expert has no risk (it is left out of the sum). At initialisation the model is thus the
routed ensemble of the sources' zero-shot predictions plus a small learned correction. On a
classification target the shift would cancel in the softmax, so there the path is off (the
training path tells the model its target's task, ``target_task``), and so it is with experts
that are not survival models; ``source_risk=true`` is refused in both cases.
``source_risk=false`` gives the revision-2 model (the zoo's embeddings only). Why the default:
over the 18 rare targets of six fresh worlds named in advance, this configuration beats the
cancer-specific ABMIL (+0.081 [+0.036, +0.124], p 0.002), where the path without the
standardisation and the learning-rate multiplier did not beat it on a confirmation world
(docs/transfer.md, measured 2026-12-01). Model folders saved before revision 3 load as the
models they were (:meth:`ROUPKT.load_state_dict`).

An expert trained on one of the target's patients would leak its outcome: the training path
asks the model for every patient its experts saw (:meth:`ROUPKT.seen_patients`) and refuses a
fold whose test or validation part holds one; ``exclude`` leaves experts out by cancer (e.g.
the target's zoo model, which saw all its patients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.features.schema import FeatureContract
from oncoslide.models.abmil import AttentionSlidePath, GatedAttention
from oncoslide.models.base import (
    MODELS,
    Dropout,
    MILModel,
    MILOutput,
    attention_pool,
    bag_index,
    project_valid,
)
from oncoslide.models.heads import discrete_risk, make_head

#: The name of the target's own (trainable) expert in :meth:`ROUPKT.routing` and the details.
OWN_EXPERT = "own"

#: ``risk_scale_lr`` of the source-risk path by default (revision 3): the scale moves within
#: the few dozen steps a rare target gives
DEFAULT_RISK_SCALE_LR = 100.0

_REFERENCE = (
    "Cross-cancer prognosis knowledge transfer (CROPKT / ROUPKT), seed 000: routing over "
    "off-the-shelf cancer models"
)


class OwnExpert(AttentionSlidePath):
    """The target's own expert: ABMIL's slide path (``proj`` + gated ``attention``), no head;
    trained with the router, so it only ever sees the fold's training patients."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float, attn_dim: int) -> None:
        super().__init__(in_dim, 1, dropout, hidden_dim)
        self._build_slide_path(attn_dim)

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        embedding, attention = self.slide_embedding(features, mask)
        return MILOutput(logits=embedding[:, :0], embedding=embedding, attention=attention)


@MODELS.register(
    "roupkt",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=False,
    aux_losses={"balance": 0.01, "z": 0.01},
    needs_experts=True,
    target_task=True,  # the training path passes target_task (the source-risk path's default)
    describes_patients=True,  # routing weights per expert, beside the predictions
    # 2: the target's own trainable expert by default (own_expert=True); 3: the source-risk
    # path, standardised, with risk_scale_lr 100, on by default for survival zoos. Earlier runs
    # and benchmark cells keep their keys apart
    revision=3,
    description="ROUPKT: a router over the frozen models of a zoo (experts=ZOO)",
)
class ROUPKT(MILModel):
    """Top-k routing over frozen zoo experts (see the module docstring).

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`.
        experts: a zoo folder (``oncoslide zoo train``).
        exclude: cancers of the zoo left out as experts.
        top_k: experts kept per patient (5 in the paper; at most the number of experts, the
            own expert included).
        attn_dim: width of the router's gated attention (and of the own expert's).
        own_expert: add the target's own expert, a trainable cancer-specific ABMIL slide path
            (the paper's "plus the target's own model"; see the module docstring).
        source_risk: add the routed sum of the zoo experts' own risk predictions to the
            output, times a learned scale initialised at 1 (see the module docstring). Default
            (None): on when every zoo expert is a survival model.
        source_risk_scale: ``"shared"`` (one scale) or ``"per_expert"`` (one per zoo expert).
        source_risk_standardise: standardise each zoo expert's risk by its mean and sd on the
            fold's training part (:meth:`fit_to_training`) before routing it. Default (None):
            on with the source-risk path.
        risk_scale_lr: learning-rate multiplier of the source-risk scale(s) (``lr_scales``).
            Default (None): 100 with the source-risk path.
        target_task: the target's task kind (``"survival"``, ``"binary"``, ``"multiclass"``),
            filled by the training path (a model built by hand without it is taken to have a
            survival target). On a classification target the source-risk path is off.
    """

    # buffers of source_risk_standardise (registered only with it)
    risk_mean: Tensor
    risk_sd: Tensor
    risk_fitted: Tensor

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        experts: str | None = None,
        exclude: Sequence[str] = (),
        top_k: int = 5,
        attn_dim: int = 128,
        own_expert: bool = True,
        source_risk: bool | None = None,
        source_risk_scale: str = "shared",
        source_risk_standardise: bool | None = None,
        risk_scale_lr: float | None = None,
        target_task: str | None = None,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        from oncoslide.transfer.zoo import load_zoo

        if not isinstance(own_expert, bool):
            raise ConfigError(f"roupkt: own_expert must be true or false, got {own_expert!r}")
        if source_risk is not None and not isinstance(source_risk, bool):
            raise ConfigError(f"roupkt: source_risk must be true or false, got {source_risk!r}")
        if source_risk_scale not in ("shared", "per_expert"):
            raise ConfigError(
                f"roupkt: source_risk_scale must be 'shared' or 'per_expert', got "
                f"{source_risk_scale!r}"
            )
        if source_risk_standardise is not None and not isinstance(source_risk_standardise, bool):
            raise ConfigError(
                f"roupkt: source_risk_standardise must be true or false, got "
                f"{source_risk_standardise!r}"
            )
        if risk_scale_lr is not None and (
            isinstance(risk_scale_lr, bool)
            or not isinstance(risk_scale_lr, int | float)
            or not risk_scale_lr > 0
        ):
            raise ConfigError(
                f"roupkt: risk_scale_lr must be a positive number, got {risk_scale_lr!r}"
            )
        if source_risk is False and (source_risk_standardise or risk_scale_lr is not None):
            raise ConfigError(
                "roupkt: source_risk_standardise and risk_scale_lr act on the source-risk path, "
                "which source_risk=false turns off"
            )

        if experts is None:
            raise ConfigError("roupkt needs a zoo of experts: --model-arg experts=ZOO_FOLDER")
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"roupkt: top_k must be a positive integer, got {top_k!r}")
        zoo = load_zoo(experts)
        unknown = sorted(set(exclude) - set(zoo.cancers))
        if unknown:
            raise ConfigError(f"roupkt: exclude names cancers the zoo lacks: {unknown}")
        self.expert_names = [c for c in zoo.cancers if c not in set(exclude)]
        if not self.expert_names:
            raise ConfigError("roupkt: every expert of the zoo is excluded")
        if own_expert and OWN_EXPERT in self.expert_names:
            raise ConfigError(
                f"roupkt: the zoo has a cancer named {OWN_EXPERT!r}, the own expert's name; "
                f"exclude it or set own_expert=false"
            )
        loaded = [zoo.model(c) for c in self.expert_names]
        for name, trained in zip(self.expert_names, loaded, strict=True):
            if trained.model.in_dim != in_dim:
                raise ConfigError(
                    f"roupkt: the {name} expert reads {trained.model.in_dim}-d features, these "
                    f"are {in_dim}-d"
                )
        self.zoo_contract: FeatureContract = zoo.contract
        # per zoo expert, how its head's logits become one risk ("cox": the logit; "nll": the
        # discrete-time risk), as the training path of its own task computes it
        self._risk_kinds: list[str] = []
        if target_task not in (None, "survival", "binary", "multiclass"):
            raise ConfigError(
                f"roupkt: target_task must be survival, binary or multiclass, got {target_task!r}"
            )
        classifies = target_task in ("binary", "multiclass")
        if source_risk and classifies:
            raise ConfigError(
                f"roupkt: source_risk adds the same shift to every class logit of a "
                f"{target_task} target, which the softmax cancels; it only works on survival "
                f"targets"
            )
        if source_risk is None:  # the default: on wherever it can act (survival everywhere)
            source_risk = not classifies and all(t.task.is_survival for t in loaded)
            if not source_risk and (source_risk_standardise or risk_scale_lr is not None):
                why = (
                    f"off on a {target_task} target"
                    if classifies
                    else "which needs survival experts; this zoo holds other models"
                )
                raise ConfigError(
                    f"roupkt: source_risk_standardise and risk_scale_lr act on the source-risk "
                    f"path, {why}"
                )
        if source_risk_standardise is None:
            source_risk_standardise = source_risk
        if risk_scale_lr is None:
            risk_scale_lr = DEFAULT_RISK_SCALE_LR if source_risk else 1.0
        if source_risk:
            for name, trained in zip(self.expert_names, loaded, strict=True):
                if not trained.task.is_survival:
                    raise ConfigError(
                        f"roupkt: source_risk needs survival experts; the {name} expert was "
                        f"trained for a {trained.task.kind} task"
                    )
                self._risk_kinds.append(str(trained.config.survival_loss))
        self._seen = {
            name: set(t.patients()["patient_id"].astype(str))
            for name, t in zip(self.expert_names, loaded, strict=True)
        }
        self.experts = nn.ModuleList([t.model for t in loaded])
        for p in self.experts.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(t.model.embed_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
                for t in loaded
            ]
        )
        self.own_expert = own_expert
        # the own expert comes last: its index is len(expert_names), its adapter the last one
        self.own: OwnExpert | None = None
        if own_expert:
            self.own = OwnExpert(in_dim, hidden_dim, dropout, attn_dim)
            self.adapters.append(
                nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
            )
        n_experts = len(loaded) + int(own_expert)
        self._top_k_asked = top_k
        self.top_k = min(top_k, n_experts)
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
        self.attention = GatedAttention(hidden_dim, attn_dim, dropout, gated=True)
        self.router = nn.Linear(hidden_dim, n_experts)
        self.head = make_head(hidden_dim, n_outputs)
        self.source_risk = source_risk
        self.source_risk_scale = source_risk_scale
        # only with the path, so that models without it keep their parameters and folders
        shape = (len(loaded),) if source_risk_scale == "per_expert" else ()
        self.risk_scale: nn.Parameter | None = (
            nn.Parameter(torch.ones(shape)) if source_risk else None
        )
        self.risk_scale_lr = float(risk_scale_lr)
        # the zoo experts' risk mean and sd on the fold's training part (fit_to_training);
        # buffers, so a saved model folder predicts the same; only with the option, so that
        # models without it keep their state dicts. risk_fitted counts the patients (0: not yet)
        self.source_risk_standardise = source_risk_standardise
        if source_risk_standardise:
            self.register_buffer("risk_mean", torch.zeros(len(loaded)))
            self.register_buffer("risk_sd", torch.ones(len(loaded)))
            self.register_buffer("risk_fitted", torch.zeros((), dtype=torch.long))

    @property
    def routed_names(self) -> list[str]:
        """The router's experts in its order: the zoo's, then ``own`` (if any)."""
        return [*self.expert_names, *([OWN_EXPERT] if self.own is not None else [])]

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        if self.own is not None and not any(k.startswith("own.") for k in state_dict):
            # a model folder saved before the own expert existed (before 2026-12-01, when
            # own_expert was not a keyword): the model it holds routed over the zoo alone
            self._drop_own_expert()
        if self.risk_scale is not None and "risk_scale" not in state_dict:
            # saved before revision 3 (2026-12-01), when the source-risk path was off unless
            # asked for and its folder recorded no source_risk keyword
            self._drop_source_risk()
        elif self.source_risk_standardise and "risk_mean" not in state_dict:
            # saved with source_risk=true before revision 3: the risks were not standardised
            self._drop_standardisation()
        return super().load_state_dict(state_dict, strict, assign)

    def _drop_source_risk(self) -> None:
        self._drop_standardisation()
        self.source_risk = False
        self.risk_scale = None
        self.risk_scale_lr = 1.0

    def _drop_standardisation(self) -> None:
        if self.source_risk_standardise:
            self.source_risk_standardise = False
            for name in ("risk_mean", "risk_sd", "risk_fitted"):
                delattr(self, name)

    def _drop_own_expert(self) -> None:
        self.own = None
        self.own_expert = False
        del self.adapters[-1]
        self.router = nn.Linear(self.hidden_dim, len(self.expert_names))
        self.top_k = min(self._top_k_asked, len(self.expert_names))

    def train(self, mode: bool = True) -> ROUPKT:
        super().train(mode)
        self.experts.eval()  # frozen experts never use dropout
        return self

    def parameter_groups(self) -> dict[str, list[str]]:
        groups = super().parameter_groups()
        return {k: [n for n in v if not n.startswith("experts.")] for k, v in groups.items()}

    def lr_scales(self) -> dict[str, float]:
        """``risk_scale_lr`` for the source-risk scale(s) (none when it is 1)."""
        if self.risk_scale is None or self.risk_scale_lr == 1.0:
            return {}
        return {"risk_scale": self.risk_scale_lr}

    def fit_to_training(self, bags: Iterable[Mapping[str, Any]]) -> None:
        """With ``source_risk_standardise``: each zoo expert's risk mean and standard
        deviation (ddof 0) over the training part's patients, the experts frozen and in eval
        mode (see :meth:`~oncoslide.models.MILModel.fit_to_training`). An expert whose risk
        does not vary there (sd < 1e-6) keeps sd 1: its standardised risk is then constant."""
        if not self.source_risk_standardise:
            return
        was_training = self.experts.training
        self.experts.eval()
        risks = []
        with torch.no_grad():
            for bag in bags:
                features, mask = bag["features"], bag["mask"]
                self.check_inputs(features, mask)
                outputs = [expert(features, mask) for expert in self.experts]
                risks.append(self.source_risks(outputs).double())
        self.experts.train(was_training)
        if not risks:
            raise ConfigError("roupkt: no training patient to standardise the expert risks on")
        stacked = torch.cat(risks)  # (patients, zoo experts)
        mean = stacked.mean(dim=0)
        sd = stacked.std(dim=0, unbiased=False)
        sd = torch.where(sd < 1e-6, torch.ones_like(sd), sd)
        self.risk_mean.copy_(mean.to(self.risk_mean.dtype))
        self.risk_sd.copy_(sd.to(self.risk_sd.dtype))
        self.risk_fitted.fill_(stacked.shape[0])

    def seen_patients(self) -> dict[str, set[str]]:
        """Per expert, the patients it was trained on (the training path's leak check)."""
        return {k: set(v) for k, v in self._seen.items()}

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        self.check_inputs(features, mask, coords)
        with torch.no_grad():
            outputs = [expert(features, mask) for expert in self.experts]
            embeddings = [o.embedding for o in outputs]
            risks = self.source_risks(outputs) if self.risk_scale is not None else None
            if risks is not None and self.source_risk_standardise:
                if int(self.risk_fitted) == 0:
                    raise ConfigError(
                        "roupkt: source_risk_standardise needs the experts' risk statistics "
                        "of the training part: call fit_to_training first (the training "
                        "path does)"
                    )
                risks = (risks - self.risk_mean) / self.risk_sd
        if self.own is not None:  # trainable: outside no_grad
            embeddings.append(self.own.slide_embedding(features, mask)[0])
        adapted = torch.stack(
            [adapter(e) for adapter, e in zip(self.adapters, embeddings, strict=True)], dim=1
        )  # (B, K, H)
        rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
        pooled, attention = attention_pool(self.attention(rows), rows, mask, bag_index(mask))
        logits = self.router(pooled)  # (B, K)
        probs = torch.softmax(logits, dim=-1)
        kept = torch.zeros_like(probs).scatter(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
        weights = probs * kept
        mixed = (weights.unsqueeze(-1) * adapted).sum(dim=1)
        top1 = nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        aux = {
            "balance": probs.shape[-1] * (probs.mean(dim=0) * top1.mean(dim=0)).sum(),
            "z": torch.logsumexp(logits, dim=-1).pow(2).mean(),
        }
        out = self.head(mixed)
        if risks is not None and self.risk_scale is not None:
            # the zoo experts come first in the router's order; the own expert has no risk
            routed = weights[:, : risks.shape[1]] * risks  # (B, zoo experts)
            if self.risk_scale.dim():  # per expert
                out = out + (self.risk_scale * routed).sum(dim=1, keepdim=True)
            else:
                out = out + self.risk_scale * routed.sum(dim=1, keepdim=True)
        return MILOutput(
            logits=out,
            embedding=mixed,
            attention=attention,
            aux_losses=aux,
            attention_maps={},
        )

    def source_risks(self, outputs: Sequence[MILOutput]) -> Tensor:
        """The zoo experts' own risks from their outputs, (B, number of zoo experts): a Cox
        head's logit, a discrete-time head's ``-sum_k S_k`` (the training path's risk)."""
        return torch.stack(
            [
                o.logits[:, 0] if kind == "cox" else discrete_risk(o.logits)
                for o, kind in zip(outputs, self._risk_kinds, strict=True)
            ],
            dim=1,
        )

    def routing(self, features: Tensor, mask: Tensor) -> dict[str, Any]:
        """The router's weights per expert for a batch (for reports)."""
        with torch.no_grad():
            rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
            pooled, _ = attention_pool(self.attention(rows), rows, mask, bag_index(mask))
            probs = torch.softmax(self.router(pooled), dim=-1)
        return {name: probs[:, k] for k, name in enumerate(self.routed_names)}

    def patient_details(self, features: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``routing_<expert>``: the router's softmax weight of each expert (before top-k);
        ``routing_own`` for the target's own expert."""
        return {f"routing_{k}": v for k, v in self.routing(features, mask).items()}
