"""Whole-slide images: reading at a physical resolution, tissue detection, tiling, previews."""

from oncoslide.slides.preview import render_preview
from oncoslide.slides.reader import Slide, SlideInfo, open_slide
from oncoslide.slides.tiling import Tiles, TilingConfig, tile_slide
from oncoslide.slides.tissue import TissueConfig, TissueMask, detect_tissue, detect_tissue_rgb

__all__ = [
    "Slide",
    "SlideInfo",
    "Tiles",
    "TilingConfig",
    "TissueConfig",
    "TissueMask",
    "detect_tissue",
    "detect_tissue_rgb",
    "open_slide",
    "render_preview",
    "tile_slide",
]
