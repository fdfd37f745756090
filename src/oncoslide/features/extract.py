"""Slides to feature files: tissue, tiles, patch encoder, one HDF5 file per slide.

The unit of work is one slide (:func:`extract_slide`): pure and idempotent — its result depends
only on the slide file and the :class:`ExtractConfig`, and a slide whose feature file already
holds the same extraction fingerprint is skipped. Every file is written atomically, so a killed
run leaves finished slides and nothing partial; running it again finishes the set.

An output folder holds one extraction: its settings are recorded in ``extraction.json``, and a
run with other settings (encoder, weights, µm/px, patch size, ...) is refused rather than
replacing the files, unless ``overwrite`` (then the earlier features are removed first). A
feature file made with another per-slide µm/px override is kept and its slide reported, too.

:func:`extract_slides` runs a list of slides in this process (patch decoding in DataLoader
worker processes overlaps the encoder) or fans them out over a Ray cluster, and writes a
manifest (slide, status, patches, seconds, error, resolution) after every slide, so a killed run
leaves a manifest of the slides it finished. A slide that cannot be read is reported in the
manifest and the run goes on; a write that fails (a full disk) stops the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd
import torch
from rich.markup import escape
from torch.utils.data import DataLoader, Dataset, get_worker_info

from oncoslide._io import read_table_file, write_json, write_table
from oncoslide._log import get_logger, run_log
from oncoslide._ray import TaskFailed, map_unordered
from oncoslide.errors import ConfigError, OncoslideError, WriteError
from oncoslide.features.schema import write_feature_file

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
)  # fmt: skip
STATUS_DONE, STATUS_SKIPPED, STATUS_FAILED, STATUS_EMPTY = "done", "skipped", "failed", "no_tissue"
PREVIEW_SIDE = 1200  # px along the longer side of the preview PNG
MANIFEST_COLUMNS = (
    "slide_id", "path", "status", "patches", "seconds", "error", "level0_mpp", "mpp_source",
)  # fmt: skip
SETTINGS_FILE = "extraction.json"  # the folder's extraction settings and encoder weights

_LOG = get_logger("extract")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """How patches are cut and embedded. Every field but the execution ones sets the output."""

    encoder: str = "efficientnet-lite0"
    weights: str | None = None  # local weights file/folder for encoders that need one
    target_mpp: float = 0.5
    patch_size: int = 224
    overlap: int = 0
    min_tissue_fraction: float = 0.25
    tissue: dict[str, Any] = field(default_factory=dict)  # TissueConfig overrides
    dtype: Literal["float16", "float32"] = "float32"
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp_override: float | None = None  # replaces every slide's metadata
    # execution only
    batch_size: int = 64
    num_workers: int | None = None  # patch-reading processes; None: see default_workers()
    device: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.target_mpp <= 0:
            problems.append(f"target_mpp must be > 0, got {self.target_mpp}")
        if self.patch_size < 8:
            problems.append(f"patch_size must be >= 8, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            problems.append(f"overlap must be in [0, patch_size), got {self.overlap}")
        if not 0 <= self.min_tissue_fraction <= 1:
            problems.append("min_tissue_fraction must be in [0, 1]")
        if self.batch_size < 1 or (self.num_workers is not None and self.num_workers < 0):
            problems.append("batch_size must be >= 1 and num_workers >= 0")
        if self.mpp_override is not None and self.mpp_override <= 0:
            problems.append("mpp_override must be > 0")
        if problems:
            raise ConfigError(
                "invalid extraction settings:\n" + "\n".join(f"  - {p}" for p in problems)
            )

    def output_settings(self) -> dict[str, Any]:
        """The settings that determine the feature file's content."""
        skip = {"batch_size", "num_workers", "device", "weights"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def folder_settings(self) -> dict[str, Any]:
        """The output settings every feature file of one output folder shares, as JSON values:
        all but the µm/px override, which describes slides (like a slide list's ``mpp``)."""
        settings = self.output_settings()
        settings.pop("mpp_override")
        return dict(json.loads(json.dumps(settings, sort_keys=True, default=str)))

    def fingerprint(self, weights_fingerprint: str, mpp_override: float | None = None) -> str:
        payload = {
            **self.output_settings(),
            "weights_fingerprint": weights_fingerprint,
            "slide_mpp_override": mpp_override,
        }
        blob = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SlideJob:
    """One slide to extract: its path, the id its feature file is named by, an optional MPP."""

    path: str
    slide_id: str
    mpp: float | None = None  # per-slide override (slides CSV column `mpp`)


@dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str
    patches: int = 0
    seconds: float = 0.0
    error: str = ""
    level0_mpp: float | None = None
    mpp_source: str = ""

    def row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in MANIFEST_COLUMNS}


