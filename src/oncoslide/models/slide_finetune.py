"""Fine-tuning a pre-trained slide encoder on a task: fully, with LoRA, or frozen (a linear probe).

``oncoslide train --model slide-finetune --init enc/`` builds the encoder of the folder a
``oncoslide pretrain ...`` run wrote (its architecture reaches the model as the ``encoder``
keyword, read from ``enc/encoder.json`` by the training path, see
:meth:`~oncoslide.training.tasks.FoldTask.model_kwargs`), copies its weights (``--init``) and adds
a head on the slide embedding. ``finetune``:

- ``full``: every parameter trains;
- ``lora``: the encoder's weights stay fixed; every Linear layer of the encoder gets a trainable
  low-rank update W + (alpha / r) B A (Hu et al., LoRA, ICLR 2022; B starts at zero so training
  starts from the pre-trained function) - the parameter-efficient transfer idea of SurgPETL;
- ``frozen``: only the head trains.

The share of the encoder's parameters that train is in :attr:`SlideFinetune.trainable_share`
(and the run's ``trainable_share`` covers the head too). A LoRA run needs a larger step than
full fine-tuning (measured in docs/pretrain.md): in ``lora`` mode the updates and the head train
at ``lora_lr_scale`` (10) times the run's learning rate, declared through
:meth:`SlideFinetune.lr_scales` (the training path's generic per-group learning-rate hook).
Scaling the updates alone (the head at the run's rate) was measured worse.

The encoder was pre-trained one slide at a time, so each of a patient's slides is embedded on its
own (its own coordinate frame) and the patient's embedding is the mean of its slides' embeddings,
as ``embed-slides`` and the benchmark's slide-level protocol do (the model declares
``uses_slide_index``). Encoders with a batched ``encode(features, mask, *, return_attention)``
(Threads) run batched, others (PAMA) slide by slide through their ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from oncoslide.errors import ConfigError
from oncoslide.models.base import MODELS, MILModel, MILOutput
from oncoslide.models.heads import make_head

_REFERENCE = (
    "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022; SurgPETL "
    "(parameter-efficient transfer learning, seed 003)"
)
FINETUNE_MODES = ("full", "lora", "frozen")


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank trainable update: y = x W^T + b + (alpha / r) x A^T B^T.

    Parameter names ``weight`` and ``bias`` are those of nn.Linear, so a pre-trained Linear's
    state loads as is (``lora_a``, ``lora_b`` come on top)."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float) -> None:
        super().__init__(in_features, out_features)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling


def add_lora(module: nn.Module, *, rank: int, alpha: float) -> int:
    """Replace every nn.Linear inside ``module`` by a LoRALinear with the same weights; returns
    how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
            lora = LoRALinear(child.in_features, child.out_features, rank=rank, alpha=alpha)
            with torch.no_grad():
                lora.weight.copy_(child.weight)
                if child.bias is not None and lora.bias is not None:
                    lora.bias.copy_(child.bias)
            setattr(module, name, lora)
            count += 1
        else:
            count += add_lora(child, rank=rank, alpha=alpha)
    return count


