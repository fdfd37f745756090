"""A negative-control feature set: every slide gets another patient's feature file.

``shuffle_features`` permutes the cohort's slides' feature files across patients (a random
derangement of patients: no patient keeps any of its own slides) and writes a folder in which
``<slide_id>.h5`` links to (or copies) the file of a slide of another patient. Bag sizes and the
feature distribution stay exactly as they were; the link between a patient's tissue and its
outcome is destroyed. A benchmark should rank it below the real feature set on every task,
which makes it the check that a pipeline measures signal and not leakage or chance.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from oncoslide._io import atomic_path, write_table
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError


def shuffle_features(
    cohort_table: str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    copy: bool = False,
) -> pd.DataFrame:
    """Write the shuffled feature set; returns the map (slide_id, source_slide_id, ...).

    Links are symbolic (absolute targets) unless ``copy``; the map is written to
    ``out_dir/shuffle_map.csv``. Raises ConfigError for a cohort with fewer than 2 patients.
    """
    cohort = load_cohort(cohort_table, features_dir, check_features=False)
    slides = cohort.slides
    missing = slides.loc[slides["feature_path"].isna(), "slide_id"].tolist()
    if missing:
        raise ConfigError(
            f"{len(missing)} slide(s) have no feature file in {features_dir}: {missing[:5]}"
        )
    patients = cohort.patient_ids
    if len(patients) < 2:
        raise ConfigError("shuffling across patients needs at least 2 patients")
    rng = np.random.default_rng(seed)
    # a derangement of patients (a random cyclic shift of a random order), then each slide of
    # patient p takes a slide of the patient p was mapped to (cycling through its slides)
    order = rng.permutation(len(patients))
    donor_of = {
        patients[order[i]]: patients[order[(i + 1) % len(order)]] for i in range(len(order))
    }
    by_patient = {
        pid: rows.sort_values("slide_id") for pid, rows in slides.groupby("patient_id", sort=True)
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pid in patients:
        donor_rows = by_patient[donor_of[pid]]
        for k, (_, slide) in enumerate(by_patient[pid].iterrows()):
            src = donor_rows.iloc[k % len(donor_rows)]
            source = Path(str(src["feature_path"])).resolve()
            target = out / f"{slide['slide_id']}{source.suffix}"
            _place(source, target, copy)
            rows.append(
                {
                    "slide_id": slide["slide_id"],
                    "patient_id": pid,
                    "source_slide_id": src["slide_id"],
                    "source_patient_id": donor_of[pid],
                }
            )
    mapping = pd.DataFrame(rows)
    write_table(out / "shuffle_map.csv", mapping)
    return mapping


def _place(source: Path, target: Path, copy: bool) -> None:
    with atomic_path(target, suffix=f"{target.suffix}.tmp") as tmp:
        if copy:
            shutil.copyfile(source, tmp)
        else:
            tmp.unlink(missing_ok=True)
            os.symlink(source, tmp)


__all__ = ["shuffle_features"]