def settings_notes(config: ExtractConfig) -> list[str]:
    """Warnings about settings that differ from what the encoder was trained on."""
    from oncoslide.encoders import encoder_info
    from oncoslide.encoders.base import resolution_warning

    info = encoder_info(config.encoder)
    notes = []
    warning = resolution_warning(info, config.target_mpp)
    if warning:
        notes.append(warning)
    if config.patch_size != info.input_size:
        notes.append(
            f"patches of {config.patch_size} px are resized to {info.input_size} px "
            f"for {info.name} (pass --patch-size {info.input_size} to cut them at its input size)"
        )
    return notes


# ------------------------------------------------------------------------------ slide lists


def find_slides(source: str | os.PathLike[str]) -> list[SlideJob]:
    """Slides from a folder (searched recursively by suffix), one slide file, or a CSV/Parquet list.

    A list has a ``path`` (or ``slide_path``) column and optional ``slide_id`` and ``mpp``
    columns; relative paths are relative to the list's folder. Slide ids default to the file
    name without its suffix and must be unique.
    """
    src = Path(source)
    problems: list[str] = []
    if src.is_dir():
        paths = sorted(
            p for p in src.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file()
        )
        jobs = [SlideJob(str(p), p.stem) for p in paths]
        if not jobs:
            problems.append(f"no slides ({', '.join(SLIDE_SUFFIXES)}) found under {src}")
    elif src.is_file() and src.suffix.lower() in SLIDE_SUFFIXES:
        jobs = [SlideJob(str(src), src.stem)]
    elif src.is_file():
        table = read_table_file(src, problems, string_columns=("slide_id", "path", "slide_path"))
        jobs = [] if table is None else _jobs_from_table(table, src.parent, problems)
    else:
        problems.append(f"{src} is neither a folder of slides nor a slide list")
        jobs = []
    ids: dict[str, list[str]] = {}
    for job in jobs:
        ids.setdefault(job.slide_id, []).append(job.path)
    for sid, named in ids.items():
        if len(named) > 1:
            problems.append(f"slide id {sid!r} names {len(named)} slides: {', '.join(named[:3])}")
    if problems:
        raise ConfigError(f"slides {src}:\n" + "\n".join(f"  - {p}" for p in problems))
    return jobs


def _jobs_from_table(table: pd.DataFrame, root: Path, problems: list[str]) -> list[SlideJob]:
    col = "path" if "path" in table.columns else "slide_path" if "slide_path" in table else None
    if col is None:
        problems.append("the slide list needs a 'path' (or 'slide_path') column")
        return []
    jobs = []
    for i, row in enumerate(table.to_dict("records")):
        raw = row.get(col)
        if raw is None or (isinstance(raw, float) and np.isnan(raw)):
            problems.append(f"row {i + 1}: empty path")
            continue
        path = Path(str(raw))
        path = path if path.is_absolute() else root / path
        sid = row.get("slide_id")
        sid = path.stem if sid is None or (isinstance(sid, float) and np.isnan(sid)) else str(sid)
        mpp = row.get("mpp")
        mpp = None if mpp is None or pd.isna(mpp) else float(mpp)
        if mpp is not None and mpp <= 0:
            problems.append(f"row {i + 1} ({sid}): mpp must be > 0, got {mpp}")
        jobs.append(SlideJob(str(path), sid, mpp))
    return jobs


