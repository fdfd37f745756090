"""A regular grid of square patches at a physical resolution, kept where there is tissue.

Sizes are converted to level-0 pixels once, by rounding to the nearest integer (halves up):

    patch_size_level0 = round(patch_size x target_mpp / level0_mpp)
    stride_level0     = round((patch_size - overlap) x target_mpp / level0_mpp)

Patches start at x = 0, stride_level0, 2 stride_level0, ... (same for y) and only patches wholly
inside the slide are considered, so a slide of width W has (W - patch_size_level0) //
stride_level0 + 1 columns. A patch is kept when the fraction of its area covered by the
tissue mask is at least ``min_tissue_fraction``; that fraction is exact for the mask (a
piecewise-constant image), from the mask's integral image interpolated at the patch corners.
Order is row-major: by y, then x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oncoslide.errors import ConfigError, SlideError
from oncoslide.features.schema import PatchGrid
from oncoslide.slides.reader import UPSAMPLE_TOLERANCE, SlideInfo, round_half_up
from oncoslide.slides.tissue import TissueMask

_FRACTION_EPS = 1e-9  # the integral image is float64: forgive rounding at the threshold


@dataclass(frozen=True, kw_only=True)
class TilingConfig:
    """Patch grid settings: sizes in pixels at ``target_mpp`` (µm per pixel)."""

    target_mpp: float = 0.5
    patch_size: int = 224
    overlap: int = 0  # px at the target resolution shared by neighbouring patches
    min_tissue_fraction: float = 0.25  # of the patch area; 0 keeps every patch of the grid

    def __post_init__(self) -> None:
        problems = []
        if not self.target_mpp > 0:
            problems.append(f"target_mpp must be > 0, got {self.target_mpp}")
        if not (isinstance(self.patch_size, (int, np.integer)) and self.patch_size >= 1):
            problems.append(f"patch_size must be a positive integer, got {self.patch_size!r}")
        elif not 0 <= self.overlap < self.patch_size:
            problems.append(f"overlap must be in [0, patch_size), got {self.overlap}")
        if not 0 <= self.min_tissue_fraction <= 1:
            problems.append(
                f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}"
            )
        if problems:
            raise ConfigError(
                "invalid tiling settings:\n" + "\n".join(f"  - {p}" for p in problems)
            )


@dataclass(frozen=True, kw_only=True, eq=False)
class Tiles:
    """The kept patches of one slide: level-0 top-left corners and their tissue fractions."""

    coords: np.ndarray  # (N, 2) int64, top-left (x, y) in level-0 px
    tissue_fraction: np.ndarray  # (N,) float64 in [0, 1]
    grid: PatchGrid
    stride_level0: int

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def grid_sizes(info: SlideInfo, config: TilingConfig) -> tuple[int, int]:
    """(patch_size_level0, stride_level0) of a slide, by the rounding rule above."""
    scale = config.target_mpp / info.level0_mpp
    if scale < 1 - UPSAMPLE_TOLERANCE:
        raise SlideError(
            info.path,
            f"target {config.target_mpp:g} µm/px is finer than level 0 "
            f"({info.level0_mpp:g} µm/px): patches would be upsampled",
        )
    scale = max(scale, 1.0)  # within the tolerance the target counts as level 0 (as in reading)
    patch = round_half_up(config.patch_size * scale)
    stride = max(1, round_half_up((config.patch_size - config.overlap) * scale))
    return patch, stride


def tile_slide(info: SlideInfo, mask: TissueMask, config: TilingConfig | None = None) -> Tiles:
    """The grid patches of a slide whose tissue fraction (from ``mask``) is high enough.

    ``mask`` must cover the whole slide (as :func:`~oncoslide.slides.detect_tissue` makes it).
    """
    config = config or TilingConfig()
    patch, stride = grid_sizes(info, config)
    _check_mask_covers(info, mask)
    xs = _starts(info.width, patch, stride)
    ys = _starts(info.height, patch, stride)
    fraction = _tissue_fractions(mask, info, xs, ys, patch)  # (len(ys), len(xs))
    keep = fraction >= config.min_tissue_fraction - _FRACTION_EPS
    rows, cols = np.nonzero(keep)  # row-major: sorted by y, then x
    coords = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64).reshape(-1, 2)
    grid = PatchGrid(
        patch_size=int(config.patch_size),
        patch_size_level0=patch,
        target_mpp=float(config.target_mpp),
        level0_mpp=float(info.level0_mpp),
        level0_width=int(info.width),
        level0_height=int(info.height),
        overlap=int(config.overlap),
    )
    return Tiles(
        coords=coords,
        tissue_fraction=np.clip(fraction[rows, cols], 0.0, 1.0),
        grid=grid,
        stride_level0=stride,
    )


def _starts(extent: int, patch: int, stride: int) -> np.ndarray:
    """Left (top) edges of the patches that fit wholly in [0, extent)."""
    if extent < patch:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, extent - patch + 1, stride, dtype=np.int64)


def _check_mask_covers(info: SlideInfo, mask: TissueMask) -> None:
    height, width = mask.shape
    # a mask made from a thumbnail is within one mask pixel of the slide's size
    for label, extent, cells in (("width", info.width, width), ("height", info.height, height)):
        if abs(cells * mask.downsample - extent) > mask.downsample + 1:
            raise ConfigError(
                f"the tissue mask ({width}x{height} px at downsample {mask.downsample:g}) does "
                f"not cover slide {info.slide_id} ({info.width}x{info.height} px): its {label} "
                "differs"
            )


def _tissue_fractions(
    mask: TissueMask, info: SlideInfo, xs: np.ndarray, ys: np.ndarray, patch: int
) -> np.ndarray:
    """Exact fraction of each patch's area on tissue, for every (y, x) grid position."""
    if xs.size == 0 or ys.size == 0:
        return np.zeros((ys.size, xs.size))
    height, width = mask.shape
    # level-0 px -> mask px, per axis: thumbnail sizes are rounded, so x and y differ slightly
    sx, sy = width / info.width, height / info.height
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = mask.mask.cumsum(0).cumsum(1)
    # the integral of a piecewise-constant image is bilinear in each cell: interpolating the
    # integral image at fractional corners gives the covered area exactly
    u = np.concatenate([xs, xs + patch]) * sx
    v = np.concatenate([ys, ys + patch]) * sy
    along_x = _interp_columns(integral, u, width)  # (height + 1, 2 nx)
    corners = _interp_columns(along_x.T, v, height).T  # (2 ny, 2 nx)
    nx, ny = xs.size, ys.size
    x0, x1 = slice(0, nx), slice(nx, 2 * nx)
    y0, y1 = slice(0, ny), slice(ny, 2 * ny)
    covered = corners[y1, x1] - corners[y0, x1] - corners[y1, x0] + corners[y0, x0]
    return covered / (patch * sx * patch * sy)


def _interp_columns(table: np.ndarray, at: np.ndarray, size: int) -> np.ndarray:
    """Linear interpolation of ``table``'s columns at fractional positions ``at`` in [0, size]."""
    at = np.clip(at, 0.0, float(size))
    left = np.minimum(np.floor(at).astype(np.int64), max(size - 1, 0))
    frac = at - left
    return table[:, left] * (1 - frac) + table[:, left + 1] * frac
