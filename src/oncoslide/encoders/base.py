"""The patch-encoder contract: metadata, preprocessing, strict weight loading, fingerprints.

A :class:`PatchEncoder` maps RGB patches to one feature vector each::

    encoder.preprocess(uint8 (B, H, W, 3)) -> float (B, 3, S, S)   # resize, scale, normalise
    encoder(x (B, 3, S, S)) -> (B, out_dim)                        # features in the model dtype
    encoder.encode(uint8 (B, H, W, 3)) -> float32 numpy (B, out_dim)

Weights are only ever read from local files, strictly: every parameter the model needs must be
in the file (or the entry must say explicitly which keys it ignores), otherwise an
:class:`~oncoslide.errors.EncoderError` lists what is missing or unexpected. Nothing is
downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from oncoslide.errors import EncoderError
from oncoslide.registry import Registry

#: Every registered encoder: name -> factory ``(weights: Path | None) -> PatchEncoder`` building
#: the encoder on the CPU in float32, with metadata ``info`` (an :class:`EncoderInfo`).
ENCODERS: Registry[PatchEncoder] = Registry("encoder")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FINGERPRINT_CHARS = 16  # hex characters of the sha256 kept: 64 bits, plenty to tell weights apart
_SHOWN_KEYS = 5  # key names quoted per category in a mismatch error

TIMM_INSTALL_HINT = (
    "install the torch build for your machine first (https://pytorch.org), "
    "then `pip install 'oncoslide[timm]'`"
)


@dataclass(frozen=True, kw_only=True)
class EncoderInfo:
    """What a patch encoder is, expects and produces.

    Attributes:
        name: registry name.
        architecture: human-readable architecture (e.g. "ViT-L/16").
        out_dim: feature dimension D.
        input_size: side S in pixels of the square input the network sees.
        mean, std: per-channel normalisation of 0-1 RGB input.
        native_mpp: micrometres per pixel of the images it was trained on (None: natural images).
        license: licence of the weights.
        source: where the weights and reference code come from.
        weights_description: what file the user must provide and where it comes from (or
            "packaged" when the weights ship with a package).
        requires: optional Python packages needed beyond oncoslide's core dependencies.
        interpolation: resampling used when a patch is not ``input_size`` px ("bilinear"/"bicubic").
        half_dtype: reduced precision used on GPU ("float16" or "bfloat16", as upstream uses).
        reference: paper or model card.
    """

    name: str
    architecture: str
    out_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_mpp: float | None
    license: str
    source: str
    weights_description: str
    requires: tuple[str, ...] = ()
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    half_dtype: Literal["float16", "bfloat16"] = "float16"
    reference: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), e.g. for JSON or a table."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


class PatchEncoder(nn.Module):
    """Base class of every encoder: subclasses implement :meth:`features`.

    ``forward`` moves its input to the encoder's device, dtype and memory format first, so the
    float32 CPU tensor from :meth:`preprocess` can be passed as is.
    """

    def __init__(self, info: EncoderInfo) -> None:
        super().__init__()
        self.info = info
        self.channels_last = False
        self._fingerprint: str | None = None

    # -- what subclasses provide --------------------------------------------------------------

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) normalised input in the model dtype -> (B, out_dim)."""
        raise NotImplementedError

    def optimize_for_inference(self) -> None:
        """Rewrite the network for inference with the same outputs (e.g. fold batch norms).

        Called by ``create_encoder`` after the weights fingerprint is read; a no-op unless a
        subclass knows better. The model cannot be trained afterwards.
        """

    # -- the contract -------------------------------------------------------------------------

    @property
    def weights_fingerprint(self) -> str:
        """Short sha256 of the weights (fixed when first read; ``create_encoder`` reads it
        before any dtype cast, so it does not depend on device or precision)."""
        if self._fingerprint is None:
            self._fingerprint = state_dict_fingerprint(self.state_dict())
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return _first_tensor(self).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_tensor(self).dtype

    def preprocess(self, images: np.ndarray, device: torch.device | str | None = None) -> Tensor:
        """uint8 RGB patches (B, H, W, 3) -> float32 (B, 3, S, S), resized and normalised.

        The uint8 data is moved to ``device`` (default: the encoder's) before any arithmetic,
        so on a GPU the transfer is 4x smaller and resizing runs there.
        """
        return preprocess_images(images, self.info, self.device if device is None else device)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) preprocessed patches -> (B, out_dim) features in the model dtype."""
        size = self.info.input_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (size, size):
            raise EncoderError(
                f"encoder {self.info.name!r} takes (B, 3, {size}, {size}) input, got "
                f"{tuple(x.shape)}; use encoder.preprocess(images) first"
            )
        return self.features(self.prepare_input(x))

    def prepare_input(self, x: Tensor) -> Tensor:
        """``x`` on the encoder's device, in its dtype and memory format."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(device=self.device, dtype=self.dtype, memory_format=memory_format)

    def encode(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 RGB patches (B, H, W, 3) -> float32 numpy (B, out_dim), in eval mode, no grad."""
        images = check_images(images, self.info.name)
        step = max(1, batch_size or len(images))
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                chunks = [
                    self(self.preprocess(images[i : i + step])).float().cpu().numpy()
                    for i in range(0, len(images), step)
                ]
        finally:
            self.train(was_training)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def extra_repr(self) -> str:
        i = self.info
        return f"name={i.name!r}, out_dim={i.out_dim}, input_size={i.input_size}"


def fold_batch_norms(pairs: Iterable[tuple[nn.Module, str, str]]) -> list[nn.Conv2d]:
    """Fold each (owner.conv_name, owner.bn_name) batch norm into its convolution, in eval mode.

    The batch norm becomes an identity and the convolution gets the folded weights and bias
    (``torch.nn.utils.fusion``). Returns the new convolutions.
    """
    fused: list[nn.Conv2d] = []
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            new = fuse_conv_bn_eval(conv, bn)
            setattr(owner, conv_name, new)
            setattr(owner, bn_name, nn.Identity())
            fused.append(new)
    return fused


def _first_tensor(module: nn.Module) -> Tensor:
    for parameter in module.parameters():
        return parameter
    for buffer in module.buffers():
        return buffer
    return torch.empty(0)


# ------------------------------------------------------------------------------ preprocessing


def check_images(images: object, name: str) -> np.ndarray:
    """The patches as a uint8 (B, H, W, 3) array, or an EncoderError saying what is wrong."""
    if not isinstance(images, np.ndarray):
        raise EncoderError(
            f"encoder {name!r}: patches must be a numpy array, got {type(images).__name__}"
        )
    problems = []
    if images.dtype != np.uint8:
        problems.append(f"dtype must be uint8 (0-255 RGB), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        problems.append(f"shape must be (B, H, W, 3), got {images.shape}")
    elif min(images.shape[:3]) == 0:
        problems.append(f"empty batch or patch, shape {images.shape}")
    if problems:
        raise EncoderError(f"encoder {name!r}: bad patches: " + "; ".join(problems))
    return images


def preprocess_images(
    images: np.ndarray, info: EncoderInfo, device: torch.device | str = "cpu"
) -> Tensor:
    """Resize (antialiased) to ``info.input_size``, scale to 0-1 and normalise with mean/std."""
    images = check_images(images, info.name)
    if not images.flags.writeable:  # torch.from_numpy warns on read-only memory
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    size = info.input_size
    if tuple(x.shape[-2:]) != (size, size):
        # antialias: a downscaled patch must average its pixels, not skip them (aliasing)
        x = F.interpolate(
            x, size=(size, size), mode=info.interpolation, antialias=True, align_corners=False
        )
        if info.interpolation == "bicubic":
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots at edges
    mean = torch.tensor(info.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


# ------------------------------------------------------------------------------ fingerprints


def state_dict_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


# ------------------------------------------------------------------------------ weights


def resolve_weights_path(
    weights: str | os.PathLike[str] | None, name: str, file_names: Iterable[str], hint: str
) -> Path:
    """The weights file: ``weights`` itself, or the first of ``file_names`` inside a folder.

    ``hint`` says what to download and from where; it ends every error message.
    """
    if weights is None:
        raise EncoderError(f"encoder {name!r} needs local weights: {hint}")
    path = Path(weights).expanduser()
    if path.is_dir():
        names = list(file_names)
        for file_name in names:
            if (path / file_name).is_file():
                return path / file_name
        raise EncoderError(
            f"encoder {name!r}: the folder {path} holds none of {', '.join(names)}; {hint}"
        )
    if not path.is_file():
        raise EncoderError(f"encoder {name!r}: weights file {path} does not exist; {hint}")
    return path


def read_state_dict(path: Path, name: str, hint: str) -> dict[str, Tensor]:
    """Tensors of a .safetensors / .bin / .pth / .pt file, read on the CPU without pickle code.

    A checkpoint that wraps its weights (``{"state_dict": ...}``, ``{"model": ...}``) is
    unwrapped; anything else that is not a flat name -> tensor mapping is an error.
    """
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise EncoderError(
                f"encoder {name!r}: reading {path.name} needs safetensors: pip install safetensors"
            ) from None
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # corrupt or truncated file
            raise EncoderError(f"encoder {name!r}: cannot read {path}: {exc}; {hint}") from None
    try:
        obj = _torch_load(path)
    except Exception as exc:  # not a torch file, truncated, or pickled code (refused)
        raise EncoderError(f"encoder {name!r}: cannot read {path}: {exc}; {hint}") from None
    return _unwrap_state_dict(obj, path, name, hint)


def _torch_load(path: Path) -> Any:
    try:  # memory-map: a multi-GB checkpoint is not held twice in RAM while loading
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # only legacy (pre-zip) files cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap_state_dict(obj: Any, path: Path, name: str, hint: str) -> dict[str, Tensor]:
    for _ in range(3):  # at most a few levels of {"state_dict": {"model": ...}}
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model", "module") if k in obj), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise EncoderError(
        f"encoder {name!r}: {path} does not hold a state dict (name -> tensor); {hint}"
    )


def load_weights_strict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    name: str,
    hint: str,
    *,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or misshapen key is an error.

    Keys starting with one of ``ignore_prefixes`` are dropped first (e.g. a classifier the
    encoder does not use). BatchNorm ``num_batches_tracked`` counters may be absent (old
    torchvision files predate them; they do not affect inference).
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = [
        _few(what, keys)
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", misshapen),
        )
        if keys
    ]
    if problems:
        raise EncoderError(
            f"encoder {name!r}: the weights do not match the architecture "
            f"({'; '.join(problems)}). Is this the right file? {hint}"
        )
    module.load_state_dict(state, strict=False)  # completeness was checked above


def _few(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} {what}: {shown}{more}"


def resolution_warning(info: EncoderInfo, target_mpp: float, rel_tol: float = 0.1) -> str | None:
    """A sentence when ``target_mpp`` is far (> ``rel_tol``) from the encoder's native µm/px."""
    if info.native_mpp is None:
        return None
    if abs(target_mpp - info.native_mpp) <= rel_tol * info.native_mpp:
        return None
    return (
        f"encoder {info.name!r} was trained on patches at {info.native_mpp} µm/px; extracting at "
        f"{target_mpp} µm/px gives features it has not seen (pass target_mpp={info.native_mpp})"
    )