# ------------------------------------------------------------------------------ one slide


class _PatchDataset(Dataset):
    """Patches of one slide; each DataLoader worker opens its own handle to the slide."""

    def __init__(self, path: str, coords: np.ndarray, config: ExtractConfig, mpp: float | None):
        self.path, self.coords, self.config, self.mpp = path, coords, config, mpp
        self._slide: Any = None
        self._owner: int | None = None

    def _handle(self) -> Any:
        from oncoslide.slides import open_slide

        worker = get_worker_info()
        owner = None if worker is None else worker.id
        if self._slide is None or self._owner != owner:
            self._slide = open_slide(self.path, backend=self.config.backend, mpp_override=self.mpp)
            self._owner = owner
        return self._slide

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> np.ndarray:
        x, y = (int(v) for v in self.coords[i])
        return self._handle().read_patch(x, y, self.config.patch_size, self.config.target_mpp)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _stack(patches: list[np.ndarray]) -> np.ndarray:
    return np.stack(patches)


def existing_fingerprint(path: Path) -> str | None:
    """The extraction fingerprint stored in a finished feature file, or None."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("extraction_fingerprint")
            return None if value is None else str(value)
    except (OSError, KeyError):
        return None


def extract_slide(
    job: SlideJob,
    out_dir: str | os.PathLike[str],
    config: ExtractConfig,
    encoder: Any,
    *,
    on_batch: Callable[[int, int], None] | None = None,
    replace: bool = False,
) -> SlideResult:
    """Tissue, tiles, features and previews of one slide. Never raises for a bad slide.

    Writes ``<out>/<slide_id>.h5`` (the feature-file contract), ``<out>/thumbnails/<slide_id>.png``
    (tissue outline and kept patches) and ``<out>/masks/<slide_id>.geojson`` / ``.png`` (the
    tissue mask as polygons in level-0 px, and as an image at the mask's resolution).

    A feature file of the same settings is kept (status ``skipped``); one of other settings is
    kept too and the slide fails saying what differs, unless ``replace``.
    """
    from oncoslide.slides import (
        TilingConfig,
        TissueConfig,
        detect_tissue,
        open_slide,
        render_preview,
        tile_slide,
    )

    started = time.perf_counter()
    out = Path(out_dir)
    target = out / f"{job.slide_id}.h5"
    mpp = config.mpp_override if config.mpp_override is not None else job.mpp
    fingerprint = config.fingerprint(encoder.weights_fingerprint, mpp)
    result = _new_result(job, config)
    if target.exists() and existing_fingerprint(target) == fingerprint:
        result.status = STATUS_SKIPPED
        with h5py.File(target, "r") as f:
            result.patches = int(f["features"].shape[0])
            # the resolution the finished file was cut from, as a fresh run would report it
            level0_mpp = f["coords"].attrs.get("level0_mpp")
            source = f.attrs.get("mpp_source")
        if level0_mpp is not None:
            result.level0_mpp = float(level0_mpp)
        if source is not None:
            result.mpp_source = str(source)
        return result
    if target.exists() and not replace:
        differences = _file_differences(target, config, encoder.weights_fingerprint, mpp)
        result.error = (
            f"{target} holds features extracted with other settings ({differences}): kept; "
            "pass --overwrite to replace it, or extract into another --out"
        )
        result.seconds = time.perf_counter() - started
        return result
    dataset = None
    try:
        with open_slide(job.path, backend=config.backend, mpp_override=mpp) as slide:
            info = slide.info
            result.level0_mpp, result.mpp_source = info.level0_mpp, info.mpp_source
            tissue_cfg = TissueConfig.from_mapping(config.tissue)
            mask = detect_tissue(slide, tissue_cfg)
            tiles = tile_slide(
                info,
                mask,
                TilingConfig(
                    target_mpp=config.target_mpp,
                    patch_size=config.patch_size,
                    overlap=config.overlap,
                    min_tissue_fraction=config.min_tissue_fraction,
                ),
            )
            side = min(PREVIEW_SIDE, max(info.width, info.height))
            thumb, _ = slide.thumbnail(max_side=side)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        mask.to_geojson(out / "masks" / f"{job.slide_id}.geojson")
        mask.save_png(out / "masks" / f"{job.slide_id}.png")
        render_preview(thumb, mask, tiles, out / "thumbnails" / f"{job.slide_id}.png")
        if len(tiles.coords) == 0:
            result.status = STATUS_EMPTY
            result.error = "no patch with enough tissue"
            return result
        dataset = _PatchDataset(job.path, tiles.coords, config, mpp)
        features = _encode(dataset, encoder, config, on_batch)
        write_feature_file(
            target,
            features,
            tiles.coords,
            grid=tiles.grid,
            encoder=config.encoder,
            weights_fingerprint=encoder.weights_fingerprint,
            dtype=config.dtype,
            attrs={
                "extraction_fingerprint": fingerprint,
                "extraction": json.dumps(config.output_settings(), sort_keys=True, default=str),
                # absolute, so a heatmap finds the slide from any working folder
                "slide_path": os.path.abspath(job.path),
                "mpp_source": info.mpp_source,
            },
        )
        result.status, result.patches = STATUS_DONE, len(tiles.coords)
    except WriteError:
        raise  # a full disk fails every slide after this one too: stop, finished slides stay
    except OncoslideError as exc:
        result.error = str(exc)
    except Exception as exc:  # a broken slide must not stop the batch
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if dataset is not None:
            dataset.close()
        result.seconds = time.perf_counter() - started
    return result


def _file_differences(
    path: Path, config: ExtractConfig, weights_fingerprint: str, mpp: float | None
) -> str:
    """What differs between the extraction that wrote ``path`` and this one, stored value
    first: "patch_size 224 -> 256", "encoder weights ab12 -> cd34", "slide µm/px ..."."""
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("extraction")
            weights = f["features"].attrs.get("weights_fingerprint") if "features" in f else None
            source = f.attrs.get("mpp_source")
            level0 = f["coords"].attrs.get("level0_mpp") if "coords" in f else None
    except (OSError, KeyError) as exc:
        return f"it cannot be read: {exc}"
    if raw is None:
        return "it was not written by oncoslide extract"
    try:
        stored = dict(json.loads(str(raw)))
    except (ValueError, TypeError):
        return "its recorded settings cannot be read"
    stored_mpp = stored.pop("mpp_override", None)
    items = setting_changes(stored, config.folder_settings())
    if weights is not None and str(weights) != weights_fingerprint:
        items.append(f"encoder weights {weights} -> {weights_fingerprint}")
    if source == "override" and level0 is not None:
        stored_mpp = float(level0)
    if (stored_mpp is None) != (mpp is None) or (
        stored_mpp is not None and mpp is not None and not np.isclose(stored_mpp, mpp)
    ):
        shown = [
            f"{v:g} (override)" if v is not None else "from metadata" for v in (stored_mpp, mpp)
        ]
        items.append(f"slide µm/px {shown[0]} -> {shown[1]}")
    return "; ".join(items) or "another extraction fingerprint"


def setting_changes(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """``"name stored -> requested"`` for every setting that differs (missing: "-")."""
    changes = []
    for name in sorted(set(stored) | set(requested)):
        before, after = stored.get(name, "-"), requested.get(name, "-")
        if before != after:
            changes.append(f"{name} {_shown(before)} -> {_shown(after)}")
    return changes


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _new_result(job: SlideJob, config: ExtractConfig) -> SlideResult:
    """A failed result that already holds what is known before the slide is opened: with an
    override (``--mpp-override`` or the slide list's ``mpp``), the level-0 resolution, so a
    slide that cannot be opened still shows the µm/px it was to be read at."""
    mpp = config.mpp_override if config.mpp_override is not None else job.mpp
    result = SlideResult(job.slide_id, job.path, STATUS_FAILED)
    if mpp is not None:
        result.level0_mpp, result.mpp_source = float(mpp), "override"
    return result


def _encode(
    dataset: _PatchDataset,
    encoder: Any,
    config: ExtractConfig,
    on_batch: Callable[[int, int], None] | None,
) -> np.ndarray:
    workers = config.num_workers
    if workers is None:
        workers = default_workers(str(next(encoder.parameters()).device))
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=workers,
        collate_fn=_stack,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        multiprocessing_context="fork" if workers > 0 and os.name == "posix" else None,
    )
    chunks, done = [], 0
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        for images in loader:
            x = encoder.preprocess(images).to(device, non_blocking=True)
            chunks.append(encoder(x).float().cpu().numpy())
            done += len(images)
            if on_batch is not None:
                on_batch(done, len(dataset))
    return np.concatenate(chunks).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------ many slides


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete temporary files left by a killed run (ours only: hidden ``.*.tmp`` names)."""
    removed = 0
    for tmp in out_dir.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def default_workers(device: str) -> int:
    """Patch-reading processes when none are asked for.

    On a GPU, reading is the bottleneck: use most cores. On a CPU the encoder already uses every
    core and reads run about four times faster than it encodes, so extra reader processes only
    compete with it (measured on 2 cores: 0 workers ran 1.6x faster than 2); a few help only on
    many-core machines.
    """
    cpus = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(8, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 4)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def extract_slides(
    jobs: Sequence[SlideJob],
    out_dir: str | os.PathLike[str],
    config: ExtractConfig,
    *,
    executor: Literal["local", "ray"] = "local",
    address: str | None = None,
    gpus_per_slide: float = 0.0,
    progress: Any = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Extract every slide, write ``manifest.csv`` and return it.

    The manifest is rewritten (atomically) after every slide: a killed run leaves one listing
    the slides it finished. ``progress`` is a rich Progress (or None). With ``executor="ray"``
    slides run as Ray tasks on the cluster at ``address`` (a local instance when None), each
    reserving ``gpus_per_slide`` GPUs: Ray hides GPUs from tasks that reserve none, so encoding
    on GPUs needs e.g. 1 or 0.5.

    Raises:
        ConfigError: ``out_dir`` holds features extracted with other settings (see
            ``extraction.json``) and ``overwrite`` is false; with ``overwrite`` the earlier
            features, previews and manifest are removed first.
    """
    out = Path(out_dir)
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}: use 'local' or 'ray'")
    record = check_output_folder(out, config, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    _write_record(out, config, record.get("weights_fingerprint") if record else None)
    manifest = _Manifest(out / "manifest.csv", jobs)
    with run_log(out, "extraction"):
        _LOG.info(
            "extracting %d slide(s) with %s at %s µm/px -> %s",
            len(jobs), config.encoder, config.target_mpp, out, extra={"event": "start"},
        )  # fmt: skip
        if executor == "ray":
            _run_ray(jobs, out, config, address, gpus_per_slide, progress, manifest.add, overwrite)
            if not (record or {}).get("weights_fingerprint"):
                _write_record(out, config, _weights_of_folder(out))
        else:
            _run_local(jobs, out, config, progress, manifest.add, record, overwrite)
    return manifest.frame()


def read_folder_record(out: Path) -> dict[str, Any] | None:
    """The extraction an output folder holds: ``{"settings": ..., "weights_fingerprint": ...}``
    from its ``extraction.json``, or, in a folder written before that file existed, from its
    first feature file; None for a folder without a feature file of oncoslide extract (a run
    that stopped before its first slide, e.g. on a missing package, binds nothing).

    Raises:
        ConfigError: ``extraction.json`` cannot be read.
    """
    record_file = out / SETTINGS_FILE
    if not any(existing_fingerprint(path) is not None for path in out.glob("*.h5")):
        return None
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            settings = record["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"cannot read {record_file} ({type(exc).__name__}: {exc}): extract into "
                "another --out, or pass --overwrite to replace the folder's features"
            ) from None
        return {"settings": settings, "weights_fingerprint": record.get("weights_fingerprint")}
    return _record_from_feature_files(out)


def _record_from_feature_files(out: Path) -> dict[str, Any] | None:
    """The record of the first feature file in ``out`` written by oncoslide extract."""
    if not out.is_dir():
        return None
    for path in sorted(out.glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("extraction")
                weights = f["features"].attrs.get("weights_fingerprint")
            if raw is None:
                continue  # not written by oncoslide extract
            settings = dict(json.loads(str(raw)))
        except (OSError, KeyError, ValueError, TypeError):
            continue
        settings.pop("mpp_override", None)
        return {
            "settings": settings,
            "weights_fingerprint": None if weights is None else str(weights),
        }
    return None


def check_output_folder(
    out: Path, config: ExtractConfig, *, overwrite: bool = False
) -> dict[str, Any] | None:
    """Refuse an output folder that holds an extraction with other settings (with
    ``overwrite``: remove its features first). Returns the folder's record when it is kept."""
    try:
        record = read_folder_record(out)
    except ConfigError:
        if not overwrite:
            raise
        record = {"settings": {}, "weights_fingerprint": None}  # replaced below
    if record is None:
        return None
    changes = setting_changes(record["settings"], config.folder_settings())
    if not changes:
        return record
    _refuse_or_clear(out, changes, overwrite)
    return None


def _refuse_or_clear(out: Path, changes: list[str], overwrite: bool) -> None:
    if not overwrite:
        raise ConfigError(
            f"{out} holds features extracted with other settings (stored -> requested: "
            f"{'; '.join(changes)}); extract into another --out, or pass --overwrite to "
            "replace them"
        )
    _LOG.info("--overwrite: removing the features extracted with other settings in %s", out)
    remove_extraction(out)


def remove_extraction(out: Path) -> None:
    """Delete what ``oncoslide extract`` wrote in ``out`` (feature files carrying an extraction
    fingerprint, previews, masks, manifest, settings); other files stay."""
    for path in out.glob("*.h5"):
        if existing_fingerprint(path) is not None:
            path.unlink()
    for name in ("thumbnails", "masks"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("manifest.csv", SETTINGS_FILE):
        (out / name).unlink(missing_ok=True)


def _write_record(out: Path, config: ExtractConfig, weights_fingerprint: str | None) -> None:
    write_json(
        out / SETTINGS_FILE,
        {"settings": config.folder_settings(), "weights_fingerprint": weights_fingerprint},
    )


def _weights_of_folder(out: Path) -> str | None:
    """The encoder weights fingerprint of a feature file the run left (Ray runs build the
    encoder in the workers only)."""
    record = _record_from_feature_files(out)
    return None if record is None else record.get("weights_fingerprint")


class _Manifest:
    """The rows of the slides finished so far, in the order of the slide list, on disk."""

    def __init__(self, path: Path, jobs: Sequence[SlideJob]) -> None:
        self.path = path
        self.order = {job.slide_id: i for i, job in enumerate(jobs)}
        self.results: dict[str, SlideResult] = {}

    def add(self, result: SlideResult) -> None:
        self.results[result.slide_id] = result
        write_table(self.path, self.frame())
        done, total = len(self.results), len(self.order)
        what = f"{result.patches} patches" if result.status == STATUS_DONE else result.status
        if result.status == STATUS_FAILED:
            what += f": {result.error.splitlines()[0] if result.error else ''}"
        _LOG.log(
            logging.WARNING if result.status == STATUS_FAILED else logging.INFO,
            "[%d/%d] %s: %s (%.1f s)", done, total, result.slide_id, what, result.seconds,
            extra={"event": "slide", "slide_id": result.slide_id, "status": result.status,
                   "patches": result.patches, "seconds": result.seconds},
        )  # fmt: skip

    def frame(self) -> pd.DataFrame:
        done = sorted(self.results.values(), key=lambda r: self.order[r.slide_id])
        return pd.DataFrame([r.row() for r in done], columns=list(MANIFEST_COLUMNS))


def _run_local(
    jobs: Sequence[SlideJob],
    out: Path,
    config: ExtractConfig,
    progress: Any,
    on_result: Callable[[SlideResult], None],
    record: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    from oncoslide.encoders import create_encoder

    encoder = create_encoder(
        config.encoder, weights=config.weights, device=resolve_device(config.device)
    )
    # the weights are known once loaded: other weights under the same encoder name are other
    # features, refused (or replaced) like any other setting
    stored = (record or {}).get("weights_fingerprint")
    if stored and stored != encoder.weights_fingerprint:
        _refuse_or_clear(
            out, [f"encoder weights {stored} -> {encoder.weights_fingerprint}"], overwrite
        )
    _write_record(out, config, encoder.weights_fingerprint)
    overall = progress.add_task("slides", total=len(jobs)) if progress is not None else None
    for job in jobs:
        task = (
            progress.add_task(f"  {escape(job.slide_id)}", total=None)
            if progress is not None
            else None
        )

        def on_batch(done: int, total: int, task: Any = task) -> None:
            if progress is not None:
                progress.update(task, completed=done, total=total)

        on_result(extract_slide(job, out, config, encoder, on_batch=on_batch, replace=overwrite))
        if progress is not None:
            progress.remove_task(task)
            progress.advance(overall)


_WORKER_ENCODERS: dict[tuple[str, str | None, str], Any] = {}


def _ray_extract(job: SlideJob, out: str, config: ExtractConfig, replace: bool) -> SlideResult:
    """The Ray task: one slide; the encoder is built once per worker process and reused."""
    from oncoslide.encoders import create_encoder

    device = resolve_device(config.device)
    key = (config.encoder, config.weights, device)
    if key not in _WORKER_ENCODERS:
        _WORKER_ENCODERS[key] = create_encoder(
            config.encoder, weights=config.weights, device=device
        )
    # Ray tasks are the parallelism: decode patches in the task's own process
    local = dataclasses.replace(config, num_workers=0)
    return extract_slide(job, out, local, _WORKER_ENCODERS[key], replace=replace)


def _run_ray(
    jobs: Sequence[SlideJob],
    out: Path,
    config: ExtractConfig,
    address: str | None,
    gpus_per_slide: float,
    progress: Any,
    on_result: Callable[[SlideResult], None],
    replace: bool = False,
) -> None:
    overall = progress.add_task("slides (ray)", total=len(jobs)) if progress is not None else None
    tasks = map_unordered(
        _ray_extract, jobs, str(out), config, replace, address=address, num_gpus=gpus_per_slide
    )
    for job, outcome in tasks:
        # a crashed worker is one failed slide, not a failed run
        if isinstance(outcome, TaskFailed):
            outcome = dataclasses.replace(_new_result(job, config), error=outcome.message)
        on_result(outcome)
        if progress is not None:
            progress.advance(overall)


def summarise_manifest(manifest: pd.DataFrame) -> dict[str, int]:
    counts = manifest["status"].value_counts().to_dict()
    return {
        s: int(counts.get(s, 0)) for s in (STATUS_DONE, STATUS_SKIPPED, STATUS_EMPTY, STATUS_FAILED)
    }


__all__ = [
    "ExtractConfig",
    "SlideJob",
    "SlideResult",
    "extract_slide",
    "extract_slides",
    "find_slides",
]
