"""The contract of slide-encoder pre-training: encoders, methods, bags, and their registries.

A **slide encoder** (:class:`SlideEncoder`) turns one bag of patch features (and, when it uses
them, the patches' coordinates) into one embedding::

    encoder(features: (N, D) float tensor, coords: (N, 2) float tensor | None) -> (E,) tensor

It has ``embed_dim`` (E) and ``config()``: the JSON-able keywords that rebuild it with
``SLIDE_ENCODERS.create(encoder.name, **encoder.config())``. A bag is one coordinate frame
(one slide) for position-aware encoders; an encoder that pools a patient's slides receives
them concatenated and must not compare coordinates across ``Bag.slide_index`` values.

A **pre-training method** (:class:`PretrainMethod`, a LightningModule registered in
``PRETRAINERS``) owns an encoder (``method.encoder``) and whatever it trains beside it (a
decoder, a molecular encoder), and implements one function::

    method.loss(bags: list[Bag], generator: torch.Generator) -> Tensor (scalar)

Every random draw of a step (masks, dropped anchors) must come from ``generator``: it is
seeded from (run seed, global step, process rank), so a run resumed from a checkpoint draws
what the uninterrupted run drew. The base class does the rest: the optimiser (AdamW, linear
warm-up then cosine decay over the planned steps), logging the loss, counting bags. The
runner (:func:`oncoslide.pretrain.runner.run_pretraining`) trains any registered method on a
:class:`~oncoslide.pretrain.bags.PretrainBags` dataset and writes the encoder folder
(:mod:`oncoslide.pretrain.folder`).

To add a method: subclass both, register them (``@SLIDE_ENCODERS.register("name")`` and
``@PRETRAINERS.register("name", encoder="name", description=...)``), and add a
``pretrain <name>`` command to :mod:`oncoslide.cli_pretrain`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from oncoslide.registry import Registry

#: Slide encoders by name: ``SLIDE_ENCODERS.create(name, **config)`` rebuilds one.
SLIDE_ENCODERS: Registry[SlideEncoder] = Registry("slide encoder")
#: Pre-training methods by name; metadata ``encoder`` (the SLIDE_ENCODERS name it trains),
#: ``description``, ``reference``, ``needs`` (side inputs, e.g. ``("omics",)``).
PRETRAINERS: Registry[PretrainMethod] = Registry("pre-training method")


class SlideEncoder(nn.Module):
    """One bag of patch features -> one slide embedding of size ``embed_dim``."""

    #: the SLIDE_ENCODERS name (set by subclasses; written in the encoder folder)
    name: ClassVar[str] = ""
    #: whether ``forward`` reads ``coords`` (embed-slides refuses bags without positions)
    uses_coords: ClassVar[bool] = False
    embed_dim: int
    in_dim: int

    def forward(self, features: Tensor, coords: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able keywords rebuilding this encoder (``in_dim`` included)."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, features: Tensor, coords: Tensor | None = None) -> Tensor:
        """``forward`` in eval mode without gradients (the mode is restored after)."""
        was_training = self.training
        self.eval()
        try:
            return self(features, coords)
        finally:
            self.train(was_training)


@dataclass(frozen=True, eq=False)
class Bag:
    """One unit of pre-training: the patches of a slide (or of a patient's slides).

    ``coords`` are level-0 pixels of each patch's own slide (float32), ``None`` when the files
    had no positions; ``slide_index`` says which slide a patch comes from (all 0 for a slide
    bag). ``extras`` hold per-patient side data a method asked the dataset for (e.g. an
    expression vector); a patient without it has no key.
    """

    index: int
    unit_id: str  # slide id (per-slide bags) or patient id (per-patient bags)
    patient_id: str
    features: Tensor  # (N, D) float32
    coords: Tensor | None  # (N, 2) float32
    slide_index: Tensor  # (N,) int64
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return int(self.features.shape[0])

    def to(self, device: torch.device | str) -> Bag:
        return dataclasses.replace(
            self,
            features=self.features.to(device),
            coords=None if self.coords is None else self.coords.to(device),
            slide_index=self.slide_index.to(device),
            extras={k: v.to(device) for k, v in self.extras.items()},
        )


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for the random draws of one optimiser step of one process."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class PretrainMethod(pl.LightningModule):
    """Base of label-free (or molecular) slide-encoder pre-training methods.

    Subclasses build ``self.encoder`` (a :class:`SlideEncoder`) and whatever else they train,
    and implement :meth:`loss` and :meth:`config`. The runner sets ``total_steps`` (the
    schedule's length) and ``seed`` before fitting.
    """

    name: ClassVar[str] = ""
    encoder: SlideEncoder

    def __init__(
        self, *, lr: float = 1e-3, weight_decay: float = 0.05, warmup_fraction: float = 0.05
    ) -> None:
        super().__init__()
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.warmup_fraction = float(warmup_fraction)
        self.total_steps = 1
        self.seed = 0
        self.step_losses: list[float] = []  # this epoch's step losses (mean logged per epoch)
        self.bags_seen = 0
        self.run_settings: dict[str, Any] = {}

    # -- what a method implements ---------------------------------------------------------
    def loss(self, bags: list[Bag], generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able keywords of the method (the encoder's are in ``encoder.config()``)."""
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_fraction": self.warmup_fraction,
        }

    def prepare(self, dataset: Any, seed: int) -> None:
        """Label-free set-up from the pre-training bags, before the first step (e.g. a k-means
        tokenizer of their patches). Called by the runner on every start, resumed or not, so it
        must be deterministic given (dataset, seed); what it fits must be buffers (they travel
        in the checkpoints). Default: nothing."""

    def fit_readout(self, encoder: SlideEncoder, dataset: Any, seed: int) -> None:
        """Label-free fit of what the exported encoder's readout needs from the pre-training
        bags (e.g. projection axes), called once at the end on ``encoder`` holding the chosen
        epoch's weights; what it fits must be ``encoder`` buffers (they go to the folder's
        weights). Deterministic given (weights, dataset, seed). Default: nothing."""

    def folder_files(self) -> dict[str, dict[str, Tensor]]:
        """Extra tensors the encoder folder keeps beside the encoder ({file name: tensors},
        saved with torch.save), e.g. a tokenizer's codebook. Default: none."""
        return {}

    # -- checkpoints: the process's RNG states and the run's settings travel with them -----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # numpy's legacy global state (what code may draw from); tensors and plain numbers
        # only: the checkpoint loads with weights_only=True
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [
                str(kind),
                torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                int(pos),
                int(has_gauss),
                float(gauss),
            ],
            "python": list(random.getstate()),
        }
        checkpoint["oncoslide_run"] = dict(getattr(self, "run_settings", {}))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            legacy = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
            np.random.set_state(legacy)  # noqa: NPY002
            version, internal, gauss_next = states["python"]
            random.setstate((version, tuple(internal), gauss_next))

    # -- training -------------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(step_seed(self.seed, int(self.global_step), int(self.global_rank)))
        return gen

    def transfer_batch_to_device(
        self, batch: list[Bag], device: torch.device, dataloader_idx: int
    ) -> list[Bag]:
        return [bag.to(device) for bag in batch]

    def training_step(self, batch: list[Bag], batch_idx: int) -> Tensor:
        loss = self.loss(batch, self.step_generator())
        value = float(loss.detach())
        self.step_losses.append(value)
        self.bags_seen += len(batch)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> Any:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for pname, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # biases, norms and learned tokens/tables are not decayed (as in MAE/ViT recipes)
            (no_decay if p.ndim < 2 or "token" in pname or "table" in pname else decay).append(p)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
        )
        total = max(1, int(self.total_steps))
        warmup = min(total - 1, round(self.warmup_fraction * total))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def create_method(name: str, *, in_dim: int, **kwargs: Any) -> PretrainMethod:
    """Build the registered method ``name`` for ``in_dim``-dimensional patch features."""
    return PRETRAINERS.create(name, in_dim=in_dim, **kwargs)


__all__ = [
    "PRETRAINERS",
    "SLIDE_ENCODERS",
    "Bag",
    "PretrainMethod",
    "SlideEncoder",
    "create_method",
    "step_seed",
]
