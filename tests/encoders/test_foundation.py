"""Foundation-model entries: metadata, clear errors without timm or weights, and the loading
logic exercised through a small stand-in for timm (the real one is not installable here)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oncoslide.encoders import create_encoder, encoder_info
from oncoslide.encoders.foundation import (
    SPECS,
    AttentionalPooler,
    ConchV15Encoder,
    build_backbone,
)
from oncoslide.errors import EncoderError

FOUNDATION = ("uni", "uni2-h", "conch-v1.5", "virchow2", "h-optimus-0", "h-optimus-1",
              "prov-gigapath")  # fmt: skip

# (out_dim, input_size, native µm/px) from the model cards
CARDS = {
    "uni": (1024, 224, 0.5),
    "uni2-h": (1536, 224, 0.5),
    "conch-v1.5": (768, 448, 0.5),
    "virchow2": (2560, 224, 0.5),
    "h-optimus-0": (1536, 224, 0.5),
    "h-optimus-1": (1536, 224, 0.5),
    "prov-gigapath": (1536, 224, 0.5),
}
# Hugging Face repositories the weights come from
REPOS = {
    "uni": "MahmoodLab/UNI",
    "uni2-h": "MahmoodLab/UNI2-h",
    "conch-v1.5": "MahmoodLab/conchv1_5",
    "virchow2": "paige-ai/Virchow2",
    "h-optimus-0": "bioptimus/H-optimus-0",
    "h-optimus-1": "bioptimus/H-optimus-1",
    "prov-gigapath": "prov-gigapath/prov-gigapath",
}


# ------------------------------------------------------------------------------ a stand-in timm

# embedding width of timm's architectures before keyword overrides
_TIMM_WIDTH = {
    "vit_large_patch16_224": 1024,
    "vit_huge_patch14_224": 1280,
    "vit_giant_patch14_224": 1408,
    "vit_giant_patch14_dinov2": 1536,
    "vit_giant_patch14_reg4_dinov2": 1536,
}


class _SwiGLUPacked(nn.Module):
    pass


class _PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int, img_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.grid_size = (img_size // patch, img_size // patch)


class TinyViT(nn.Module):
    """One linear 'block': enough to carry timm's token layout (class, registers, patches)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs
        width = kwargs.get("embed_dim", _TIMM_WIDTH[name])
        patch = kwargs.get("patch_size", 14 if "patch14" in name else 16)
        registers = kwargs.get("reg_tokens", 4 if "reg4" in name else 0)
        self.embed_dim = width
        self.num_prefix_tokens = 1 + registers
        self.patch_embed = _PatchEmbed(width, patch, kwargs.get("img_size", 224))
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.reg_token = nn.Parameter(torch.randn(1, registers, width)) if registers else None
        n = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        self.block = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        grid = self.patch_embed.grid_size[0]
        pos = self.pos_embed[:, 1:]
        if tokens.shape[1] != pos.shape[1]:  # dynamic_img_size: interpolate positions
            side = int(tokens.shape[1] ** 0.5)
            pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(side, side), mode="bilinear")
            pos = pos.flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(len(x), -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(len(x), -1, -1))
        tokens = torch.cat([*prefix, tokens + pos], dim=1)
        return self.norm(tokens + self.block(tokens))


def _resample(posemb: torch.Tensor, new_size: list[int], num_prefix_tokens: int, **_: Any):
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    side = int(grid.shape[1] ** 0.5)
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode="bilinear")
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    calls: list[tuple[str, dict[str, Any]]] = []

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> TinyViT:
        calls.append((name, {"pretrained": pretrained, **kwargs}))
        assert not name.startswith("hf"), "never a hub name"
        torch.manual_seed(0)
        return TinyViT(name, **kwargs)

    module = types.ModuleType("timm")
    module.create_model = create_model  # type: ignore[attr-defined]
    module.layers = types.SimpleNamespace(  # type: ignore[attr-defined]
        SwiGLUPacked=_SwiGLUPacked, resample_abs_pos_embed=_resample
    )
    module.calls = calls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", module)
    return module


@pytest.fixture
def no_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError


def _reference_state(name: str, timm: types.ModuleType) -> dict[str, torch.Tensor]:
    """What a released checkpoint holds: the state dict of the architecture the entry builds."""
    spec = SPECS[name]
    backbone = build_backbone(timm, spec)
    if spec.pooling == "conch":
        torch.manual_seed(1)
        return ConchV15Encoder(encoder_info(name), backbone).state_dict()
    return backbone.state_dict()


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize("name", FOUNDATION)
def test_metadata_matches_the_model_cards(name: str) -> None:
    info = encoder_info(name)
    assert (info.out_dim, info.input_size, info.native_mpp) == CARDS[name]
    assert info.requires == ("timm",)
    assert REPOS[name] in info.weights_description and SPECS[name].hf_repo == REPOS[name]
    assert len(info.mean) == len(info.std) == 3 and all(s > 0 for s in info.std)
    assert info.license and info.reference


def test_normalisation_constants() -> None:
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for name in ("uni", "uni2-h", "conch-v1.5", "virchow2", "prov-gigapath"):
        assert (encoder_info(name).mean, encoder_info(name).std) == imagenet
    for name in ("h-optimus-0", "h-optimus-1"):
        info = encoder_info(name)
        assert info.mean == (0.707223, 0.578729, 0.703617)
        assert info.std == (0.211883, 0.230117, 0.177517)


