"""Attention heatmaps: where a trained fold model looked, drawn on the patient's slides.

A heatmap is only honest when the model did not train on the patient, so by default the model
is the one of the fold in which the patient was a *test* patient (out-of-fold attention). The
model is rebuilt from a ``oncoslide train`` run folder: its ``config.json``, ``splits.csv`` and
the fold's self-describing model folder, which holds the chosen weights and everything fitted
on the fold's training part (time bins, class weights), so the prediction shown equals the
run's. Runs written before model folders existed fall back to the fold's Lightning checkpoint,
with the preprocessing refitted on the fold's training part exactly as training did.

Attention weights sum to 1 over a patient's patches, so their scale depends on the bag size;
the maps show each patch's percentile among the patient's patches (as CLAM does), and the
table keeps both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from oncoslide._io import atomic_path, write_table, write_text
from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.splits import fold_parts
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError, FeatureFileError, OncoslideError
from oncoslide.features.cache import FeatureCache
from oncoslide.features.readers import read_features
from oncoslide.features.schema import PatchGrid
from oncoslide.models import MODELS, MILModel, create_model
from oncoslide.training.config import TrainConfig
from oncoslide.training.model_folder import is_model_folder, load_model_folder
from oncoslide.training.run_folder import FoldFolder, RunFolder
from oncoslide.training.tasks import FoldTask, TaskSpec, fit_fold_task, resolve_task

if TYPE_CHECKING:
    from oncoslide.slides.reader import Slide

#: Slide file suffixes searched in ``slides_dir`` for a background image.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms")
ATTENTION_COLUMNS = ("patient_id", "slide_id", "x", "y", "attention", "percentile")


@dataclass(frozen=True, eq=False)
class FoldModel:
    """One fold's trained model, rebuilt from a run folder."""

    model: MILModel
    config: TrainConfig
    task: TaskSpec
    fold_task: FoldTask
    seed: int
    fold: int
    checkpoint: Path  # the fold's model folder (or, for older runs, its Lightning checkpoint)
    test_ids: frozenset[str]  # the fold's test part: the only out-of-fold patients


@dataclass(frozen=True, eq=False)
class PatientAttention:
    """A patient's attention under one fold model.

    ``table`` has one row per patch (ATTENTION_COLUMNS): level-0 top-left ``x, y``, the raw
    ``attention`` (sums to 1 over the patient) and its ``percentile`` in (0, 1] among the
    patient's patches. ``prediction`` is the model's output for the patient (``risk``, or
    ``prob_<class>``), computed in the same pass.
    """

    patient_id: str
    seed: int
    fold: int
    out_of_fold: bool
    table: pd.DataFrame
    prediction: dict[str, float]


@dataclass
class HeatmapResult:
    """What :func:`attention_heatmaps` wrote."""

    attention: PatientAttention
    table_path: Path
    # keyed by stem: <slide_id>, or <slide_id>.<map> for further maps
    images: dict[str, Path] = field(default_factory=dict)  # the overlay, max_side px
    figures: dict[str, Path] = field(default_factory=dict)  # figures/<stem>.png: title, colour bar
    tiffs: dict[str, Path] = field(default_factory=dict)  # <stem>.ome.tif (full_resolution)
    geojson: dict[str, Path] = field(default_factory=dict)  # slide_id -> <slide_id>.geojson
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ the model


def held_out_fold(splits: pd.DataFrame, patient_id: str, seed: int) -> int:
    """The fold in which ``patient_id`` is a test patient for ``seed``.

    Raises:
        ConfigError: the patient is not in the run's splits for that seed.
    """
    rows = splits.loc[
        (splits["seed"] == seed)
        & (splits["patient_id"].astype(str) == str(patient_id))
        & (splits["part"] == "test")
    ]
    if rows.empty:
        seeds = sorted(int(s) for s in splits["seed"].unique())
        raise ConfigError(
            f"patient {patient_id!r} is not a test patient of seed {seed} in this run "
            f"(seeds: {seeds}); is it in the run's cohort and task?"
        )
    return int(rows["fold"].iloc[0])


def read_run(run_dir: str | Path) -> tuple[TrainConfig, pd.DataFrame]:
    """The settings and splits of an ``oncoslide train`` run folder."""
    return RunFolder(run_dir).read()


def load_fold_model(run_dir: str | Path, cohort: Cohort, *, seed: int, fold: int) -> FoldModel:
    """Rebuild the model of one (seed, fold) of a run, with its chosen weights.

    Raises:
        ConfigError: not a run folder, the fold did not finish, the model has no attention, or
            the cohort does not fit the run (feature dimension).
    """
    run = Path(run_dir)
    config, splits = read_run(run)
    return _fold_model(run, config, splits, cohort, seed, fold)


