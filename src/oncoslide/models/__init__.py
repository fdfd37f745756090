"""MIL aggregators behind one registry: ``create_model("abmil", in_dim=1536, n_outputs=4)``.

Registered models: ``mean``, ``max`` (pooling baselines), ``composition`` (tissue-cluster
shares with marginal or joint effects), ``abmil`` (gated attention),
``abmil_plain`` (tanh attention), ``transmil``, ``hmil`` (hierarchical labels), ``ghanet``
and ``pathlupi`` (omics in training only), and the baselines that read omics at test time:
``omics_snn``, ``fusion_late`` and ``mome``; ``roupkt``, ``zoo_finetune`` and ``zoo_probe``
(transfer from a model zoo). See docs/models.md.
"""

from __future__ import annotations

from typing import Any

from oncoslide.models import abmil as _abmil  # noqa: F401  (registers abmil, abmil_plain)
from oncoslide.models import composition as _composition  # noqa: F401  (registers composition)
from oncoslide.models import genomic as _genomic  # noqa: F401  (registers ghanet, pathlupi)
from oncoslide.models import hmil as _hmil  # noqa: F401  (registers hmil)
from oncoslide.models import omics_baselines as _omics  # noqa: F401  (omics_snn, fusion_late, mome)
from oncoslide.models import pooling as _pooling  # noqa: F401  (registers mean, max)
from oncoslide.models import roupkt as _roupkt  # noqa: F401  (registers roupkt)
from oncoslide.models import slide_finetune as _slide_ft  # noqa: F401  (slide-finetune)
from oncoslide.models import transmil as _transmil  # noqa: F401  (registers transmil)
from oncoslide.models import zoo_transfer as _zoo  # noqa: F401  (zoo_finetune, zoo_probe)
from oncoslide.models.abmil import ABMIL
from oncoslide.models.base import MODELS, MILModel, MILOutput
from oncoslide.models.heads import (
    class_probs,
    discrete_hazards,
    discrete_risk,
    discrete_survival,
    make_head,
)
from oncoslide.models.pooling import MaxPoolMIL, MeanPoolMIL
from oncoslide.models.transmil import TransMIL


def create_model(name: str, **kwargs: Any) -> MILModel:
    """Build the registered model ``name``, e.g. ``create_model("abmil", in_dim=1536, n_outputs=4)``."""
    return MODELS.create(name, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style pattern."""
    return MODELS.list(pattern)


__all__ = [
    "ABMIL",
    "MODELS",
    "MILModel",
    "MILOutput",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "TransMIL",
    "class_probs",
    "create_model",
    "discrete_hazards",
    "discrete_risk",
    "discrete_survival",
    "list_models",
    "make_head",
]
