"""Survival losses: discrete-time NLL (MCAT convention) and the Cox partial likelihood."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from oncoslide.errors import ConfigError

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


def discrete_time_nll(
    logits: Tensor,
    bin_index: Tensor,
    event: Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
    reduction: Reduction = "mean",
) -> Tensor:
    """Negative log-likelihood of the discrete-time hazard model (MCAT/PORPOISE convention).

    With ``h = sigmoid(logits)`` (B, K), ``S = cumprod(1 - h)`` and ``S_pad = [1, S]``:

    * a patient who died in bin y contributes ``-(log S_pad[y] + log h[y])`` (survived the bins
      before y, died in y);
    * a patient censored in bin y contributes ``-log S_pad[y + 1]`` (survived bin y: MCAT
      counts the censoring bin as survived);
    * ``loss = (1 - alpha) * (uncensored + censored) + alpha * uncensored``.

    All logarithms are computed from ``logsigmoid`` (no log of products). Like MCAT's clamp of
    probabilities at ``eps``, each log term is floored at ``log(eps)`` (``eps=0`` disables this).

    Args:
        logits: (B, K) hazard logits.
        bin_index: (B,) int time bin of each patient, in [0, K).
        event: (B,) 1/True if the death was observed, 0/False if censored.
        alpha: weight of the extra uncensored-only term (0.5 in CROPKT, 0 in G-HANet/PathBench).
        reduction: "mean" over patients, "sum", or "none" (per patient, (B,)).
    """
    _check_reduction(reduction)
    if logits.ndim != 2:
        raise ConfigError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    batch, n_bins = logits.shape
    problems = _check_vectors(batch, bin_index=bin_index, event=event)
    if not problems and bin_index.is_floating_point():
        problems.append("bin_index must be an integer tensor")
    if not problems and bin_index.numel() and (bin_index.min() < 0 or bin_index.max() >= n_bins):
        problems.append(
            f"bin_index must lie in [0, {n_bins}), got [{bin_index.min()}, {bin_index.max()}]"
        )
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if problems:
        raise ConfigError("discrete_time_nll: " + "; ".join(problems))

    floor = math.log(eps) if eps > 0 else -math.inf
    log_h = F.logsigmoid(logits)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)
    log_s_pad = torch.cat([log_s.new_zeros(batch, 1), log_s], dim=1)  # log S_pad, (B, K + 1)
    y = bin_index.long().unsqueeze(1)
    before = log_s_pad.gather(1, y).squeeze(1).clamp(min=floor)
    hazard = log_h.gather(1, y).squeeze(1).clamp(min=floor)
    after = log_s_pad.gather(1, y + 1).squeeze(1).clamp(min=floor)
    observed = event.to(logits.dtype)
    uncensored = -observed * (before + hazard)
    censored = -(1.0 - observed) * after
    loss = (1.0 - alpha) * (uncensored + censored) + alpha * uncensored
    return _reduce(loss, reduction, loss.new_tensor(float(batch)))


def cox_ph_loss(
    risk: Tensor,
    time: Tensor,
    event: Tensor,
    mask: Tensor | None = None,
    ties: Literal["breslow", "efron"] = "efron",
    reduction: Reduction = "mean",
) -> Tensor:
    """Negative Cox partial log-likelihood of a minibatch of patients.

    The risk set of an event at time t holds every (unmasked) patient with time >= t, censored
    patients at t included. Tied event times are handled by Breslow's or Efron's approximation.
    Vectorised over a (B, B) risk-set matrix: no Python loop over patients.

    Args:
        risk: (B,) log partial hazards (higher = earlier event).
        time: (B,) event or censoring times.
        event: (B,) 1/True for an observed event.
        mask: (B,) bool, False for padded batch entries (excluded everywhere); None keeps all.
        ties: "efron" (default, as lifelines and R's coxph) or "breslow".
        reduction: "mean" divides the sum by the number of events (so the scale does not depend
            on the batch's censoring); "sum"; "none" gives per-patient terms (0 for censored or
            masked entries). With no event in the batch the loss is 0, still attached to the
            graph (zero gradients).
    """
    _check_reduction(reduction)
    if ties not in ("breslow", "efron"):
        raise ConfigError(f"ties must be 'breslow' or 'efron', got {ties!r}")
    if risk.ndim == 2 and risk.shape[1] == 1:  # a Cox head with n_outputs = 1
        risk = risk.squeeze(1)
    if risk.ndim != 1:
        raise ConfigError(f"cox_ph_loss: risk must be (B,), got shape {tuple(risk.shape)}")
    batch = risk.shape[0]
    vectors = (
        {"time": time, "event": event}
        if mask is None
        else {"time": time, "event": event, "mask": mask}
    )
    problems = _check_vectors(batch, **vectors)
    if mask is not None and not problems and mask.dtype != torch.bool:
        problems.append(f"mask must be bool, got {mask.dtype}")
    if problems:
        raise ConfigError("cox_ph_loss: " + "; ".join(problems))

    valid = torch.ones(batch, dtype=torch.bool, device=risk.device) if mask is None else mask
    # Padded entries may hold anything (even NaN): replace them before any arithmetic so that
    # neither the value nor the gradient can be poisoned.
    risk_v = torch.where(valid, risk, risk.new_zeros(()))
    time_v = torch.where(valid, time.to(risk.dtype), risk.new_zeros(()))
    is_event = valid & event.bool()
    n_events = is_event.sum()

    at_risk = valid[None, :] & (time_v[None, :] >= time_v[:, None])  # row i: risk set at t_i
    weight = at_risk.to(risk.dtype)
    if ties == "efron":
        # Efron: the r-th of the m events tied at t (r = 0..m-1) sees the tied events
        # down-weighted by (1 - r/m); the order inside a tie group does not matter.
        tied = is_event[None, :] & is_event[:, None] & (time_v[None, :] == time_v[:, None])
        n_tied = tied.sum(dim=1).clamp(min=1)
        rank = torch.tril(tied, diagonal=-1).sum(dim=1)
        fraction = (rank.to(risk.dtype) / n_tied.to(risk.dtype))[:, None]
        weight = torch.where(tied, weight * (1.0 - fraction), weight)
    # Every row keeps itself (weight > 0) so logsumexp never sees an all -inf row.
    weight = torch.where(
        torch.eye(batch, dtype=torch.bool, device=risk.device) & ~is_event[:, None], 1.0, weight
    )
    log_denominator = torch.logsumexp(risk_v[None, :] + torch.log(weight), dim=1)
    terms = torch.where(is_event, log_denominator - risk_v, risk_v.new_zeros(()))
    return _reduce(terms, reduction, n_events.to(risk.dtype))


def _reduce(terms: Tensor, reduction: str, count: Tensor) -> Tensor:
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "sum":
        return total
    return torch.where(count > 0, total / count.clamp(min=1), total)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_vectors(batch: int, **vectors: Tensor) -> list[str]:
    return [
        f"{name} must have shape ({batch},), got {tuple(value.shape)}"
        for name, value in vectors.items()
        if tuple(value.shape) != (batch,)
    ]
