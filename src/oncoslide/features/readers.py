"""Read per-slide feature files written by oncoslide, TRIDENT, CLAM or STAMP.

Every reader returns a :class:`~oncoslide.features.schema.SlideFeatures` in oncoslide units:
features float16 or float32 (N, D), coords int64 (N, 2) top-left (x, y) in **level-0 pixels**.
Units are converted explicitly and never guessed: a STAMP file (coordinates in micrometres) is
converted with the slide resolution, from the file or from the caller. Without one, a file that
records its tile grid (``tile_size_um``, ``tile_size_px``) gets coords in pixels of that grid
(``coords_frame="tile"``): training needs only relative positions; drawing on the slide asks
for the resolution. Without either, reading fails with a clear message.

Layouts (detected from the file's content, not its name):

- ``oncoslide``: file attribute ``oncoslide_layout_version``; ``features`` + ``coords`` with the
  patch-grid attributes of docs/contracts.md.
- ``trident`` / ``clam``: HDF5 ``features`` (N, D) or (1, N, D) and ``coords`` (N, 2) or
  (1, N, 2) in level-0 pixels. Called ``trident`` when the file carries TRIDENT's attributes
  (``patch_size_level0``, ``level0_magnification``, ``target_magnification`` on ``coords`` or
  ``encoder`` on ``features``), ``clam`` otherwise.
- ``pt``: a ``.pt`` file (loaded with ``weights_only=True``) holding a tensor or numpy array
  (N, D) / (1, N, D), or a dict with ``features`` (or ``feats``) and optionally ``coords``.
- ``stamp``: HDF5 ``feats`` (N, D) and ``coords`` in micrometres, converted to level-0 pixels
  (or to tile-grid pixels when the slide resolution is unknown, see above).

A layout without coordinates (``.pt`` tensors, STAMP 1.x files without unit information) gets
coords filled with -1: position-aware models refuse such bags instead of using wrong positions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from oncoslide.errors import AmbiguousFeatureFileError, FeatureFileError, NonFiniteFeaturesError
from oncoslide.features.schema import (
    GRID_ATTRS,
    LAYOUT_VERSION,
    CoordsFrame,
    PatchGrid,
    SlideFeatures,
)

PathLike = str | os.PathLike[str]

#: File suffixes searched by :func:`find_feature_file`, in order of preference.
FEATURE_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".pt")
_HDF5_SUFFIXES = frozenset({".h5", ".hdf5", ".hdf"})
_TORCH_SUFFIXES = frozenset({".pt", ".pth"})
_TRIDENT_COORD_ATTRS = ("patch_size_level0", "level0_magnification", "target_magnification")
_MICROMETRE_UNITS = frozenset(
    {
        "um",
        "µm",
        "μm",
        "micron",
        "microns",
        "micrometer",
        "micrometers",
        "micrometre",
        "micrometres",
    }
)
#: Attributes (on the file or on ``coords``) read as the level-0 µm/px of a STAMP slide.
STAMP_MPP_ATTRS: tuple[str, ...] = ("mpp", "slide_mpp", "level0_mpp")
# STAMP 1.x: the coordinate unit is unknown, so no positions are kept
_NO_UNIT: tuple[float, CoordsFrame] = (0.0, "level0")
_KEPT_DTYPES = (np.dtype("float16"), np.dtype("float32"))
_CHECK_ROWS = 1 << 16  # rows per block when scanning for NaN/inf (bounds the temporary mask)


@dataclass(frozen=True)
class FeatureInfo:
    """What a feature file holds, read from its metadata only (no feature values)."""

    path: Path
    layout: str
    n_patches: int
    dim: int
    dtype: np.dtype
    has_coords: bool
    coords_frame: CoordsFrame = "level0"  # "tile": STAMP coords without the slide resolution


# --------------------------------------------------------------------------------------------
# public API


def read_features(
    path: PathLike,
    *,
    slide_id: str | None = None,
    stamp_mpp: float | None = None,
    mmap: bool = False,
) -> SlideFeatures:
    """Read one slide's feature file, whatever its layout, in oncoslide units.

    Args:
        path: an HDF5 (``.h5``, ``.hdf5``) or torch (``.pt``) feature file.
        slide_id: id recorded in the result; defaults to the file name without its suffix.
        stamp_mpp: level-0 micrometres per pixel used to convert STAMP coordinates when the file
            does not record its own (``mpp``, ``slide_mpp`` or ``level0_mpp`` attribute).
            Without either, STAMP coords are pixels of the file's tile grid
            (``coords_frame="tile"``).
        mmap: map uncompressed, contiguous HDF5 datasets (and ``.pt`` tensors) into memory
            instead of reading them; other files are read normally.

    Raises:
        FeatureFileError: missing or unreadable file, unknown layout, bad shapes, NaN/inf
            features, or STAMP micrometre coordinates with neither a resolution nor a tile size.
    """
    path = Path(path)
    sid = slide_id if slide_id is not None else _stem(path)
    kind = _file_kind(path)
    if kind == "hdf5":
        return _guard_h5(path, lambda: _read_h5(path, sid, stamp_mpp, mmap))
    return _read_pt(path, sid, mmap)


def peek_features(path: PathLike) -> tuple[int, int]:
    """Return ``(n_patches, dim)`` from the file's metadata, without reading feature values."""
    info = inspect_features(path)
    return info.n_patches, info.dim