def encoder_spec(folder: str | Path) -> dict[str, Any]:
    """``{"name", "config"}`` of an encoder folder's encoder (its architecture, no weights), or
    of the encoder inside a trained ``slide-finetune`` model folder (``--init model/``)."""
    import json

    meta_file = Path(folder) / "encoder.json"
    model_file = Path(folder) / "model.json"
    if not meta_file.is_file() and model_file.is_file():
        try:
            spec = json.loads(model_file.read_text())["model"]["kwargs"]["encoder"]
            return {"name": str(spec["name"]), "config": dict(spec["config"])}
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{folder} is a model folder without a slide encoder: --init a slide-finetune "
                "model folder or an encoder folder (oncoslide pretrain)"
            ) from None
    try:
        spec = json.loads(meta_file.read_text())["encoder"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{folder} is not a readable slide-encoder folder: {exc}") from None
    return {"name": str(spec["name"]), "config": dict(spec["config"])}


@MODELS.register(
    "slide-finetune",
    reference=_REFERENCE,
    has_attention=True,
    uses_coords=True,
    uses_slide_index=True,  # each slide embedded in its own frame, then averaged
    encoder_init=encoder_spec,  # the architecture of an --init encoder folder
    description="a pre-trained slide encoder (--init enc/) with a head: full, LoRA or frozen",
)
class SlideFinetune(MILModel):
    """A slide encoder of the pre-training registry plus a head (module docstring).

    Args:
        encoder: ``{"name": ..., "config": {...}}`` of the slide encoder (from the encoder
            folder's ``encoder.json``); default: a small Threads-style encoder, trained from
            scratch unless ``--init`` gives weights.
        finetune: ``full``, ``lora`` or ``frozen``.
        lora_rank, lora_alpha: rank r and scale alpha of the LoRA updates.
        lora_lr_scale: ``lora`` only: the learning rate of the LoRA updates and the head as a
            multiple of the run's.
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dropout: float = 0.25,
        hidden_dim: int = 512,
        encoder: Mapping[str, Any] | None = None,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 8.0,
        lora_lr_scale: float = 10.0,
    ) -> None:
        super().__init__(in_dim, n_outputs, dropout, hidden_dim)
        from oncoslide.pretrain import SLIDE_ENCODERS

        if finetune not in FINETUNE_MODES:
            raise ConfigError(f"slide-finetune: finetune must be one of {FINETUNE_MODES}")
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise ConfigError(f"slide-finetune: lora_rank must be >= 1, got {lora_rank!r}")
        if not float(lora_lr_scale) > 0:
            raise ConfigError(f"slide-finetune: lora_lr_scale must be > 0, got {lora_lr_scale!r}")
        self.lora_lr_scale = float(lora_lr_scale)
        spec = dict(encoder or {"name": "threads", "config": {"in_dim": in_dim}})
        config = dict(spec.get("config", {}))
        if int(config.get("in_dim", in_dim)) != in_dim:
            raise ConfigError(
                f"slide-finetune: the encoder takes {config['in_dim']}-d patch features, "
                f"these are {in_dim}-d"
            )
        config["in_dim"] = in_dim
        self.encoder_name = str(spec.get("name", "threads"))
        self.encoder = SLIDE_ENCODERS.create(self.encoder_name, **config)
        self.finetune = finetune
        n_encoder = sum(p.numel() for p in self.encoder.parameters())
        if finetune == "lora":
            add_lora(self.encoder, rank=lora_rank, alpha=lora_alpha)
        for pname, p in self.encoder.named_parameters():
            p.requires_grad_(finetune == "full" or (finetune == "lora" and "lora_" in pname))
        n_trainable = sum(p.numel() for p in self.encoder.parameters() if p.requires_grad)
        #: trainable encoder values / the pre-trained encoder's parameter count
        self.trainable_share = n_trainable / max(1, n_encoder)
        self.n_encoder_parameters = n_encoder
        self._embed_dim = int(self.encoder.embed_dim)
        self.head_dropout = nn.Dropout(dropout)
        self.head = make_head(self._embed_dim, n_outputs)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    def parameter_groups(self) -> dict[str, list[str]]:
        names = [n for n, _ in self.named_parameters()]
        groups = {
            "encoder": [n for n in names if n.startswith("encoder.")],
            "head": [n for n in names if n.startswith("head.")],
            "lora": [n for n in names if n.startswith("encoder.") and "lora_" in n],
        }
        return {k: v for k, v in groups.items() if v}

    def lr_scales(self) -> dict[str, float]:
        # LoRA's B starts at zero: at full fine-tuning's rate the updates barely move before
        # early stopping. docs/pretrain.md measured the whole LoRA run (updates and head) at 10x
        # within noise of full fine-tuning, and the updates alone at 10x (head at 1x) worse
        if self.finetune != "lora":
            return {}
        return {"lora": self.lora_lr_scale, "head": self.lora_lr_scale}

    def load_encoder(self, folder: str | Path, contract: Any = None) -> dict[str, Any]:
        """Copy the pre-trained encoder weights of an encoder folder (``--init enc/``)."""
        from oncoslide.pretrain.folder import WEIGHTS_FILE, load_slide_encoder

        loaded = load_slide_encoder(folder)
        if loaded.name != self.encoder_name:
            raise ConfigError(
                f"--init {folder} holds a {loaded.name!r} encoder; this model was built for "
                f"{self.encoder_name!r}"
            )
        if contract is not None:
            problems = loaded.contract.mismatches(contract)
            if problems:
                raise ConfigError(
                    f"--init {folder} was pre-trained on other features: " + "; ".join(problems)
                )
        state = loaded.encoder.state_dict()
        result = self.encoder.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if "lora_" not in k]
        if missing or result.unexpected_keys:
            raise ConfigError(
                f"--init {folder}: the encoder weights do not fit (missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]})"
            )
        import hashlib

        digest = hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()
        return {
            "init": str(folder),
            "init_weights_sha256": digest,
            "init_copied": len(state),
            "encoder_trainable_share": self.trainable_share,
        }

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None = None,
        slide_index: Tensor | None = None,
    ) -> MILOutput:
        """Embeds each slide of a bag on its own (``slide_index``, -1 on padding) and averages
        the slides' embeddings; without ``slide_index`` a bag is taken as one slide."""
        self.check_inputs(features, mask, coords)
        if slide_index is not None and slide_index.shape != mask.shape:
            raise ConfigError(
                f"SlideFinetune input: slide_index must be (B, N) = {tuple(mask.shape)}, got "
                f"{tuple(slide_index.shape)}"
            )
        segments = None if slide_index is None else _slide_segments(mask, slide_index)
        if segments is None:  # one slide per bag: the bags are the slides
            emb, attention = self._encode(features, mask, coords)
        else:
            emb, attention = self._encode_slides(features, mask, coords, segments)
        return MILOutput(
            logits=self.head(self.head_dropout(emb)), embedding=emb, attention=attention
        )

    @property
    def gives_attention(self) -> bool:
        """Whether forward returns per-patch attention: only encoders with a batched
        attention-pooling ``encode`` (Threads') have it; PAMA's embedding has none."""
        return _batched_encode(getattr(self.encoder, "encode", None))

    def _encode(
        self, features: Tensor, mask: Tensor, coords: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """(B, E) embeddings of B one-slide bags and (B, N) attention where the encoder has it."""
        encode: Any = getattr(self.encoder, "encode", None)
        if _batched_encode(encode):
            emb, maps = encode(features, mask, return_attention=True)
            return emb, maps.mean(dim=1)
        rows = []
        for b in range(features.shape[0]):
            keep = mask[b]
            c = None if coords is None else coords[b][keep].float()
            rows.append(self.encoder(features[b][keep].float(), c))
        return torch.stack(rows), None

    def _encode_slides(
        self,
        features: Tensor,
        mask: Tensor,
        coords: Tensor | None,
        segments: list[tuple[int, Tensor]],
    ) -> tuple[Tensor, Tensor | None]:
        """Every (bag, slide) segment as its own padded bag, then the mean per bag; a patch's
        attention is its weight within its slide over the bag's number of slides."""
        n_max = max(len(pos) for _, pos in segments)
        shape = (len(segments), n_max)
        f = features.new_zeros((*shape, features.shape[-1]))
        m = torch.zeros(shape, dtype=torch.bool, device=mask.device)
        c = None if coords is None else coords.new_zeros((*shape, 2))
        for s, (b, pos) in enumerate(segments):
            f[s, : len(pos)] = features[b, pos]
            m[s, : len(pos)] = True
            if c is not None and coords is not None:
                c[s, : len(pos)] = coords[b, pos]
        seg_emb, seg_att = self._encode(f, m, c)
        owner = torch.tensor([b for b, _ in segments], device=seg_emb.device)
        counts = torch.bincount(owner, minlength=features.shape[0]).to(seg_emb.dtype)
        total = seg_emb.new_zeros((features.shape[0], seg_emb.shape[1])).index_add(
            0, owner, seg_emb
        )
        emb = total / counts[:, None]
        attention = None
        if seg_att is not None:
            attention = seg_att.new_zeros(mask.shape)
            for s, (b, pos) in enumerate(segments):
                attention[b, pos] = seg_att[s, : len(pos)] / counts[b]
        return emb, attention


def _batched_encode(encode: object) -> bool:
    """Whether an encoder's ``encode`` is the batched ``encode(features (B, N, D), mask (B, N),
    *, return_attention)`` (Threads); PAMA's ``encode`` is another, per-slide function."""
    if not callable(encode):
        return False
    import inspect

    params = inspect.signature(encode).parameters
    return "mask" in params and "return_attention" in params


def _slide_segments(mask: Tensor, slide_index: Tensor) -> list[tuple[int, Tensor]] | None:
    """(bag, positions of one slide's valid patches) per slide of each bag, in slide order;
    None when every bag holds a single slide."""
    big = torch.iinfo(torch.long).max
    sidx = slide_index.long()
    lo = sidx.masked_fill(~mask, big).amin(dim=1)
    hi = sidx.masked_fill(~mask, -1).amax(dim=1)
    if bool((lo == hi).all()):
        return None
    segments = []
    for b in range(mask.shape[0]):
        for s in torch.unique(sidx[b][mask[b]]).tolist():
            segments.append((b, torch.nonzero(mask[b] & (sidx[b] == s)).flatten()))
    return segments


def trainable_summary(
    in_dim: int,
    model_kwargs: Mapping[str, Any],
    init: str | Path | None,
    n_outputs: int = 1,
    *,
    lr: float | None = None,
) -> str:
    """One line: how many of the encoder's parameters a fine-tuning run trains (and, for LoRA,
    the learning rate of its updates given the run's ``lr``)."""
    kwargs = dict(model_kwargs)
    if init is not None and (Path(init) / "encoder.json").is_file():
        kwargs.setdefault("encoder", encoder_spec(init))
    model = SlideFinetune(in_dim, n_outputs, **kwargs)
    enc_train = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters())
    line = (
        f"slide-finetune ({model.finetune}): {enc_train:,} of the encoder's "
        f"{model.n_encoder_parameters:,} parameters train ({100 * model.trainable_share:.2f} %), "
        f"plus the head's {head:,}"
    )
    scale = model.lr_scales().get("lora")
    if scale is not None:
        rate = "" if lr is None else f" ({lr * scale:g})"
        line += f"; the LoRA updates and the head train at {scale:g}x the learning rate{rate}"
    return line


__all__ = [
    "FINETUNE_MODES",
    "LoRALinear",
    "SlideFinetune",
    "add_lora",
    "encoder_spec",
    "trainable_summary",
]
