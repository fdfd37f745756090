"""``oncoslide demo``: the main job on embedded data, end to end, in minutes on 2 CPU cores.

0. Extract features from the bundled real slide (tests/data/cmu_small_region.svs, Aperio, CC0):
   tissue, 224-px patches at 0.5 µm/px, EfficientNet-Lite0 features, a preview PNG.
1. Simulate a pan-cancer cohort (400 patients, bags of about 80 patches; features, table,
   omics, ground truth) and its negative control: the same feature files shuffled across
   patients.
2. Benchmark (``examples/bench-demo.yaml``): two feature sets (simulated, shuffled) x three
   models (ABMIL and mean pooling fine-tuned, a linear model on frozen mean embeddings) x two
   tasks (overall survival, MSI status), each with 5-fold patient-level cross-validation.
3. The leaderboard: a ranking and per-task estimates with 95% bootstrap intervals on screen,
   ``bench/index.html`` (open it in a browser) and the tidy ``results.csv``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.markup import escape

from oncoslide._io import write_table, write_text

# Also shipped as examples/bench-demo.yaml (a test keeps the two equal).
DEMO_BENCH_YAML = """\
# A small PathBench-style benchmark on the simulated cohort (under 5 minutes on 2 CPU cores).
#
#   oncoslide simulate examples/data --patients 400 --patches 80
#   oncoslide bench shuffle-features --cohort examples/data/cohort.csv \\
#       --features examples/data/features --out examples/data/features-shuffled
#   oncoslide bench run examples/bench-demo.yaml --out bench-demo/
#   oncoslide bench leaderboard bench-demo/
#
# "shuffled" is the negative control: every slide carries another patient's features, so it
# must rank below "sim" on every task. Paths are relative to this file.
name: bench-demo
cohort: data/cohort.csv
folds: 5
seeds: [0]
n_boot: 1000
train:
  epochs: 6
  early_stopping_patience: 2
feature_sets:
  - name: sim
    features: data/features
  - name: shuffled
    features: data/features-shuffled
tasks:
  - {name: os, kind: survival}
  - {name: msi, kind: binary, target: msi}
models:
  - {name: abmil, protocol: mil}
  - {name: meanpool, protocol: mil, model: mean}
  - {name: linear, protocol: linear}
"""


def run_demo(
    out: str | Path, *, quick: bool = False, console: Console | None = None, bars: bool = True
) -> pd.DataFrame:
    """The demo's steps; ``bars=False`` draws no progress bars (the command line then shows the
    library's per-slide and per-cell lines instead, e.g. when the output goes to a file)."""
    from oncoslide.bench.report import build_leaderboard, print_leaderboard
    from oncoslide.bench.runner import run_benchmark
    from oncoslide.bench.shuffle import shuffle_features
    from oncoslide.bench.spec import spec_from_dict
    from oncoslide.simulate import SimulationConfig, run_simulation

    console = console or Console()
    out = Path(out)
    started = time.perf_counter()
    _extract_real_slide(out / "real-slide", console, bars)
    data = out / "data"
    # many patients with modest bags: tight intervals at the training cost of the default cohort
    sim = SimulationConfig(
        n_patients=160 if quick else 400, patches_median=80, patches_min=20, patches_max=3000
    )
    if not (data / "cohort.csv").exists():
        console.rule("1. simulate the default cohort and its shuffled-features control")
        run_simulation(data, sim, overwrite=False, permuted_copy=False, console=console)
    if not (data / "features-shuffled" / "shuffle_map.csv").exists():
        shuffle_features(data / "cohort.csv", data / "features", data / "features-shuffled")

    console.rule("2. benchmark: 2 feature sets x 3 models x 2 tasks, 5-fold CV")
    spec_path = out / "bench-demo.yaml"
    write_text(spec_path, DEMO_BENCH_YAML)
    raw = yaml.safe_load(DEMO_BENCH_YAML)
    if quick:
        raw["train"]["epochs"] = 4
        raw["n_boot"] = 300
    spec = spec_from_dict(raw, base_dir=out, source=str(spec_path))
    run = run_benchmark(spec, out / "bench", console=console, progress=bars)
    for failure in run.failures:
        console.print(
            f"[red]failed[/] {escape(str(failure['cell']))}: {escape(str(failure['error']))}",
            highlight=False,
        )

    console.rule("3. leaderboard")
    board = build_leaderboard(out / "bench")
    print_leaderboard(board, console)
    results = board.data.scores
    write_table(out / "results.csv", results)
    console.print(
        "'shuffled' gives every slide another patient's features: a pipeline that measures "
        "signal ranks it below 'sim' on every task, with its C-index and AUC near 0.5."
    )
    console.print(
        f"[green]demo finished[/] in {(time.perf_counter() - started) / 60:.1f} min; "
        + escape(f"leaderboard: {board.html_path}; tidy scores: {out / 'results.csv'}")
    )
    return results


REAL_SLIDE = Path(__file__).resolve().parents[2] / "tests" / "data" / "cmu_small_region.svs"


def _extract_real_slide(out: Path, console: Console, bars: bool = True) -> None:
    """The slide-to-features chain on a real H&E slide (skipped outside a source checkout)."""
    from oncoslide.features import read_features
    from oncoslide.features.extract import ExtractConfig, extract_slides, find_slides
    from oncoslide.training.progress import make_progress

    console.rule("0. slide -> feature file, on a real H&E slide")
    if not REAL_SLIDE.is_file():
        console.print(
            escape(f"bundled slide not found at {REAL_SLIDE} (not a source checkout): skipped")
        )
        return
    progress = make_progress(console, enabled=bars)
    with progress:
        manifest = extract_slides(find_slides(REAL_SLIDE), out, ExtractConfig(), progress=progress)
    row = manifest.iloc[0]
    if row["status"] not in ("done", "skipped"):
        console.print(f"[red]extraction failed[/]: {escape(str(row['error']))}", highlight=False)
        return
    sf = read_features(out / f"{row['slide_id']}.h5")
    console.print(
        escape(
            f"{REAL_SLIDE.name}: {sf.n_patches} patches of 224 px at 0.5 µm/px on tissue, "
            f"{sf.dim}-d {sf.encoder} features -> {out / (row['slide_id'] + '.h5')}\n"
            f"  check the tissue mask and patches: "
            f"{out / 'thumbnails' / (row['slide_id'] + '.png')}"
        )
    )