def inspect_features(
    path: PathLike, *, stamp_mpp: float | None = None, check_units: bool = False
) -> FeatureInfo:
    """Describe a feature file from its metadata: layout, shape, dtype once read.

    Checks everything :func:`read_features` checks except array values (NaN/inf features,
    fractional pixel coordinates), which would need the data itself.
    With ``check_units=True`` a STAMP file must also have convertible coordinates (a resolution,
    its own ``mpp`` attribute or ``stamp_mpp``, or else its tile size), so that a later read
    cannot fail for that reason.
    """
    path = Path(path)
    if _file_kind(path) == "hdf5":
        return _guard_h5(path, lambda: _inspect_h5(path, stamp_mpp, check_units))
    # A .pt file has no separate metadata; mapping it reads only the pages touched (all of
    # them when a dtype conversion is needed, e.g. from bfloat16).
    sf = _read_pt(path, _stem(path), mmap=True, check_values=False)
    has_coords = bool((sf.coords != -1).any())
    return FeatureInfo(path, sf.layout, sf.n_patches, sf.dim, sf.features.dtype, has_coords)


def find_feature_file(features_dir: PathLike, slide_id: str) -> Path | None:
    """Find the feature file of ``slide_id`` in ``features_dir``; ``None`` when there is none.

    Searched, in order (the first level that has a match wins):

    1. ``features_dir/<slide_id>.h5``, ``.hdf5``, ``.pt``;
    2. ``features_dir/<sub>/<slide_id>.h5``, ``.hdf5``, ``.pt`` for every immediate subfolder
       ``<sub>`` (CLAM and TRIDENT write ``h5_files/`` and ``pt_files/``).

    Within a level ``.h5`` is preferred over ``.hdf5`` over ``.pt`` (a ``.pt`` beside an ``.h5``
    is the same slide without coordinates). Two files of the preferred suffix in different
    subfolders (e.g. features of two encoders) are ambiguous.

    Raises:
        FeatureFileError: the match is ambiguous.
    """
    features_dir = Path(features_dir)
    top = [features_dir / f"{slide_id}{s}" for s in FEATURE_SUFFIXES]
    candidates = [(0, p) for p in top if p.is_file()]
    if not candidates:
        for sub in _subfolders(features_dir):
            candidates += [(1, sub / f"{slide_id}{s}") for s in FEATURE_SUFFIXES]
        candidates = [(lvl, p) for lvl, p in candidates if p.is_file()]
    return _choose(features_dir, slide_id, candidates).path


class FeatureIndex:
    """All feature files of a folder, scanned once; lookups follow :func:`find_feature_file`.

    Used to validate cohorts of thousands of slides without a directory scan per slide.
    """

    def __init__(self, features_dir: PathLike) -> None:
        self.features_dir = Path(features_dir)
        if not self.features_dir.is_dir():
            raise FeatureFileError(self.features_dir, "features folder not found")
        self._by_id: dict[str, list[tuple[int, Path]]] = {}
        self._add_folder(self.features_dir, level=0)
        for sub in _subfolders(self.features_dir):
            self._add_folder(sub, level=1)

    def find(self, slide_id: str) -> Path | None:
        """The chosen file for ``slide_id`` or ``None``; raises FeatureFileError when ambiguous."""
        return self.locate(slide_id).path

    def locate(self, slide_id: str) -> Located:
        """The chosen file and the lower-preference files that were passed over."""
        found = self._by_id.get(slide_id, [])
        level = min((lvl for lvl, _ in found), default=0)
        return _choose(self.features_dir, slide_id, [c for c in found if c[0] == level])

    def _add_folder(self, folder: Path, level: int) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                suffix = _matching_suffix(name)
                if suffix is None or name.startswith(".") or not entry.is_file():
                    continue
                stem = name[: -len(suffix)]
                self._by_id.setdefault(stem, []).append((level, folder / name))


