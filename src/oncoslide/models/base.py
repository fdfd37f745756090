"""The model contract shared by every MIL aggregator, and the masked building blocks they use.

Every model maps a padded batch of bags to a :class:`MILOutput`::

    model(features (B, N, D) float, mask (B, N) bool, coords (B, N, 2) | None) -> MILOutput

What a model needs beyond that it declares in its registry metadata, and the training path
passes it as keywords:

- ``side_inputs={"omics": "train"}``: per-patient tables (``"train"``: seen in training steps
  only, never for validation or test patients; ``"always"``: also at prediction time). The model
  gets ``side={"omics": (B, G) float, "omics_present": (B,) bool}`` in training steps, and
  ``side=None`` where the input is not given (it must then predict from the slides alone).
- ``uses_slide_index=True``: ``slide_index=(B, N) long`` (-1 on padding), for models that must
  know which of a patient's slides (separate coordinate frames) a patch comes from.
- ``aux_losses={"name": default_weight}``: extra loss terms the model returns in
  :attr:`MILOutput.aux_losses`; the training step adds them with these weights (or the run's
  ``aux_weights``), while validation and checkpoint choice use the task loss or metric only.
- ``uses_targets=True``: training steps (only) pass ``targets={"label": (B,) ...}`` (the
  batch's targets), for loss terms that need labels (supervised contrastive, curricula); the
  model may return :attr:`MILOutput.sample_weight` to re-weight its patients in the task loss.
  A model with a ``set_training_progress(epoch, epochs)`` method is told each epoch's start.
- ``uses_label_tree=True``: the model is built with ``tree={coarse: [fine, ...]}`` and
  ``classes`` (the task's classes, the fine level) of the run's label tree (``--hierarchy``).
- ``chooses_on_validation=True``: before training, the training path scores each of the
  model's ``candidates()`` (selected with ``use_source(name)``, scored by
  ``zero_shot_logits(features, mask)``) on the fold's validation part and keeps the best.
- ``needs_experts=True``: built on a zoo of trained models (``experts=``); ``exclude=auto``
  leaves out those trained on the task's patients, and a fold is refused when one saw a
  patient it validates or tests on (``seen_patients()``).
- ``describes_patients=True``: the model's ``patient_details(features, mask) -> {name: (B,)}``
  (e.g. ROUPKT's router weights) is written beside its predictions as ``detail_<name>``
  columns (test parts, benchmark cells, ``predict``; see :mod:`oncoslide.training.details`).

Padded positions (``mask`` False) never influence any output. The heavy per-patch projection
runs on the valid patches only (:func:`pack_valid`), so padding costs no matrix-multiply time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.registry import Registry

MODELS: Registry[MILModel] = Registry("model")


@dataclass
class MILOutput:
    """What a MIL model returns for a batch of B bags of at most N patches.

    Attributes:
        logits: (B, n_outputs) raw head outputs (hazard logits for discrete-time survival,
            class logits for classification, one log-risk for Cox).
        embedding: (B, E) the bag representation fed to the head.
        attention: (B, N) per-patch weights, non-negative, summing to 1 over each bag's valid
            patches and exactly 0 on padding; None for models without attention.
        aux_losses: named scalar loss terms beyond the task loss (training only; see the
            module docstring).
        attention_maps: further named (B, N) maps over the patches (e.g. one per gene group
            of G-HANet), each a distribution over the valid patches like ``attention``;
            heatmaps draw one image per map.
        sample_weight: (B,) weights of the bags in a training step's task loss (a model's
            curriculum; classification only); None weighs them equally.
        loss_views: (B, V, n_outputs) further outputs for the training loss: a training step
            applies the task loss to each of the V views (B, n_outputs) and takes their mean,
            in place of the task loss of ``logits`` (e.g. one view per input a model learns
            the effect of on its own); validation, checkpoint choice and predictions use
            ``logits``. None: the task loss of ``logits``.
    """

    logits: Tensor
    embedding: Tensor
    attention: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    attention_maps: dict[str, Tensor] = field(default_factory=dict)
    # (B,) weights of the patients in the task loss of a training step (None: equal)
    sample_weight: Tensor | None = None
    # (B, V, n_outputs): the training step's task loss is the mean over these views
    loss_views: Tensor | None = None


class MILModel(nn.Module):
    """Base class: stores and checks the keywords common to all models, validates inputs.

    Args:
        in_dim: feature dimension D of the patches.
        n_outputs: number of head outputs (classes, time bins, or 1 for a Cox risk).
        dropout: dropout probability after the patch projection.
        hidden_dim: width of the patch projection (and, for most models, of the embedding).
    """

    #: Project only the valid patches (True) or all positions then select (False). Both give the
    #: same outputs; False exists only to measure what packing saves.
    pack_valid: bool = True

    def __init__(
        self, in_dim: int, n_outputs: int, dropout: float = 0.25, hidden_dim: int = 512
    ) -> None:
        super().__init__()
        problems = []
        for key, value in (
            ("in_dim", in_dim),
            ("n_outputs", n_outputs),
            ("hidden_dim", hidden_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            problems.append(f"dropout must be in [0, 1), got {dropout!r}")
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))
        self.in_dim = in_dim
        self.n_outputs = n_outputs
        self.dropout = float(dropout)
        self.hidden_dim = hidden_dim

    @property
    def embed_dim(self) -> int:
        """Width E of :attr:`MILOutput.embedding`."""
        return self.hidden_dim

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of parameter names, for freezing in fine-tuning transfer.

        ``encoder`` is everything but the head (the slide embedding), ``head`` the output layer,
        ``projection`` the per-patch projection, ``aggregator`` what lies between; and every
        top-level submodule by its own name.
        """
        names = [n for n, _ in self.named_parameters()]

        def under(prefix: str) -> list[str]:
            return [n for n in names if n == prefix or n.startswith(prefix + ".")]

        groups = {
            "encoder": [n for n in names if n not in under("head")],
            "head": under("head"),
            "projection": under("proj"),
            "aggregator": [n for n in names if n not in under("head") + under("proj")],
        }
        for child, _ in self.named_children():
            groups.setdefault(child, under(child))
        for n in names:  # parameters held directly (e.g. a CLS token)
            if "." not in n:
                groups.setdefault(n, [n])
        return {k: v for k, v in groups.items() if v}

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by :meth:`parameter_groups` name (default none): the
        training path gives these groups' trainable parameters ``lr * scale`` and every other
        trainable parameter the run's ``lr`` (e.g. LoRA updates in ``slide-finetune``)."""
        return {}

    def fit_to_training(self, bags: Iterable[Mapping[str, Any]]) -> None:
        """Fit fixed statistics to the fold's training part, once, before the first step
        (default: nothing, and ``bags`` is not read). The training path passes the training
        patients' whole bags one at a time, each ``{"patient_id": str, "features": (1, N, D),
        "mask": (1, N), "coords": (1, N, 2)}``, without outcomes; never a validation or test
        patient. ``bags`` may be iterated more than once (each pass reads the bags again).
        Store what is fitted in buffers, so a saved model predicts the same."""
        return None

    def freeze(self, groups: list[str] | tuple[str, ...]) -> int:
        """Keep the parameters of the named groups fixed; returns how many values are frozen.

        Raises ``ConfigError`` for unknown group names, listing the known ones.
        """
        known = self.parameter_groups()
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} has no parameter group(s) {unknown}; known: "
                f"{', '.join(sorted(known))}"
            )
        frozen = {n for g in groups for n in known[g]}
        count = 0
        for name, param in self.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
                count += param.numel()
        return count

    def check_inputs(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> None:
        """Raise a ``ConfigError`` listing every shape/dtype problem of a model call."""
        problems = []
        if features.ndim != 3:
            problems.append(f"features must be (B, N, D), got shape {tuple(features.shape)}")
        elif features.shape[-1] != self.in_dim:
            problems.append(
                f"features have dimension {features.shape[-1]}, model expects {self.in_dim}"
            )
        if not features.is_floating_point():
            problems.append(f"features must be floating point, got {features.dtype}")
        if mask.dtype != torch.bool:
            problems.append(f"mask must be bool, got {mask.dtype}")
        if mask.shape != features.shape[:2]:
            problems.append(
                f"mask shape {tuple(mask.shape)} does not match features (B, N) = "
                f"{tuple(features.shape[:2])}"
            )
        elif mask.dtype == torch.bool and mask.numel() and not bool(mask.any(dim=1).all()):
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            problems.append(f"bags {empty} have no valid patch")
        if coords is not None and coords.shape != (*features.shape[:2], 2):
            problems.append(f"coords must be (B, N, 2), got shape {tuple(coords.shape)}")
        if problems:
            raise ConfigError(f"{type(self).__name__} input: " + "; ".join(problems))

    def forward(
        self, features: Tensor, mask: Tensor, coords: Tensor | None = None
    ) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def pack_valid(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The valid patches of a padded batch, packed: (M, D) rows and their bag index (M,).

    Rows come in row-major order of ``mask`` (bag by bag, patch by patch), the order that
    ``Tensor.masked_scatter`` uses to put them back.
    """
    batch, n = mask.shape
    index = bag_index(mask)
    if index.numel() == batch * n:  # nothing padded: a view, no copy
        return features.reshape(batch * n, -1), index
    return features[mask], index


def bag_index(mask: Tensor) -> Tensor:
    """The bag of each valid patch, (M,), in the packing order of :func:`pack_valid`."""
    batch = mask.shape[0]
    return torch.repeat_interleave(torch.arange(batch, device=mask.device), mask.sum(dim=1))


def project_valid(proj: nn.Module, features: Tensor, mask: Tensor, pack: bool = True) -> Tensor:
    """``proj`` applied to the valid patches only, packed as (M, H) (see :func:`pack_valid`).

    With ``pack=False`` the projection runs on every position and the valid rows are selected
    afterwards: the same result at the cost of the padding (kept only to measure the saving).
    """
    dtype = next(proj.parameters()).dtype  # float16 feature files meet float32 weights
    if pack:
        rows, _ = pack_valid(features, mask)
        return proj(rows.to(dtype))
    return proj(features.to(dtype))[mask]


def unpack(rows: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """Packed (M, ...) rows back to a padded (B, N, ...) tensor, ``fill`` on padding."""
    shape = (*mask.shape, *rows.shape[1:])
    full_mask = mask.reshape(*mask.shape, *([1] * (rows.ndim - 1))).expand(shape)
    return rows.new_full(shape, fill).masked_scatter(full_mask, rows)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over the positions where ``mask`` is True; exactly 0 elsewhere.

    ``torch.where`` (not multiplication) keeps non-finite scores on padding out of the result
    and out of the gradient. Every slice along ``dim`` must have at least one True.
    """
    scores = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    return torch.softmax(scores, dim=dim)


def attention_pool(
    scores: Tensor, rows: Tensor, mask: Tensor, bag_index: Tensor
) -> tuple[Tensor, Tensor]:
    """Attention pooling of packed rows.

    Args:
        scores: (M,) attention logits of the valid patches.
        rows: (M, H) their representations.
        mask: (B, N) validity mask; bag_index: (M,) bag of each row.

    Returns:
        (pooled (B, H), attention (B, N)) with attention a masked softmax over each bag.
    """
    logits = unpack(scores, mask, fill=float("-inf"))
    attention = torch.softmax(logits, dim=1)
    weighted = attention[mask].unsqueeze(-1) * rows
    pooled = rows.new_zeros(mask.shape[0], rows.shape[-1]).index_add(0, bag_index, weighted)
    return pooled, attention


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster CPU path; identical semantics and the same global RNG.

    PyTorch's CPU dropout draws Bernoulli variables one at a time and costs about three times
    a uniform draw plus a comparison; on the per-patch activations of a bag that was a quarter
    of an ABMIL training step on CPU. On GPUs the fused kernel is used as is.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.is_cuda or self.inplace:
            return super().forward(x)
        keep = torch.rand_like(x) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))