def _fold_model(
    run: Path, config: TrainConfig, splits: pd.DataFrame, cohort: Cohort, seed: int, fold: int
) -> FoldModel:
    if not MODELS.metadata(config.model).get("has_attention", False):
        with_attention = [m for m in MODELS.list() if MODELS.metadata(m).get("has_attention")]
        raise ConfigError(
            f"model {config.model!r} has no attention to draw; attention models: "
            f"{', '.join(with_attention)}"
        )
    folder = RunFolder(run).fold(seed, fold)
    if not folder.is_done:
        raise ConfigError(f"seed {seed} fold {fold} of {run} has not finished")
    if cohort.feature_dim is None:
        raise ConfigError("load the cohort with its feature files (check_features=True)")
    parts = fold_parts(splits, seed, fold)
    if is_model_folder(folder.model_dir):
        trained = load_model_folder(folder.model_dir)
        check_gives_attention(trained.model, config.model)
        if trained.model.in_dim != cohort.feature_dim:
            raise ConfigError(
                f"the model of seed {seed} fold {fold} expects {trained.model.in_dim}-d "
                f"features; this cohort's are {cohort.feature_dim}-d"
            )
        return FoldModel(
            trained.model,
            config,
            trained.task,
            trained.fold_task,
            seed,
            fold,
            folder.model_dir,
            frozenset(parts["test"]),
        )
    return _legacy_fold_model(folder, config, cohort, parts, seed, fold)


def check_gives_attention(model: Any, name: str) -> None:
    """Refuse a model of an attention model class that gives none in this configuration
    (``gives_attention`` False: e.g. ``slide-finetune`` with a PAMA encoder), before any bag
    is read.

    Raises:
        ConfigError: naming the model and why.
    """
    if not getattr(model, "gives_attention", True):
        encoder = getattr(getattr(model, "encoder", None), "name", "its encoder")
        raise ConfigError(
            f"model {name!r} has no attention to draw in this run: its slide encoder "
            f"({encoder}) gives none (attention-pooling encoders, e.g. Threads', do)"
        )


def _legacy_fold_model(
    folder: FoldFolder,
    config: TrainConfig,
    cohort: Cohort,
    parts: dict[str, list[str]],
    seed: int,
    fold: int,
) -> FoldModel:
    """Runs written before fold model folders existed: a Lightning checkpoint, and the fold's
    preprocessing refitted on its training part exactly as training did."""
    checkpoint = folder.checkpoint
    if checkpoint is None:
        raise ConfigError(f"seed {seed} fold {fold} of {folder.path} has no model")
    assert cohort.feature_dim is not None
    task = resolve_task(cohort, config)
    fold_task = fit_fold_task(task, config, cohort, parts["train"])
    model = create_model(
        config.model,
        in_dim=cohort.feature_dim,
        n_outputs=fold_task.n_outputs,
        **config.model_kwargs,
    )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ConfigError(
            f"the checkpoint {checkpoint} does not fit this cohort's features "
            f"(D = {cohort.feature_dim}): {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return FoldModel(
        model, config, task, fold_task, seed, fold, checkpoint, frozenset(parts["test"])
    )


# ------------------------------------------------------------------------------ attention


def patient_attention(
    fold_model: FoldModel, cohort: Cohort, patient_id: str, cache: FeatureCache | None = None
) -> PatientAttention:
    """Every patch's attention for one patient, with the model's prediction."""
    own = cache is None
    cache = cache or FeatureCache()
    try:
        bag = load_bag(cohort, patient_id, cache)
    finally:
        if own:
            cache.close()
    # copies: cached bags are read-only and shared
    features = torch.tensor(np.asarray(bag.features, dtype=np.float32))[None]
    mask = torch.ones(features.shape[:2], dtype=torch.bool)
    coords = torch.tensor(np.asarray(bag.coords, dtype=np.float32))[None]
    inputs: dict[str, Any] = {}
    if MODELS.metadata(fold_model.config.model).get("uses_slide_index"):
        # as in training and predict: e.g. slide-finetune embeds each slide on its own
        inputs["slide_index"] = torch.tensor(np.asarray(bag.slide_index, dtype=np.int64))[None]
    with torch.no_grad():
        out = fold_model.model(features, mask, coords, **inputs)
    if out.attention is None:
        raise ConfigError(f"model {fold_model.config.model!r} returned no attention")
    weights = out.attention[0].double().numpy()
    table = pd.DataFrame(
        {
            "patient_id": patient_id,
            "slide_id": [bag.slide_ids[i] for i in bag.slide_index],
            "x": bag.coords[:, 0].astype(np.int64),
            "y": bag.coords[:, 1].astype(np.int64),
            "attention": weights,
            "percentile": _percentile(weights),
        }
    )
    # further maps (G-HANet: one per gene group): attention:<name> and percentile:<name>
    for name, values in out.attention_maps.items():
        extra = values[0].double().numpy()
        table[f"attention:{name}"] = extra
        table[f"percentile:{name}"] = _percentile(extra)
    frame = fold_model.fold_task.prediction_frame(out.logits)
    prediction = {str(k): float(v) for k, v in frame.iloc[0].items()}
    return PatientAttention(
        patient_id,
        fold_model.seed,
        fold_model.fold,
        patient_id in fold_model.test_ids,
        table,
        prediction,
    )


