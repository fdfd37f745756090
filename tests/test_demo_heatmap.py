"""The real-slide heatmap demo: a cohort planted on one slide's patches (fast, closed form), and
`oncoslide demo --heatmap` end to end on the bundled slide (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from oncoslide.demo_heatmap import LABEL, REAL_PATIENT, slide_demo_cohort
from oncoslide.errors import ConfigError
from oncoslide.features import read_features
from oncoslide.features.schema import PatchGrid, write_feature_file

GRID = PatchGrid(
    patch_size=224,
    patch_size_level0=224,
    target_mpp=0.5,
    level0_mpp=0.5,
    level0_width=2240,
    level0_height=1120,
)


def _real_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """50 patches on a 10 x 5 grid; the 13 listed are offset far along a direction whose
    components sum to more than zero: they are the planted quarter, whatever the noise."""
    rng = np.random.default_rng(1)
    xs, ys = np.meshgrid(np.arange(10) * 224, np.arange(5) * 224)
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    features = rng.normal(scale=0.1, size=(50, 12))
    planted = np.zeros(50, dtype=bool)
    planted[rng.choice(50, 13, replace=False)] = True  # ceil(0.25 x 50) = 13
    features[planted] += np.linspace(1.0, 3.0, 12)
    path = tmp_path / "real" / "slide-x.h5"
    write_feature_file(
        path, features, coords, grid=GRID, encoder="enc", attrs={"slide_path": "/s/slide-x.svs"}
    )
    return path, planted


def test_the_planted_cohort_shares_the_slides_geometry_and_patches(tmp_path: Path) -> None:
    path, planted = _real_file(tmp_path)
    demo = slide_demo_cohort(path, tmp_path / "demo", n_patients=20, noise=0.0, seed=3)
    np.testing.assert_array_equal(demo.marked, planted)
    table = pd.read_csv(demo.cohort_table)
    assert len(table) == 21 and table["patient_id"].is_unique
    real = table.iloc[0]
    assert (real["patient_id"], real["slide_id"], real[LABEL]) == (REAL_PATIENT, "slide-x", 1)
    assert table[LABEL].iloc[1:].sum() == 10  # half the simulated patients are marked
    truth = pd.read_csv(demo.truth_table)
    np.testing.assert_array_equal(truth[LABEL].to_numpy(), planted)

    source = read_features(path)
    # stored as float16: without noise every simulated patch is a real one, so rounded
    real_rows = source.features.astype(np.float16)
    for row in table.iloc[1:].itertuples():
        sim_path = demo.features_dir / f"{row.slide_id}.h5"
        sim = read_features(sim_path)
        np.testing.assert_array_equal(sim.coords, source.coords)
        assert sim.grid == source.grid
        with h5py.File(sim_path) as f:  # a simulated bag must not be drawn on the real slide
            assert "slide_path" not in f.attrs
        match = (sim.features.astype(np.float16)[:, None, :] == real_rows[None]).all(axis=2)
        assert (match.sum(axis=1) >= 1).all()
        from_planted = match[:, planted].any(axis=1)
        if getattr(row, LABEL) == 0:
            assert not from_planted.any()
        else:
            assert from_planted.sum() >= 2
    # the real slide's file is copied as it is (it still names its slide)
    with h5py.File(demo.features_dir / "slide-x.h5") as f:
        assert f.attrs["slide_path"] == "/s/slide-x.svs"


def test_a_file_without_coordinates_or_with_too_few_patches_is_refused(tmp_path: Path) -> None:
    few = tmp_path / "few.h5"
    write_feature_file(few, np.zeros((4, 3)), np.zeros((4, 2)), grid=GRID, encoder="enc")
    with pytest.raises(ConfigError, match="too few"):
        slide_demo_cohort(few, tmp_path / "demo")


@pytest.mark.slow
def test_heatmap_demo_on_the_bundled_slide(tmp_path: Path) -> None:
    """Measured (2026-11-30, 2 shared cores): 2-4 min; attention AUC 1.00 for the planted type.
    Planted truth: the out-of-fold attention on the real slide must rank the planted patches
    above the others."""
    import tifffile
    from PIL import Image
    from typer.testing import CliRunner

    from oncoslide.cli import app

    result = CliRunner().invoke(app, ["demo", "--heatmap", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "heatmap demo finished" in said
    auc = float(said.split("attention AUC for the planted tissue type on the real slide: ")[1][:4])
    assert auc > 0.9

    maps = tmp_path / "heatmap" / "maps" / REAL_PATIENT
    table = pd.read_csv(maps / "attention.csv")
    assert len(table) > 40 and table["attention"].sum() == pytest.approx(1.0)
    assert Image.open(maps / "cmu_small_region.png").size == (1532, 2048)  # 2220 x 2967 slide
    features = json.loads((maps / "cmu_small_region.geojson").read_text())["features"]
    assert len(features) == len(table)
    rings = np.asarray([f["geometry"]["coordinates"][0] for f in features])
    assert rings[..., 0].min() >= 0 and rings[..., 0].max() <= 2220
    assert rings[..., 1].min() >= 0 and rings[..., 1].max() <= 2967
    with tifffile.TiffFile(maps / "cmu_small_region.ome.tif") as tif:
        assert tif.series[0].levels[0].shape == (2967, 2220, 3)
