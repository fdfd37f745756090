"""Whole-slide images behind one interface: OpenSlide first, tiffslide as the fallback.

A :class:`Slide` knows its physical resolution (micrometres per pixel, "MPP") and reads pixels
at a requested resolution: :meth:`Slide.level_for` picks the pyramid level, :meth:`Slide.read_patch`
reads a square patch at a target MPP, :meth:`Slide.thumbnail` a downsampled overview.

Coordinates are always level-0 pixels (x to the right, y down); sizes are pixels of the level
or resolution being read. Everything returned is RGB uint8 with transparent or out-of-slide
areas painted white, whichever backend read it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from oncoslide.errors import ConfigError, SlideError

Backend = Literal["auto", "openslide", "tiffslide"]
BACKENDS: tuple[str, ...] = ("openslide", "tiffslide")

MPP_RANGE = (0.05, 20.0)  # µm/px a brightfield scan can plausibly have
MPP_XY_TOLERANCE = 0.05  # relative disagreement allowed between the x and y resolutions
LEVEL_TOLERANCE = 1e-3  # a level this much coarser than the target still counts as fine enough
UPSAMPLE_TOLERANCE = 0.02  # a target this much finer than level 0 is read from level 0 as is
_TIFF_DEFAULT_MPP = 25_400 / 72  # 72 dpi: what TIFF writers store when they know nothing
_UM_PER_UNIT = {"centimeter": 10_000.0, "cm": 10_000.0, "inch": 25_400.0, "in": 25_400.0}
_MAX_READ_SIDE = 4096  # level pixels per side read at once when building thumbnails

MPP_HINT = (
    "pass --mpp-override <µm/px> (CLI) or mpp_override= (API) with the scan's resolution "
    "(typically 0.25 at 40x, 0.5 at 20x)"
)


class _Handle(Protocol):
    """What OpenSlide and TiffSlide objects have in common (the part used here)."""

    @property
    def level_count(self) -> int: ...
    @property
    def level_dimensions(self) -> Any: ...
    @property
    def level_downsamples(self) -> Any: ...
    @property
    def properties(self) -> Mapping[str, Any]: ...
    def read_region(self, location: Any, level: int, size: Any) -> Image.Image: ...
    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class SlideInfo:
    """What a slide is: size, pyramid and physical resolution. Sizes in pixels, MPP in µm/px."""

    path: str
    slide_id: str  # file name without its suffix (also for multi-file formats such as .mrxs)
    backend: str  # "openslide" or "tiffslide"
    vendor: str | None
    level0_mpp: float
    mpp_source: Literal["metadata", "override"]
    width: int  # level 0
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]  # level-0 px per level px
    objective_power: float | None

    def level_mpp(self, level: int) -> float:
        """µm per pixel of a pyramid level."""
        return self.level0_mpp * self.level_downsamples[level]


def round_half_up(value: float) -> int:
    """Nearest integer with halves rounded up (Python's round() rounds halves to even)."""
    return math.floor(value + 0.5)


def open_slide(
    path: str | Path, *, backend: Backend = "auto", mpp_override: float | None = None
) -> Slide:
    """Open a whole-slide image.

    ``backend="auto"`` tries OpenSlide, then tiffslide; when neither can open the file, one
    :class:`SlideError` reports both reasons. ``mpp_override`` (µm per level-0 pixel) replaces
    whatever resolution the metadata holds; without it, a missing or implausible resolution is
    a :class:`SlideError` that names the slide.
    """
    path = Path(path)
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"unknown slide backend {backend!r}; use auto, {', '.join(BACKENDS)}")
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    names = BACKENDS if backend == "auto" else (backend,)
    errors: list[str] = []
    for name in names:
        handle = None
        try:
            handle = _open_backend(name, path)
            return Slide(handle, _slide_info(path, name, handle, mpp_override))
        except SlideError:  # the file opened but its metadata is unusable: no point going on
            _close_quietly(handle)
            raise
        except Exception as exc:  # each backend raises its own types for unreadable files
            _close_quietly(handle)
            errors.append(f"{name}: {type(exc).__name__}: {exc}".strip())
    raise SlideError(path, "cannot open the slide (" + "; ".join(errors) + ")")


def _close_quietly(handle: _Handle | None) -> None:
    if handle is not None:
        # closing a handle that failed half-way may fail again; the first error is the news
        with contextlib.suppress(Exception):
            handle.close()


def _open_backend(name: str, path: Path) -> _Handle:
    # imported lazily: a broken or absent backend must not stop the other one from working
    if name == "openslide":
        import openslide

        return openslide.OpenSlide(str(path))  # not open_slide(): no PNG/JPEG fallback
    import tiffslide

    return tiffslide.TiffSlide(str(path))


