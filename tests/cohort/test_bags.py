"""Patient bags: slides concatenated in a stable order, single slides shared without a copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncoslide.cohort import load_bag, load_cohort
from oncoslide.cohort.bags import empty_slides, empty_slides_note
from oncoslide.errors import FeatureFileError
from oncoslide.features import FeatureCache, PatchGrid, write_feature_file

GRID = PatchGrid(
    patch_size=224,
    patch_size_level0=224,
    target_mpp=0.5,
    level0_mpp=0.5,
    level0_width=1000,
    level0_height=1000,
)


def _slide(
    folder: Path, sid: str, n: int, d: int = 3, dtype: str = "float32", base: int = 0
) -> None:
    feats = (base + np.arange(n * d)).reshape(n, d).astype(dtype)
    coords = np.stack([np.arange(n) * 224 + base, np.full(n, base)], axis=1)
    write_feature_file(folder / f"{sid}.h5", feats, coords, grid=GRID, encoder="e", dtype=dtype)


@pytest.fixture
def setup(tmp_path: Path):
    _slide(tmp_path, "b_slide", 2, base=100)
    _slide(tmp_path, "a_slide", 3, base=0, dtype="float16")
    _slide(tmp_path, "solo", 4, base=500)
    df = pd.DataFrame({"patient_id": ["P", "P", "Q"], "slide_id": ["b_slide", "a_slide", "solo"]})
    return load_cohort(df, tmp_path), FeatureCache(), tmp_path


def test_multi_slide_bag_concatenates_in_slide_id_order(setup) -> None:
    cohort, cache, _ = setup
    bag = load_bag(cohort, "P", cache)
    assert bag.slide_ids == ["a_slide", "b_slide"]
    assert bag.n_patches == 5 and bag.dim == 3
    assert bag.features.dtype == np.float32  # float16 + float32 -> float32
    expected = np.concatenate(
        [np.arange(9).reshape(3, 3), 100 + np.arange(6).reshape(2, 3)]
    ).astype(np.float32)
    np.testing.assert_array_equal(bag.features, expected)
    np.testing.assert_array_equal(bag.slide_index, [0, 0, 0, 1, 1])
    assert bag.slide_index.dtype == np.int64 and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords[:, 0], [0, 224, 448, 100, 324])
    assert bag.has_coords
    with pytest.raises(ValueError, match="read-only"):
        bag.features[0, 0] = 0


def test_single_slide_bag_shares_the_cached_arrays(setup) -> None:
    cohort, cache, tmp_path = setup
    bag = load_bag(cohort, "Q", cache)
    cached = cache.get(tmp_path / "solo.h5")
    assert bag.features is cached.features and bag.coords is cached.coords
    np.testing.assert_array_equal(bag.slide_index, np.zeros(4))
    assert bag.slide_ids == ["solo"]


def test_bag_reads_through_the_cache_once(setup) -> None:
    cohort, cache, _ = setup
    for _ in range(3):
        load_bag(cohort, "P", cache)
    assert cache.stats.reads == 2


def test_unreadable_slide_raises_feature_file_error(tmp_path: Path) -> None:
    (tmp_path / "bad.h5").write_bytes(b"junk")
    cohort = load_cohort(
        pd.DataFrame({"patient_id": ["P"], "slide_id": ["bad"]}), tmp_path, check_features=False
    )
    with pytest.raises(FeatureFileError, match="cannot read HDF5"):
        load_bag(cohort, "P", FeatureCache())


def test_slides_of_different_dims_raise(tmp_path: Path) -> None:
    _slide(tmp_path, "s1", 2, d=3)
    _slide(tmp_path, "s2", 2, d=5)
    cohort = load_cohort(
        pd.DataFrame({"patient_id": ["P", "P"], "slide_id": ["s1", "s2"]}),
        tmp_path,
        check_features=False,
    )
    with pytest.raises(FeatureFileError, match="s1: D=3, s2: D=5"):
        load_bag(cohort, "P", FeatureCache())


def test_pt_slide_without_coords_marks_the_bag(tmp_path: Path) -> None:
    import torch

    _slide(tmp_path, "s1", 2)
    torch.save(torch.ones(3, 3), tmp_path / "s2.pt")
    cohort = load_cohort(
        pd.DataFrame({"patient_id": ["P", "P"], "slide_id": ["s1", "s2"]}), tmp_path
    )
    bag = load_bag(cohort, "P", FeatureCache())
    assert bag.n_patches == 5 and not bag.has_coords
    assert (bag.coords[2:] == -1).all() and (bag.coords[:2] >= 0).all()


def test_empty_slide_of_a_multi_slide_patient_is_listed_and_the_patient_kept(
    tmp_path: Path,
) -> None:
    _slide(tmp_path, "p_full", 3)
    _slide(tmp_path, "p_empty", 0)
    _slide(tmp_path, "q_solo", 2, base=50)
    df = pd.DataFrame({"patient_id": ["P", "P", "Q"], "slide_id": ["p_full", "p_empty", "q_solo"]})
    cohort = load_cohort(df, tmp_path)
    assert cohort.patient_ids == ["P", "Q"]
    assert empty_slides(cohort) == ["p_empty"]
    note = empty_slides_note(cohort)
    assert "1 slide(s) have an empty feature file" in note and note.endswith(": p_empty")
    bag = load_bag(cohort, "P", FeatureCache())
    assert bag.slide_ids == ["p_empty", "p_full"] and bag.n_patches == 3
    np.testing.assert_array_equal(bag.slide_index, [1, 1, 1])

    # dropped instead, the slide is listed with the dropped ones, not twice
    dropped = load_cohort(df, tmp_path, bad_features="drop")
    assert empty_slides(dropped) == [] and empty_slides_note(dropped) == ""
    assert list(dropped.dropped_slides["slide_id"]) == ["p_empty"]
    # files not opened: nothing is known to be empty
    assert empty_slides(load_cohort(df, tmp_path, check_features=False)) == []
