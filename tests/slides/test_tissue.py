"""Tissue detection: the real slide, and synthetic images with planted tissue, ink and holes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from oncoslide.errors import ConfigError
from oncoslide.slides import (
    TissueConfig,
    TissueMask,
    detect_tissue,
    detect_tissue_rgb,
    open_slide,
)

MPP = 8.0  # µm per pixel of the synthetic images: one pixel is 64 µm²
GLASS = (243, 242, 245)
EOSIN, HAEMATOXYLIN = (235, 160, 200), (120, 70, 150)


def glass(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A blank slide: near-white with a little sensor noise."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 2, size=(*shape, 3))
    return np.clip(np.array(GLASS) + noise, 0, 255).astype(np.uint8)


def paint_tissue(image: np.ndarray, where: np.ndarray, seed: int = 1) -> None:
    """H&E-like texture (a random mix of eosin and haematoxylin) on the pixels in ``where``."""
    rng = np.random.default_rng(seed)
    mix = rng.uniform(0, 1, size=(*image.shape[:2], 1))
    colours = mix * np.array(EOSIN) + (1 - mix) * np.array(HAEMATOXYLIN)
    colours += rng.normal(0, 6, size=colours.shape)
    image[where] = np.clip(colours[where], 0, 255).astype(np.uint8)


def disk_mask(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def polygon_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


# ------------------------------------------------------------------------------ the real slide


def test_real_slide_tissue(svs_path: Path, svs_pixels: np.ndarray) -> None:
    with open_slide(svs_path) as slide:
        mask = detect_tissue(slide)
    assert mask.shape == (185, 138)  # the 8 µm/px thumbnail
    assert mask.mpp == pytest.approx(8.0, rel=0.01)
    assert mask.downsample == pytest.approx(2220 / 138)
    # looking at the slide: a strip of skin over roughly 35-40% of the field
    assert 0.30 < mask.tissue_fraction < 0.45
    # an independent estimate: 16 x 16 blocks of level 0 whose mean colour is not grey
    h, w = 2967 // 16 * 16, 2220 // 16 * 16
    blocks = svs_pixels[:h, :w].reshape(h // 16, 16, w // 16, 16, 3).mean(axis=(1, 3))
    coloured = (blocks.max(axis=2) - blocks.min(axis=2) > 15).mean()
    # the mask also closes small gaps and fills small holes, so it is a little larger
    assert coloured - 0.01 < mask.tissue_fraction < coloured + 0.05
    # places checked by eye on the thumbnail (level-0 px -> mask px)
    d = mask.downsample
    assert mask.mask[int(2400 / d), int(1000 / d)]  # dermis, lower middle
    assert not mask.mask[int(2400 / d), int(300 / d)]  # glass, lower left
    assert not mask.mask[int(300 / d), int(2000 / d)]  # glass, upper right
    # the mask's last row reaches past the slide (185 x 16.09 > 2967 px): polygons stay inside
    assert mask.shape[0] * d > 2967 and mask.extent == (2220.0, 2967.0)
    rings = np.concatenate(mask.contours())
    assert rings[:, 0].min() >= 0 and rings[:, 0].max() <= 2220
    assert rings[:, 1].min() >= 0 and rings[:, 1].max() <= 2967


# ---------------------------------------------------------------------------- synthetic images


def test_blank_slide_has_no_tissue() -> None:
    for image in (glass((200, 160)), np.full((50, 60, 3), 255, np.uint8)):
        mask = detect_tissue_rgb(image, MPP)
        assert mask.tissue_fraction == 0.0
        assert mask.contours() == []
        assert mask.geojson()["features"] == []
    # a tinted but uniform glass is not tissue either: the saturation floor holds
    tinted = glass((100, 100)).astype(int) + np.array([-6, -2, 0])
    assert detect_tissue_rgb(tinted.clip(0, 255).astype(np.uint8), MPP).tissue_fraction == 0.0


def test_planted_tissue_is_found() -> None:
    image = glass((200, 200))
    truth = disk_mask((200, 200), (100, 100), 60)
    paint_tissue(image, truth)
    mask = detect_tissue_rgb(image, MPP)
    agree = (mask.mask == truth).mean()
    assert agree > 0.99
    assert mask.tissue_fraction == pytest.approx(truth.mean(), rel=0.03)


def draw_strokes(image: np.ndarray) -> dict[str, np.ndarray]:
    """Thick pen strokes (~100 µm wide); returns where each ink went."""
    where = {}
    strokes = {
        "blue": ((40, 20, 40, 60, 260, 280, 260, 300), (40, 60, 170)),
        "green": ((20, 250, 150, 270), (30, 140, 60)),
        "black": ((200, 20, 280, 60), (35, 35, 38)),
        "red": ((240, 200, 290, 260), (200, 30, 40)),
    }
    for name, (points, colour) in strokes.items():
        layer = Image.new("L", (image.shape[1], image.shape[0]), 0)
        ImageDraw.Draw(layer).line(points, fill=255, width=12)
        hit = np.asarray(layer) > 0
        image[hit] = colour
        where[name] = hit
    return where


def test_pen_marks_are_rejected() -> None:
    shape = (320, 320)
    image = glass(shape)
    tissue = disk_mask(shape, (160, 150), 70)
    paint_tissue(image, tissue)
    ink = draw_strokes(image)  # blue crosses the tissue; the others lie on glass
    on_glass = {name: hit & ~tissue for name, hit in ink.items()}

    plain = detect_tissue_rgb(image, MPP, TissueConfig(pen_inks=()))
    # without rejection the saturated strokes look like tissue: the test can fail
    for name in ("blue", "green", "red"):
        assert plain.mask[on_glass[name]].mean() > 0.5, name

    mask = detect_tissue_rgb(image, MPP, TissueConfig(pen_inks=("blue", "green", "black", "red")))
    for name, hit in ink.items():
        assert not mask.mask[hit].any(), name
    # the tissue away from the blue stroke (beyond the 24 µm = 3 px margin) survives
    far = tissue & ~ndimage.binary_dilation(ink["blue"], iterations=5)
    assert mask.mask[far].mean() > 0.97
    assert not mask.mask[tissue & ink["blue"]].any()

    # red is opt-in (it overlaps eosin and blood): the default keeps it as tissue-like
    default = detect_tissue_rgb(image, MPP)
    assert not default.mask[ink["blue"]].any()
    assert default.mask[on_glass["red"]].mean() > 0.5


def test_eosin_and_haematoxylin_are_not_ink() -> None:
    image = glass((200, 200))
    tissue = disk_mask((200, 200), (100, 100), 70)
    paint_tissue(image, tissue)
    image[tissue & (np.arange(200)[None, :] > 100)] = (60, 25, 90)  # dense dark nuclei
    all_inks = TissueConfig(pen_inks=("blue", "green", "black", "red"))
    mask = detect_tissue_rgb(image, MPP, all_inks)
    assert mask.mask[tissue].mean() > 0.99


def test_small_specks_are_removed() -> None:
    image = glass((200, 200))
    big = np.zeros((200, 200), bool)
    big[20:60, 20:60] = True  # 1600 px = 102,400 µm²
    small = np.zeros((200, 200), bool)
    small[150:155, 150:155] = True  # 25 px = 1,600 µm² < 10,000
    medium = np.zeros((200, 200), bool)
    medium[100:113, 30:43] = True  # 169 px = 10,816 µm² >= 10,000
    paint_tissue(image, big | small | medium)
    config = TissueConfig(closing_um=0)
    mask = detect_tissue_rgb(image, MPP, config)
    assert mask.mask[big].mean() > 0.99
    assert mask.mask[medium].mean() > 0.99
    assert not mask.mask[small].any()
    kept = detect_tissue_rgb(image, MPP, TissueConfig(closing_um=0, min_object_um2=0))
    assert kept.mask[small].mean() > 0.9


def test_small_holes_are_filled_and_large_ones_kept() -> None:
    image = glass((240, 240))
    tissue = np.zeros((240, 240), bool)
    tissue[20:220, 20:220] = True
    small_hole = np.zeros_like(tissue)
    small_hole[50:56, 50:56] = True  # 36 px = 2,304 µm² < 20,000
    large_hole = np.zeros_like(tissue)
    large_hole[120:170, 120:170] = True  # 2,500 px = 160,000 µm²
    paint_tissue(image, tissue & ~small_hole & ~large_hole)
    no_closing = TissueConfig(closing_um=0)
    mask = detect_tissue_rgb(image, MPP, no_closing)
    assert mask.mask[small_hole].all()
    core = np.zeros_like(large_hole)
    core[125:165, 125:165] = True
    assert not mask.mask[core].any()
    unfilled = detect_tissue_rgb(image, MPP, TissueConfig(closing_um=0, max_hole_um2=0))
    assert not unfilled.mask[small_hole].any()
    # a hole open to the image border is not a hole
    open_image = glass((100, 100))
    band = np.zeros((100, 100), bool)
    band[:, 20:80] = True
    notch = np.zeros_like(band)
    notch[:5, 45:55] = True
    paint_tissue(open_image, band & ~notch)
    assert not detect_tissue_rgb(open_image, MPP, no_closing).mask[notch].any()


def test_closing_joins_nearby_fragments() -> None:
    image = glass((120, 120))
    left = np.zeros((120, 120), bool)
    left[20:100, 20:58] = True
    right = np.zeros_like(left)
    right[20:100, 60:100] = True  # a 2-px (16 µm) gap
    paint_tissue(image, left | right)
    gap = np.zeros_like(left)
    gap[30:90, 58:60] = True
    assert detect_tissue_rgb(image, MPP).mask[gap].all()
    assert not detect_tissue_rgb(image, MPP, TissueConfig(closing_um=0)).mask[gap].any()


# ------------------------------------------------------------------------------ the mask


def test_contours_are_in_level0_pixels() -> None:
    grid = np.zeros((40, 60), bool)
    grid[10:20, 30:50] = True
    mask = TissueMask(mask=grid, mpp=2.0, downsample=4.0)
    (ring,) = mask.contours()
    assert ring.shape[1] == 2
    np.testing.assert_array_equal(ring[0], ring[-1])  # closed
    # mask columns 30..49 cover level-0 x 120..200, rows 10..19 cover y 40..80
    assert ring[:, 0].min() == pytest.approx(120, abs=2) and ring[:, 0].max() == 200
    assert ring[:, 1].min() == pytest.approx(40, abs=2) and ring[:, 1].max() == 80


def test_polygons_and_geojson(tmp_path: Path) -> None:
    grid = np.zeros((80, 80), bool)
    grid[10:70, 10:70] = True
    grid[30:50, 30:50] = False  # a hole
    grid[72:78, 72:78] = True  # a second piece
    mask = TissueMask(mask=grid, mpp=4.0, downsample=8.0)
    pieces = mask.polygons()
    assert sorted(len(holes) for _, holes in pieces) == [0, 1]
    assert len(mask.contours()) == 3
    path = mask.to_geojson(tmp_path / "masks" / "slide.geojson")
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    areas = 0.0
    for feature in data["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tissue"
        outer, *holes = (np.array(r) for r in feature["geometry"]["coordinates"])
        np.testing.assert_array_equal(outer[0], outer[-1])
        areas += polygon_area(outer) - sum(polygon_area(h) for h in holes)
    # polygon area in level-0 px² = tissue pixels x 8², less the corners marching squares cuts
    assert areas == pytest.approx(grid.sum() * 64, rel=0.01)
    assert [p.name for p in path.parent.iterdir()] == ["slide.geojson"]  # no temp file left


def test_polygons_are_clipped_to_the_extent() -> None:
    grid = np.ones((10, 10), bool)  # tissue up to the mask's edge
    unclipped = TissueMask(mask=grid, mpp=4.0, downsample=8.0).contours()[0]
    assert unclipped.max() == 80  # 10 mask px of 8 level-0 px
    clipped = TissueMask(mask=grid, mpp=4.0, downsample=8.0, extent=(75.0, 78.0)).contours()[0]
    assert clipped[:, 0].max() == 75 and clipped[:, 1].max() == 78
    with pytest.raises(ConfigError, match="extent"):
        TissueMask(mask=grid, mpp=4.0, downsample=8.0, extent=(0.0, 78.0))


def test_save_png_round_trip(tmp_path: Path) -> None:
    grid = np.random.default_rng(0).uniform(size=(30, 40)) > 0.5
    mask = TissueMask(mask=grid, mpp=8.0, downsample=16.0)
    path = mask.save_png(tmp_path / "mask.png")
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image) > 0, grid)
        assert float(image.text["oncoslide.mpp"]) == 8.0
        assert float(image.text["oncoslide.downsample"]) == 16.0


def test_mask_is_read_only() -> None:
    grid = np.ones((4, 4), bool)
    mask = TissueMask(mask=grid, mpp=1.0, downsample=1.0)
    grid[:] = False  # the caller's array is copied
    assert mask.tissue_fraction == 1.0
    with pytest.raises(ValueError):
        mask.mask[0, 0] = False


def test_invalid_settings_are_all_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        TissueConfig(thumbnail_mpp=0, closing_um=-1, pen_inks=("purple",), max_grey=2)
    message = str(caught.value)
    for word in ("thumbnail_mpp", "closing_um", "purple", "max_grey"):
        assert word in message
    with pytest.raises(ConfigError, match="unknown tissue settings"):
        TissueConfig.from_mapping({"closing_um": 8, "otsu_bias": 1})
    assert TissueConfig.from_mapping({"pen_inks": ["blue"]}).pen_inks == ("blue",)
    with pytest.raises(ConfigError, match="RGB uint8"):
        detect_tissue_rgb(np.zeros((10, 10), np.uint8), MPP)


def test_grey_limit_option() -> None:
    image = glass((100, 100))
    pale = np.zeros((100, 100), bool)
    pale[20:80, 20:80] = True
    image[pale] = (240, 215, 232)  # faint pink, grey level ~0.88
    assert detect_tissue_rgb(image, MPP).mask[pale].mean() > 0.99
    assert not detect_tissue_rgb(image, MPP, TissueConfig(max_grey=0.8)).mask[pale].any()
