"""``resnet50-trunc``: CLAM's truncated ResNet-50 (conv1 .. layer3, global average pool, 1024-d).

The network is written here in plain torch (standard ResNet-50 v1.5 bottlenecks: the stride
sits on the 3x3 convolution), so it needs neither torchvision nor timm. Its parameter names
follow torchvision, so a torchvision or timm ImageNet ResNet-50 state dict loads directly; the
``layer4.*`` and ``fc.*`` entries of such a file are dropped on purpose (the trunk ends at
layer3), every other key must match exactly.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from oncoslide.encoders.base import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderInfo,
    PatchEncoder,
    fold_batch_norms,
    load_weights_strict,
    read_state_dict,
    resolve_weights_path,
)

#: Keys of a full ResNet-50 checkpoint that the truncated trunk deliberately does not use.
IGNORED_PREFIXES = ("layer4.", "fc.")
_LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 2))  # (width, blocks, stride) of layer1..layer3
_EXPANSION = 4

RESNET50_TRUNC_INFO = EncoderInfo(
    name="resnet50-trunc",
    architecture="ResNet-50 truncated after layer3 (CNN, 8.5M parameters used)",
    out_dim=1024,
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    native_mpp=None,
    license="BSD-3-Clause (torchvision ImageNet weights)",
    source="torchvision ResNet-50 ImageNet-1k weights, truncated as in CLAM (mahmoodlab/CLAM)",
    weights_description=(
        "a torchvision-format ResNet-50 state dict, e.g. torchvision's resnet50-19c8e357.pth "
        "(IMAGENET1K_V1, the one CLAM uses) or pytorch_model.bin from timm/resnet50.tv_in1k"
    ),
    requires=(),
    interpolation="bilinear",
    half_dtype="float16",
    reference="Lu et al., CLAM, Nature Biomedical Engineering 2021; He et al., CVPR 2016",
)

_HINT = (
    "resnet50-trunc needs a torchvision-format ResNet-50 state dict (keys conv1.weight, "
    "layer1.0.conv1.weight, ...), e.g. resnet50-19c8e357.pth from download.pytorch.org or "
    "pytorch_model.bin from timm/resnet50.tv_in1k; pass --weights /path/to/that/file"
)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, plus a projected shortcut where shapes change."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * _EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


def _layer(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` bottlenecks; the first one changes the stride and the channel count."""
    first = Bottleneck(in_channels, width, stride)
    rest = [Bottleneck(width * _EXPANSION, width, 1) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


class ResNet50Trunk(nn.Module):
    """ResNet-50 stem and layer1..layer3 (output: 1024 channels at 1/16 resolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        (w1, n1, s1), (w2, n2, s2), (w3, n3, s3) = _LAYERS
        self.layer1 = _layer(64, w1, n1, s1)
        self.layer2 = _layer(w1 * _EXPANSION, w2, n2, s2)
        self.layer3 = _layer(w2 * _EXPANSION, w3, n3, s3)
        self.out_channels = w3 * _EXPANSION
        self._init_weights()

    def _init_weights(self) -> None:
        # a defined random state (He init, unit BN), so an untrained trunk is still well scaled
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class ResNet50TruncEncoder(PatchEncoder):
    """Truncated ResNet-50; features are the spatial mean of layer3 (1024-d)."""

    def __init__(self, trunk: ResNet50Trunk | None = None) -> None:
        super().__init__(RESNET50_TRUNC_INFO)
        self.trunk = trunk if trunk is not None else ResNet50Trunk()

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.trunk(x).mean(dim=(2, 3), keepdim=True), 1)

    def optimize_for_inference(self) -> None:
        """Fold every batch norm into its convolution (same outputs to float rounding)."""
        trunk = self.trunk
        pairs: list[tuple[nn.Module, str, str]] = [(trunk, "conv1", "bn1")]
        for layer in (trunk.layer1, trunk.layer2, trunk.layer3):
            for block in layer:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                downsample = block.downsample
                if isinstance(downsample, nn.Module):
                    pairs.append((downsample, "0", "1"))
        fold_batch_norms(pairs)


@ENCODERS.register("resnet50-trunc", info=RESNET50_TRUNC_INFO)
def resnet50_trunc(weights: str | os.PathLike[str] | None = None) -> ResNet50TruncEncoder:
    """CLAM's truncated ResNet-50 with a local torchvision-format ImageNet state dict."""
    name = RESNET50_TRUNC_INFO.name
    path = resolve_weights_path(
        weights, name, ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth", "pytorch_model.bin",
                        "model.safetensors"), _HINT
    )  # fmt: skip
    trunk = ResNet50Trunk()
    state = read_state_dict(path, name, _HINT)
    load_weights_strict(trunk, state, name, _HINT, ignore_prefixes=IGNORED_PREFIXES)
    return ResNet50TruncEncoder(trunk)
