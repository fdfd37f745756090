"""Extraction throughput on the bundled real slide: reading alone, encoder alone, the full run.

Three measurements in one process, on copies of tests/data/cmu_small_region.svs (Aperio, 0.499
µm/px), at 0.5 µm/px with 224-px patches:

* **read**: tissue detection, tiling and reading every patch through the same DataLoader
  (worker processes) as the extraction, with no encoder — the read limit;
* **encode**: the encoder alone on patches already in memory — the compute limit;
* **extract**: ``extract_slides`` end to end (tissue, tiles, reading, encoder, atomic HDF5
  writes, previews).

It prints patches/s for each, the ratios extract/encode (how much of the compute limit the full
run reaches) and extract/read, and the peak resident memory of each phase (Linux VmHWM, reset
between phases).

    python benchmarks/bench_extract.py [--copies 4] [--workers 2] [--min-tissue 0.25]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from oncoslide.encoders import create_encoder
from oncoslide.features.extract import (
    ExtractConfig,
    _PatchDataset,
    _stack,
    default_workers,
    extract_slides,
    find_slides,
)
from oncoslide.slides import TilingConfig, TissueConfig, detect_tissue, open_slide, tile_slide

SLIDE = Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs"


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_only(slides: list[Path], config: ExtractConfig) -> tuple[int, float, list[np.ndarray]]:
    """Tissue, tiles and every patch read through the extraction's DataLoader, no encoder."""
    started, n, sample = time.perf_counter(), 0, []
    for path in slides:
        with open_slide(path) as slide:
            mask = detect_tissue(slide, TissueConfig())
            tiles = tile_slide(
                slide.info,
                mask,
                TilingConfig(
                    target_mpp=config.target_mpp,
                    patch_size=config.patch_size,
                    min_tissue_fraction=config.min_tissue_fraction,
                ),
            )
        dataset = _PatchDataset(str(path), tiles.coords, config, None)
        workers = default_workers("cpu") if config.num_workers is None else config.num_workers
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            num_workers=workers,
            collate_fn=_stack,
            prefetch_factor=4 if workers else None,
            multiprocessing_context="fork" if workers else None,
        )
        for batch in loader:
            n += len(batch)
            if not sample:
                sample.append(batch)
        dataset.close()
    return n, time.perf_counter() - started, sample


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=4, help="copies of the slide to process")
    parser.add_argument(
        "--workers", type=int, default=None, help="patch-reading processes (default: auto)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-tissue", type=float, default=0.25)
    args = parser.parse_args()
    config = ExtractConfig(
        num_workers=args.workers, batch_size=args.batch_size, min_tissue_fraction=args.min_tissue
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        slides = []
        for i in range(args.copies):
            slides.append(folder / f"copy{i}.svs")
            shutil.copyfile(SLIDE, slides[-1])

        reset_peak_rss()
        n_read, t_read, sample = read_only(slides, config)
        mem_read = peak_rss_mb()

        encoder = create_encoder(config.encoder)
        patches = sample[0]
        encoder.encode(patches[:8])  # warm-up
        reset_peak_rss()
        started, n_enc = time.perf_counter(), 0
        while n_enc < n_read:
            encoder.encode(patches)
            n_enc += len(patches)
        t_enc = time.perf_counter() - started
        mem_enc = peak_rss_mb()

        reset_peak_rss()
        started = time.perf_counter()
        manifest = extract_slides(find_slides(folder), Path(tmp) / "feats", config)
        t_ext = time.perf_counter() - started
        mem_ext = peak_rss_mb()
        n_ext = int(manifest["patches"].sum())
        assert (manifest["status"] == "done").all(), manifest

    rate = {"read": n_read / t_read, "encode": n_enc / t_enc, "extract": n_ext / t_ext}
    print(f"{args.copies} copies of {SLIDE.name}, {n_ext // args.copies} patches each; "
          f"{args.workers if args.workers is not None else 'auto'} reading workers, batch {args.batch_size}")  # fmt: skip
    print(f"{'':10s} {'patches/s':>10s} {'seconds':>8s} {'peak RSS MiB':>13s}")
    for name, t, mem in (
        ("read", t_read, mem_read),
        ("encode", t_enc, mem_enc),
        ("extract", t_ext, mem_ext),
    ):
        print(f"{name:10s} {rate[name]:10.1f} {t:8.2f} {mem:13.0f}")
    print(
        f"\nextract / encode = {rate['extract'] / rate['encode']:.2f}  (share of the compute limit)"
    )
    print(
        f"extract / read   = {rate['extract'] / rate['read']:.2f}  (reading is {rate['read'] / rate['encode']:.0f}x faster than encoding)"
    )


if __name__ == "__main__":
    main()
