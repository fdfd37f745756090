"""Shared fixtures, built once per test session in temporary folders.

Simulated cohorts (small and fast to train on), and slides derived from the real Aperio SVS in
tests/data: a three-level pyramidal TIFF (downsamples 1, 2, 4, tiled, lossless deflate,
resolution tags in centimetres), copies without a usable resolution, and damaged copies. The
pyramid levels are made here by 2x2 means with numpy, so tests can compare what the reader
returns with pixels computed independently of it.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from oncoslide.simulate import SimulationConfig, simulate_cohort, write_permuted_cohort

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# The test files that take longest under ``make test`` (seconds on 2 cores, measured
# 2026-12-02 with --durations), started first: pytest-xdist hands out whole files (--dist
# loadfile) and by default the files with the most tests first, which left the slowest
# one-test file running alone at the end. ``make test`` keeps this order
# (--no-loadscope-reorder); the other files follow in collection order.
SCHEDULE_FIRST = (
    "tests/training/test_planted_signal.py",  # 196
    "tests/bench/test_runner.py",  # 200
    "tests/test_cli.py",  # 120
    "tests/features/test_extract.py",  # 80
    "tests/training/test_ddp.py",  # 40
    "tests/report/test_patient.py",  # 35
    "tests/report/test_prototypes.py",  # 30
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the files of ``SCHEDULE_FIRST`` first, in its order (a stable sort: the tests of a
    file and the other files keep their order)."""
    root = Path(str(config.rootpath))
    rank = {name: i for i, name in enumerate(SCHEDULE_FIRST)}

    def key(item: pytest.Item) -> int:
        try:
            name = Path(str(item.path)).relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(name, len(rank))

    items.sort(key=key)


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """Loads ``benchmarks/<name>.py`` as the module ``<name>`` (benchmarks/ is put on sys.path,
    so the scripts' imports of each other resolve to the same modules)."""

    def load(name: str) -> ModuleType:
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_ray_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests that start a local Ray instance take turns: under pytest-xdist (``make test``
    runs two workers) two instances at once, each with its own worker processes, starve each
    other on a 2-core machine. A file lock in the folder the workers share."""
    import fcntl
    import os

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' basetemps are siblings
    with (root / "ray.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(autouse=True, scope="session")
def _scan_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Feature-file scans are cached in a session folder, never in the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ONCOSLIDE_CACHE_DIR", str(tmp_path_factory.mktemp("scan-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 patients, 2 cancer types, 16-d features, ~40 patches per slide (seconds to train)."""
    out = tmp_path_factory.mktemp("tiny-cohort")
    config = SimulationConfig(
        n_patients=40,
        n_cohorts=2,
        feature_dim=16,
        patches_median=40,
        patches_min=10,
        patches_max=120,
        n_genes=24,
        seed=3,
    )
    simulate_cohort(out, config)
    write_permuted_cohort(out / "cohort.csv", out / "cohort_permuted.csv", seed=1)
    return out


def write_stamp_file(
    path: Path,
    feats: np.ndarray,
    grid_xy: np.ndarray,
    *,
    tile_size_um: float = 128.0,
    tile_size_px: int = 256,
) -> Path:
    """A feature file exactly as STAMP >= 2.1 writes it: ``feats`` (float16, STAMP stores
    ``.half()``), float32 ``coords`` in micrometres (tile grid positions x ``tile_size_um``),
    file attributes ``unit="um"``, ``tile_size_um``, ``tile_size_px`` and no slide resolution."""
    with h5py.File(path, "w") as f:
        f["coords"] = (np.asarray(grid_xy, dtype=np.float32) * tile_size_um).reshape(-1, 2)
        f["feats"] = np.asarray(feats, dtype=np.float16)
        f.attrs["stamp_version"] = "2.3.0"
        f.attrs["extractor"] = "ctranspath"
        f.attrs["unit"] = "um"
        f.attrs["tile_size_um"] = tile_size_um
        f.attrs["tile_size_px"] = tile_size_px
        f.attrs["code_hash"] = "0123abcd"
        f.attrs["feat_type"] = "tile"
    return path


@pytest.fixture(scope="session")
def write_stamp() -> Callable[..., Path]:
    """:func:`write_stamp_file`, for test modules (conftest is not importable from them)."""
    return write_stamp_file