@dataclass(frozen=True)
class Located:
    """Result of a feature-file lookup: the chosen file and the ones passed over."""

    path: Path | None
    ignored: tuple[Path, ...] = ()


# --------------------------------------------------------------------------------------------
# file lookup helpers


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        subs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
    return sorted(subs)


def _matching_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in FEATURE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[-len(suffix) :]
    return None


def _suffix_rank(path: Path) -> int:
    return FEATURE_SUFFIXES.index(path.suffix.lower())


def _choose(features_dir: Path, slide_id: str, candidates: list[tuple[int, Path]]) -> Located:
    if not candidates:
        return Located(None)
    paths = sorted((p for _, p in candidates), key=lambda p: (_suffix_rank(p), str(p)))
    best_rank = _suffix_rank(paths[0])
    best = [p for p in paths if _suffix_rank(p) == best_rank]
    if len(best) > 1:
        raise AmbiguousFeatureFileError(
            features_dir, slide_id, [str(p.relative_to(features_dir)) for p in best]
        )
    return Located(best[0], tuple(paths[1:]))


def _stem(path: Path) -> str:
    suffix = _matching_suffix(path.name)
    return path.name[: -len(suffix)] if suffix else path.stem


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _HDF5_SUFFIXES | _TORCH_SUFFIXES:
        raise FeatureFileError(
            path, f"unsupported file suffix {path.suffix!r}; expected .h5, .hdf5 or .pt"
        )
    if not path.is_file():
        raise FeatureFileError(path, "file not found")
    return "hdf5" if suffix in _HDF5_SUFFIXES else "torch"


# --------------------------------------------------------------------------------------------
# HDF5 layouts


@dataclass(frozen=True)
class _H5Layout:
    name: str  # oncoslide | trident | clam | stamp
    features: h5py.Dataset
    coords: h5py.Dataset | None


def _guard_h5(path: Path, fn: Any) -> Any:
    """Run ``fn`` turning h5py's low-level errors (truncated, corrupt files) into typed ones."""
    try:
        return fn()
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise FeatureFileError(
            path, f"cannot read HDF5 file ({type(exc).__name__}: {exc})"
        ) from exc


def _detect_layout(f: h5py.File, path: Path) -> _H5Layout:
    if "oncoslide_layout_version" in f.attrs:
        version = int(np.asarray(f.attrs["oncoslide_layout_version"]).item())
        if version > LAYOUT_VERSION:
            raise FeatureFileError(
                path,
                f"oncoslide layout version {version} is newer than this reader ({LAYOUT_VERSION})",
            )
        return _H5Layout("oncoslide", _dataset(f, "features", path), _dataset(f, "coords", path))
    if "features" in f and "feats" in f:
        raise FeatureFileError(path, "holds both 'features' and 'feats'; cannot tell the layout")
    coords = _dataset(f, "coords", path) if "coords" in f else None
    if "features" in f:
        feats = _dataset(f, "features", path)
        return _H5Layout(_trident_or_clam(feats, coords), feats, coords)
    if "feats" in f:
        return _H5Layout("stamp", _dataset(f, "feats", path), coords)
    found = ", ".join(sorted(f.keys())) or "nothing"
    raise FeatureFileError(
        path,
        f"no known feature dataset (found: {found}); expected 'features' "
        "(oncoslide, TRIDENT, CLAM) or 'feats' (STAMP)",
    )


def _dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        what = "missing" if obj is None else "not a dataset"
        raise FeatureFileError(path, f"'{key}' is {what}")
    return obj


def _trident_or_clam(feats: h5py.Dataset, coords: h5py.Dataset | None) -> str:
    if "encoder" in feats.attrs:
        return "trident"
    if coords is not None and any(a in coords.attrs for a in _TRIDENT_COORD_ATTRS):
        return "trident"
    return "clam"


def _features_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or shape[1] < 1:
        raise FeatureFileError(path, f"features must be (N, D) or (1, N, D), got shape {shape}")
    return int(shape[0]), int(shape[1])


def _coords_shape(shape: tuple[int, ...], n: int, path: Path) -> None:
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or shape[1] != 2:
        raise FeatureFileError(path, f"coords must be (N, 2) or (1, N, 2), got shape {shape}")
    if shape[0] != n:
        raise FeatureFileError(path, f"{shape[0]} coords for {n} feature rows")


