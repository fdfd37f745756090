"""Writing a simulated world to disk: ``simulate_cohort`` and the command's ``run_simulation``."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from oncoslide._io import atomic_path, check_folder_target, write_json, write_table, write_text
from oncoslide.errors import ConfigError
from oncoslide.simulate.config import SUBTYPES, SimulationConfig
from oncoslide.simulate.control import write_permuted_cohort
from oncoslide.simulate.omics import draw_omics
from oncoslide.simulate.outcomes import Outcomes, draw_outcomes
from oncoslide.simulate.patients import Patients, draw_patients
from oncoslide.simulate.slides import SlideOut, simulate_patient_slides
from oncoslide.simulate.truth import summary, truth_document
from oncoslide.simulate.world import World, make_streams, make_world


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """Where a simulated cohort was written, and a summary of it.

    ``mutations_table`` and ``label_tree`` are None in worlds without mutations or hierarchical
    labels; ``site_transforms`` is None without shifted sites.
    """

    out_dir: Path
    cohort_table: Path
    features_dir: Path
    omics_table: Path
    gene_groups: Path
    gene_groups_gmt: Path
    truth: Path
    truth_prototypes: Path
    truth_patch_labels: Path
    mutations_table: Path | None
    label_tree: Path | None
    site_transforms: Path | None
    summary: dict[str, Any]


def simulate_cohort(
    out_dir: str | os.PathLike[str],
    config: SimulationConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Simulate a cohort into ``out_dir``; deterministic given ``config.seed``.

    Raises ``ConfigError`` when ``out_dir`` already holds a cohort and ``overwrite`` is False.
    ``progress(done, total)`` is called after each patient's slides are written.
    """
    cfg = config or SimulationConfig()
    started = time.perf_counter()
    out = check_folder_target(out_dir)
    if (out / "cohort.csv").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a cohort (cohort.csv); pass overwrite=True")
    features_dir = out / "features"
    features_dir.mkdir(parents=True, exist_ok=True)

    streams = make_streams(cfg.seed)
    world = make_world(cfg, streams)
    pts = draw_patients(cfg, world, streams)
    outcomes = draw_outcomes(cfg, world, pts, streams)
    omics = draw_omics(cfg, pts, outcomes, streams)
    fingerprint = _fingerprint(cfg)

    patch_seqs = streams["patches"].spawn(cfg.n_patients)
    shuffle_seqs = streams["shuffle"].spawn(cfg.n_patients) if cfg.shuffle_positions else None
    slides: list[list[SlideOut]] = []
    for i in range(cfg.n_patients):
        slides.append(
            simulate_patient_slides(
                i,
                cfg,
                world,
                pts,
                patch_seqs[i],
                None if shuffle_seqs is None else shuffle_seqs[i],
                features_dir,
                fingerprint,
            )
        )
        if progress is not None:
            progress(i + 1, cfg.n_patients)
    _remove_stale(out, features_dir, {s.slide_id for ss in slides for s in ss})

    paths = _result_paths(out, cfg)
    write_table(paths["cohort_table"], cohort_table(cfg, pts, outcomes, slides))
    write_table(paths["omics_table"], omics.table)
    write_json(paths["gene_groups"], omics.groups)
    write_text(paths["gene_groups_gmt"], _gmt(omics.groups))
    if paths["mutations_table"] is not None and omics.mutations is not None:
        write_table(paths["mutations_table"], omics.mutations)
    if paths["label_tree"] is not None:
        write_text(paths["label_tree"], label_tree_yaml(cfg))
    if paths["site_transforms"] is not None:
        _write_site_transforms(paths["site_transforms"], world)
    _write_npy(paths["truth_prototypes"], world.output_centres().astype(np.float32))
    _write_patch_labels(paths["truth_patch_labels"], slides)
    summary_ = summary(cfg, world, pts, outcomes, omics, slides)
    truth = truth_document(cfg, world, pts, outcomes, omics, slides, summary_, fingerprint)
    write_json(paths["truth"], truth)

    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary_ = {**summary_, "disk_mb": round(disk / 2**20, 2)}
    summary_["seconds"] = round(time.perf_counter() - started, 2)
    return SimulationResult(out_dir=out, features_dir=features_dir, summary=summary_, **paths)


