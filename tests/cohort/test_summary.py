"""The summary `oncoslide validate` ends with: counts, events or classes, the features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from oncoslide.cohort import load_cohort
from oncoslide.cohort.summary import summarise_cohort, summary_lines
from oncoslide.features import PatchGrid, write_feature_file

GRID = PatchGrid(
    patch_size=256, patch_size_level0=512, target_mpp=0.5, level0_mpp=0.25,
    level0_width=4000, level0_height=4000,
)  # fmt: skip


def _cohort_files(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    features = tmp_path / "features"
    rows = [  # patient, slide, time, event, subtype
        ("P1", "s1", 10.0, 1, "A"),
        ("P2", "s2", 12.0, 0, "B"),
        ("P2", "s2b", 12.0, 0, "B"),
        ("P3", "s3", 7.0, 1, "A"),
        ("P4", "s4", None, None, None),
    ]
    for _, sid, *_ in rows:
        write_feature_file(
            features / f"{sid}.h5", np.ones((3, 6), np.float32), np.zeros((3, 2), np.int64),
            grid=GRID, encoder="uni",
        )  # fmt: skip
    table = pd.DataFrame(rows, columns=["patient_id", "slide_id", "time", "event", "subtype"])
    return table, features


def test_summary_counts_events_classes_and_describes_the_features(tmp_path: Path) -> None:
    table, features = _cohort_files(tmp_path)
    summary = summarise_cohort(load_cohort(table, features, label_cols=["subtype"]))
    assert (summary.n_patients, summary.n_slides) == (4, 5)
    assert summary.events == (2, 1, 1)  # events, censored, without time or event
    assert summary.classes == {"subtype": {"(missing)": 1, "A": 2, "B": 1}}
    assert (summary.layout, summary.encoder, summary.feature_dim) == ("oncoslide", "uni", 6)
    assert (summary.patch_size, summary.target_mpp) == (256, 0.5)
    assert summary_lines(summary) == [
        ("patients", "4 (5 slides)"),
        ("survival", "2 events (67%), 1 censored, 1 without time or event"),
        ("classes of subtype", "(missing) 1 (25%), A 2 (50%), B 1 (25%)"),
        ("features", "oncoslide layout, encoder uni, dim 6, 256 px patches at 0.5 µm/px"),
    ]


def test_summary_without_features_or_survival_says_so(tmp_path: Path) -> None:
    table, _ = _cohort_files(tmp_path)
    summary = summarise_cohort(load_cohort(table.drop(columns=["time", "event"]), None))
    assert summary.events is None and summary.feature_dim is None and summary.layout is None
    assert summary_lines(summary) == [
        ("patients", "4 (5 slides)"),
        ("features", "not checked (give --features)"),
    ]