def _percentile(weights: np.ndarray) -> np.ndarray:
    """Each patch's rank among the patient's patches, in (0, 1]."""
    return pd.Series(weights).rank(method="average").to_numpy() / weights.size


def map_names(table: pd.DataFrame) -> list[str]:
    """The further attention maps an attention table holds (see ``attention:<name>``)."""
    return [c.split(":", 1)[1] for c in table.columns if c.startswith("attention:")]


# ------------------------------------------------------------------------------ drawing


def _grid_of(path: Path, rows: pd.DataFrame, cache: FeatureCache) -> PatchGrid:
    """The slide's patch grid from its feature file, or inferred from the coordinates."""
    grid = cache.get(path).grid
    if grid is not None:
        return grid
    xs, ys = np.unique(rows["x"]), np.unique(rows["y"])
    steps = np.concatenate([np.diff(xs), np.diff(ys)])
    size = int(steps[steps > 0].min()) if (steps > 0).any() else 256
    return PatchGrid(
        patch_size=size,
        patch_size_level0=size,
        target_mpp=1.0,
        level0_mpp=1.0,
        level0_width=int(rows["x"].max()) + size,
        level0_height=int(rows["y"].max()) + size,
    )


def find_slide_file(feature_path: Path, slide_id: str, slides_dir: Path | None) -> Path | None:
    """The slide behind a feature file: ``slides_dir/<slide_id>.<ext>``, else the path that
    ``oncoslide extract`` recorded in the file (``slide_path`` attribute), if it still exists."""
    if slides_dir is not None:
        for suffix in SLIDE_SUFFIXES:
            candidate = slides_dir / f"{slide_id}{suffix}"
            if candidate.exists():
                return candidate
    try:
        with h5py.File(feature_path, "r") as f:
            recorded = f.attrs.get("slide_path")
    except OSError:
        return None
    if isinstance(recorded, bytes):
        recorded = recorded.decode()
    if isinstance(recorded, str) and Path(recorded).exists():
        return Path(recorded)
    return None


class _Painter:
    """A slide's patches as rectangles of output pixels, at ``scale`` output px per level-0 px.

    Rectangles are kept in painting order (increasing percentile: where patches overlap, the
    higher one is on top) with their colours. Both edges of a rectangle are rounded from
    level-0 positions, so adjacent patches meet without gaps, and any region of the output
    paints exactly as the same pixels of the whole image would: strips of the overview and
    tiles of the full-resolution TIFF agree to the pixel.
    """

    def __init__(self, rows: pd.DataFrame, patch_level0: float, scale: float, cmap: str) -> None:
        percentile = rows["percentile"].to_numpy(dtype=float)
        order = np.argsort(percentile, kind="stable")
        x = rows["x"].to_numpy(dtype=float)[order]
        y = rows["y"].to_numpy(dtype=float)[order]
        size = float(patch_level0)
        self.x0 = np.round(x * scale).astype(np.int64)
        self.y0 = np.round(y * scale).astype(np.int64)
        self.x1 = np.maximum(np.round((x + size) * scale).astype(np.int64), self.x0 + 1)
        self.y1 = np.maximum(np.round((y + size) * scale).astype(np.int64), self.y0 + 1)
        self.colours = colormaps[cmap](percentile[order])[:, :3] * 255.0
        self._lut = np.vstack([self.colours, np.zeros((1, 3))])
        # rows sorted by top edge find the patches of a region without scanning them all
        self._by_y = np.argsort(self.y0, kind="stable")
        self._y0_sorted = self.y0[self._by_y]
        self._reach = int((self.y1 - self.y0).max()) if len(self.y0) else 0

    def _within(self, x_off: int, y_off: int, width: int, height: int) -> np.ndarray:
        """Indices (in painting order) of the patches that reach into the region."""
        lo = np.searchsorted(self._y0_sorted, y_off - self._reach, side="right")
        hi = np.searchsorted(self._y0_sorted, y_off + height, side="left")
        idx = self._by_y[lo:hi]
        keep = (self.y1[idx] > y_off) & (self.x1[idx] > x_off) & (self.x0[idx] < x_off + width)
        return np.sort(idx[keep])

    def paint(self, base: np.ndarray, x_off: int, y_off: int, alpha: float) -> np.ndarray:
        """``base`` (RGB uint8) is the region of the output whose top-left pixel is (x_off,
        y_off); returns it with every patch that reaches into it blended in."""
        height, width = base.shape[:2]
        # the last patch painted on each pixel: 4 bytes a pixel, whatever the patch count
        index = np.full((height, width), -1, dtype=np.int32)
        for i in self._within(x_off, y_off, width, height):
            x0, y0 = max(self.x0[i] - x_off, 0), max(self.y0[i] - y_off, 0)
            x1, y1 = min(self.x1[i] - x_off, width), min(self.y1[i] - y_off, height)
            index[y0:y1, x0:x1] = i
        covered = index >= 0
        if not covered.any():
            return base.copy()
        # whole-region arithmetic (index -1 picks an unused last colour): far faster than
        # gathering the covered pixels, and the same numbers
        colour = self._lut[index]
        blended = np.round((1 - alpha) * base + alpha * colour)
        painted = np.clip(blended, 0, 255).astype(np.uint8)
        return np.where(covered[..., None], painted, base)