def _slide_info(path: Path, backend: str, handle: _Handle, mpp_override: float | None) -> SlideInfo:
    props = handle.properties
    if mpp_override is not None:
        if not _plausible(mpp_override):
            raise SlideError(
                path,
                f"mpp_override={mpp_override} µm/px is outside the plausible range "
                f"[{MPP_RANGE[0]}, {MPP_RANGE[1]}]",
            )
        mpp, source = float(mpp_override), "override"
    else:
        mpp, source = _metadata_mpp(path, backend, props), "metadata"
    dims = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
    vendor = props.get(f"{backend}.vendor")
    return SlideInfo(
        path=str(path),
        slide_id=path.stem,
        backend=backend,
        vendor=None if vendor is None else str(vendor),
        level0_mpp=mpp,
        mpp_source=source,  # type: ignore[arg-type]
        width=dims[0][0],
        height=dims[0][1],
        level_count=int(handle.level_count),
        level_dimensions=dims,
        level_downsamples=tuple(float(d) for d in handle.level_downsamples),
        objective_power=_as_float(props.get(f"{backend}.objective-power")),
    )


def _metadata_mpp(path: Path, backend: str, props: Mapping[str, Any]) -> float:
    """Level-0 µm/px from the backend's MPP properties, else the TIFF resolution tags."""
    mpp_x = _as_float(props.get(f"{backend}.mpp-x"))
    mpp_y = _as_float(props.get(f"{backend}.mpp-y"))
    if mpp_x is None and mpp_y is None:
        mpp_x, mpp_y = _tiff_tag_mpp(props, "X"), _tiff_tag_mpp(props, "Y")
    # a format that reports one axis only is taken as having square pixels
    mpp_x = mpp_y if mpp_x is None else mpp_x
    mpp_y = mpp_x if mpp_y is None else mpp_y
    if mpp_x is None or mpp_y is None:
        raise SlideError(path, f"no microns-per-pixel (MPP) in the slide's metadata; {MPP_HINT}")
    if all(math.isclose(v, _TIFF_DEFAULT_MPP, rel_tol=1e-6) for v in (mpp_x, mpp_y)):
        raise SlideError(
            path,
            "the metadata holds only the TIFF default resolution (72 dpi), which means "
            f"'unknown'; {MPP_HINT}",
        )
    bad = [f"{axis}={v:g}" for axis, v in (("x", mpp_x), ("y", mpp_y)) if not _plausible(v)]
    if bad:
        raise SlideError(
            path,
            f"implausible MPP in the metadata ({', '.join(bad)} µm/px; expected "
            f"{MPP_RANGE[0]} to {MPP_RANGE[1]}); {MPP_HINT}",
        )
    if abs(mpp_x - mpp_y) > MPP_XY_TOLERANCE * max(mpp_x, mpp_y):
        raise SlideError(
            path,
            f"MPP differs between x ({mpp_x:g}) and y ({mpp_y:g}) by more than "
            f"{MPP_XY_TOLERANCE:.0%}: non-square pixels are not supported; {MPP_HINT}",
        )
    return (mpp_x + mpp_y) / 2


def _tiff_tag_mpp(props: Mapping[str, Any], axis: str) -> float | None:
    """µm/px from tiff.XResolution / tiff.ResolutionUnit; None when the unit is 'none'."""
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    per_unit = _as_float(props.get(f"tiff.{axis}Resolution"))
    if unit not in _UM_PER_UNIT or per_unit is None or per_unit <= 0:
        return None
    return _UM_PER_UNIT[unit] / per_unit


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _plausible(mpp: object) -> bool:
    value = _as_float(mpp)
    return value is not None and MPP_RANGE[0] <= value <= MPP_RANGE[1]


