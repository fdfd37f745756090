"""Tissue detection on a low-resolution thumbnail, with every size given in micrometres.

Steps (:func:`detect_tissue_rgb`), each documented with its knob in :class:`TissueConfig`:

1. pen ink (blue, green, black; red on request) is found by hue/saturation/value ranges;
   strokes (ink areas of at least ``pen_min_area_um2``) are widened by a margin;
2. tissue is saturated: Otsu's threshold on the HSV saturation of the ink-free pixels, never
   below a floor so a blank slide gives no tissue; by default pale pixels above the floor that
   touch confident tissue are kept too (hysteresis); optionally pixels must also be darker
   than a grey level;
3. morphological closing (a disk of ``closing_um`` radius) joins fragments and small gaps;
4. holes smaller than ``max_hole_um2`` are filled; ink is removed again;
5. objects smaller than ``min_object_um2`` are removed.

The result is a :class:`TissueMask` that knows its resolution, converts its outline to
level-0 polygons and saves itself as PNG or QuPath-compatible GeoJSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, PngImagePlugin
from scipy import ndimage
from skimage.color import rgb2gray, rgb2hsv
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.measure import find_contours
from skimage.morphology import disk

from oncoslide._io import atomic_path, write_text
from oncoslide.errors import ConfigError
from oncoslide.slides.reader import Slide


@dataclass(frozen=True)
class InkRange:
    """Pixels of one ink colour: hue in degrees (a range that may wrap past 360), S and V in [0, 1].

    ``hue=None`` accepts any hue (black ink is defined by darkness, not hue).
    """

    hue: tuple[float, float] | None
    saturation: tuple[float, float]
    value: tuple[float, float]


# H&E occupies hues of about 250-360 degrees (haematoxylin purple to eosin pink) and never green.
# The ranges below stay out of it; red ink overlaps eosin and red blood cells, so it is opt-in.
PEN_INKS: dict[str, InkRange] = {
    "blue": InkRange(hue=(180.0, 245.0), saturation=(0.30, 1.0), value=(0.10, 0.95)),
    "green": InkRange(hue=(70.0, 180.0), saturation=(0.20, 1.0), value=(0.10, 0.95)),
    "red": InkRange(hue=(345.0, 15.0), saturation=(0.65, 1.0), value=(0.25, 0.95)),
    # dense haematoxylin can be as dark as V 0.2 but stays saturated (S > 0.45); ink is grey
    "black": InkRange(hue=None, saturation=(0.0, 0.30), value=(0.0, 0.20)),
}


@dataclass(frozen=True, kw_only=True)
class TissueConfig:
    """How tissue is found. Lengths in µm, areas in µm², so results do not depend on the scan."""

    thumbnail_mpp: float = 8.0  # resolution the mask is computed at (µm per mask pixel)
    threshold: Literal["hysteresis", "otsu"] = "hysteresis"
    saturation_floor: float = 0.07  # Otsu's threshold never goes below (glass is < 0.05)
    max_grey: float | None = None  # also require grey level < this (0 black .. 1 white)
    closing_um: float = 16.0  # radius of the closing disk; 0 disables it
    max_hole_um2: float = 20_000.0  # holes smaller than this are filled; 0 disables it
    min_object_um2: float = 10_000.0  # tissue pieces smaller than this are dropped (0.01 mm²)
    pen_inks: tuple[str, ...] = ("blue", "green", "black")  # any of PEN_INKS; () disables
    pen_min_area_um2: float = 5_000.0  # smaller ink-coloured specks are not pen strokes
    pen_margin_um: float = 24.0  # ink pixels are widened by this much before removal

    def __post_init__(self) -> None:
        # settings read from JSON/YAML give lists; keep the dataclass hashable
        object.__setattr__(self, "pen_inks", tuple(self.pen_inks))
        problems = []
        if not self.thumbnail_mpp > 0:
            problems.append(f"thumbnail_mpp must be > 0, got {self.thumbnail_mpp}")
        if self.threshold not in ("hysteresis", "otsu"):
            problems.append(f"threshold must be 'hysteresis' or 'otsu', got {self.threshold!r}")
        if not 0 <= self.saturation_floor < 1:
            problems.append(f"saturation_floor must be in [0, 1), got {self.saturation_floor}")
        if self.max_grey is not None and not 0 < self.max_grey <= 1:
            problems.append(f"max_grey must be in (0, 1] or None, got {self.max_grey}")
        for name in (
            "closing_um",
            "max_hole_um2",
            "min_object_um2",
            "pen_min_area_um2",
            "pen_margin_um",
        ):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        unknown = [ink for ink in self.pen_inks if ink not in PEN_INKS]
        if unknown:
            problems.append(f"unknown pen inks {unknown}; known: {', '.join(PEN_INKS)}")
        if problems:
            raise ConfigError(
                "invalid tissue settings:\n" + "\n".join(f"  - {p}" for p in problems)
            )

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> TissueConfig:
        """Build from a plain mapping (a config file); unknown keys are a :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(
                f"unknown tissue settings {unknown}; known: {', '.join(sorted(known))}"
            )
        return cls(**settings)