_STRIP = 1024  # rows of the overview painted at once: memory stays a few bytes a pixel


def attention_overlay(
    rows: pd.DataFrame,
    grid: PatchGrid,
    *,
    max_side: int = 2048,
    background: np.ndarray | None = None,
    alpha: float = 0.5,
    cmap: str = "turbo",
) -> np.ndarray:
    """An RGB image of the slide (``background`` resized, or white) with every patch painted by
    its attention percentile; ``max_side`` px on the slide's longer side."""
    width, height = grid.level0_width, grid.level0_height
    scale = max_side / max(width, height)
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    if background is not None:
        from PIL import Image

        base = np.asarray(
            Image.fromarray(background).resize((out_w, out_h), Image.Resampling.BILINEAR),
            dtype=np.uint8,
        )
    else:
        base = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    painter = _Painter(rows, grid.patch_size_level0, scale, cmap)
    image = np.empty_like(base)
    for y in range(0, out_h, _STRIP):
        image[y : y + _STRIP] = painter.paint(base[y : y + _STRIP], 0, y, alpha)
    return image


def _capped_side(max_side: int, grid: PatchGrid) -> int:
    """``max_side``, or the slide's longer level-0 side when that is smaller: an overview is
    never drawn finer than the slide's own pixels (they would be invented)."""
    return max(1, min(int(max_side), max(grid.level0_width, grid.level0_height)))


