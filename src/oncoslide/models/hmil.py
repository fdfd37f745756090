"""HMIL: hierarchical-label MIL over a coarse -> fine label tree (the HMIL idea of seed 003).

- **Class-wise attention at both levels.** One gated attention branch per class and level (the
  tanh/sigmoid layers shared within a level, one score vector per class); each class pools the
  bag with its own attention, and a class-wise linear classifier reads its pooled vector.
- **Predictions that follow the tree by construction.** p(coarse) = softmax of the coarse
  logits; p(fine | coarse) = softmax of the fine logits among the coarse class's children;
  p(fine) = p(parent) * p(fine | parent). The returned logits are log p(fine), so the task's
  cross-entropy is -log p(coarse) - log p(fine | coarse) and the coarse probabilities are
  exactly the sums of their children's (the top-down decision rule is in
  :mod:`oncoslide.evaluation.hierarchy`).
- **Attention kept consistent with the tree** (auxiliary loss ``align``): each fine class's
  attention is pulled towards its parent's, KL(a_parent || a_fine) over the bag's patches.
- **Supervised contrastive term** (``supcon``) on the slide embeddings of a training batch,
  positives = patients of the same fine class (Khosla et al. 2020), temperature 0.1.
- **Curriculum weighting** (``MILOutput.sample_weight``): a patient's difficulty is its
  cross-entropy standardised within the batch (gradient stopped); its weight is
  exp(lambda * difficulty) normalised to mean 1, with lambda moving linearly from -strength
  (easy cases first) at the first epoch to +strength (hard cases) at the last: deterministic,
  a function of the batch and the epoch only.

Labels reach the model in training steps only (registry ``uses_targets``); validation, test and
``predict`` use the slides alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oncoslide.cohort.label_tree import LabelTree, LabelTreeError, parse_label_tree
from oncoslide.errors import ConfigError
from oncoslide.models.base import (
    MODELS,
    Dropout,
    MILModel,
    MILOutput,
    project_valid,
    unpack,
)

_REFERENCE = (
    "HMIL: hierarchical multi-instance learning for fine-grained WSI classification (seed 003): "
    "class-wise attention aligned across a label tree, supervised contrastive loss, curriculum"
)


class ClasswiseAttention(nn.Module):
    """Gated attention with one score per class: w_k^T (tanh(V h) * sigmoid(U h)) for class k."""

    def __init__(self, dim: int, attn_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), Dropout(dropout))
        self.gate_branch = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), Dropout(dropout))
        self.score = nn.Linear(attn_dim, n_classes)

    def forward(self, rows: Tensor) -> Tensor:
        """(M, dim) -> (M, K) attention logits."""
        return self.score(self.tanh_branch(rows) * self.gate_branch(rows))


class ClasswiseHead(nn.Module):
    """logit_k = w_k . z_k + b_k: one linear classifier per class, reading its own pooled vector."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        self.bias = nn.Parameter(torch.zeros(n_classes))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, K, dim) -> (B, K)."""
        return (pooled * self.weight).sum(dim=-1) + self.bias


