"""The feature contract a trained model keeps: what it compares and how it words a mismatch."""

from __future__ import annotations

import numpy as np

from oncoslide.features.schema import FeatureContract, PatchGrid, SlideFeatures


def _slide(encoder: str | None, dim: int, mpp: float | None) -> SlideFeatures:
    grid = None
    if mpp is not None:
        grid = PatchGrid(
            patch_size=224, patch_size_level0=448, target_mpp=mpp, level0_mpp=0.25,
            level0_width=4480, level0_height=4480,
        )  # fmt: skip
    return SlideFeatures(
        slide_id="s",
        features=np.zeros((3, dim), dtype=np.float32),
        coords=np.zeros((3, 2), dtype=np.int64),
        grid=grid,
        encoder=encoder,
        weights_fingerprint=None if encoder is None else f"{encoder}-w",
    )


def test_contract_names_both_sides_of_every_difference() -> None:
    model = FeatureContract.of(_slide("uni", 1024, 0.5))
    assert model.mismatches(FeatureContract.of(_slide("uni", 1024, 0.5))) == []
    assert model.mismatches(FeatureContract.of(_slide("uni", 1024, 0.505))) == []  # rounding
    problems = model.mismatches(FeatureContract.of(_slide("conch_v15", 768, 1.0)))
    text = " ".join(problems)
    assert len(problems) == 4  # dimension, encoder, weights, resolution
    for word in ("1024", "768", "uni", "conch_v15", "0.5", "1.0"):
        assert word in text


def test_unknown_values_are_not_compared_but_the_dimension_always_is() -> None:
    model = FeatureContract.of(_slide("uni", 1024, 0.5))
    bare = FeatureContract.of(_slide(None, 1024, None))  # e.g. TRIDENT .pt files
    assert model.mismatches(bare) == [] and bare.mismatches(model) == []
    assert "dimension" in model.mismatches(FeatureContract.of(_slide(None, 512, None)))[0]
    assert FeatureContract.from_dict(model.to_dict()) == model
