"""Transfer baselines over a model zoo (seed 000, CROPKT): fine-tuning from a source cancer's
model and a linear probe on its frozen slide embedding.

Both read a zoo (``experts=<zoo folder>``, see :mod:`oncoslide.transfer.zoo`) and use ONE
source model of it:

- ``zoo_finetune``: the source model, every weight trainable (its head too), trained on the
  target's training part; the ``--init`` route of CROPKT's baselines, with the source chosen
  per fold.
- ``zoo_probe``: the source model frozen (no gradient, no dropout); a new linear head on its
  slide embedding is the only thing trained.

``source="auto"`` (default) chooses the source on the fold's **validation part** (carved from the
target's training part): each candidate, unchanged, scores the validation patients, and the one
with the best validation score (C-index) is kept. The training path calls
:meth:`ZooSource.candidates` / :meth:`ZooSource.use_source` for that before training; the test
part is never read for it (the paper picked the best source on the test set; we do not). Every
candidate's weights stay in the model (frozen when not chosen) and the chosen index is a buffer,
so a saved model folder reloads with its choice.

A source trained on one of the fold's validation or test patients would leak their outcomes:
like ROUPKT, the models expose :meth:`seen_patients` and the training path refuses such a fold
(leave the target's own zoo model out with ``exclude``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.features.schema import FeatureContract
from oncoslide.models.base import MODELS, MILModel, MILOutput
from oncoslide.models.heads import make_head

_REFERENCE = (
    "Cross-cancer prognosis knowledge transfer (CROPKT), seed 000: fine-tuning and linear "
    "probing from the best source cancer's model, chosen on validation (FIX: not on the test set)"
)


class ZooSource(MILModel):
    """The zoo loading, source choice and leak-check shared by both baselines."""

    #: whether the source network trains (fine-tuning) or stays frozen (probe)
    trains_source: bool = True
    chosen: Tensor  # a buffer: the index of the chosen source

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        experts: str | None = None,
        source: str = "auto",
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        from oncoslide.transfer.zoo import load_zoo

        name = type(self).__name__
        if experts is None:
            raise ConfigError(f"{name} needs a zoo: --model-arg experts=ZOO_FOLDER")
        zoo = load_zoo(experts)
        unknown = sorted(set(exclude) - set(zoo.cancers))
        if unknown:
            raise ConfigError(f"{name}: exclude names cancers the zoo lacks: {unknown}")
        names = [c for c in zoo.cancers if c not in set(exclude)]
        if source != "auto":
            if source not in zoo.cancers:
                raise ConfigError(
                    f"{name}: source {source!r} is not in the zoo ({', '.join(zoo.cancers)})"
                )
            if source in set(exclude):
                raise ConfigError(f"{name}: source {source!r} is also excluded")
            names = [source]
        if not names:
            raise ConfigError(f"{name}: every model of the zoo is excluded")
        loaded = [zoo.model(c) for c in names]
        for cancer, trained in zip(names, loaded, strict=True):
            if trained.model.in_dim != in_dim:
                raise ConfigError(
                    f"{name}: the {cancer} model reads {trained.model.in_dim}-d features, these "
                    f"are {in_dim}-d"
                )
        self.source_names = names
        self.zoo_contract: FeatureContract = zoo.contract
        self._seen = {
            c: set(t.patients()["patient_id"].astype(str))
            for c, t in zip(names, loaded, strict=True)
        }
        self.sources = nn.ModuleList([t.model for t in loaded])
        self.register_buffer("chosen", torch.zeros((), dtype=torch.long))
        self._freeze_others()
        self._build(n_outputs)

    def _build(self, n_outputs: int) -> None:
        """What a baseline adds on the loaded sources (checks, a new head)."""

    # --- the training path's hooks -------------------------------------------------------------
    def candidates(self) -> list[str]:
        """Source cancers to choose from on validation (one when ``source`` is named)."""
        return list(self.source_names)

    def use_source(self, cancer: str) -> None:
        """Route every forward pass through ``cancer``'s model (the others stay frozen)."""
        if cancer not in self.source_names:
            raise ConfigError(f"{type(self).__name__}: no candidate source {cancer!r}")
        self.chosen.fill_(self.source_names.index(cancer))
        self._freeze_others()

    def zero_shot_logits(self, features: Tensor, mask: Tensor) -> Tensor:
        """The chosen source's own head, unchanged: what validation scores a candidate by."""
        return self.net(features, mask).logits

    def seen_patients(self) -> dict[str, set[str]]:
        """Per source, the patients it was trained on (the training path's leak check)."""
        return {k: set(v) for k, v in self._seen.items()}

    # -------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.net.embed_dim)

    @property
    def source(self) -> str:
        return self.source_names[int(self.chosen.item())]

    @property
    def net(self) -> MILModel:
        return self.nets[int(self.chosen.item())]

    @property
    def nets(self) -> list[MILModel]:
        return [cast(MILModel, net) for net in self.sources]

    def _freeze_others(self) -> None:
        for k, net in enumerate(self.sources):
            net.requires_grad_(self.trains_source and k == int(self.chosen.item()))

    def parameter_groups(self) -> dict[str, list[str]]:
        # only the chosen source's parameters are meaningful to freeze; the others are fixed
        prefix = f"sources.{int(self.chosen.item())}."
        groups = super().parameter_groups()
        return {
            k: [n for n in v if not n.startswith("sources.") or n.startswith(prefix)]
            for k, v in groups.items()
        }