def classwise_pool(scores: Tensor, rows: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class attention pooling of packed rows.

    Returns (pooled (B, K, H), attention (B, K, N), log-attention (B, K, N)); attention is a
    softmax over each bag's valid patches, exactly 0 on padding (log-attention -inf there).
    """
    logits = unpack(scores, mask, fill=float("-inf")).transpose(1, 2)  # (B, K, N)
    log_att = torch.log_softmax(logits, dim=-1)
    att = log_att.exp()
    pooled = torch.bmm(att, unpack(rows, mask))  # (B, K, H)
    return pooled, att, log_att


def supervised_contrastive(embedding: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """SupCon loss (Khosla et al. 2020) of a batch; anchors without a positive are left out
    (a batch without any positive pair gives 0, still attached to the graph)."""
    z = F.normalize(embedding, dim=-1)
    sim = z @ z.T / temperature
    n = len(labels)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = positive.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return embedding.sum() * 0.0
    per = -torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return (per[has] / n_pos[has]).mean()


@MODELS.register(
    "hmil",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=False,
    aux_losses={"align": 0.1, "supcon": 0.1},
    uses_targets=True,
    uses_label_tree=True,
    description="hierarchical-label MIL over a label tree (--hierarchy tree.yaml)",
)
class HMIL(MILModel):
    """Hierarchical-label MIL (see the module docstring).

    Args:
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`;
            ``n_outputs`` is the number of fine classes.
        tree: ``{coarse: [fine, ...]}`` (the training path passes the run's ``--hierarchy``).
        classes: the fine classes in output order (default: the tree's fine classes, sorted).
        attn_dim: width of the attention branches.
        temperature: of the supervised contrastive term.
        curriculum: strength of the curriculum weighting (0: off).
    """

    parent: Tensor  # (C_fine,) index of each fine class's coarse class (a buffer)

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        tree: Mapping[str, Sequence[str]] | None = None,
        classes: Sequence[str] | None = None,
        attn_dim: int = 128,
        temperature: float = 0.1,
        curriculum: float = 1.0,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        if tree is None:
            raise ConfigError("hmil needs a label tree: --hierarchy tree.yaml (coarse -> fine)")
        problems = []
        if not isinstance(attn_dim, int) or attn_dim < 1:
            problems.append(f"attn_dim must be a positive integer, got {attn_dim!r}")
        if not float(temperature) > 0:
            problems.append(f"temperature must be > 0, got {temperature!r}")
        if not float(curriculum) >= 0:
            problems.append(f"curriculum must be >= 0, got {curriculum!r}")
        if problems:
            raise ConfigError("HMIL: " + "; ".join(problems))
        label_tree: LabelTree = parse_label_tree(dict(tree), "of hmil")
        fine = [str(c) for c in classes] if classes is not None else sorted(label_tree.fine_classes)
        if len(fine) != n_outputs:
            raise ConfigError(
                f"HMIL: n_outputs is {n_outputs} but there are {len(fine)} fine classes"
            )
        try:
            found, found_parent = label_tree.parent_index(fine)
        except LabelTreeError as exc:
            raise ConfigError(f"HMIL: {exc}") from None
        # families in sorted order: the weights must not depend on the order of the tree's
        # keys, which a JSON round trip (model.json) may change
        coarse = tuple(sorted(found))
        parent = [coarse.index(found[k]) for k in found_parent]
        self.classes = tuple(fine)
        self.coarse_classes = coarse
        self.register_buffer("parent", torch.as_tensor(parent, dtype=torch.long), persistent=False)
        self.attn_dim = attn_dim
        self.temperature = float(temperature)
        self.curriculum = float(curriculum)
        self._progress = 0.0  # 0 at the first epoch, 1 at the last (set_training_progress)
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), Dropout(dropout))
        self.coarse_attention = ClasswiseAttention(hidden_dim, attn_dim, len(coarse), dropout)
        self.fine_attention = ClasswiseAttention(hidden_dim, attn_dim, len(fine), dropout)
        self.head = nn.ModuleDict(
            {
                "coarse": ClasswiseHead(hidden_dim, len(coarse)),
                "fine": ClasswiseHead(hidden_dim, len(fine)),
            }
        )
        self.contrast = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 128)
        )

    def set_training_progress(self, epoch: int, epochs: int) -> None:
        """Where training stands, for the curriculum (called at each epoch's start)."""
        self._progress = min(1.0, epoch / max(1, epochs - 1))

    def log_probs(self, coarse_logits: Tensor, fine_logits: Tensor) -> Tensor:
        """log p(fine) = log p(parent) + log p(fine | parent), (B, C_fine)."""
        parent = self.parent
        log_coarse = torch.log_softmax(coarse_logits, dim=-1)
        lse = torch.stack(
            [
                torch.logsumexp(fine_logits[:, parent == c], dim=-1)
                for c in range(len(self.coarse_classes))
            ],
            dim=-1,
        )  # (B, C_coarse): normaliser of each family's children
        return log_coarse[:, parent] + fine_logits - lse[:, parent]

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        targets: Mapping[str, Tensor] | None = None,
    ) -> MILOutput:
        self.check_inputs(features, mask, coords)
        rows = project_valid(self.proj, features, mask, pack=self.pack_valid)
        zc, ac, log_ac = classwise_pool(self.coarse_attention(rows), rows, mask)
        zf, af, log_af = classwise_pool(self.fine_attention(rows), rows, mask)
        log_p = self.log_probs(self.head["coarse"](zc), self.head["fine"](zf))
        embedding = zf.mean(dim=1)
        p_fine = log_p.exp()
        attention = (p_fine.detach().unsqueeze(-1) * af).sum(dim=1)  # a mixture: sums to 1
        maps = {f"coarse:{c}": ac[:, k] for k, c in enumerate(self.coarse_classes)}
        maps.update({f"fine:{c}": af[:, k] for k, c in enumerate(self.classes)})
        out = MILOutput(logits=log_p, embedding=embedding, attention=attention, attention_maps=maps)
        if targets is None or "label" not in targets:
            return out
        labels = targets["label"]
        # KL(a_parent || a_fine) per bag and fine class, over valid patches only
        # (logs replaced on padding first: -inf - -inf would put NaN into the gradient)
        valid = mask.unsqueeze(1).expand_as(af)
        zero = torch.zeros_like(af)
        parent_log = torch.where(valid, log_ac[:, self.parent], zero)
        kl = ac[:, self.parent] * (parent_log - torch.where(valid, log_af, zero))
        out.aux_losses = {
            "align": kl.sum(dim=-1).mean(),
            "supcon": supervised_contrastive(self.contrast(embedding), labels, self.temperature),
        }
        if self.curriculum > 0 and len(labels) > 1:
            with torch.no_grad():
                loss = F.nll_loss(log_p.detach(), labels, reduction="none")
                z = ((loss - loss.mean()) / loss.std().clamp_min(1e-6)).clamp(-2.0, 2.0)
                lam = self.curriculum * (2.0 * self._progress - 1.0)
                w = torch.exp(lam * z)
                out.sample_weight = w / w.mean()
        return out


__all__ = ["HMIL", "ClasswiseAttention", "ClasswiseHead", "supervised_contrastive"]
