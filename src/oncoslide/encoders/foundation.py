"""Pathology foundation models built with timm (optional) from weights the user downloaded.

Every entry builds its architecture with ``timm.create_model(..., pretrained=False)`` (never a
hub name, never a download) and loads the user's local checkpoint strictly. The constructor
arguments, input sizes, normalisation and pooling follow each model card and the reference
loaders in mahmoodlab/TRIDENT (trident/patch_encoder_models/load.py); see docs/encoders.md.

timm is an optional dependency (``pip install 'oncoslide[timm]'`` after installing torch):
without it these entries raise an :class:`~oncoslide.errors.EncoderError` saying so, together
with any problem with the weights path, before anything is built.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oncoslide.encoders.base import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_INSTALL_HINT,
    EncoderInfo,
    PatchEncoder,
    load_weights_strict,
    read_state_dict,
    resolve_weights_path,
)
from oncoslide.errors import EncoderError

# timm objects named by string, resolved only once timm is imported (it may be absent)
SWIGLU_PACKED = "timm.layers.SwiGLUPacked"
SILU = "torch.nn.SiLU"
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, gated; see the model card)"
_CHECKPOINT_NAMES = ("pytorch_model.bin", "model.safetensors")


@dataclass(frozen=True)
class TimmSpec:
    """How to build one entry: timm architecture name and arguments, pooling, expected files.

    ``pooling``: "cls" takes the class token after the final norm; "cls+mean" concatenates it
    with the mean of the patch tokens (register tokens excluded).
    """

    timm_name: str
    kwargs: Mapping[str, Any]
    pooling: Literal["cls", "cls+mean", "conch"]
    hf_repo: str
    file_names: tuple[str, ...] = _CHECKPOINT_NAMES
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hint(self) -> str:
        return (
            f"download {self.file_names[0]} from https://huggingface.co/{self.hf_repo} (gated: "
            f"accept its terms, then download once) and pass --weights "
            f"/path/to/{self.file_names[0]} (weights= in Python), or the folder holding it"
        )


class TimmViTEncoder(PatchEncoder):
    """A timm VisionTransformer; features from its normalised tokens (see ``TimmSpec.pooling``)."""

    def __init__(self, info: EncoderInfo, backbone: nn.Module, pooling: str) -> None:
        super().__init__(info)
        self.backbone: Any = backbone  # a timm VisionTransformer (timm is untyped here)
        self.pooling = pooling

    def features(self, x: Tensor) -> Tensor:
        tokens = self.backbone.forward_features(x)  # (B, prefix + patches, D), after final norm
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        patches = tokens[:, int(self.backbone.num_prefix_tokens) :]  # skips class and registers
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


class AttentionalPooler(nn.Module):
    """Cross-attention of learned queries over the tokens (CONCH v1.5's contrastive pooler).

    Parameter names match the released checkpoint: ``query``, ``ln_q``, ``ln_k``, ``to_q``,
    ``to_kv``, ``to_out``.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        inner = (d_model // n_head) * n_head
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, context_dim) -> (B, n_queries, d_model)."""
        b = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as released
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV15Encoder(PatchEncoder):
    """CONCH v1.5 vision tower: ViT-L/16 trunk, attentional pooler, LayerNorm -> 768-d."""

    def __init__(self, info: EncoderInfo, trunk: nn.Module) -> None:
        super().__init__(info)
        self.trunk: Any = trunk
        context = int(getattr(trunk, "embed_dim", 1024))
        self.attn_pool_contrast = AttentionalPooler(768, context, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def features(self, x: Tensor) -> Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


# ------------------------------------------------------------------------------ building


def import_timm() -> ModuleType | None:
    """timm, or None when it is not installed."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        return None


def _resolve(value: Any, timm: ModuleType) -> Any:
    if value == SWIGLU_PACKED:
        return timm.layers.SwiGLUPacked
    if value == SILU:
        return nn.SiLU
    return value


def _ready(info: EncoderInfo, spec: TimmSpec, weights: Any) -> tuple[ModuleType, Path]:
    """timm and the weights file, or ONE EncoderError listing every missing piece."""
    problems: list[str] = []
    timm = import_timm()
    if timm is None:
        problems.append(f"needs timm, which is not installed: {TIMM_INSTALL_HINT}")
    path: Path | None = None
    try:
        path = resolve_weights_path(weights, info.name, spec.file_names, spec.hint)
    except EncoderError as exc:
        problems.append(str(exc).removeprefix(f"encoder {info.name!r}").lstrip(": "))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise EncoderError(f"encoder {info.name!r} cannot be built:\n{lines}")
    assert timm is not None and path is not None
    return timm, path


def build_backbone(timm: ModuleType, spec: TimmSpec) -> nn.Module:
    """``timm.create_model(spec.timm_name, pretrained=False, **kwargs)``: never downloads."""
    kwargs = {k: _resolve(v, timm) for k, v in spec.kwargs.items()}
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


def _resample_pos_embed(
    timm: ModuleType, state: dict[str, Tensor], trunk: Any, key: str
) -> dict[str, Tensor]:
    """Resize a checkpoint's position embedding to the trunk's grid (explicit, as upstream)."""
    if key in state and state[key].shape != trunk.pos_embed.shape:
        state = dict(state)
        state[key] = timm.layers.resample_abs_pos_embed(
            state[key],
            new_size=list(trunk.patch_embed.grid_size),
            num_prefix_tokens=1,
            interpolation="bilinear",
            antialias=False,
        )
    return state


def build_timm_encoder(info: EncoderInfo, spec: TimmSpec, weights: Any) -> PatchEncoder:
    """Check timm and the weights, build the architecture, load the weights strictly."""
    timm, path = _ready(info, spec, weights)
    state = read_state_dict(path, info.name, spec.hint)
    encoder: PatchEncoder
    if spec.pooling == "conch":
        encoder = ConchV15Encoder(info, build_backbone(timm, spec))
        state = _resample_pos_embed(timm, state, encoder.trunk, "trunk.pos_embed")
        target: nn.Module = encoder
    else:
        encoder = TimmViTEncoder(info, build_backbone(timm, spec), spec.pooling)
        target = encoder.backbone
    load_weights_strict(target, state, info.name, spec.hint)
    return encoder


def _register(info: EncoderInfo, spec: TimmSpec) -> None:
    def factory(weights: str | os.PathLike[str] | None = None) -> PatchEncoder:
        return build_timm_encoder(info, spec, weights)

    factory.__name__ = factory.__qualname__ = info.name.replace("-", "_").replace(".", "_")
    factory.__doc__ = f"{info.architecture} from local weights ({spec.hf_repo})."
    ENCODERS.register(info.name, info=info, spec=spec)(factory)


# ------------------------------------------------------------------------------ the entries


def _info(name: str, **fields: Any) -> EncoderInfo:
    defaults: dict[str, Any] = {
        "name": name,
        "input_size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "native_mpp": 0.5,
        "requires": ("timm",),
        "interpolation": "bicubic",
        "half_dtype": "float16",
    }
    return EncoderInfo(**{**defaults, **fields})


_VIT_L16 = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
            "dynamic_img_size": True}  # fmt: skip