@pytest.fixture(scope="session")
def stamp_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 patients with one STAMP slide each (128 µm tiles of 256 px on an 8 x 10 grid, which
    fits inside the bundled SVS at its 0.499 µm/px); P00 also has an empty slide P00-S2.
    Feature 0 carries the hazard. ``cohort.csv`` (survival) and ``features/``."""
    out = tmp_path_factory.mktemp("stamp-cohort")
    (out / "features").mkdir()
    rng = np.random.default_rng(11)
    cells = np.array([(x, y) for y in range(10) for x in range(8)])
    rows = []
    for i in range(12):
        risk = rng.normal()
        grid_xy = cells[np.sort(rng.choice(len(cells), 20, replace=False))]
        feats = rng.normal(size=(20, 8))
        feats[:, 0] += risk
        sid = f"P{i:02d}-S1"
        write_stamp_file(out / "features" / f"{sid}.h5", feats, grid_xy)
        time = float(rng.exponential(np.exp(-risk)))
        rows.append({"patient_id": f"P{i:02d}", "slide_id": sid, "time": time, "event": 1})
    write_stamp_file(out / "features" / "P00-S2.h5", np.zeros((0, 8)), np.zeros((0, 2)))
    rows.append({**rows[0], "slide_id": "P00-S2"})
    pd.DataFrame(rows).to_csv(out / "cohort.csv", index=False)
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds overhead (a lot on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- slides

DATA = Path(__file__).resolve().parent / "data"
SVS_MPP = 0.499
SVS_SIZE = (2220, 2967)  # width, height


@pytest.fixture(scope="session")
def svs_path() -> Path:
    return DATA / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def svs_pixels(svs_path: Path) -> np.ndarray:
    """Level 0 of the SVS decoded by tifffile (not through the reader under test)."""
    with tifffile.TiffFile(svs_path) as tif:
        return tif.pages[0].asarray()


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 means (a trailing odd row or column is dropped), rounded to uint8."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).astype(np.float64)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


@pytest.fixture(scope="session")
def pyramid_levels(svs_pixels: np.ndarray) -> list[np.ndarray]:
    levels = [svs_pixels]
    for _ in range(2):
        levels.append(halve(levels[-1]))
    return levels


def write_pyramid(
    path: Path,
    levels: list[np.ndarray],
    *,
    mpp: float | None,
    unit: str = "CENTIMETER",
    compression: str = "zlib",
) -> Path:
    """A tiled TIFF with one top-level page per level (readable by OpenSlide and tiffslide).

    ``mpp=None`` writes no resolution (tifffile then stores 1/1 with unit NONE, "unknown").
    """
    per_unit_um = {"CENTIMETER": 1e4, "INCH": 25_400.0}[unit]
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            options: dict = {
                "tile": (256, 256),
                "photometric": "rgb",
                "compression": compression,
                "subfiletype": 1 if i else 0,  # reduced-resolution image
            }
            if compression == "zlib":
                options["compressionargs"] = {"level": 1}  # fast; still lossless
            if mpp is not None:
                res = per_unit_um / (mpp * 2**i)
                options.update(resolution=(res, res), resolutionunit=unit)
            tif.write(level, **options)
    return path


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory: pytest.TempPathFactory, pyramid_levels) -> Path:
    out = tmp_path_factory.mktemp("pyramid") / "cmu_pyramid.tif"
    return write_pyramid(out, pyramid_levels, mpp=SVS_MPP)


@pytest.fixture(scope="session")
def small_tiffs(tmp_path_factory: pytest.TempPathFactory, svs_pixels) -> dict[str, Path]:
    """Single-level 512 x 512 crops: without resolution, with 72 dpi, in inches, anisotropic."""
    out = tmp_path_factory.mktemp("small")
    crop = [np.ascontiguousarray(svs_pixels[1000:1512, 800:1312])]
    paths = {
        "no_mpp": write_pyramid(out / "no_mpp.tif", crop, mpp=None),
        "dpi72": write_pyramid(out / "dpi72.tif", crop, mpp=25_400 / 72, unit="INCH"),
        "inch": write_pyramid(out / "inch.tif", crop, mpp=0.25, unit="INCH"),
        "tiny_mpp": write_pyramid(out / "tiny_mpp.tif", crop, mpp=0.001),
    }
    aniso = out / "anisotropic.tif"
    tifffile.imwrite(
        aniso,
        crop[0],
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / 0.25, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    paths["anisotropic"] = aniso
    return paths


@pytest.fixture(scope="session")
def damaged_slides(tmp_path_factory: pytest.TempPathFactory, svs_path: Path) -> dict[str, Path]:
    """A truncated copy (its directory is lost), tile data zeroed, and a text file named .svs."""
    out = tmp_path_factory.mktemp("damaged")
    data = bytearray(svs_path.read_bytes())
    truncated = out / "truncated.svs"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    zeroed = out / "zeroed_tiles.svs"
    # the first image directory sits after the tile data (offset in bytes 4-8): zero tiles only
    first_ifd = int.from_bytes(data[4:8], "little")
    data[20_000 : first_ifd - 1000] = bytes(first_ifd - 1000 - 20_000)
    zeroed.write_bytes(bytes(data))
    text = out / "notes.svs"
    text.write_text("not a slide\n")
    copy = out / "copy.svs"
    shutil.copyfile(svs_path, copy)
    return {"truncated": truncated, "zeroed": zeroed, "text": text, "copy": copy}