def write_png(image: np.ndarray, target: Path, *, title: str, description: str) -> None:
    """The overlay pixel for pixel (no resampling: its size is the requested one), atomically,
    with the title and the prediction in the PNG's text chunks (``Title``, ``Description``)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", description)
    info.add_text("Software", "oncoslide")
    with atomic_path(target, suffix=".png.tmp") as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def _save_figure(image: np.ndarray, title: str, cmap: str, target: Path) -> None:
    """A small annotated figure: the overlay (at most _FIGURE_SIDE px), title and colour bar."""
    height, width = image.shape[:2]
    if max(height, width) > _FIGURE_SIDE:
        from PIL import Image

        # matplotlib would resample it anyway; a smaller copy keeps drawing cheap
        shrink = _FIGURE_SIDE / max(height, width)
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    fig = Figure(figsize=(8, 6.6 * height / width + 0.7), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(image)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 100), colormaps[cmap]), ax=ax, shrink=0.6)
    bar.set_label("attention percentile within the patient")
    with atomic_path(target, suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


_FIGURE_SIDE = 1600


# ------------------------------------------------------------------------------ GeoJSON


def attention_geojson(rows: pd.DataFrame, grid: PatchGrid, *, cmap: str = "turbo") -> dict:
    """A slide's patches as a GeoJSON FeatureCollection that QuPath imports as detections.

    One Feature per patch: a square Polygon in level-0 pixels (QuPath's convention: origin at
    the top-left of level 0, x right, y down), clipped to the slide's bounds; ``properties``
    hold ``objectType: "detection"``, the patch's percentile colour (``color``, RGB) and the
    attention table's values as QuPath ``measurements`` (``attention``, ``percentile``, and
    ``attention:<map>``, ``percentile:<map>`` for further maps). Patches entirely outside the
    slide have no place on it and are left out.
    """
    width, height = grid.level0_width, grid.level0_height
    size = grid.patch_size_level0
    names = ["attention", "percentile"]
    for name in map_names(rows):
        names += [f"attention:{name}", f"percentile:{name}"]
    values = rows[names].to_numpy(dtype=float)
    colours = np.round(colormaps[cmap](rows["percentile"].to_numpy(dtype=float))[:, :3] * 255)
    xs, ys = rows["x"].to_numpy(dtype=np.int64), rows["y"].to_numpy(dtype=np.int64)
    x0s, x1s = np.clip(xs, 0, width), np.clip(xs + size, 0, width)
    y0s, y1s = np.clip(ys, 0, height), np.clip(ys + size, 0, height)
    features = []
    for i in range(len(rows)):
        x0, x1, y0, y1 = int(x0s[i]), int(x1s[i]), int(y0s[i]), int(y1s[i])
        if x1 <= x0 or y1 <= y0:
            continue
        # counter-clockwise in x, y numbers (RFC 7946), as the tissue outlines are written
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "color": [int(c) for c in colours[i]],
                    "measurements": dict(zip(names, values[i].tolist(), strict=True)),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


# ------------------------------------------------------------------------------ full resolution

#: Tile side (px) of the full-resolution TIFF: tiles are read, painted and compressed one at a
#: time, so memory stays at a few tiles whatever the slide's size.
TIFF_TILE = 512


def write_overlay_tiff(
    target: str | Path,
    rows: pd.DataFrame,
    grid: PatchGrid,
    *,
    slide: Slide | None = None,
    scale: float = 1.0,
    mpp: float | None = None,
    alpha: float = 0.5,
    cmap: str = "turbo",
    tile: int = TIFF_TILE,
    compression: str = "jpeg",
) -> Path:
    """The overlay at ``scale`` output px per level-0 px (1: the slide's full resolution) as a
    tiled, pyramidal OME-TIFF (BigTIFF), written tile by tile.

    Sub-resolutions (halving until the image fits one tile) go into SubIFDs, as slide viewers
    (QuPath, OMERO, napari) expect; each level is painted from the slide's own pyramid, never
    from the level above, so every level is as sharp as the slide allows. ``slide`` is the
    open slide to draw on (``None``: white); ``mpp`` (µm per level-0 px) writes the physical
    pixel size. ``compression``: ``"jpeg"`` (quality 90, as slides are stored) or a lossless
    one (``"zlib"``, ``"lzw"``, ``None``).
    """
    import tifffile

    if not 0 < scale <= 1:
        raise ConfigError(f"scale must be in (0, 1] (never finer than level 0), got {scale}")
    target = Path(target)
    width, height = grid.level0_width, grid.level0_height
    levels: list[tuple[float, int, int]] = []
    level_scale = float(scale)
    while True:
        size = (max(1, round(width * level_scale)), max(1, round(height * level_scale)))
        levels.append((level_scale, *size))
        if max(size) <= tile:
            break
        level_scale /= 2

    def tiles(level_scale: float, out_w: int, out_h: int) -> Iterator[np.ndarray]:
        painter = _Painter(rows, grid.patch_size_level0, level_scale, cmap)
        for oy in range(0, out_h, tile):
            for ox in range(0, out_w, tile):
                w, h = min(tile, out_w - ox), min(tile, out_h - oy)
                if slide is None:
                    base = np.full((h, w, 3), 255, dtype=np.uint8)
                else:
                    base = _slide_region(slide, level_scale, ox, oy, w, h)
                # edge tiles are padded white (tifffile would pad black, which JPEG smears)
                block = np.full((tile, tile, 3), 255, dtype=np.uint8)
                block[:h, :w] = painter.paint(base, ox, oy, alpha)
                yield block

    options: dict[str, Any] = {
        "tile": (tile, tile),
        "photometric": "rgb",
        "dtype": np.uint8,
        "compression": compression,
    }
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}
    with atomic_path(target, suffix=".tmp.ome.tif") as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for k, (level_scale, out_w, out_h) in enumerate(levels):
                extra: dict[str, Any] = {}
                if mpp is not None:
                    level_mpp = mpp / level_scale
                    extra["resolution"] = (1e4 / level_mpp, 1e4 / level_mpp)
                    extra["resolutionunit"] = "CENTIMETER"
                if k == 0:
                    metadata: dict[str, Any] = {"axes": "YXS", "Name": target.name}
                    if mpp is not None:
                        metadata.update(
                            PhysicalSizeX=mpp / level_scale,
                            PhysicalSizeXUnit="µm",
                            PhysicalSizeY=mpp / level_scale,
                            PhysicalSizeYUnit="µm",
                        )
                    extra["subifds"] = len(levels) - 1
                    extra["metadata"] = metadata
                else:
                    extra["subfiletype"] = 1  # a reduced-resolution copy of the image
                tif.write(
                    tiles(level_scale, out_w, out_h), shape=(out_h, out_w, 3), **options, **extra
                )
    return target


def _slide_region(
    slide: Slide, scale: float, ox: int, oy: int, width: int, height: int
) -> np.ndarray:
    """Pixels (ox, oy) to (ox + width, oy + height) of the slide drawn at ``scale`` output px
    per level-0 px: read from the coarsest pyramid level fine enough and area-averaged (BOX)
    with a fractional box, so that neighbouring regions meet without seams."""
    from PIL import Image

    info = slide.info
    level, _ = slide.level_for(info.level0_mpp / scale)
    ds = info.level_downsamples[level]
    f = 1.0 / (scale * ds)  # level px per output px
    lx0, ly0 = math.floor(ox * f), math.floor(oy * f)
    lx1, ly1 = math.ceil((ox + width) * f), math.ceil((oy + height) * f)
    region = slide.read_region(round(lx0 * ds), round(ly0 * ds), level, lx1 - lx0, ly1 - ly0)
    box = (ox * f - lx0, oy * f - ly0, (ox + width) * f - lx0, (oy + height) * f - ly0)
    resized = Image.fromarray(region).resize((width, height), Image.Resampling.BOX, box=box)
    return np.asarray(resized)


# ------------------------------------------------------------------------------ all together


def attention_heatmaps(
    run_dir: str | Path,
    cohort: Cohort,
    patient_id: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    fold: int | None = None,
    slides_dir: str | Path | None = None,
    max_side: int = 2048,
    cmap: str = "turbo",
    stamp_mpp: float | None = None,
    geojson: bool = True,
    full_resolution: bool = False,
    tiff_mpp: float | None = None,
    tiff_compression: str = "jpeg",
) -> HeatmapResult:
    """Write ``attention.csv`` and, per slide of ``patient_id``, ``<slide_id>.png`` (the
    overlay, ``max_side`` px on its longer side), ``figures/<slide_id>.png`` (with title and
    colour bar) and ``<slide_id>.geojson`` (one QuPath detection per patch); with
    ``full_resolution``, ``<slide_id>.ome.tif`` (the overlay at level 0, or at ``tiff_mpp`` µm
    per pixel, as a tiled pyramidal OME-TIFF). Further maps (gene groups) add
    ``<slide_id>.<map>.png`` and so on.

    ``fold`` defaults to the fold in which the patient was a test patient (out-of-fold
    attention); another fold is allowed but the result says that its model trained on the
    patient. The background is the slide itself when it can be found (``slides_dir``, or the
    path recorded by ``oncoslide extract``), else a white canvas. ``stamp_mpp`` (level-0 µm
    per pixel) places STAMP patches on the slide when their file does not record it. Images
    are never finer than the slide's level 0: a larger ``max_side`` (or a finer ``tiff_mpp``)
    is capped there, with a note.

    Raises:
        FeatureFileError: a slide file was found but the slide's feature file does not record
            the slide resolution (STAMP without ``mpp``) and ``stamp_mpp`` was not given.
    """
    if cmap not in colormaps:
        raise ConfigError(f"unknown colour map {cmap!r}")
    if max_side < 1:
        raise ConfigError(f"max_side must be a positive number of pixels, got {max_side}")
    if tiff_mpp is not None and not tiff_mpp > 0:
        raise ConfigError(f"tiff_mpp must be a positive number of µm per pixel, got {tiff_mpp}")
    full_resolution = full_resolution or tiff_mpp is not None
    run, out = Path(run_dir), Path(out_dir)
    config, splits = read_run(run)
    if str(patient_id) not in set(splits["patient_id"].astype(str)):
        raise ConfigError(f"patient {patient_id!r} is not in the run's splits ({run}/splits.csv)")
    chosen = held_out_fold(splits, patient_id, seed) if fold is None else int(fold)
    fold_model = _fold_model(run, config, splits, cohort, seed, chosen)
    # Read as training read the files (no stamp_mpp), so the model sees the coords it saw.
    cache = FeatureCache()
    notes: list[str] = []
    try:
        attention = patient_attention(fold_model, cohort, patient_id, cache)
        paths = dict(zip(cohort.slide_ids(patient_id), cohort.slide_paths(patient_id), strict=True))
        in_tiles = _to_level0(attention.table, paths, cache, stamp_mpp)
        slide_files = _slide_files(paths, in_tiles, slides_dir)
        if not attention.out_of_fold:
            notes.append(
                f"the model of seed {seed} fold {chosen} trained (or chose its checkpoint) on "
                f"{patient_id}: its attention "
                "is not an out-of-fold view (leave --fold unset for the test fold)"
            )
        table_path = out / "attention.csv"
        write_table(table_path, attention.table)
        result = HeatmapResult(attention, table_path, notes=notes)
        prediction = ", ".join(f"{k} {v:.3g}" for k, v in attention.prediction.items())
        view = "out-of-fold" if attention.out_of_fold else "trained on"
        for slide_id, rows in attention.table.groupby("slide_id", sort=False):
            slide_id = str(slide_id)
            path = Path(paths[slide_id])
            if (rows["x"] < 0).any():
                notes.append(f"{slide_id}: the feature file has no coordinates; no image drawn")
                continue
            level0 = slide_id not in in_tiles
            if not level0:
                notes.append(
                    f"{slide_id}: the feature file does not record the slide resolution; x, y "
                    "in attention.csv are pixels of its tile grid, not level-0 pixels (no "
                    "GeoJSON or full-resolution overlay)"
                )
            grid = _grid_of(path, rows, cache)
            slide_file = slide_files.get(slide_id)
            if slide_file is None:
                notes.append(f"{slide_id}: slide file not found; drawn on a blank canvas")
                background = None
            else:
                inferred = cache.get(path).grid is None
                background, grid = _background(
                    slide_file, slide_id, grid, inferred, max_side, notes
                )
                if background is None:
                    slide_file = None  # it does not fit the features: nothing to draw on
            side = _capped_side(max_side, grid)
            if side < max_side:
                notes.append(
                    f"{slide_id}: --max-side {max_side} is larger than the slide "
                    f"({grid.level0_width}x{grid.level0_height} px at level 0); drawn at "
                    f"{side} px, its full resolution"
                )
            if geojson and level0:
                collection = attention_geojson(rows, grid, cmap=cmap)
                target = out / f"{slide_id}.geojson"
                write_text(target, json.dumps(collection, separators=(",", ":")) + "\n")
                result.geojson[slide_id] = target
                outside = len(rows) - len(collection["features"])
                if outside:
                    notes.append(
                        f"{slide_id}: {outside} patch(es) lie outside the slide "
                        f"({grid.level0_width}x{grid.level0_height} px); left out of the GeoJSON"
                    )
            for name in (None, *map_names(rows)):
                drawn = rows if name is None else rows.assign(percentile=rows[f"percentile:{name}"])
                image = attention_overlay(
                    drawn, grid, max_side=side, background=background, cmap=cmap
                )
                what = "" if name is None else f" · {name} attention"
                title = (
                    f"{patient_id} · {slide_id} · {fold_model.config.model} seed {seed} fold "
                    f"{chosen} ({view}){what}"
                )
                description = f"{len(rows)} patches · prediction: {prediction}"
                stem = slide_id if name is None else f"{slide_id}.{name}"
                target = out / f"{stem}.png"
                write_png(image, target, title=title, description=description)
                result.images[stem] = target
                figure = out / "figures" / f"{stem}.png"
                _save_figure(image, f"{title}\n{description}", cmap, figure)
                result.figures[stem] = figure
            if full_resolution and level0:
                result.tiffs.update(
                    _write_tiffs(
                        rows, grid, slide_id, slide_file, cache.get(path).grid is None, out,
                        tiff_mpp, cmap, tiff_compression, notes,
                    )
                )  # fmt: skip
    finally:
        cache.close()
    return result


def _write_tiffs(
    rows: pd.DataFrame,
    grid: PatchGrid,
    slide_id: str,
    slide_file: Path | None,
    inferred: bool,
    out: Path,
    tiff_mpp: float | None,
    cmap: str,
    compression: str,
    notes: list[str],
) -> dict[str, Path]:
    """``<stem>.ome.tif`` for the slide's main map and each further map."""
    from oncoslide.slides.reader import UPSAMPLE_TOLERANCE, open_slide

    written: dict[str, Path] = {}
    slide = None
    try:
        # an inferred grid's resolution is a placeholder: the slide's metadata has the real one
        level0_mpp = None if inferred else grid.level0_mpp
        if slide_file is not None:
            slide = open_slide(slide_file, mpp_override=level0_mpp)
            level0_mpp = slide.info.level0_mpp
        scale = 1.0
        if tiff_mpp is not None and level0_mpp is None:
            notes.append(
                f"{slide_id}: the slide's resolution is unknown, so --tiff-mpp cannot be "
                "honoured; written at level 0"
            )
        elif tiff_mpp is not None and level0_mpp is not None:
            if tiff_mpp < level0_mpp * (1 - UPSAMPLE_TOLERANCE):
                notes.append(
                    f"{slide_id}: --tiff-mpp {tiff_mpp:g} is finer than the slide's level 0 "
                    f"({level0_mpp:g} µm/px); written at level 0"
                )
            else:
                scale = min(1.0, level0_mpp / tiff_mpp)
        for name in (None, *map_names(rows)):
            drawn = rows if name is None else rows.assign(percentile=rows[f"percentile:{name}"])
            stem = slide_id if name is None else f"{slide_id}.{name}"
            written[stem] = write_overlay_tiff(
                out / f"{stem}.ome.tif",
                drawn,
                grid,
                slide=slide,
                scale=scale,
                mpp=level0_mpp,
                cmap=cmap,
                compression=compression,
            )
    except OncoslideError as exc:
        notes.append(f"{slide_id}: no full-resolution overlay ({exc})")
    finally:
        if slide is not None:
            slide.close()
    return written


def _to_level0(
    table: pd.DataFrame, paths: dict[str, Path], cache: FeatureCache, stamp_mpp: float | None
) -> set[str]:
    """Put the table's x, y in level-0 pixels where the features came in tile-grid pixels
    (STAMP without the slide resolution) and ``stamp_mpp`` is given; return the slides whose
    positions stay in tile-grid pixels."""
    in_tiles = set()
    for slide_id, feature_path in paths.items():
        sf = cache.get(feature_path)
        if sf.coords_frame != "tile" or sf.n_patches == 0:  # an empty slide is not drawn
            continue
        if stamp_mpp is None:
            in_tiles.add(slide_id)
            continue
        # the same file in the same row order: the slide's rows of the table, in order
        placed = read_features(feature_path, stamp_mpp=stamp_mpp).coords
        rows = (table["slide_id"] == slide_id).to_numpy()
        table.loc[rows, "x"] = placed[:, 0]
        table.loc[rows, "y"] = placed[:, 1]
    return in_tiles


def _slide_files(
    paths: dict[str, Path], in_tiles: set[str], slides_dir: str | Path | None
) -> dict[str, Path]:
    """The slide file behind each feature file that has one.

    Checked for every slide before anything is written: patches can be placed on a slide only
    in level-0 pixels, which a STAMP file without the slide resolution cannot give.
    """
    found: dict[str, Path] = {}
    for slide_id, feature_path in paths.items():
        slide_path = find_slide_file(
            feature_path, slide_id, None if slides_dir is None else Path(slides_dir)
        )
        if slide_path is None:
            continue
        if slide_id in in_tiles:
            raise FeatureFileError(
                feature_path,
                "does not record the slide resolution (STAMP coordinates in micrometres "
                f"without mpp), so its patches cannot be placed on {slide_path.name}: give "
                "the slide's level-0 micrometres per pixel with --stamp-mpp (Python: "
                "stamp_mpp=...), or draw on a blank canvas without --slides",
            )
        found[slide_id] = slide_path
    return found


def _background(
    slide_path: Path,
    slide_id: str,
    grid: PatchGrid,
    inferred: bool,
    max_side: int,
    notes: list[str],
) -> tuple[np.ndarray | None, PatchGrid]:
    """The slide's thumbnail and the grid to draw on it (``None`` and ``grid`` when the slide
    does not fit the features). An ``inferred`` grid (the feature file describes none) only
    bounds the patches: the slide must contain them, and its own size is then used. The
    thumbnail is ``max_side`` px on its longer side, or the slide's level 0 if that is
    smaller."""
    from oncoslide.slides.reader import open_slide

    try:
        with open_slide(slide_path, mpp_override=grid.level0_mpp) as slide:
            width, height = slide.info.width, slide.info.height
            fits = (
                grid.level0_width <= width and grid.level0_height <= height
                if inferred
                else (width, height) == (grid.level0_width, grid.level0_height)
            )
            if not fits:
                what = "patches reach" if inferred else "features describe"
                notes.append(
                    f"{slide_id}: {slide_path.name} is {width}x{height} px but the {what} "
                    f"{grid.level0_width}x{grid.level0_height}; drawn on a blank canvas"
                )
                return None, grid
            if inferred:
                grid = dataclasses.replace(grid, level0_width=width, level0_height=height)
            image, _ = slide.thumbnail(max_side=_capped_side(max_side, grid))
            return image, grid
    except OncoslideError as exc:
        notes.append(f"{slide_id}: cannot read {slide_path} ({exc}); drawn on a blank canvas")
        return None, grid


__all__ = [
    "ATTENTION_COLUMNS",
    "TIFF_TILE",
    "FoldModel",
    "HeatmapResult",
    "PatientAttention",
    "attention_geojson",
    "attention_heatmaps",
    "attention_overlay",
    "find_slide_file",
    "held_out_fold",
    "load_fold_model",
    "patient_attention",
    "read_run",
    "write_overlay_tiff",
    "write_png",
]