@dataclass(frozen=True, kw_only=True, eq=False)
class TissueMask:
    """A boolean tissue mask and where it lies on the slide.

    Mask pixel (row r, column c) covers level-0 x in [c d, (c + 1) d) and y in [r d, (r + 1) d),
    with d = ``downsample``.
    """

    mask: np.ndarray  # bool (H, W), read-only
    mpp: float  # µm per mask pixel
    downsample: float  # level-0 px per mask pixel
    threshold: float | None = None  # the saturation threshold used (None if not computed)
    # level-0 (width, height) of the slide: the last mask row/column may reach past the slide's
    # edge (its size is rarely a multiple of the downsample), so polygons are clipped to it
    extent: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ConfigError(f"a tissue mask must be 2-D, got shape {mask.shape}")
        mask = mask.astype(bool, copy=True)
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)
        if not (self.mpp > 0 and self.downsample > 0):
            raise ConfigError("a tissue mask needs mpp > 0 and downsample > 0")
        if self.extent is not None and not (self.extent[0] > 0 and self.extent[1] > 0):
            raise ConfigError(f"a tissue mask's extent must be positive, got {self.extent}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the mask (the whole slide) that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mpp**2 / 1e6

    def polygons(self) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """(outer ring, [hole rings]) per tissue piece, rings as closed (K, 2) level-0 (x, y)."""
        labels, _ = ndimage.label(self.mask)  # 4-connected, as find_contours sees foreground
        pieces = []
        for index, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is None:
                continue
            piece = np.pad(labels[where] == index, 1)
            rings = find_contours(piece.astype(np.float32), 0.5, fully_connected="low")
            # one ring bounds the piece, the others bound its holes: the outer one is largest
            rings.sort(key=lambda ring: -abs(_signed_area(ring)))
            offset = np.array([where[0].start - 1, where[1].start - 1], dtype=np.float64)
            converted = [self._to_level0(ring + offset) for ring in rings]
            pieces.append((converted[0], converted[1:]))
        return pieces

    def contours(self) -> list[np.ndarray]:
        """Every boundary (outer and hole) as a closed (K, 2) float array of level-0 (x, y)."""
        return [ring for outer, holes in self.polygons() for ring in (outer, *holes)]

    def _to_level0(self, ring_rc: np.ndarray) -> np.ndarray:
        # contour vertices are in pixel-centre coordinates; pixel c spans [c - 0.5, c + 0.5]
        ring = (ring_rc[:, ::-1] + 0.5) * self.downsample
        if self.extent is not None:
            ring = np.clip(ring, 0.0, np.asarray(self.extent, dtype=np.float64))
        return ring

    def geojson(self) -> dict[str, Any]:
        """The tissue as a GeoJSON FeatureCollection of polygons in level-0 px (QuPath-ready)."""
        features = []
        for outer, holes in self.polygons():
            rings = [_oriented(outer, ccw=True)] + [_oriented(h, ccw=False) for h in holes]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [np.round(r, 2).tolist() for r in rings],
                    },
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": "Tissue", "color": [0, 160, 0]},
                    },
                }
            )
        return {"type": "FeatureCollection", "features": features}

    def to_geojson(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`geojson` atomically; returns the path."""
        write_text(path, json.dumps(self.geojson(), separators=(",", ":")) + "\n")
        return Path(path)

    def save_png(self, path: str | os.PathLike[str]) -> Path:
        """Write the mask as an 8-bit PNG (255 = tissue) with mpp/downsample in text chunks."""
        meta = PngImagePlugin.PngInfo()
        meta.add_text("oncoslide.mpp", repr(self.mpp))
        meta.add_text("oncoslide.downsample", repr(self.downsample))
        image = Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")
        with atomic_path(path, suffix=".png") as tmp:
            image.save(tmp, format="PNG", pnginfo=meta)
        return Path(path)


def detect_tissue(slide: Slide, config: TissueConfig | None = None) -> TissueMask:
    """Tissue mask of a slide, computed on its thumbnail at ``config.thumbnail_mpp``."""
    config = config or TissueConfig()
    rgb, mpp = slide.thumbnail(config.thumbnail_mpp)
    mask = detect_tissue_rgb(rgb, mpp, config, level0_mpp=slide.info.level0_mpp)
    return replace(mask, extent=(float(slide.info.width), float(slide.info.height)))


def detect_tissue_rgb(
    rgb: np.ndarray,
    mpp: float,
    config: TissueConfig | None = None,
    *,
    level0_mpp: float | None = None,
) -> TissueMask:
    """Tissue mask of an RGB uint8 (H, W, 3) image at ``mpp`` µm/px.

    ``level0_mpp`` places the mask on a slide (downsample = mpp / level0_mpp); without it the
    image is taken as level 0 itself.
    """
    config = config or TissueConfig()
    rgb = _check_rgb(rgb)
    if not mpp > 0 or (level0_mpp is not None and not level0_mpp > 0):
        raise ConfigError(f"mpp and level0_mpp must be > 0, got {mpp} and {level0_mpp}")
    hsv = rgb2hsv(rgb) if rgb.size else np.zeros(rgb.shape, dtype=np.float64)
    pen = _pen_mask(hsv, config, mpp)
    tissue, threshold = _saturated(hsv[..., 1], ~pen, config)
    if config.max_grey is not None:
        tissue &= rgb2gray(rgb) < config.max_grey
    tissue &= ~pen
    tissue = _close(tissue, config.closing_um / mpp)
    tissue = _fill_small_holes(tissue, config.max_hole_um2 / mpp**2)
    tissue &= ~pen
    tissue = _drop_small_objects(tissue, config.min_object_um2 / mpp**2)
    downsample = 1.0 if level0_mpp is None else mpp / level0_mpp
    return TissueMask(mask=tissue, mpp=float(mpp), downsample=downsample, threshold=threshold)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ConfigError(f"expected an RGB uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    return arr


def _pen_mask(hsv: np.ndarray, config: TissueConfig, mpp: float) -> np.ndarray:
    """Pixels of the configured inks in strokes of ``pen_min_area_um2``, widened by a margin."""
    pen = np.zeros(hsv.shape[:2], dtype=bool)
    hue_deg, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    for name in config.pen_inks:
        ink = PEN_INKS[name]
        hit = (sat >= ink.saturation[0]) & (sat <= ink.saturation[1])
        hit &= (val >= ink.value[0]) & (val <= ink.value[1])
        if ink.hue is not None:
            lo, hi = ink.hue
            hit &= (
                (hue_deg >= lo) & (hue_deg <= hi)
                if lo <= hi
                else (hue_deg >= lo) | (hue_deg <= hi)  # the range wraps past 360 degrees
            )
        pen |= hit
    # isolated ink-coloured pixels (tissue-marking dye, debris) are not strokes: leave them
    pen = _drop_small_objects(pen, config.pen_min_area_um2 / mpp**2)
    radius = round(config.pen_margin_um / mpp)
    if pen.any() and radius >= 1:
        pen = ndimage.binary_dilation(pen, structure=disk(radius))
    return pen


def _saturated(
    sat: np.ndarray, usable: np.ndarray, config: TissueConfig
) -> tuple[np.ndarray, float]:
    """Pixels above Otsu's saturation threshold (computed without the ink), floored."""
    values = sat[usable]
    threshold = config.saturation_floor
    # Otsu needs two distinct values; a uniform image has no tissue/background split to find
    if values.size and values.max() - values.min() > 1e-6:
        threshold = max(threshold, float(threshold_otsu(values)))
    if config.threshold == "otsu" or threshold <= config.saturation_floor:
        return sat > threshold, threshold
    # pale tissue (above the floor) joined to confident tissue (above Otsu) is tissue too
    return apply_hysteresis_threshold(sat, config.saturation_floor, threshold), threshold


def _close(mask: np.ndarray, radius_px: float) -> np.ndarray:
    radius = round(radius_px)
    if radius < 1 or not mask.any():
        return mask
    # pad first: scipy erodes from the image border, which would bite into tissue cut by it
    padded = np.pad(mask, radius)
    closed = ndimage.binary_closing(padded, structure=disk(radius))
    return closed[radius:-radius, radius:-radius]


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background pieces smaller than ``max_area_px`` that do not touch the border."""
    if max_area_px <= 0 or not mask.any():
        return mask
    # background is 8-connected where tissue is 4-connected (find_contours' convention)
    labels, n = ndimage.label(~mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_area_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def _drop_small_objects(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    if min_area_px <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[labels]


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring (positive when counter-clockwise in its own axes)."""
    a, b = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(a[:-1], b[1:]) - np.dot(a[1:], b[:-1]))


def _oriented(ring: np.ndarray, *, ccw: bool) -> np.ndarray:
    """RFC 7946 winding: outer rings counter-clockwise, holes clockwise (in x, y numbers)."""
    return ring if (_signed_area(ring) > 0) == ccw else ring[::-1]