@MODELS.register(
    "zoo_finetune",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=False,
    needs_experts=True,
    chooses_on_validation=True,
    description="fine-tune a zoo model (experts=ZOO) on the target; source chosen on validation",
)
class ZooFineTune(ZooSource):
    """Fine-tuning from a source cancer's model (see the module docstring).

    Args (both baselines):
        in_dim, n_outputs, dropout, hidden_dim: see :class:`~oncoslide.models.base.MILModel`
            (``dropout`` and ``hidden_dim`` are the source's own; these are unused).
        experts: a zoo folder (``oncoslide zoo train``).
        source: a zoo cancer, or ``"auto"`` to choose on each fold's validation part.
        exclude: zoo cancers never used (e.g. the target's own model, which saw its patients).
    """

    def _build(self, n_outputs: int) -> None:
        for cancer, net in zip(self.source_names, self.nets, strict=True):
            if net.n_outputs != n_outputs:
                raise ConfigError(
                    f"zoo_finetune: the {cancer} model has {net.n_outputs} outputs, this task "
                    f"{n_outputs}; train with the zoo's survival loss and bins"
                )

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        self.check_inputs(features, mask, coords)
        out = self.net(features, mask)
        return MILOutput(
            logits=out.logits,
            embedding=out.embedding,
            attention=out.attention,
            attention_maps=out.attention_maps,
            loss_views=out.loss_views,  # the source's own training loss (e.g. composition's)
        )


@MODELS.register(
    "zoo_probe",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=False,
    needs_experts=True,
    chooses_on_validation=True,
    description="linear probe on a frozen zoo model's slide embedding (experts=ZOO); source "
    "chosen on validation",
)
class ZooProbe(ZooSource):
    """A linear head on a frozen source model's slide embedding (see the module docstring).

    Args: as :class:`ZooFineTune`.
    """

    trains_source = False

    def _build(self, n_outputs: int) -> None:
        widths = {int(net.embed_dim) for net in self.nets}
        if len(widths) != 1:
            raise ConfigError(f"zoo_probe: the candidate sources embed at {sorted(widths)} widths")
        self.head = make_head(widths.pop(), n_outputs)

    def train(self, mode: bool = True) -> ZooProbe:
        super().train(mode)
        self.sources.eval()  # a frozen source never uses dropout
        return self

    def forward(self, features: Tensor, mask: Tensor, coords: Tensor | None = None) -> MILOutput:
        self.check_inputs(features, mask, coords)
        with torch.no_grad():
            out = self.net(features, mask)
        return MILOutput(
            logits=self.head(out.embedding),
            embedding=out.embedding,
            attention=out.attention,
            attention_maps=out.attention_maps,
        )
