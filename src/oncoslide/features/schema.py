"""The oncoslide feature-file contract (docs/contracts.md), one HDF5 file per slide.

``features`` float (N, D) and ``coords`` int (N, 2), the top-left (x, y) of each patch in
level-0 pixels. The patch grid is described by attributes on ``coords``; the encoder by
attributes on ``features``. Units are explicit: coordinates are never in micrometres here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from oncoslide._io import atomic_path
from oncoslide.errors import FeatureFileError

LAYOUT_VERSION = 1
CoordsFrame = Literal["level0", "tile"]
GRID_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "target_mpp",
    "level0_mpp",
    "level0_width",
    "level0_height",
    "overlap",
)


@dataclass(frozen=True, kw_only=True)
class PatchGrid:
    """Where the patches of a slide lie: sizes in pixels, resolutions in micrometres per pixel."""

    patch_size: int  # px at the target resolution
    patch_size_level0: int  # the same patch measured in level-0 px
    target_mpp: float
    level0_mpp: float
    level0_width: int
    level0_height: int
    overlap: int = 0  # px at the target resolution

    def as_attrs(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class SlideFeatures:
    """The patches of one slide as read from any supported layout, in oncoslide units."""

    slide_id: str
    features: np.ndarray  # (N, D) float16 or float32
    coords: np.ndarray  # (N, 2) int64, level-0 px, top-left (x, y); see coords_frame
    grid: PatchGrid | None = None  # None when the file does not describe its grid
    encoder: str | None = None
    weights_fingerprint: str | None = None
    layout: str = "oncoslide"  # which on-disk layout it was read from
    #: "level0": coords are level-0 pixels of the slide. "tile": the file does not record the
    #: slide's resolution (STAMP micrometres without mpp), so coords are pixels at the tiles'
    #: own resolution: right relative to each other (neighbours one tile apart), but they
    #: cannot be placed on the slide image without the resolution.
    coords_frame: CoordsFrame = "level0"

    @property
    def n_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + self.coords.nbytes)


def write_feature_file(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    *,
    grid: PatchGrid,
    encoder: str,
    weights_fingerprint: str = "",
    dtype: str | np.dtype = "float32",
    compression: str | None = None,
    attrs: Mapping[str, str | int | float] | None = None,
) -> Path:
    """Write one slide's features atomically (temp file + rename) in the oncoslide layout.

    ``attrs`` become extra file-level attributes (e.g. how the features were extracted).
    """
    features = np.asarray(features)
    coords = np.asarray(coords)
    if features.ndim != 2:
        raise FeatureFileError(path, f"features must be 2-D (N, D), got shape {features.shape}")
    if coords.shape != (features.shape[0], 2):
        raise FeatureFileError(
            path, f"coords must have shape ({features.shape[0]}, 2), got {coords.shape}"
        )
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype("float16"), np.dtype("float32")):
        raise FeatureFileError(path, f"feature dtype must be float16 or float32, not {dtype}")
    path = Path(path)
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["oncoslide_layout_version"] = LAYOUT_VERSION
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            dset = f.create_dataset(
                "features", data=features.astype(dtype, copy=False), compression=compression
            )
            dset.attrs["encoder"] = encoder
            dset.attrs["weights_fingerprint"] = weights_fingerprint
            cset = f.create_dataset("coords", data=coords.astype(np.int64, copy=False))
            for key, value in grid.as_attrs().items():
                cset.attrs[key] = value
    return path


@dataclass(frozen=True, kw_only=True)
class FeatureContract:
    """What a trained model expects of its patch features: the encoder, its weights, the
    dimension and the patch grid's size and resolution. ``None`` where the files did not say."""

    encoder: str | None
    weights_fingerprint: str | None
    feature_dim: int
    patch_size: int | None = None
    target_mpp: float | None = None

    @classmethod
    def of(cls, slide: SlideFeatures) -> FeatureContract:
        grid = slide.grid
        return cls(
            encoder=slide.encoder,
            weights_fingerprint=slide.weights_fingerprint,
            feature_dim=slide.dim,
            patch_size=None if grid is None else grid.patch_size,
            target_mpp=None if grid is None else float(grid.target_mpp),
        )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FeatureContract:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})  # type: ignore[arg-type]

    def mismatches(self, other: FeatureContract) -> list[str]:
        """Every way features described by ``other`` differ from this contract (both named).

        Unknown values (None on either side) are not compared; the dimension always is.
        """
        problems = []
        if self.feature_dim != other.feature_dim:
            problems.append(
                f"feature dimension: the model expects {self.feature_dim}, "
                f"the features have {other.feature_dim}"
            )
        for name, what in (
            ("encoder", "encoder"),
            ("weights_fingerprint", "encoder weights"),
            ("patch_size", "patch size (px)"),
            ("target_mpp", "resolution (µm/px)"),
        ):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None or theirs is None:
                continue
            same = (
                abs(float(mine) - float(theirs)) <= 0.02 * float(mine)
                if name == "target_mpp"
                else mine == theirs
            )
            if not same:
                problems.append(
                    f"{what}: the model was trained on {mine}, the features are {theirs}"
                )
        return problems
