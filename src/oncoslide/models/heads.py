"""The linear head and the conversions of its logits into survival or class quantities.

Discrete-time survival (the MCAT convention used by CROPKT, G-HANet and PathBench): the head
outputs K logits, one per time bin; the hazard of bin k is ``h_k = sigmoid(logit_k)``, the
probability of surviving past bin k is ``S_k = prod_{j <= k} (1 - h_j)`` and the risk score is
``-sum_k S_k`` (higher = earlier death). Classification uses a softmax over n_outputs classes,
binary tasks included (n_outputs = 2), so every task has the same head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_head(embed_dim: int, n_outputs: int) -> nn.Linear:
    """The prediction head: Linear(E -> n_outputs)."""
    return nn.Linear(embed_dim, n_outputs)


def discrete_hazards(logits: Tensor) -> Tensor:
    """Per-bin hazards h = sigmoid(logits), shape (B, K)."""
    return torch.sigmoid(logits)


def discrete_survival(logits: Tensor) -> Tensor:
    """S_k = prod_{j <= k} (1 - h_j), (B, K): the probability of surviving past bin k.

    Computed as exp(cumsum(logsigmoid(-logits))), which equals cumprod(1 - sigmoid(logits))
    but keeps precision when hazards are close to 0 or 1.
    """
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=-1))


def discrete_risk(logits: Tensor) -> Tensor:
    """Risk score -sum_k S_k, (B,): higher means shorter expected survival (MCAT convention)."""
    return -discrete_survival(logits).sum(dim=-1)


def class_probs(logits: Tensor) -> Tensor:
    """Class probabilities softmax(logits), (B, C); binary tasks use C = 2."""
    return torch.softmax(logits, dim=-1)