class Slide:
    """An open slide. Use it as a context manager, or call :meth:`close`."""

    def __init__(self, handle: _Handle, info: SlideInfo) -> None:
        self._handle: _Handle | None = handle
        self._info = info

    @property
    def info(self) -> SlideInfo:
        return self._info

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self._info
        return f"Slide({i.slide_id!r}, {i.width}x{i.height}, {i.level0_mpp:g} µm/px, {i.backend})"

    # ---------------------------------------------------------------------------------- reading

    def read_region(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``level`` whose top-left is (x0, y0) in level-0 px.

        On a level above 0 the region starts at the level pixel nearest to (x0, y0) divided by
        the level's downsample. Parts outside the slide, and transparent pixels, are white.
        Backend failures (a corrupt tile, a truncated file) raise :class:`SlideError`.
        """
        info = self._info
        if not 0 <= level < info.level_count:
            raise SlideError(
                info.path, f"level {level} does not exist (the slide has {info.level_count})"
            )
        ds = info.level_downsamples[level]
        if level == 0:
            return self._read_level(int(x0), int(y0), 0, width, height)
        return self._read_level(
            round_half_up(x0 / ds), round_half_up(y0 / ds), level, width, height
        )

    def _read_level(self, lx: int, ly: int, level: int, width: int, height: int) -> np.ndarray:
        """Like :meth:`read_region` with the top-left in pixels of ``level``."""
        if width < 1 or height < 1:
            raise ConfigError(f"region size must be positive, got {width}x{height}")
        width, height = int(width), int(height)
        level_w, level_h = self._info.level_dimensions[level]
        # the backends disagree outside the slide (OpenSlide: transparent, tiffslide: black),
        # so only the part inside is read and the rest stays white
        x_first, x_count = _visible_span(lx, width, level_w)
        y_first, y_count = _visible_span(ly, height, level_h)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x_count > 0 and y_count > 0:
            ds = self._info.level_downsamples[level]
            backend = self._info.backend
            inside = self._read_backend(
                _level0_coordinate(lx + x_first, ds, backend),
                _level0_coordinate(ly + y_first, ds, backend),
                level,
                x_count,
                y_count,
            )
            out[y_first : y_first + y_count, x_first : x_first + x_count] = inside
        return out

    def _read_backend(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        if self._handle is None:
            raise SlideError(self._info.path, "the slide is closed")
        try:
            image = self._handle.read_region((x0, y0), level, (width, height))
            return _to_rgb(image)
        except Exception as exc:  # JPEG, TIFF and OpenSlide errors all mean "unreadable here"
            raise SlideError(
                self._info.path,
                f"cannot read {width}x{height} px at ({x0}, {y0}), level {level}: "
                f"{type(exc).__name__}: {exc}",
            ) from exc

    def level_for(self, target_mpp: float, *, allow_upsample: bool = False) -> tuple[int, float]:
        """The level to read for ``target_mpp`` and the extra downsample from it to the target.

        That is the coarsest level whose resolution is at least as fine as the target (its MPP
        <= target x (1 + 1e-3)). A target finer than level 0 raises :class:`SlideError`
        (pixels are never invented silently) unless it is within 2% of level 0, which then
        counts as level 0 (factor 1.0), or ``allow_upsample=True`` (factor < 1).
        """
        _check_mpp_arg(target_mpp)
        info = self._info
        if target_mpp < info.level0_mpp * (1 - UPSAMPLE_TOLERANCE) and not allow_upsample:
            raise SlideError(
                info.path,
                f"target {target_mpp:g} µm/px is finer than level 0 ({info.level0_mpp:g} "
                f"µm/px): refusing to upsample; choose a target >= {info.level0_mpp:g} µm/px",
            )
        if target_mpp < info.level0_mpp:
            # within the tolerance the target counts as level 0 itself (0.499 for 0.5)
            return 0, target_mpp / info.level0_mpp if allow_upsample else 1.0
        best = 0
        for level in range(info.level_count):
            mpp = info.level_mpp(level)
            if mpp <= target_mpp * (1 + LEVEL_TOLERANCE) and mpp > info.level_mpp(best):
                best = level
        return best, target_mpp / info.level_mpp(best)

    def read_patch(
        self,
        x0: int,
        y0: int,
        patch_size: int,
        target_mpp: float,
        *,
        allow_upsample: bool = False,
    ) -> np.ndarray:
        """RGB uint8 (patch_size, patch_size, 3) at ``target_mpp``, top-left (x0, y0) level-0 px.

        Reads round(patch_size x extra downsample) pixels of the level chosen by
        :meth:`level_for`. When that equals ``patch_size`` (e.g. 0.499 µm/px read for a 0.5
        target) the stored pixels are returned unresampled; otherwise they are resized with
        PIL's BOX filter (area averaging: no ringing, exact 2x2 means for a factor of 2), or
        bicubic when upsampling was allowed. Same inputs, same output.
        """
        if patch_size < 1:
            raise ConfigError(f"patch_size must be positive, got {patch_size}")
        level, factor = self.level_for(target_mpp, allow_upsample=allow_upsample)
        side = max(1, round_half_up(patch_size * factor))
        region = self.read_region(x0, y0, level, side, side)
        if side == patch_size:
            return region
        resample = Image.Resampling.BOX if side > patch_size else Image.Resampling.BICUBIC
        return np.asarray(Image.fromarray(region).resize((patch_size, patch_size), resample))

    def thumbnail(
        self, target_mpp: float | None = None, *, max_side: int | None = None
    ) -> tuple[np.ndarray, float]:
        """The whole slide at ``target_mpp`` (or with its longer side ``max_side`` px).

        Returns the RGB uint8 image and its actual µm/px along x (sizes are whole pixels, so
        it can differ slightly from the request). Read from the coarsest level fine enough,
        block by block (memory stays bounded on slides without a pyramid), area-averaged
        (BOX). A thumbnail never upsamples: a target finer than level 0 gives level 0.
        """
        info = self._info
        if max_side is not None and target_mpp is None:
            if max_side < 1:
                raise ConfigError(f"max_side must be positive, got {max_side}")
            target_mpp = max(info.width, info.height) * info.level0_mpp / max_side
        elif max_side is not None or target_mpp is None:
            raise ConfigError("thumbnail() takes exactly one of target_mpp and max_side")
        _check_mpp_arg(target_mpp)
        target = max(float(target_mpp), info.level0_mpp)
        level, _ = self.level_for(target)
        scale = info.level0_mpp / target  # output px per level-0 px
        out_w = max(1, round_half_up(info.width * scale))
        out_h = max(1, round_half_up(info.height * scale))
        image = self._resampled_level(level, out_w, out_h)
        return image, info.level0_mpp * info.width / out_w

    def _resampled_level(self, level: int, out_w: int, out_h: int) -> np.ndarray:
        """A whole level resized to (out_w, out_h), reading at most _MAX_READ_SIDE px a side."""
        level_w, level_h = self._info.level_dimensions[level]
        fx, fy = level_w / out_w, level_h / out_h  # level px per output px
        block_w = max(16, math.floor(_MAX_READ_SIDE / fx))
        block_h = max(16, math.floor(_MAX_READ_SIDE / fy))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for oy in range(0, out_h, block_h):
            oy1 = min(out_h, oy + block_h)
            ly0, ly1 = math.floor(oy * fy), min(level_h, math.ceil(oy1 * fy))
            for ox in range(0, out_w, block_w):
                ox1 = min(out_w, ox + block_w)
                lx0, lx1 = math.floor(ox * fx), min(level_w, math.ceil(ox1 * fx))
                region = self._read_level(lx0, ly0, level, lx1 - lx0, ly1 - ly0)
                # the float box keeps block seams exact when the scale is not an integer
                box = (ox * fx - lx0, oy * fy - ly0, ox1 * fx - lx0, oy1 * fy - ly0)
                block = Image.fromarray(region).resize(
                    (ox1 - ox, oy1 - oy), Image.Resampling.BOX, box=box
                )
                out[oy:oy1, ox:ox1] = np.asarray(block)
        return out


def _check_mpp_arg(target_mpp: float) -> None:
    try:
        ok = math.isfinite(float(target_mpp)) and float(target_mpp) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"target_mpp must be a positive number of µm/px, got {target_mpp!r}")


def _visible_span(start: int, size: int, limit: int) -> tuple[int, int]:
    """The part of [start, start + size) inside [0, limit): (offset in the request, count)."""
    first = min(size, max(0, -start))
    count = max(0, min(size, limit - start) - first)
    return first, count


def _level0_coordinate(level_px: int, ds: float, backend: str) -> int:
    """The level-0 coordinate that makes ``backend`` read from ``level_px`` of a level.

    tiffslide floors x / ds: ceil(level_px x ds) lands exactly on ``level_px``. OpenSlide reads
    from x / ds itself, interpolating between pixels when it is fractional: the nearest integer
    to level_px x ds keeps that offset below 0.5 / ds pixel (zero when ds is an integer).
    """
    if ds == 1.0:
        return level_px
    if backend == "tiffslide":
        return math.ceil(level_px * ds - 1e-6)
    return round_half_up(level_px * ds)


def _to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB uint8 with transparency composited onto white."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA")
        arr = np.asarray(image)
    else:
        arr = np.asarray(image)
    if arr.ndim != 3 or arr.dtype != np.uint8 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected 8-bit RGB(A) pixels, got {arr.dtype} {arr.shape}")
    if arr.shape[2] == 3:
        return np.ascontiguousarray(arr)
    alpha = arr[..., 3:4].astype(np.uint32)
    if alpha.min() == 255:
        return np.ascontiguousarray(arr[..., :3])
    # OpenSlide returns un-premultiplied RGBA: blend each pixel over white
    rgb = arr[..., :3].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
