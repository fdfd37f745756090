"""resnet50-trunc: our ResNet-50 trunk loads torchvision-format state dicts strictly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oncoslide.encoders import ENCODERS, create_encoder
from oncoslide.encoders.resnet import ResNet50TruncEncoder, ResNet50Trunk
from oncoslide.errors import EncoderError

# torchvision's ResNet-50 has 25,557,032 parameters, of which layer4 holds 14,964,736 and the
# fc classifier 2,049,000: the trunk up to layer3 must hold the rest.
RESNET50_PARAMS, LAYER4_PARAMS, FC_PARAMS = 25_557_032, 14_964_736, 2_049_000


def _torchvision_state(seed: int = 0, *, with_counters: bool = False) -> dict[str, torch.Tensor]:
    """A random full ResNet-50 state dict in torchvision's key layout (layer4 and fc included).

    Old torchvision files (resnet50-19c8e357.pth) have no ``num_batches_tracked`` entries.
    """
    torch.manual_seed(seed)
    trunk = ResNet50Trunk()
    for module in trunk.modules():  # non-trivial BN statistics, as in trained weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {
        k: v.clone()
        for k, v in trunk.state_dict().items()
        if with_counters or not k.endswith("num_batches_tracked")
    }
    state["layer4.0.conv1.weight"] = torch.randn(512, 1024, 1, 1)
    state["layer4.2.bn3.running_var"] = torch.ones(2048)
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    """Like the real resnet50-19c8e357.pth: legacy (pre-zip) serialisation, no BN counters."""
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(_torchvision_state(), path, _use_new_zipfile_serialization=False)
    return path


def test_trunk_has_resnet50_minus_layer4_and_fc_parameters() -> None:
    n = sum(p.numel() for p in ResNet50Trunk().parameters())
    assert n == RESNET50_PARAMS - LAYER4_PARAMS - FC_PARAMS


def test_trunk_uses_torchvision_key_names() -> None:
    keys = set(ResNet50Trunk().state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer2.3.conv3.weight",
        "layer3.5.bn3.running_mean",
    ):
        assert key in keys
    assert not any(k.startswith(("layer4", "fc")) for k in keys)


def test_loads_a_torchvision_file_and_gives_1024_features(weights_file: Path) -> None:
    encoder = create_encoder("resnet50-trunc", weights=weights_file, channels_last=False)
    assert isinstance(encoder, ResNet50TruncEncoder)
    state = torch.load(weights_file, weights_only=True)
    loaded = ENCODERS.create("resnet50-trunc", weights=weights_file)  # before the BN folding
    for key in ("conv1.weight", "layer3.5.bn3.running_var", "layer2.0.downsample.0.weight"):
        torch.testing.assert_close(loaded.trunk.state_dict()[key], state[key], rtol=0, atol=0)
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    features = encoder.encode(images)
    assert features.shape == (2, 1024) and features.dtype == np.float32
    # the features are the spatial mean of layer3, which sits at 1/16 of the input (14 x 14)
    with torch.inference_mode():
        maps = encoder.trunk(encoder.preprocess(images))
    assert maps.shape == (2, 1024, 14, 14)
    np.testing.assert_allclose(features, maps.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_fingerprint_depends_on_the_trunk_weights_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    state = _torchvision_state(seed=1, with_counters=True)
    torch.save(state, a)
    state["fc.bias"] += 1.0  # an ignored layer changes: same trunk, same fingerprint
    torch.save(state, b)
    fa = create_encoder("resnet50-trunc", weights=a).weights_fingerprint
    assert fa == create_encoder("resnet50-trunc", weights=b).weights_fingerprint
    state["layer1.0.conv1.weight"] += 1e-3
    torch.save(state, b)
    assert fa != create_encoder("resnet50-trunc", weights=b).weights_fingerprint


def test_key_mismatches_are_listed(tmp_path: Path) -> None:
    state = _torchvision_state()
    del state["layer3.5.conv3.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(EncoderError) as err:
        create_encoder("resnet50-trunc", weights=path)
    message = str(err.value)
    assert "1 missing: layer3.5.conv3.weight" in message
    assert "1 unexpected: layer5.0.conv1.weight" in message
    assert "wrong shape: conv1.weight (64, 3, 3, 3) (model: (64, 3, 7, 7))" in message
    assert "layer4" not in message and "fc." not in message  # ignored on purpose


def test_many_missing_keys_are_summarised(tmp_path: Path) -> None:
    state = {k: v for k, v in _torchvision_state().items() if not k.startswith("layer3")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(EncoderError, match=r"\d+ missing: layer3\.0\..* and \d+ more"):
        create_encoder("resnet50-trunc", weights=path)


def test_weights_are_required_and_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match=r"resnet50-19c8e357\.pth.*--weights"):
        create_encoder("resnet50-trunc")
    with pytest.raises(EncoderError, match="does not exist"):
        create_encoder("resnet50-trunc", weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="cannot read"):
        create_encoder("resnet50-trunc", weights=garbage)
    with pytest.raises(EncoderError, match="holds none of"):
        create_encoder("resnet50-trunc", weights=tmp_path)  # a folder without a known file
    not_a_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state)
    with pytest.raises(EncoderError, match="does not hold a state dict"):
        create_encoder("resnet50-trunc", weights=not_a_state)


def test_a_folder_with_the_torchvision_file_is_accepted(weights_file: Path) -> None:
    encoder = create_encoder("resnet50-trunc", weights=weights_file.parent)
    assert encoder.info.out_dim == 1024