def run_simulation(
    out_dir: str | os.PathLike[str],
    config: SimulationConfig | None = None,
    *,
    overwrite: bool = False,
    permuted_copy: bool = True,
    console: Any | None = None,
) -> SimulationResult:
    """What ``oncoslide simulate`` does: simulate with a progress bar, then the permuted control.

    ``permuted_copy`` also writes ``cohort_permuted.csv`` (outcomes shuffled across patients with
    seed + 1), the negative control that names the same slides.
    """
    from rich.console import Console

    from oncoslide.training.progress import make_progress

    cfg = config or SimulationConfig()
    progress = make_progress(console or Console())
    with progress:
        task = progress.add_task("simulating patients", total=cfg.n_patients)
        result = simulate_cohort(
            out_dir,
            cfg,
            overwrite=overwrite,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    if permuted_copy:
        write_permuted_cohort(
            result.cohort_table, Path(out_dir) / "cohort_permuted.csv", seed=cfg.seed + 1
        )
    return result


def _result_paths(out: Path, cfg: SimulationConfig) -> dict[str, Any]:
    return {
        "cohort_table": out / "cohort.csv",
        "omics_table": out / "omics.csv",
        "gene_groups": out / "gene_groups.json",
        "gene_groups_gmt": out / "gene_groups.gmt",
        "truth": out / "truth.json",
        "truth_prototypes": out / "truth_prototypes.npy",
        "truth_patch_labels": out / "truth_patch_labels.npz",
        "mutations_table": out / "mutations.csv" if cfg.n_mutation_genes else None,
        "label_tree": out / "label_tree.yaml" if cfg.hierarchical_labels else None,
        "site_transforms": out / "truth_site_transforms.npz" if cfg.site_shift_sites else None,
    }


# Optional outputs of an earlier simulation in the same folder that this one does not write.
_OPTIONAL_FILES = (
    "mutations.csv",
    "label_tree.yaml",
    "truth_site_transforms.npz",
    "cohort_permuted.csv",
)


def _remove_stale(out: Path, features_dir: Path, keep: set[str]) -> None:
    """On overwrite, drop files of an earlier simulation that this one does not have."""
    for f in features_dir.glob("*.h5"):
        if f.stem not in keep:
            f.unlink()
    for name in _OPTIONAL_FILES:
        (out / name).unlink(missing_ok=True)


def _fingerprint(cfg: SimulationConfig) -> str:
    """Identifies the feature space: equal for simulations that share the geometry."""
    keys = [
        "seed",
        "feature_dim",
        "n_cohorts",
        "cohort_names",
        "sites_per_cohort",
        "n_shared_prototypes",
        "n_specific_prototypes",
        "prototype_separation",
        "within_prototype_rank",
        "within_prototype_spread",
        "site_effect",
    ]
    # v2 knobs that change the geometry join the key only when set, so that v1 worlds keep theirs
    defaults = SimulationConfig.__dataclass_fields__
    for key in ("prognosis_families", "hierarchical_labels", "fine_separation", "hierarchy_tree"):
        if getattr(cfg, key) != defaults[key].default:
            keys.append(key)
    blob = json.dumps({key: getattr(cfg, key) for key in keys}, sort_keys=True)
    return "sim-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def cohort_table(
    cfg: SimulationConfig, pts: Patients, out: Outcomes, slides: list[list[SlideOut]]
) -> pd.DataFrame:
    fine_names = [f for _, f in cfg.histology_classes]
    coarse_of = dict((f, c) for c, f in cfg.histology_classes)
    rows = []
    for i, pid in enumerate(pts.patient_id):
        for s in slides[i]:
            row: dict[str, Any] = {
                "patient_id": pid,
                "slide_id": s.slide_id,
                "cohort": cfg.cohorts[int(pts.cohort[i])],
                "site": pts.site[i],
                "time": float(out.time[i]),
                "event": int(out.event[i]),
                "msi": int(out.msi[i]),
                "subtype": SUBTYPES[int(out.subtype[i])],
            }
            if out.inflamed is not None:
                row["inflamed"] = int(out.inflamed[i])
            if out.fine is not None:
                fine = fine_names[int(out.fine[i])]
                row["histology_coarse"] = coarse_of[fine]
                row["histology_fine"] = fine
            rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(["cohort", "patient_id", "slide_id"], kind="stable").reset_index(
        drop=True
    )


def label_tree_yaml(cfg: SimulationConfig) -> str:
    """The label tree, coarse -> fine, as the hierarchical preset writes it beside the table."""
    tree = {coarse: list(fines) for coarse, fines in cfg.hierarchy_tree}
    header = (
        "# label tree of the simulated cohort: coarse class (cohort column histology_coarse)\n"
        "# -> fine classes (column histology_fine); every fine class has exactly one parent\n"
    )
    return header + yaml.safe_dump(
        {"levels": ["histology_coarse", "histology_fine"], "tree": tree}, sort_keys=False
    )


def _gmt(groups: dict[str, list[str]]) -> str:
    """Gene groups in the GMT format (name, description, genes; tab-separated)."""
    return "".join(
        f"{name}\tsimulated\t" + "\t".join(genes) + "\n" for name, genes in groups.items()
    )


def _write_npy(target: Path, array: np.ndarray) -> None:
    with atomic_path(target, suffix=".npy.tmp") as tmp, tmp.open("wb") as fh:
        np.save(fh, array)


def _write_patch_labels(target: Path, slides: list[list[SlideOut]]) -> None:
    arrays: dict[str, Any] = {s.slide_id: s.labels.astype(np.int16) for ss in slides for s in ss}
    with atomic_path(target, suffix=".npz.tmp") as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, **arrays)


def _write_site_transforms(target: Path, world: World) -> None:
    arrays: dict[str, Any] = {}
    for code, tf in sorted(world.site_transform.items()):
        arrays[f"{code}/mixing"] = tf.mixing.astype(np.float32)
        arrays[f"{code}/gain"] = tf.gain
        arrays[f"{code}/offset"] = tf.offset
        arrays[f"{code}/content"] = tf.content
    arrays["scale"] = world.scale
    arrays["output_offset"] = world.offset
    with atomic_path(target, suffix=".npz.tmp") as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, **arrays)
