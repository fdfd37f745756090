"""Reading slides: metadata, pixels, levels for a target resolution, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oncoslide.errors import ConfigError, SlideError
from oncoslide.slides import open_slide
from oncoslide.slides import reader as reader_module

BACKENDS = ["openslide", "tiffslide"]
WIDTH, HEIGHT, MPP = 2220, 2967, 0.499


def box_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """factor x factor block means, as float (the oracle for area downsampling)."""
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.astype(np.float64).mean(axis=(1, 3))


# ------------------------------------------------------------------------------ the real SVS


@pytest.mark.parametrize("backend", BACKENDS)
def test_svs_metadata(svs_path: Path, backend: str) -> None:
    with open_slide(svs_path, backend=backend) as slide:
        info = slide.info
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.level0_mpp == pytest.approx(MPP)
    assert info.mpp_source == "metadata"
    assert info.vendor == "aperio"
    assert info.backend == backend
    assert info.slide_id == "cmu_small_region"
    assert info.level_count == 1
    assert info.level_dimensions == ((WIDTH, HEIGHT),)
    assert info.level_downsamples == (1.0,)
    assert info.objective_power == 20


def test_auto_backend_prefers_openslide(svs_path: Path) -> None:
    with open_slide(svs_path) as slide:
        assert slide.info.backend == "openslide"


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_pixels_match_an_independent_decoder(
    svs_path: Path, svs_pixels: np.ndarray, backend: str
) -> None:
    with open_slide(svs_path, backend=backend) as slide:
        region = slide.read_region(700, 1200, 0, 300, 200)
        again = slide.read_region(700, 1200, 0, 300, 200)
    assert region.shape == (200, 300, 3)
    assert region.dtype == np.uint8
    np.testing.assert_array_equal(region, again)
    # tifffile + imagecodecs decode the same JPEG tiles: allow tiny decoder differences
    expected = svs_pixels[1200:1400, 700:1000].astype(int)
    assert np.abs(region.astype(int) - expected).mean() < 0.5


def test_backends_agree_on_pixels(svs_path: Path) -> None:
    with (
        open_slide(svs_path, backend="openslide") as a,
        open_slide(svs_path, backend="tiffslide") as b,
    ):
        pa = a.read_region(300, 900, 0, 1024, 1024).astype(int)
        pb = b.read_region(300, 900, 0, 1024, 1024).astype(int)
    assert np.abs(pa - pb).mean() < 0.5
    assert pa.std() > 20  # a region with content, so agreement means something


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_the_slide_is_white(svs_path: Path, svs_pixels: np.ndarray, backend: str) -> None:
    with open_slide(svs_path, backend=backend) as slide:
        corner = slide.read_region(-40, -30, 0, 100, 100)
        far = slide.read_region(WIDTH + 10, 0, 0, 20, 20)
        edge = slide.read_region(WIDTH - 20, HEIGHT - 10, 0, 50, 50)
    assert (corner[:30] == 255).all() and (corner[:, :40] == 255).all()
    np.testing.assert_array_equal(corner[30:, 40:], svs_pixels[:70, :60])
    assert (far == 255).all()
    np.testing.assert_array_equal(edge[:10, :20], svs_pixels[-10:, -20:])
    assert (edge[10:] == 255).all() and (edge[:, 20:] == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_patch_at_level0_resolution_is_raw_pixels(
    svs_path: Path, svs_pixels: np.ndarray, backend: str
) -> None:
    # 0.5 µm/px on a 0.499 slide: 224 x 1.002 rounds to 224 level pixels, read as stored
    with open_slide(svs_path, backend=backend) as slide:
        patch = slide.read_patch(448, 896, 224, 0.5)
        assert slide.level_for(0.5) == (0, pytest.approx(0.5 / MPP))
    assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8
    np.testing.assert_array_equal(patch, svs_pixels[896:1120, 448:672])


def test_read_patch_is_deterministic(svs_path: Path) -> None:
    with open_slide(svs_path) as slide:
        a = slide.read_patch(600, 1500, 96, 1.3)
        b = slide.read_patch(600, 1500, 96, 1.3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_is_an_area_average(svs_path: Path, svs_pixels: np.ndarray, backend: str) -> None:
    with open_slide(svs_path, backend=backend) as slide:
        thumb, mpp = slide.thumbnail(8.0)
        by_side, _ = slide.thumbnail(max_side=300)
    # round(2220 x 0.499 / 8) = 138, round(2967 x 0.499 / 8) = 185
    assert thumb.shape == (185, 138, 3)
    assert mpp == pytest.approx(MPP * WIDTH / 138)
    oracle = np.asarray(Image.fromarray(svs_pixels).resize((138, 185), Image.Resampling.BOX))
    assert np.abs(thumb.astype(int) - oracle).max() <= 1
    assert max(by_side.shape[:2]) == 300


def test_thumbnail_in_blocks_matches_one_read(
    svs_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(svs_path) as slide:
        whole, _ = slide.thumbnail(3.0)
        monkeypatch.setattr(reader_module, "_MAX_READ_SIDE", 200)  # 3.0/0.499: ~33 px blocks
        blocks, _ = slide.thumbnail(3.0)
    assert blocks.shape == whole.shape
    # PIL's BOX filter takes the pixels whose centre lies in an output pixel; a centre exactly
    # on the edge can go either way with the blocks' float offsets, so allow a rare odd row
    diff = np.abs(blocks.astype(int) - whole).max(axis=2)
    assert (diff <= 1).mean() > 0.99
    assert diff.mean() < 0.1


def test_closed_slide_raises(svs_path: Path) -> None:
    slide = open_slide(svs_path)
    slide.close()
    slide.close()  # closing twice is harmless
    with pytest.raises(SlideError, match="closed"):
        slide.read_region(0, 0, 0, 10, 10)


def test_bad_arguments(svs_path: Path) -> None:
    with pytest.raises(ConfigError, match="backend"):
        open_slide(svs_path, backend="bioformats")  # type: ignore[arg-type]
    with open_slide(svs_path) as slide:
        with pytest.raises(SlideError, match="level 1 does not exist"):
            slide.read_region(0, 0, 1, 10, 10)
        with pytest.raises(ConfigError, match="positive"):
            slide.read_region(0, 0, 0, 0, 10)
        with pytest.raises(ConfigError, match="target_mpp"):
            slide.level_for(-1.0)
        with pytest.raises(ConfigError, match="exactly one"):
            slide.thumbnail(8.0, max_side=100)


# ------------------------------------------------------------------------ the pyramidal TIFF


@pytest.mark.parametrize("backend", BACKENDS)
def test_pyramid_metadata(pyramid_tiff: Path, backend: str) -> None:
    with open_slide(pyramid_tiff, backend=backend) as slide:
        info = slide.info
    assert info.level_count == 3
    assert info.level_dimensions == ((2220, 2967), (1110, 1483), (555, 741))
    assert info.level0_mpp == pytest.approx(MPP)  # from the TIFF resolution tags
    assert info.level_downsamples[1] == pytest.approx(2.0, abs=1e-3)
    assert info.level_downsamples[2] == pytest.approx(4.0, abs=3e-3)


@pytest.mark.parametrize(
    ("target", "level"), [(0.5, 0), (0.998, 1), (1.0, 1), (1.5, 1), (2.0, 2), (3.0, 2), (10, 2)]
)
def test_level_for_picks_the_coarsest_fine_enough_level(
    pyramid_tiff: Path, target: float, level: int
) -> None:
    with open_slide(pyramid_tiff) as slide:
        chosen, factor = slide.level_for(target)
        downsamples = slide.info.level_downsamples
    assert chosen == level
    assert factor == pytest.approx(target / (MPP * downsamples[level]))
    assert factor >= 1 - 1e-3
    # the next level up would have been too coarse
    if level + 1 < len(downsamples):
        assert MPP * downsamples[level + 1] > target * (1 + 1e-3)


# OpenSlide interpolates when a level-0 coordinate falls between the pixels of a level whose
# downsample is not an integer (here 2.0003); tiffslide reads whole pixels
PIXEL_TOLERANCE = {"openslide": 2.0, "tiffslide": 0.5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_patch_from_level1_matches_downsampled_level0(
    pyramid_tiff: Path, svs_pixels: np.ndarray, backend: str
) -> None:
    x0, y0 = 600, 1400
    with open_slide(pyramid_tiff, backend=backend) as slide:
        assert slide.level_for(1.0)[0] == 1
        patch = slide.read_patch(x0, y0, 224, 1.0).astype(np.float64)
    oracle = box_mean(svs_pixels[y0 : y0 + 448, x0 : x0 + 448], 2)
    shifted = box_mean(svs_pixels[y0 + 2 : y0 + 450, x0 + 2 : x0 + 450], 2)
    error = np.abs(patch - oracle).mean()
    assert error < PIXEL_TOLERANCE[backend]
    # a patch one level-1 pixel off is far worse: the position really is checked
    assert np.abs(patch - shifted).mean() > 3 * error + 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_patch_resampled_between_levels(
    pyramid_tiff: Path, pyramid_levels: list[np.ndarray], svs_pixels: np.ndarray, backend: str
) -> None:
    # 3.0 µm/px: level 2 (2.0 µm/px) read over round(224 x 1.503) = 337 px, area-averaged to 224
    x0, y0 = 400, 1000
    with open_slide(pyramid_tiff, backend=backend) as slide:
        level, factor = slide.level_for(3.0)
        ds = slide.info.level_downsamples[2]
        patch = slide.read_patch(x0, y0, 224, 3.0).astype(np.float64)
    assert level == 2 and round(224 * factor) == 337
    lx, ly = round(x0 / ds), round(y0 / ds)  # the level-2 pixel nearest to (x0, y0)
    region = pyramid_levels[2][ly : ly + 337, lx : lx + 337]
    expected = np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BOX))
    assert np.abs(patch - expected).mean() < PIXEL_TOLERANCE[backend]
    # and it shows the same tissue as level 0 resampled in one go (other sampling, same place)
    side0 = round(224 * 3.0 / MPP)
    direct = Image.fromarray(svs_pixels[y0 : y0 + side0, x0 : x0 + side0])
    direct_patch = np.asarray(direct.resize((224, 224), Image.Resampling.BOX))
    assert np.abs(patch - direct_patch).mean() < 8.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_pyramid_thumbnail_uses_a_coarse_level(
    pyramid_tiff: Path, svs_path: Path, backend: str
) -> None:
    with open_slide(pyramid_tiff, backend=backend) as slide, open_slide(svs_path) as svs:
        thumb, _ = slide.thumbnail(8.0)
        reference, _ = svs.thumbnail(8.0)
    assert thumb.shape == reference.shape
    assert np.abs(thumb.astype(int) - reference).mean() < 2.0


def test_target_finer_than_level0_is_refused(pyramid_tiff: Path) -> None:
    with open_slide(pyramid_tiff) as slide:
        with pytest.raises(SlideError, match=r"finer than level 0.*refusing to upsample"):
            slide.level_for(0.25)
        with pytest.raises(SlideError, match="finer than level 0"):
            slide.read_patch(0, 0, 224, 0.25)
        # within 2% the target counts as level 0 (0.49 on a 0.499 slide)
        assert slide.level_for(0.49) == (0, 1.0)
        level, factor = slide.level_for(0.25, allow_upsample=True)
        upsampled = slide.read_patch(100, 100, 64, 0.25, allow_upsample=True)
    assert (level, factor) == (0, pytest.approx(0.25 / MPP))
    assert upsampled.shape == (64, 64, 3)


# ----------------------------------------------------------------------------- MPP problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_mpp_names_the_slide_and_the_override(
    small_tiffs: dict[str, Path], backend: str
) -> None:
    path = small_tiffs["no_mpp"]
    with pytest.raises(SlideError) as caught:
        open_slide(path, backend=backend)
    message = str(caught.value)
    assert str(path) in message
    assert "--mpp-override" in message and "mpp_override=" in message
    with open_slide(path, backend=backend, mpp_override=0.25) as slide:
        assert slide.info.level0_mpp == 0.25
        assert slide.info.mpp_source == "override"
        assert slide.read_patch(0, 0, 64, 0.5).shape == (64, 64, 3)


def test_tiff_default_72_dpi_means_unknown(small_tiffs: dict[str, Path]) -> None:
    with pytest.raises(SlideError, match=r"72 dpi.*--mpp-override"):
        open_slide(small_tiffs["dpi72"])


def test_resolution_in_inches(small_tiffs: dict[str, Path]) -> None:
    for backend in BACKENDS:
        with open_slide(small_tiffs["inch"], backend=backend) as slide:
            assert slide.info.level0_mpp == pytest.approx(0.25)


def test_implausible_and_anisotropic_mpp_are_refused(small_tiffs: dict[str, Path]) -> None:
    with pytest.raises(SlideError, match=r"implausible MPP.*mpp_override="):
        open_slide(small_tiffs["tiny_mpp"])
    with pytest.raises(SlideError, match="differs between x"):
        open_slide(small_tiffs["anisotropic"])
    with open_slide(small_tiffs["anisotropic"], mpp_override=0.3) as slide:
        assert slide.info.level0_mpp == 0.3


def test_override_replaces_metadata(svs_path: Path) -> None:
    with open_slide(svs_path, mpp_override=0.25) as slide:
        assert (slide.info.level0_mpp, slide.info.mpp_source) == (0.25, "override")
        assert slide.level_for(0.5) == (0, 2.0)
    with pytest.raises(SlideError, match="mpp_override=500"):
        open_slide(svs_path, mpp_override=500)


def test_metadata_mpp_rules_on_property_maps() -> None:
    """The MPP rules on their own, with property maps as the backends report them."""
    path = Path("x.tif")
    get = reader_module._metadata_mpp
    assert get(path, "openslide", {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26"}) == (
        pytest.approx(0.255)
    )
    assert get(path, "tiffslide", {"tiffslide.mpp-x": 0.5}) == 0.5  # one axis: square pixels
    tags = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"}
    assert get(path, "openslide", tags) == pytest.approx(0.25)
    with pytest.raises(SlideError, match="no microns-per-pixel"):
        get(path, "openslide", {"tiff.ResolutionUnit": "none", "tiff.XResolution": "40000"})
    with pytest.raises(SlideError, match="implausible"):
        get(path, "openslide", {"openslide.mpp-x": "0", "openslide.mpp-y": "0"})


# --------------------------------------------------------------------------- damaged files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path)


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_unreadable_files_report_both_backends(damaged_slides: dict[str, Path], kind: str) -> None:
    path = damaged_slides[kind]
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert str(path) in message
    assert "openslide:" in message and "tiffslide:" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tiles_raise_on_read(damaged_slides: dict[str, Path], backend: str) -> None:
    with open_slide(damaged_slides["zeroed"], backend=backend) as slide:
        assert slide.info.width == WIDTH  # the directory is intact
        with pytest.raises(SlideError, match="cannot read"):
            slide.read_patch(1000, 1000, 224, 0.5)