def _feature_dtype(dtype: np.dtype, path: Path) -> np.dtype:
    """The in-memory dtype: float16/float32 kept, other floats widened or narrowed to float32."""
    if dtype in _KEPT_DTYPES:
        return dtype
    if np.issubdtype(dtype, np.floating):
        return np.dtype("float32")
    raise FeatureFileError(path, f"features must be floating point, got {dtype}")


def _inspect_h5(path: Path, stamp_mpp: float | None, check_units: bool) -> FeatureInfo:
    with h5py.File(path, "r") as f:
        lay = _detect_layout(f, path)
        n, d = _features_shape(lay.features.shape, path)
        dtype = _feature_dtype(lay.features.dtype, path)
        if lay.coords is not None:
            _coords_shape(lay.coords.shape, n, path)
        if lay.name == "oncoslide":
            _grid(lay.coords, path, required=True)
        has_coords = lay.coords is not None
        frame: CoordsFrame = "level0"
        if lay.name == "stamp" and has_coords:
            um_per_px, frame = _stamp_scale(f, lay, path, stamp_mpp, required=check_units)
            has_coords = um_per_px != 0.0
        return FeatureInfo(path, lay.name, n, d, dtype, has_coords, frame)


def _read_h5(path: Path, slide_id: str, stamp_mpp: float | None, mmap: bool) -> SlideFeatures:
    with h5py.File(path, "r") as f:
        lay = _detect_layout(f, path)
        n, d = _features_shape(lay.features.shape, path)
        dtype = _feature_dtype(lay.features.dtype, path)
        feats = _load_array(lay.features, path, mmap).reshape(n, d)
        if feats.dtype != dtype:
            feats = feats.astype(dtype)
        _check_finite(feats, path)
        grid: PatchGrid | None = None
        frame: CoordsFrame = "level0"
        if lay.name == "stamp":
            coords, frame = _stamp_coords(f, lay, n, path, stamp_mpp)
            encoder = _attr_str(f.attrs, "extractor")
        else:
            coords = _pixel_coords(lay.coords, n, path)
            grid = _grid(lay.coords, path, required=lay.name == "oncoslide")
            encoder = _attr_str(lay.features.attrs, "encoder")
        fingerprint = _attr_str(lay.features.attrs, "weights_fingerprint")
        return SlideFeatures(
            slide_id=slide_id,
            features=feats,
            coords=coords,
            grid=grid,
            encoder=encoder or None,
            weights_fingerprint=fingerprint or None,
            layout=lay.name,
            coords_frame=frame,
        )


def _load_array(dset: h5py.Dataset, path: Path, mmap: bool) -> np.ndarray:
    """Read a dataset, or map it when asked and the bytes lie contiguous and uncompressed."""
    if mmap and dset.chunks is None and dset.compression is None and dset.size > 0:
        offset = dset.id.get_offset()
        if offset is not None:
            return np.memmap(path, mode="r", dtype=dset.dtype, offset=offset, shape=dset.shape)
    return dset[()]


def _pixel_coords(dset: h5py.Dataset | None, n: int, path: Path) -> np.ndarray:
    if dset is None:
        return np.full((n, 2), -1, dtype=np.int64)
    _coords_shape(dset.shape, n, path)
    raw = np.asarray(dset[()]).reshape(n, 2)
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.int64, copy=False)
    if not np.issubdtype(raw.dtype, np.floating):
        raise FeatureFileError(path, f"coords must be numeric, got {raw.dtype}")
    if not np.isfinite(raw).all():
        raise FeatureFileError(path, "coords contain NaN or inf")
    # Level-0 pixel positions stored as floats are accepted only when they are whole numbers:
    # fractional values would mean another unit (e.g. micrometres) that we must not guess.
    if not np.array_equal(raw, np.round(raw)):
        raise FeatureFileError(
            path, "coords are not whole level-0 pixel positions (fractional values found)"
        )
    return raw.astype(np.int64)


def _grid(dset: h5py.Dataset | None, path: Path, *, required: bool) -> PatchGrid | None:
    attrs = dset.attrs if dset is not None else {}
    missing = [a for a in GRID_ATTRS if a not in attrs]
    if missing:
        if required:
            raise FeatureFileError(path, f"coords lack grid attributes: {', '.join(missing)}")
        return None

    def num(key: str) -> float:
        return float(np.asarray(attrs[key]).item())

    return PatchGrid(
        patch_size=int(num("patch_size")),
        patch_size_level0=int(num("patch_size_level0")),
        target_mpp=num("target_mpp"),
        level0_mpp=num("level0_mpp"),
        level0_width=int(num("level0_width")),
        level0_height=int(num("level0_height")),
        overlap=int(num("overlap")),
    )


