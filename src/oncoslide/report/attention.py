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
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from oncoslide._io import atomic_path, write_table
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
    images: dict[str, Path] = field(default_factory=dict)  # slide_id -> PNG
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
    with torch.no_grad():
        out = fold_model.model(features, mask, coords)
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
            dtype=np.float64,
        )
    else:
        base = np.full((out_h, out_w, 3), 255.0)
    paint = np.zeros((out_h, out_w, 3))
    covered = np.zeros((out_h, out_w), dtype=bool)
    colours = colormaps[cmap](rows["percentile"].to_numpy(dtype=float))[:, :3] * 255.0
    # patches in increasing attention: where patches overlap, the higher one is on top
    order = np.argsort(rows["percentile"].to_numpy(), kind="stable")
    # both edges rounded from level-0 positions: adjacent patches meet without gaps
    x_lo, y_lo = rows["x"].to_numpy(dtype=float), rows["y"].to_numpy(dtype=float)
    size = float(grid.patch_size_level0)
    xs0, ys0 = np.round(x_lo * scale).astype(int), np.round(y_lo * scale).astype(int)
    xs1 = np.maximum(np.round((x_lo + size) * scale).astype(int), xs0 + 1)
    ys1 = np.maximum(np.round((y_lo + size) * scale).astype(int), ys0 + 1)
    for i in order:
        x0, y0 = max(xs0[i], 0), max(ys0[i], 0)
        x1, y1 = min(xs1[i], out_w), min(ys1[i], out_h)
        if x1 > x0 and y1 > y0:
            paint[y0:y1, x0:x1] = colours[i]
            covered[y0:y1, x0:x1] = True
    image = base.copy()
    image[covered] = (1 - alpha) * base[covered] + alpha * paint[covered]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _save_figure(image: np.ndarray, title: str, cmap: str, target: Path) -> None:
    height, width = image.shape[:2]
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
) -> HeatmapResult:
    """Write ``attention.csv`` and one ``<slide_id>.png`` per slide of ``patient_id``.

    ``fold`` defaults to the fold in which the patient was a test patient (out-of-fold
    attention); another fold is allowed but the result says that its model trained on the
    patient. The background is the slide itself when it can be found (``slides_dir``, or the
    path recorded by ``oncoslide extract``), else a white canvas. ``stamp_mpp`` (level-0 µm
    per pixel) places STAMP patches on the slide when their file does not record it.

    Raises:
        FeatureFileError: a slide file was found but the slide's feature file does not record
            the slide resolution (STAMP without ``mpp``) and ``stamp_mpp`` was not given.
    """
    if cmap not in colormaps:
        raise ConfigError(f"unknown colour map {cmap!r}")
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
        for slide_id, rows in attention.table.groupby("slide_id", sort=False):
            path = Path(paths[str(slide_id)])
            if (rows["x"] < 0).any():
                notes.append(f"{slide_id}: the feature file has no coordinates; no image drawn")
                continue
            if str(slide_id) in in_tiles:
                notes.append(
                    f"{slide_id}: the feature file does not record the slide resolution; x, y "
                    "in attention.csv are pixels of its tile grid, not level-0 pixels"
                )
            grid = _grid_of(path, rows, cache)
            slide_file = slide_files.get(str(slide_id))
            if slide_file is None:
                notes.append(f"{slide_id}: slide file not found; drawn on a blank canvas")
                background = None
            else:
                inferred = cache.get(path).grid is None
                background, grid = _background(
                    slide_file, str(slide_id), grid, inferred, max_side, notes
                )
            view = "out-of-fold" if attention.out_of_fold else "trained on"
            for name in (None, *map_names(rows)):
                drawn = rows if name is None else rows.assign(percentile=rows[f"percentile:{name}"])
                image = attention_overlay(
                    drawn, grid, max_side=max_side, background=background, cmap=cmap
                )
                what = "" if name is None else f" · {name} attention"
                title = (
                    f"{patient_id} · {slide_id} · {fold_model.config.model} seed {seed} fold "
                    f"{chosen} ({view}){what}\n"
                    f"{len(rows)} patches · prediction: {prediction}"
                )
                stem = str(slide_id) if name is None else f"{slide_id}.{name}"
                target = out / f"{stem}.png"
                _save_figure(image, title, cmap, target)
                result.images[stem] = target
    finally:
        cache.close()
    return result


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
    bounds the patches: the slide must contain them, and its own size is then used."""
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
            image, _ = slide.thumbnail(max_side=max_side)
            if inferred:
                grid = dataclasses.replace(grid, level0_width=width, level0_height=height)
            return image, grid
    except OncoslideError as exc:
        notes.append(f"{slide_id}: cannot read {slide_path} ({exc}); drawn on a blank canvas")
        return None, grid


__all__ = [
    "ATTENTION_COLUMNS",
    "FoldModel",
    "HeatmapResult",
    "PatientAttention",
    "attention_heatmaps",
    "attention_overlay",
    "find_slide_file",
    "held_out_fold",
    "load_fold_model",
    "patient_attention",
    "read_run",
]
