"""A PNG to check tissue detection and tiling at a glance: thumbnail, tissue outline, patches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from oncoslide._io import atomic_path
from oncoslide.errors import ConfigError
from oncoslide.slides.tiling import Tiles
from oncoslide.slides.tissue import TissueMask

TISSUE_COLOUR = (0, 200, 0, 255)
PATCH_FILL = (30, 110, 255, 28)
PATCH_EDGE = (20, 70, 220, 150)


def render_preview(
    slide_thumbnail_rgb: np.ndarray,
    mask: TissueMask,
    tiles: Tiles,
    path: str | os.PathLike[str],
) -> Path:
    """Draw the tissue contours (green) and the kept patches (translucent blue boxes).

    The thumbnail can have any resolution: positions are scaled from level-0 pixels to its size.
    Written atomically as PNG; returns the path. Drawing is one PIL call per patch and per
    contour, so tens of thousands of patches take well under a second.
    """
    rgb = np.asarray(slide_thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConfigError(f"expected an RGB uint8 thumbnail, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    sx = width / tiles.grid.level0_width  # thumbnail px per level-0 px
    sy = height / tiles.grid.level0_height
    base = Image.fromarray(rgb).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    side = tiles.grid.patch_size_level0
    for x, y in tiles.coords.tolist():
        x0, y0 = x * sx, y * sy
        # a patch narrower than a thumbnail pixel still gets one pixel
        x1, y1 = max(x0, (x + side) * sx - 1), max(y0, (y + side) * sy - 1)
        draw.rectangle((x0, y0, x1, y1), fill=PATCH_FILL, outline=PATCH_EDGE)
    line = max(1, round(max(width, height) / 500))
    for ring in mask.contours():
        draw.line((ring * (sx, sy)).ravel().tolist(), fill=TISSUE_COLOUR, width=line)
    out = Image.alpha_composite(base, overlay).convert("RGB")
    with atomic_path(path, suffix=".png") as tmp:
        out.save(tmp, format="PNG")
    return Path(path)