# --------------------------------------------------------------------------------------------
# STAMP units


def _stamp_coords(
    f: h5py.File, lay: _H5Layout, n: int, path: Path, stamp_mpp: float | None
) -> tuple[np.ndarray, CoordsFrame]:
    if lay.coords is None:
        return np.full((n, 2), -1, dtype=np.int64), "level0"
    _coords_shape(lay.coords.shape, n, path)
    um_per_px, frame = _stamp_scale(f, lay, path, stamp_mpp, required=True)
    if um_per_px == 0.0:  # unit unknown (STAMP 1.x): keep no positions rather than wrong ones
        return np.full((n, 2), -1, dtype=np.int64), "level0"
    um = np.asarray(lay.coords[()], dtype=np.float64).reshape(n, 2)
    if not np.isfinite(um).all():
        raise FeatureFileError(path, "coords contain NaN or inf")
    return np.rint(um / um_per_px).astype(np.int64), frame


def _stamp_scale(
    f: h5py.File, lay: _H5Layout, path: Path, stamp_mpp: float | None, *, required: bool
) -> tuple[float, CoordsFrame]:
    """µm per pixel of the frame STAMP coords are converted to, and which frame that is.

    ``(mpp, "level0")`` with the slide resolution (the file's own, else ``stamp_mpp``);
    ``(tile_size_um / tile_size_px, "tile")`` without one, so neighbouring tiles lie
    ``tile_size_px`` apart (1 µm per pixel when the file has no ``tile_size_px``);
    ``(0.0, "level0")`` when the coordinate unit is unknown.

    STAMP >= 2.1 writes ``unit="um"``, ``tile_size_um`` and ``tile_size_px`` but no slide
    resolution; STAMP 2.0 wrote micrometre coords with ``tile_size_um`` but no unit; STAMP 1.x
    wrote neither (coords in an unrecorded pixel frame).
    """
    assert lay.coords is not None
    unit = _attr_str(lay.coords.attrs, "unit") or _attr_str(f.attrs, "unit")
    tile_um = _attr_num(f, lay.coords, "tile_size_um", path)
    if unit is None:
        if tile_um is None:
            return _NO_UNIT
    elif unit.strip().lower() not in _MICROMETRE_UNITS:
        raise FeatureFileError(
            path, f"STAMP coords have unit {unit!r}; only micrometres ('um') can be converted"
        )
    mpp = _file_mpp(f, lay.coords, path)
    if mpp is None:
        mpp = stamp_mpp
    if mpp is not None:
        return _positive(mpp, "slide resolution", path), "level0"
    if tile_um is not None:
        _positive(tile_um, "tile_size_um", path)
        tile_px = _attr_num(f, lay.coords, "tile_size_px", path)
        if tile_px is None:  # STAMP 2.0: the tile's pixel size is not recorded
            return 1.0, "tile"
        return tile_um / _positive(tile_px, "tile_size_px", path), "tile"
    if not required:
        return 1.0, "level0"  # metadata-only inspection: units are known, the scale is not needed
    raise FeatureFileError(
        path,
        "STAMP coords are in micrometres and the file records neither the slide resolution nor "
        "its tile size (tile_size_um); pass stamp_mpp (level-0 micrometres per pixel) to "
        "convert them to pixels",
    )


def _positive(value: float, what: str, path: Path) -> float:
    if not (np.isfinite(value) and value > 0):
        raise FeatureFileError(path, f"{what} must be a positive number, got {value}")
    return float(value)


def _attr_num(f: h5py.File, coords: h5py.Dataset, key: str, path: Path) -> float | None:
    """A numeric attribute of ``coords`` or, failing that, of the file; None when absent."""
    for attrs in (coords.attrs, f.attrs):
        if key in attrs:
            try:
                return float(np.asarray(attrs[key]).item())
            except (TypeError, ValueError) as exc:
                raise FeatureFileError(path, f"attribute {key!r} is not a number") from exc
    return None


def _file_mpp(f: h5py.File, coords: h5py.Dataset, path: Path) -> float | None:
    for attrs in (coords.attrs, f.attrs):
        for key in STAMP_MPP_ATTRS:
            if key in attrs:
                try:
                    return float(np.asarray(attrs[key]).item())
                except (TypeError, ValueError) as exc:
                    raise FeatureFileError(path, f"attribute {key!r} is not a number") from exc
    return None


