"""``oncoslide demo --heatmap``: attention heatmaps on the bundled real slide, end to end.

A heatmap needs a trained attention model, and one real slide is not a cohort to train it on.
So the demo plants a simulated cohort on the real slide's *geometry* and *features*:

- the bundled slide (tests/data/cmu_small_region.svs, H&E, CC0) is extracted as usual
  (EfficientNet-Lite0, 1280-d, 224-px patches at 0.5 µm/px) and becomes patient ``CMU-1``;
- a planted tissue type: the quarter of its patches at one end of the first principal axis of
  their features (on this slide: the loose, sparse tissue at the section's margins);
- simulated patients each get a bag at the real slide's patch positions, every patch a real
  patch of the slide (plus noise): ``marked = 1`` patients carry 10-40 % planted-type patches,
  ``marked = 0`` patients none;
- ABMIL is cross-validated on the label ``marked`` and ``oncoslide heatmap`` draws the
  out-of-fold attention of ``CMU-1`` on the real slide: PNG, QuPath GeoJSON and a
  full-resolution OME-TIFF. The planted patches are known (``truth.csv``), so the demo reports
  how well the attention finds them (AUC), an oracle that does not come from the model.

Training on simulated bags was chosen over shipping pretrained weights: nothing binary is
bundled, every step is the one a user runs on real data, and the truth the map should show is
known. Under a minute on 2 CPU cores, extraction included (docs/heatmaps.md).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from rich.console import Console

from oncoslide._io import write_table
from oncoslide.errors import ConfigError

if TYPE_CHECKING:
    from oncoslide.report.attention import HeatmapResult
    from oncoslide.training.cv import CVResult

REAL_SLIDE = Path(__file__).resolve().parents[2] / "tests" / "data" / "cmu_small_region.svs"
REAL_PATIENT = "CMU-1"  # the bundled slide is a region of OpenSlide's CMU-1 test slide
LABEL = "marked"


@dataclass(frozen=True)
class SlideDemoCohort:
    """What :func:`slide_demo_cohort` wrote."""

    cohort_table: Path
    features_dir: Path
    truth_table: Path  # the real slide's patches: x, y, marked (the planted tissue type)
    real_slide_id: str
    marked: np.ndarray  # bool per patch of the real slide, in feature-file order


def slide_demo_cohort(
    feature_file: str | Path,
    out: str | Path,
    *,
    n_patients: int = 60,
    marked_fraction: float = 0.25,
    noise: float = 1.0,
    seed: int = 0,
) -> SlideDemoCohort:
    """A cohort planted on one real slide's feature file: its slide as patient ``CMU-1``
    (``marked = 1``) and ``n_patients`` simulated patients at its patch positions.

    Writes ``cohort.csv`` (``patient_id, slide_id, marked``), ``features/`` (the real file,
    copied, and one file per simulated patient in the same grid) and ``truth.csv``. Simulated
    patches are real patches of the slide drawn at random, plus Gaussian noise of ``noise``
    times each feature's spread over the slide; half the patients (``marked = 1``) have a
    fraction drawn from U(0.1, 0.4) of their patches from the planted type, the others none.

    Raises:
        ConfigError: the file has no coordinates or grid, or too few patches to plant a type.
    """
    from oncoslide.features import read_features
    from oncoslide.features.schema import write_feature_file

    feature_file, out = Path(feature_file), Path(out)
    sf = read_features(feature_file)
    if sf.grid is None or sf.coords is None or (sf.coords < 0).any():
        raise ConfigError(
            f"{feature_file}: the demo needs a feature file with coordinates and a patch grid "
            "(written by `oncoslide extract`)"
        )
    features = np.asarray(sf.features, dtype=np.float64)
    n = len(features)
    n_marked = int(np.ceil(marked_fraction * n))
    if n < 8 or not 0 < n_marked < n:
        raise ConfigError(f"{feature_file}: {n} patches are too few to plant a tissue type")
    centred = features - features.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    axis = axis if axis.sum() >= 0 else -axis  # SVD's sign is arbitrary: fix it
    score = centred @ axis
    marked = np.zeros(n, dtype=bool)
    marked[np.argsort(-score, kind="stable")[:n_marked]] = True

    rng = np.random.default_rng(seed)
    spread = features.std(axis=0) * noise
    features_dir = out / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    real_slide_id = feature_file.stem
    shutil.copyfile(feature_file, features_dir / feature_file.name)
    rows = [{"patient_id": REAL_PATIENT, "slide_id": real_slide_id, LABEL: 1}]
    labels = rng.permutation(np.arange(n_patients) % 2)
    marked_idx, plain_idx = np.flatnonzero(marked), np.flatnonzero(~marked)
    for i, label in enumerate(labels):
        share = rng.uniform(0.1, 0.4) if label else 0.0
        from_marked = rng.random(n) < share
        if label and from_marked.sum() < 2:  # a marked patient shows the type, however small
            from_marked[rng.choice(n, 2, replace=False)] = True
        source = np.where(from_marked, rng.choice(marked_idx, n), rng.choice(plain_idx, n))
        bag = features[source] + rng.normal(size=(n, features.shape[1])) * spread
        slide_id = f"SIM-{i:03d}-S1"
        # no slide_path: a simulated bag drawn on the real slide would look like a real map
        write_feature_file(
            features_dir / f"{slide_id}.h5",
            bag.astype(np.float32),
            sf.coords,
            grid=sf.grid,
            encoder=sf.encoder or "unknown",
            dtype="float16",
        )
        rows.append({"patient_id": f"SIM-{i:03d}", "slide_id": slide_id, LABEL: int(label)})
    cohort_table = out / "cohort.csv"
    write_table(cohort_table, pd.DataFrame(rows))
    truth_table = out / "truth.csv"
    write_table(
        truth_table,
        pd.DataFrame(
            {"slide_id": real_slide_id, "x": sf.coords[:, 0], "y": sf.coords[:, 1], LABEL: marked}
        ),
    )
    return SlideDemoCohort(cohort_table, features_dir, truth_table, real_slide_id, marked)


@dataclass(frozen=True)
class HeatmapDemoResult:
    """What :func:`run_heatmap_demo` made, and how well the attention found the planted type."""

    cohort: SlideDemoCohort
    run_dir: Path
    maps_dir: Path
    heatmap: HeatmapResult
    attention_auc: float  # P(a planted patch outranks an unplanted one) on the real slide
    seconds: float


def run_heatmap_demo(
    out: str | Path,
    *,
    slide: str | Path = REAL_SLIDE,
    n_patients: int = 60,
    epochs: int = 8,
    max_side: int = 2048,
    full_resolution: bool = True,
    console: Console | None = None,
) -> HeatmapDemoResult:
    """Extract ``slide``, plant a cohort on it, cross-validate ABMIL, draw the real patient's
    out-of-fold attention (``out/heatmap/maps/CMU-1/``)."""
    from sklearn.metrics import roc_auc_score

    from oncoslide.cohort.table import load_cohort
    from oncoslide.features.extract import ExtractConfig, extract_slides, find_slides
    from oncoslide.features.readers import find_feature_file
    from oncoslide.report.attention import attention_heatmaps
    from oncoslide.training import cross_validate, make_config
    from oncoslide.training.progress import make_progress

    console = console or Console()
    out, slide = Path(out), Path(slide)
    started = time.perf_counter()
    if not slide.is_file():
        raise ConfigError(
            f"slide {slide} not found (the bundled slide ships with a source checkout)"
        )

    console.rule("1. slide -> feature file (EfficientNet-Lite0)")
    extracted = out / "real-slide"
    progress = make_progress(console)
    with progress:
        manifest = extract_slides(find_slides(slide), extracted, ExtractConfig(), progress=progress)
    row = manifest.iloc[0]
    feature_file = find_feature_file(extracted, str(row["slide_id"]))
    if row["status"] not in ("done", "skipped") or feature_file is None:
        raise ConfigError(f"extracting {slide.name} failed: {row.get('error')}")

    console.rule("2. simulated patients on the real slide's geometry and features")
    demo = out / "heatmap"
    planted = slide_demo_cohort(feature_file, demo, n_patients=n_patients)
    console.print(
        f"{REAL_PATIENT} ({slide.name}, {len(planted.marked)} patches, {planted.marked.sum()} "
        f"of the planted type) + {n_patients} simulated patients -> {planted.cohort_table}"
    )

    console.rule(f"3. ABMIL, 5-fold cross-validation on '{LABEL}'")
    cohort = load_cohort(planted.cohort_table, planted.features_dir, label_cols=(LABEL,))
    # a small ABMIL: the planted task is easy, and the demo should take about a minute
    config = make_config(
        task=LABEL, model="abmil", folds=5, epochs=epochs, n_boot=200, progress=False,
        model_kwargs={"hidden_dim": 128, "attn_dim": 64},
    )  # fmt: skip
    run_dir = demo / "run"
    cv = cross_validate(cohort, config, run_dir, overwrite=True)
    console.print(f"run -> {run_dir} ({_score_line(cv)})")

    console.rule(f"4. out-of-fold attention of {REAL_PATIENT} on the real slide")
    maps = demo / "maps" / REAL_PATIENT
    heatmap = attention_heatmaps(
        run_dir,
        cohort,
        REAL_PATIENT,
        maps,
        slides_dir=slide.parent,
        max_side=max_side,
        full_resolution=full_resolution,
    )
    table = heatmap.attention.table
    truth = pd.read_csv(planted.truth_table)
    joined = table.merge(truth, on=["slide_id", "x", "y"], validate="one_to_one")
    auc = float(roc_auc_score(joined[LABEL].astype(int), joined["attention"]))
    for note in heatmap.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
    seconds = time.perf_counter() - started
    console.print(
        f"attention AUC for the planted tissue type on the real slide: {auc:.2f} "
        f"(0.5: blind; the planted patches are listed in {planted.truth_table})\n"
        f"[green]heatmap demo finished[/] in {seconds:.0f} s -> {maps}/ "
        f"({', '.join(sorted(p.name for p in heatmap.images.values()))}, figures/, "
        f"{', '.join(p.name for p in [*heatmap.geojson.values(), *heatmap.tiffs.values()])})",
        highlight=False,
    )
    return HeatmapDemoResult(planted, run_dir, maps, heatmap, auc, seconds)


def _score_line(cv: CVResult) -> str:
    """The run's cross-validated AUC."""
    means = cv.summary.set_index("metric")["mean"]
    return f"cross-validated AUC {means['auc']:.2f}" if "auc" in means else "done"
