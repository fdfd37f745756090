"""Tiling: grid geometry in level-0 pixels, exact tissue fractions, and the preview image."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oncoslide.errors import ConfigError, SlideError
from oncoslide.features import PatchGrid
from oncoslide.slides import (
    SlideInfo,
    TilingConfig,
    TissueMask,
    detect_tissue,
    open_slide,
    render_preview,
    tile_slide,
)
from oncoslide.slides.tiling import grid_sizes


def make_info(width: int, height: int, mpp: float) -> SlideInfo:
    return SlideInfo(
        path=f"/slides/s_{width}x{height}.tif",
        slide_id=f"s_{width}x{height}",
        backend="tiffslide",
        vendor=None,
        level0_mpp=mpp,
        mpp_source="metadata",
        width=width,
        height=height,
        level_count=1,
        level_dimensions=((width, height),),
        level_downsamples=(1.0,),
        objective_power=None,
    )


def full_mask(info: SlideInfo, downsample: float) -> TissueMask:
    shape = (round(info.height / downsample), round(info.width / downsample))
    return TissueMask(
        mask=np.ones(shape, bool), mpp=info.level0_mpp * downsample, downsample=downsample
    )


def grid_count(extent: int, patch: int, stride: int) -> int:
    return 0 if extent < patch else (extent - patch) // stride + 1


# --------------------------------------------------------------------------- the real slide


@pytest.fixture(scope="module")
def real(svs_path: Path):
    with open_slide(svs_path) as slide:
        mask = detect_tissue(slide)
        thumbnail, _ = slide.thumbnail(8.0)
        return slide.info, mask, thumbnail


def test_real_slide_patches_lie_on_the_grid_inside_and_on_tissue(real) -> None:
    info, mask, _ = real
    tiles = tile_slide(info, mask, TilingConfig(target_mpp=0.5, patch_size=224))
    grid = tiles.grid
    assert isinstance(grid, PatchGrid)
    # round(224 x 0.5 / 0.499) = round(224.45) = 224
    assert grid.patch_size_level0 == 224 and tiles.stride_level0 == 224
    assert (grid.patch_size, grid.target_mpp, grid.level0_mpp) == (224, 0.5, 0.499)
    assert (grid.level0_width, grid.level0_height, grid.overlap) == (2220, 2967, 0)
    coords = tiles.coords
    assert coords.dtype == np.int64 and coords.shape == (len(tiles), 2)
    assert 30 <= len(tiles) <= 90  # 9 x 13 = 117 grid positions, about 40% on tissue
    assert (coords >= 0).all()
    assert (coords[:, 0] + 224 <= info.width).all() and (coords[:, 1] + 224 <= info.height).all()
    assert (coords % 224 == 0).all()
    assert (tiles.tissue_fraction >= 0.25).all()

    # brute force: sample every level-0 pixel centre of every grid patch in the mask
    sx, sy = mask.shape[1] / info.width, mask.shape[0] / info.height
    kept = {tuple(c) for c in coords.tolist()}
    centres = np.arange(224) + 0.5
    for y in range(0, info.height - 223, 224):
        rows = ((y + centres) * sy).astype(int)
        for x in range(0, info.width - 223, 224):
            cols = ((x + centres) * sx).astype(int)
            fraction = mask.mask[np.ix_(rows, cols)].mean()
            if abs(fraction - 0.25) > 0.02:  # away from the threshold the decision is clear
                assert ((x, y) in kept) == (fraction >= 0.25), (x, y, fraction)


def test_real_slide_rows_are_ordered(real) -> None:
    info, mask, _ = real
    coords = tile_slide(info, mask, TilingConfig()).coords
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(coords)))


# -------------------------------------------------------------------------- grid geometry


@pytest.mark.parametrize(
    ("patch", "target", "level0", "expected"),
    [
        (224, 0.5, 0.499, 224),  # 224.45 -> 224
        (224, 0.5, 0.25, 448),
        (224, 0.5, 0.2527, 443),  # 443.2 -> 443
        (256, 1.0, 0.2457, 1042),  # 1041.9 -> 1042
        (5, 0.625, 0.25, 13),  # 12.5: halves round up (Python's round would give 12)
        (224, 0.49, 0.499, 224),  # within 2% of level 0: the target counts as level 0
    ],
)
def test_patch_size_level0_rounding(patch: int, target: float, level0: float, expected: int):
    info = make_info(5000, 5000, level0)
    size, stride = grid_sizes(info, TilingConfig(target_mpp=target, patch_size=patch))
    assert size == expected and stride == expected


def test_target_finer_than_level0_is_refused() -> None:
    info = make_info(1000, 1000, 0.5)
    with pytest.raises(SlideError, match="finer than level 0"):
        tile_slide(info, full_mask(info, 16), TilingConfig(target_mpp=0.25))


@pytest.mark.parametrize(
    ("width", "height", "mpp", "config"),
    [
        (2220, 2967, 0.499, TilingConfig()),
        (2220, 2967, 0.499, TilingConfig(overlap=56)),
        (10_001, 7_777, 0.25, TilingConfig(target_mpp=0.5, patch_size=256, overlap=32)),
        (3000, 400, 0.2527, TilingConfig(target_mpp=1.0, patch_size=128)),
        (100, 100, 0.5, TilingConfig()),  # smaller than one patch
    ],
)
def test_full_mask_with_no_minimum_gives_the_whole_grid(width, height, mpp, config) -> None:
    info = make_info(width, height, mpp)
    config = TilingConfig(
        target_mpp=config.target_mpp,
        patch_size=config.patch_size,
        overlap=config.overlap,
        min_tissue_fraction=0.0,
    )
    tiles = tile_slide(info, full_mask(info, 16.0), config)
    scale = config.target_mpp / mpp
    patch = int(np.floor(config.patch_size * scale + 0.5))
    stride = int(np.floor((config.patch_size - config.overlap) * scale + 0.5))
    expected = grid_count(width, patch, stride) * grid_count(height, patch, stride)
    assert len(tiles) == expected
    if expected:
        assert tiles.coords[:, 0].max() + patch <= width
        assert tiles.coords[:, 1].max() + patch <= height
        np.testing.assert_allclose(tiles.tissue_fraction, 1.0, atol=1e-9)


def test_overlap_changes_the_stride() -> None:
    info = make_info(2220, 2967, 0.499)
    mask = full_mask(info, 16.0)
    plain = tile_slide(info, mask, TilingConfig(min_tissue_fraction=0))
    overlapping = tile_slide(info, mask, TilingConfig(overlap=112, min_tissue_fraction=0))
    xs = np.unique(overlapping.coords[:, 0])
    # (224 - 112) x 0.5 / 0.499 = 112.2 -> 112 level-0 px
    assert overlapping.stride_level0 == 112
    assert set(np.diff(xs).tolist()) == {112}
    assert set(np.diff(np.unique(plain.coords[:, 0])).tolist()) == {224}
    assert overlapping.grid.overlap == 112 and overlapping.grid.patch_size_level0 == 224
    assert len(overlapping) == grid_count(2220, 224, 112) * grid_count(2967, 224, 112)


def test_tissue_fractions_are_exact_for_the_mask() -> None:
    # integer downsample 4: the mask upsampled with np.kron is the exact level-0 picture
    rng = np.random.default_rng(7)
    grid = rng.uniform(size=(50, 60)) > 0.6
    info = make_info(240, 200, 1.0)
    mask = TissueMask(mask=grid, mpp=4.0, downsample=4.0)
    level0 = np.kron(grid, np.ones((4, 4), bool))
    config = TilingConfig(target_mpp=1.0, patch_size=10, overlap=3, min_tissue_fraction=0.0)
    tiles = tile_slide(info, mask, config)
    assert len(tiles) == grid_count(240, 10, 7) * grid_count(200, 10, 7)
    for (x, y), fraction in zip(tiles.coords.tolist(), tiles.tissue_fraction, strict=True):
        assert fraction == pytest.approx(level0[y : y + 10, x : x + 10].mean(), abs=1e-9)
    # and the threshold keeps exactly the patches at or above it
    half = tile_slide(info, mask, TilingConfig(target_mpp=1.0, patch_size=10, overlap=3))
    expected = (tiles.tissue_fraction >= 0.25 - 1e-9).sum()
    assert len(half) == expected


def test_empty_mask_gives_no_patches() -> None:
    info = make_info(2000, 1000, 0.5)
    empty = TissueMask(mask=np.zeros((62, 125), bool), mpp=8.0, downsample=16.0)
    tiles = tile_slide(info, empty, TilingConfig())
    assert len(tiles) == 0
    assert tiles.coords.shape == (0, 2) and tiles.coords.dtype == np.int64
    assert tiles.tissue_fraction.shape == (0,)


def test_mask_that_does_not_cover_the_slide_is_refused() -> None:
    info = make_info(2000, 1000, 0.5)
    half = TissueMask(mask=np.ones((125, 125), bool), mpp=8.0, downsample=16.0)
    with pytest.raises(ConfigError, match="does not cover"):
        tile_slide(info, half, TilingConfig())


def test_invalid_tiling_settings_are_all_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        TilingConfig(target_mpp=0, patch_size=64, overlap=64, min_tissue_fraction=1.5)
    message = str(caught.value)
    assert "target_mpp" in message and "overlap" in message and "min_tissue_fraction" in message


# ------------------------------------------------------------------------------ the preview


def test_preview_outlines_patches_and_tissue(real, tmp_path: Path) -> None:
    info, mask, thumbnail = real
    tiles = tile_slide(info, mask, TilingConfig())
    path = render_preview(thumbnail, mask, tiles, tmp_path / "thumbnails" / "cmu.png")
    with Image.open(path) as image:
        preview = np.asarray(image.convert("RGB")).astype(int)
    assert preview.shape == thumbnail.shape
    changed = np.abs(preview - thumbnail).sum(axis=2) > 0
    # inside the first kept patch (away from its outline) the pixels are tinted
    sx = thumbnail.shape[1] / info.width
    x, y = tiles.coords[0]
    inner = changed[
        int((y + 40) * sx) : int((y + 180) * sx), int((x + 40) * sx) : int((x + 180) * sx)
    ]
    assert inner.mean() > 0.9
    # far from patches and tissue (the glass in the top-left corner of the grid) nothing changed
    covered = np.zeros(changed.shape, bool)
    for cx, cy in tiles.coords.tolist():
        covered[
            int(cy * sx) : int((cy + 224) * sx) + 2, int(cx * sx) : int((cx + 224) * sx) + 2
        ] = True
    assert changed[~covered & ~_near(mask, thumbnail.shape[:2])].mean() < 0.01
    assert [p.name for p in path.parent.iterdir()] == ["cmu.png"]


def _near(mask: TissueMask, shape: tuple[int, int]) -> np.ndarray:
    """Thumbnail pixels within 3 px of tissue (where the outline may be drawn)."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(mask.mask, iterations=3)
    return np.asarray(Image.fromarray(grown).resize(shape[::-1], Image.Resampling.NEAREST))


def test_preview_is_fast_with_many_patches(tmp_path: Path) -> None:
    info = make_info(80_000, 60_000, 0.25)
    mask = full_mask(info, 32.0)  # 8 µm/px
    tiles = tile_slide(info, mask, TilingConfig(min_tissue_fraction=0))
    assert len(tiles) > 20_000
    thumbnail = np.full((*mask.shape, 3), 240, np.uint8)
    started = time.perf_counter()
    render_preview(thumbnail, mask, tiles, tmp_path / "big.png")
    assert time.perf_counter() - started < 3.0