def test_timm_arguments_never_ask_for_pretrained_downloads() -> None:
    for spec in SPECS.values():
        assert "pretrained" not in spec.kwargs
        assert not spec.timm_name.startswith("hf")
        assert spec.kwargs.get("num_classes") == 0


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", FOUNDATION)
def test_without_timm_or_weights_one_error_lists_both(name: str, no_timm: None) -> None:
    with pytest.raises(EncoderError) as err:
        create_encoder(name)
    message = str(err.value)
    assert "pip install 'oncoslide[timm]'" in message
    assert REPOS[name] in message and "--weights" in message
    assert SPECS[name].file_names[0] in message


def test_without_timm_a_good_weights_file_still_needs_timm(tmp_path: Path, no_timm: None) -> None:
    path = _save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError) as err:
        create_encoder("uni", weights=path)
    message = str(err.value)
    assert "needs timm" in message and "oncoslide[timm]" in message
    assert "needs local weights" not in message and "does not exist" not in message


def test_missing_weights_with_timm_names_the_file(fake_timm: types.ModuleType) -> None:
    with pytest.raises(EncoderError, match=r"pytorch_model_vision\.bin.*MahmoodLab/conchv1_5"):
        create_encoder("conch-v1.5", weights="/nonexistent/pytorch_model_vision.bin")
    assert fake_timm.calls == []  # nothing built before the inputs are known to be there


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", FOUNDATION)
def test_builds_and_loads_with_the_declared_output(
    name: str, fake_timm: types.ModuleType, tmp_path: Path
) -> None:
    state = _reference_state(name, fake_timm)
    folder = tmp_path / name
    folder.mkdir()
    _save(state, folder / SPECS[name].file_names[0])
    encoder = create_encoder(name, weights=folder)  # a folder holding the file
    info = encoder_info(name)
    called_name, kwargs = fake_timm.calls[-1]
    assert called_name == SPECS[name].timm_name and kwargs["pretrained"] is False
    assert all(v not in ("timm.layers.SwiGLUPacked", "torch.nn.SiLU") for v in kwargs.values())
    images = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    features = encoder.encode(images)
    assert features.shape == (2, info.out_dim) and np.isfinite(features).all()
    loaded = encoder.state_dict()
    prefix = "" if SPECS[name].pooling == "conch" else "backbone."
    for key in list(state)[:3]:
        torch.testing.assert_close(loaded[prefix + key], state[key], rtol=0, atol=0)


def test_swiglu_layers_are_resolved_from_timm(fake_timm: types.ModuleType) -> None:
    for name in ("uni2-h", "virchow2"):
        backbone = build_backbone(fake_timm, SPECS[name])
        assert backbone.kwargs["mlp_layer"] is _SwiGLUPacked
        assert backbone.kwargs["act_layer"] is nn.SiLU


def test_virchow2_concatenates_class_token_and_patch_mean_without_registers(
    fake_timm: types.ModuleType, tmp_path: Path
) -> None:
    path = _save(_reference_state("virchow2", fake_timm), tmp_path / "pytorch_model.bin")
    encoder = create_encoder("virchow2", weights=path)
    x = encoder.preprocess(np.zeros((1, 224, 224, 3), dtype=np.uint8) + 200)
    with torch.inference_mode():
        tokens = encoder.backbone.forward_features(x)  # class, 4 registers, 256 patches
        features = encoder(x)
    assert tokens.shape == (1, 1 + 4 + 256, 1280)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(features, expected)


def test_strict_loading_lists_missing_and_unexpected_keys(
    fake_timm: types.ModuleType, tmp_path: Path
) -> None:
    state = _reference_state("uni", fake_timm)
    del state["norm.weight"]
    state["head.weight"] = torch.zeros(3, 1024)
    path = _save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError) as err:
        create_encoder("uni", weights=path)
    message = str(err.value)
    assert "1 missing: norm.weight" in message and "1 unexpected: head.weight" in message
    assert "MahmoodLab/UNI" in message


def test_conch_position_embedding_of_another_grid_is_resampled(
    fake_timm: types.ModuleType, tmp_path: Path
) -> None:
    state = _reference_state("conch-v1.5", fake_timm)
    assert state["trunk.pos_embed"].shape == (1, 1 + 14 * 14, 1024)
    state["trunk.pos_embed"] = torch.randn(1, 1 + 28 * 28, 1024)  # saved at 448 px
    path = _save(state, tmp_path / "pytorch_model_vision.bin")
    encoder = create_encoder("conch-v1.5", weights=path)
    assert encoder.state_dict()["trunk.pos_embed"].shape == (1, 1 + 14 * 14, 1024)
    torch.testing.assert_close(  # the class token's position is kept as is
        encoder.state_dict()["trunk.pos_embed"][:, 0], state["trunk.pos_embed"][:, 0]
    )


def test_attentional_pooler_with_constant_keys_averages_the_values() -> None:
    """Equal scores everywhere -> uniform attention -> the output is to_out(mean of values)."""
    torch.manual_seed(0)
    pooler = AttentionalPooler(d_model=16, context_dim=8, n_head=4, n_queries=2)
    with torch.no_grad():
        pooler.to_kv.weight[:16] = 0.0  # keys are all zero
    tokens = torch.randn(3, 10, 8)
    out = pooler(tokens)
    values = pooler.to_kv(pooler.ln_k(tokens))[..., 16:]
    expected = pooler.to_out(values.mean(dim=1, keepdim=True)).expand(-1, 2, -1)
    assert out.shape == (3, 2, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