ENTRIES: tuple[tuple[EncoderInfo, TimmSpec], ...] = (
    (
        _info(
            "uni",
            architecture="ViT-L/16 (DINOv2, 303M parameters)",
            out_dim=1024,
            interpolation="bilinear",
            license=NC_ND,
            source="MahmoodLab/UNI (Hugging Face); timm vit_large_patch16_224",
            weights_description="pytorch_model.bin from https://huggingface.co/MahmoodLab/UNI",
            reference="Chen et al., UNI, Nature Medicine 2024",
        ),
        TimmSpec("vit_large_patch16_224", _VIT_L16, "cls", "MahmoodLab/UNI"),
    ),
    (
        _info(
            "uni2-h",
            architecture="ViT-H/14 with 8 registers, SwiGLU (681M parameters)",
            out_dim=1536,
            interpolation="bilinear",
            half_dtype="bfloat16",
            license=NC_ND,
            source="MahmoodLab/UNI2-h (Hugging Face); timm vit_giant_patch14_224 with overrides",
            weights_description="pytorch_model.bin from https://huggingface.co/MahmoodLab/UNI2-h",
            reference="Chen et al., UNI, Nature Medicine 2024 (UNI2-h model card)",
        ),
        TimmSpec(
            "vit_giant_patch14_224",
            {
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "mlp_layer": SWIGLU_PACKED,
                "act_layer": SILU,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            "cls",
            "MahmoodLab/UNI2-h",
        ),
    ),
    (
        _info(
            "conch-v1.5",
            architecture="ViT-L/16 at 448 px with an attentional pooler (CoCa vision tower)",
            out_dim=768,
            input_size=448,
            interpolation="bilinear",
            license=NC_ND,
            source="MahmoodLab/conchv1_5 (Hugging Face); TRIDENT conchv1_5 vision tower",
            weights_description="pytorch_model_vision.bin from "
            "https://huggingface.co/MahmoodLab/conchv1_5",
            reference="Ding et al., TITAN (CONCH v1.5 is its patch encoder), 2024",
        ),
        TimmSpec(
            "vit_large_patch16_224",
            {
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1.0,
                "num_classes": 0,
                "global_pool": "",
                "dynamic_img_size": True,
            },
            "conch",
            "MahmoodLab/conchv1_5",
            file_names=("pytorch_model_vision.bin",),
        ),
    ),
    (
        _info(
            "virchow2",
            architecture="ViT-H/14 with 4 registers, SwiGLU (632M parameters)",
            out_dim=2560,
            license=NC_ND,
            source="paige-ai/Virchow2 (Hugging Face); timm vit_huge_patch14_224 with overrides",
            weights_description="pytorch_model.bin (or model.safetensors) from "
            "https://huggingface.co/paige-ai/Virchow2",
            reference="Zimmermann et al., Virchow2, arXiv:2408.00738 (2024)",
        ),
        TimmSpec(
            "vit_huge_patch14_224",
            {
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "reg_tokens": 4,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": SWIGLU_PACKED,
                "act_layer": SILU,
            },
            "cls+mean",
            "paige-ai/Virchow2",
        ),
    ),
    *(
        (
            _info(
                f"h-optimus-{version}",
                architecture="ViT-g/14 with 4 registers (1.1B parameters)",
                out_dim=1536,
                mean=HOPTIMUS_MEAN,
                std=HOPTIMUS_STD,
                license=licence,
                source=f"bioptimus/H-optimus-{version} (Hugging Face); "
                "timm vit_giant_patch14_reg4_dinov2",
                weights_description=f"pytorch_model.bin (or model.safetensors) from "
                f"https://huggingface.co/bioptimus/H-optimus-{version}",
                reference=f"Bioptimus, H-optimus-{version} model card (2024)",
            ),
            TimmSpec(
                "vit_giant_patch14_reg4_dinov2",
                {
                    "img_size": 224,
                    "init_values": 1e-5,
                    "num_classes": 0,
                    "global_pool": "token",
                    "dynamic_img_size": True,
                },
                "cls",
                f"bioptimus/H-optimus-{version}",
            ),
        )
        for version, licence in (
            ("0", "Apache-2.0"),
            ("1", "Bioptimus licence for H-optimus-1 (gated; see the model card)"),
        )
    ),
    (
        _info(
            "prov-gigapath",
            architecture="ViT-g with 16 px patches (tile encoder, 1.1B parameters)",
            out_dim=1536,
            license="Apache-2.0 (gated; see the model card)",
            source="prov-gigapath/prov-gigapath (Hugging Face); timm vit_giant_patch14_dinov2 "
            "with patch_size=16",
            weights_description="pytorch_model.bin from "
            "https://huggingface.co/prov-gigapath/prov-gigapath",
            reference="Xu et al., Prov-GigaPath, Nature 2024",
        ),
        TimmSpec(
            "vit_giant_patch14_dinov2",
            {
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            "cls",
            "prov-gigapath/prov-gigapath",
        ),
    ),
)

for _entry_info, _entry_spec in ENTRIES:
    _register(_entry_info, _entry_spec)

#: name -> spec, for documentation and tests
SPECS: dict[str, TimmSpec] = {i.name: s for i, s in ENTRIES}