def _attr_str(attrs: Mapping[str, Any], key: str) -> str | None:
    if key not in attrs:
        return None
    value = attrs[key]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value)


# --------------------------------------------------------------------------------------------
# torch files


def _numpy_safe_globals() -> list[Any]:
    """The globals a pickled numpy array needs; allow-listed so weights_only loading accepts it."""
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int64")]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def _torch_load(path: Path, mmap: bool) -> Any:
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # Legacy (non-zip) .pt files cannot be mapped; read them instead.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises loading with weights_only=False, i.e. running the file's
        # code: never the advice to give for a feature file, so only its diagnosis is kept.
        raise FeatureFileError(path, _unsafe_pickle_message(str(exc))) from exc
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise FeatureFileError(
            path, f"cannot read torch file ({type(exc).__name__}: {exc})"
        ) from exc


def _unsafe_pickle_message(message: str) -> str:
    """Why torch's weights-only loader refused a .pt file, and how to re-save it."""
    resave = (
        "re-save the features as plain tensors, e.g. torch.save(features_tensor, path) or "
        "torch.save({'features': features_tensor, 'coords': coords_tensor}, path), or write "
        "them to an .h5 file (see docs/data.md)"
    )
    found = re.search(r"GLOBAL\s+([\w.]+)", message)
    if found:  # the pickle names a class or function to call: code, not data
        return (
            f"contains Python code (a pickled {found.group(1)} object, not only tensors, numpy "
            f"arrays or dicts of them) and was not loaded, for safety: unpickling it could run "
            f"arbitrary code; {resave}"
        )
    _, sep, rest = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()] if sep else []
    detail = lines[0].split(". Please use")[0] if lines else "unpickling failed"
    return (
        f"cannot read torch file ({detail}): not a torch file, or one that holds more than "
        f"tensors, numpy arrays or dicts of them, which is not loaded, for safety; if it is "
        f"yours, {resave}"
    )


def _to_numpy(obj: Any, what: str, path: Path) -> np.ndarray:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    if isinstance(obj, np.ndarray):
        return obj
    raise FeatureFileError(
        path, f"{what} must be a tensor or numpy array, got {type(obj).__name__}"
    )


def _read_pt(path: Path, slide_id: str, mmap: bool, check_values: bool = True) -> SlideFeatures:
    obj = _torch_load(path, mmap)
    coords_obj: Any = None
    if isinstance(obj, Mapping):
        key = next((k for k in ("features", "feats") if k in obj), None)
        if key is None:
            keys = ", ".join(sorted(map(str, obj.keys()))) or "nothing"
            raise FeatureFileError(path, f"dict without 'features' or 'feats' (keys: {keys})")
        coords_obj = obj.get("coords")
        obj = obj[key]
    feats = _to_numpy(obj, "features", path)
    n, d = _features_shape(feats.shape, path)
    feats = feats.reshape(n, d)
    dtype = _feature_dtype(feats.dtype, path)
    if feats.dtype != dtype:
        feats = feats.astype(dtype)
    if check_values:
        _check_finite(feats, path)
    if coords_obj is None:
        coords = np.full((n, 2), -1, dtype=np.int64)
    else:
        raw = _to_numpy(coords_obj, "coords", path)
        _coords_shape(raw.shape, n, path)
        coords = _whole_pixels(raw.reshape(n, 2), path)
    return SlideFeatures(slide_id=slide_id, features=feats, coords=coords, layout="pt")


def _whole_pixels(raw: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.int64, copy=False)
    if not np.issubdtype(raw.dtype, np.floating) or not np.isfinite(raw).all():
        raise FeatureFileError(path, "coords must be finite numbers")
    if not np.array_equal(raw, np.round(raw)):
        raise FeatureFileError(
            path, "coords are not whole level-0 pixel positions (fractional values found)"
        )
    return raw.astype(np.int64)


# --------------------------------------------------------------------------------------------
# value checks


def _check_finite(feats: np.ndarray, path: Path) -> None:
    bad = sum(int((~np.isfinite(block)).any(axis=1).sum()) for block in _row_blocks(feats))
    if bad:
        raise NonFiniteFeaturesError(path, bad, int(feats.shape[0]))


def _row_blocks(arr: np.ndarray) -> Iterable[np.ndarray]:
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        yield arr[start : start + _CHECK_ROWS]
