"""Feature-file readers: every layout converted to oncoslide units, every bad file a typed error."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from oncoslide.errors import FeatureFileError, NonFiniteFeaturesError
from oncoslide.features import (
    FeatureIndex,
    PatchGrid,
    find_feature_file,
    inspect_features,
    peek_features,
    read_features,
    write_feature_file,
)

GRID = PatchGrid(
    patch_size=224,
    patch_size_level0=448,
    target_mpp=0.5,
    level0_mpp=0.25,
    level0_width=10_000,
    level0_height=8_000,
    overlap=0,
)


def _planted(n: int = 7, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = (rng.integers(0, 20, size=(n, 2)) * 448).astype(np.int64)
    return feats, coords


def _h5(path: Path, datasets: dict[str, np.ndarray], **attrs: object) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
        for key, value in attrs.items():
            f.attrs[key] = value
    return path


# ---------------------------------------------------------------------------------------------
# oncoslide layout


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_oncoslide_round_trip_keeps_dtype_values_and_grid(tmp_path: Path, dtype: str) -> None:
    feats, coords = _planted()
    path = write_feature_file(
        tmp_path / "s1.h5",
        feats,
        coords,
        grid=GRID,
        encoder="resnet50",
        dtype=dtype,
        weights_fingerprint="abc123",
    )
    sf = read_features(path)
    assert sf.slide_id == "s1"
    assert sf.layout == "oncoslide"
    assert sf.features.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(sf.features, feats.astype(dtype))
    assert sf.coords.dtype == np.int64
    np.testing.assert_array_equal(sf.coords, coords)
    assert sf.grid == GRID
    assert sf.encoder == "resnet50"
    assert sf.weights_fingerprint == "abc123"


def test_mmap_maps_contiguous_data_and_matches_a_normal_read(tmp_path: Path) -> None:
    feats, coords = _planted(n=50, d=8)
    path = write_feature_file(tmp_path / "s.h5", feats, coords, grid=GRID, encoder="e")
    mapped = read_features(path, mmap=True)
    assert isinstance(mapped.features, np.memmap)
    np.testing.assert_array_equal(mapped.features, read_features(path).features)
    # A compressed dataset cannot be mapped: it is read normally, with the same values.
    comp = write_feature_file(
        tmp_path / "c.h5", feats, coords, grid=GRID, encoder="e", compression="gzip"
    )
    sf = read_features(comp, mmap=True)
    assert not isinstance(sf.features, np.memmap)
    np.testing.assert_array_equal(sf.features, feats)


def test_oncoslide_file_without_grid_attributes_is_rejected(tmp_path: Path) -> None:
    feats, coords = _planted()
    path = _h5(tmp_path / "s.h5", {"features": feats, "coords": coords}, oncoslide_layout_version=1)
    with pytest.raises(FeatureFileError, match="grid attributes"):
        read_features(path)
    with pytest.raises(FeatureFileError, match="grid attributes"):
        peek_features(path)


def test_newer_layout_version_is_rejected(tmp_path: Path) -> None:
    feats, coords = _planted()
    path = write_feature_file(tmp_path / "s.h5", feats, coords, grid=GRID, encoder="e")
    with h5py.File(path, "a") as f:
        f.attrs["oncoslide_layout_version"] = 99
    with pytest.raises(FeatureFileError, match="newer"):
        read_features(path)


# ---------------------------------------------------------------------------------------------
# TRIDENT / CLAM


def test_trident_batch_axis_is_squeezed_and_attrs_detected(tmp_path: Path) -> None:
    feats, coords = _planted()
    path = tmp_path / "TCGA-XX.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats[None])
        c = f.create_dataset("coords", data=coords[None].astype(np.int32))
        for key, value in {
            "patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
            "target_magnification": 20, "overlap": 0, "name": "TCGA-XX",
        }.items():  # fmt: skip
            c.attrs[key] = value
    sf = read_features(path, slide_id="given-id")
    assert sf.layout == "trident"
    assert sf.slide_id == "given-id"
    assert sf.features.shape == feats.shape
    np.testing.assert_array_equal(sf.features, feats)
    assert sf.coords.dtype == np.int64
    np.testing.assert_array_equal(sf.coords, coords)
    assert sf.grid is None  # TRIDENT records magnifications, not µm/px: no grid is invented


def test_trident_file_with_full_grid_attrs_gets_a_grid(tmp_path: Path) -> None:
    feats, coords = _planted()
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats).attrs["encoder"] = "uni_v1"
        c = f.create_dataset("coords", data=coords)
        for key, value in GRID.as_attrs().items():
            c.attrs[key] = value
    sf = read_features(path)
    assert (sf.layout, sf.encoder, sf.grid) == ("trident", "uni_v1", GRID)


def test_clam_float64_features_become_float32_and_int32_coords_int64(tmp_path: Path) -> None:
    feats, coords = _planted()
    path = _h5(
        tmp_path / "s.h5", {"features": feats.astype(np.float64), "coords": coords.astype(np.int32)}
    )
    sf = read_features(path)
    assert sf.layout == "clam"
    assert sf.features.dtype == np.float32
    np.testing.assert_allclose(sf.features, feats)
    assert sf.coords.dtype == np.int64
    np.testing.assert_array_equal(sf.coords, coords)


def test_whole_number_float_coords_are_accepted_fractional_ones_are_not(tmp_path: Path) -> None:
    feats, coords = _planted()
    ok = _h5(tmp_path / "a.h5", {"features": feats, "coords": coords.astype(np.float32)})
    np.testing.assert_array_equal(read_features(ok).coords, coords)
    frac = _h5(tmp_path / "b.h5", {"features": feats, "coords": coords + 0.5})
    with pytest.raises(FeatureFileError, match="whole level-0 pixel"):
        read_features(frac)


def test_hdf5_features_without_coords_get_minus_one(tmp_path: Path) -> None:
    feats, _ = _planted()
    sf = read_features(_h5(tmp_path / "s.h5", {"features": feats}))
    assert (sf.coords == -1).all() and sf.coords.shape == (len(feats), 2)


# ---------------------------------------------------------------------------------------------
# .pt files


def test_pt_tensor_has_no_coords(tmp_path: Path) -> None:
    feats, _ = _planted()
    torch.save(torch.from_numpy(feats), tmp_path / "s.pt")
    sf = read_features(tmp_path / "s.pt")
    assert sf.layout == "pt" and sf.slide_id == "s"
    np.testing.assert_array_equal(sf.features, feats)
    assert sf.coords.dtype == np.int64
    assert (sf.coords == -1).all() and sf.coords.shape == (len(feats), 2)


def test_pt_batch_axis_numpy_array_and_dict_with_coords(tmp_path: Path) -> None:
    feats, coords = _planted()
    torch.save(torch.from_numpy(feats)[None], tmp_path / "a.pt")
    np.testing.assert_array_equal(read_features(tmp_path / "a.pt").features, feats)
    torch.save(feats.astype(np.float16), tmp_path / "b.pt")  # TRIDENT once saved numpy arrays
    b = read_features(tmp_path / "b.pt")
    assert b.features.dtype == np.float16
    np.testing.assert_array_equal(b.features, feats.astype(np.float16))
    torch.save(
        {"feats": torch.from_numpy(feats), "coords": torch.from_numpy(coords)}, tmp_path / "c.pt"
    )
    c = read_features(tmp_path / "c.pt")
    np.testing.assert_array_equal(c.coords, coords)
    np.testing.assert_array_equal(c.features, feats)


def test_pt_bfloat16_becomes_float32(tmp_path: Path) -> None:
    feats, _ = _planted()
    t = torch.from_numpy(feats).to(torch.bfloat16)
    torch.save(t, tmp_path / "s.pt")
    sf = read_features(tmp_path / "s.pt")
    assert sf.features.dtype == np.float32
    np.testing.assert_array_equal(sf.features, t.float().numpy())


class _Payload:
    """Not a tensor: weights_only loading must refuse to build it."""


class _Reducer:
    """Unpickling it would call a function (here a harmless one): code, not data."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (Path.cwd, ())


@pytest.mark.parametrize("payload", [_Payload(), _Reducer()], ids=["instance", "reduce"])
def test_pt_with_python_objects_is_refused_with_how_to_resave(
    tmp_path: Path, payload: object
) -> None:
    torch.save({"features": payload}, tmp_path / "s.pt", pickle_module=pickle)
    for read in (read_features, inspect_features):
        with pytest.raises(FeatureFileError, match="contains Python code") as caught:
            read(tmp_path / "s.pt")
        message = str(caught.value)
        # never torch's advice to load it anyway, which would run the file's code
        assert "weights_only=False" not in message and "weights_only` set to `False" not in message
        assert "was not loaded, for safety" in message
        assert "torch.save(features_tensor, path)" in message and ".h5" in message


def test_pt_dict_without_features_key(tmp_path: Path) -> None:
    torch.save({"embeddings": torch.zeros(3, 2)}, tmp_path / "s.pt")
    with pytest.raises(FeatureFileError, match="embeddings"):
        read_features(tmp_path / "s.pt")


# ---------------------------------------------------------------------------------------------
# STAMP


def _stamp(
    path: Path,
    px: np.ndarray,
    mpp: float,
    *,
    unit: str | None = "um",
    tile_sizes: bool = True,
    **attrs: object,
) -> Path:
    feats = np.arange(len(px) * 4, dtype=np.float16).reshape(len(px), 4)
    with h5py.File(path, "w") as f:
        f["feats"] = feats
        f["coords"] = px.astype(np.float64) * mpp  # micrometres
        f.attrs["extractor"] = "ctranspath"
        if tile_sizes:
            f.attrs["tile_size_um"] = 256.0
            f.attrs["tile_size_px"] = 224
        if unit is not None:
            f.attrs["unit"] = unit
        for key, value in attrs.items():
            f.attrs[key] = value
    return path


def test_stamp_micrometres_convert_with_caller_mpp(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=0.5)
    sf = read_features(path, stamp_mpp=0.5)
    assert sf.layout == "stamp" and sf.encoder == "ctranspath"
    assert sf.features.dtype == np.float16
    np.testing.assert_array_equal(sf.coords, px)
    assert sf.coords_frame == "level0"
    assert inspect_features(path, stamp_mpp=0.5, check_units=True).coords_frame == "level0"


@pytest.mark.parametrize("tile_size_px", [224, 256])
@pytest.mark.parametrize("on_coords", [False, True], ids=["file-attrs", "coords-attrs"])
def test_stamp_file_as_stamp_writes_it_reads_in_tile_grid_pixels(
    tmp_path: Path, write_stamp, tile_size_px: int, on_coords: bool
) -> None:
    # 256 px tiles at 0.5 µm/px: 128 µm; no slide resolution anywhere in the file
    grid_xy = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [2, 1], [5, 7]])
    feats = np.random.default_rng(0).normal(size=(len(grid_xy), 6))
    path = write_stamp(
        tmp_path / "s.h5", feats, grid_xy, tile_size_um=256 * 0.5, tile_size_px=tile_size_px
    )
    if on_coords:  # STAMP variants put the tile attributes on the coords dataset
        with h5py.File(path, "a") as f:
            for key in ("unit", "tile_size_um", "tile_size_px"):
                f["coords"].attrs[key] = f.attrs[key]
                del f.attrs[key]
    sf = read_features(path)
    assert sf.layout == "stamp" and sf.coords_frame == "tile" and sf.grid is None
    np.testing.assert_array_equal(sf.coords, grid_xy * tile_size_px)
    np.testing.assert_array_equal(sf.features, feats.astype(np.float16))
    # neighbouring tiles lie exactly one tile (tile_size_px) apart
    assert set(np.diff(np.unique(sf.coords[:, 0]))) == {tile_size_px, 3 * tile_size_px}
    assert np.diff(sf.coords[:3, 0]).tolist() == [tile_size_px, tile_size_px]
    info = inspect_features(path, check_units=True)
    assert info.has_coords and info.coords_frame == "tile"
    # the slide resolution, when given, still gives exact level-0 pixels
    level0 = read_features(path, stamp_mpp=0.25)
    assert level0.coords_frame == "level0"
    np.testing.assert_array_equal(level0.coords, grid_xy * 512)


def test_stamp_with_tile_size_um_only_reads_in_micrometre_pixels(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=0.5, tile_sizes=False, tile_size_um=256.0)
    sf = read_features(path)
    assert sf.coords_frame == "tile"
    np.testing.assert_array_equal(sf.coords, px // 2)  # 1 px per µm


def test_stamp_bad_tile_size_is_an_error(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=0.5, tile_sizes=False, tile_size_um=128.0)
    with h5py.File(path, "a") as f:
        f.attrs["tile_size_px"] = 0
    with pytest.raises(FeatureFileError, match="tile_size_px must be a positive number"):
        read_features(path)


def test_stamp_without_mpp_or_tile_size_fails_and_says_to_pass_stamp_mpp(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=0.5, tile_sizes=False)
    with pytest.raises(FeatureFileError, match="stamp_mpp"):
        read_features(path)
    with pytest.raises(FeatureFileError, match="stamp_mpp"):
        inspect_features(path, check_units=True)
    assert peek_features(path) == (len(px), 4)  # shapes need no units


def test_stamp_file_mpp_wins_over_caller(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=0.25)
    with h5py.File(path, "a") as f:
        f["coords"].attrs["mpp"] = 0.25
    np.testing.assert_array_equal(read_features(path, stamp_mpp=0.5).coords, px)


def test_stamp_2_0_without_unit_but_tile_size_um_is_micrometres(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=0.5, unit=None)
    np.testing.assert_array_equal(read_features(path, stamp_mpp=0.5).coords, px)


def test_stamp_1_without_any_unit_information_keeps_no_positions(tmp_path: Path) -> None:
    feats, coords = _planted()
    path = _h5(tmp_path / "s.h5", {"feats": feats, "coords": coords})
    sf = read_features(path)
    assert (sf.coords == -1).all()
    assert inspect_features(path, check_units=True).has_coords is False


def test_stamp_unknown_unit_is_an_error(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=1.0, unit="px")
    with pytest.raises(FeatureFileError, match="unit 'px'"):
        read_features(path, stamp_mpp=0.5)


def test_stamp_nonpositive_mpp_is_an_error(tmp_path: Path) -> None:
    _, px = _planted()
    path = _stamp(tmp_path / "s.h5", px, mpp=0.5)
    with pytest.raises(FeatureFileError, match="positive"):
        read_features(path, stamp_mpp=0.0)


# ---------------------------------------------------------------------------------------------
# malformed files


def test_no_known_dataset(tmp_path: Path) -> None:
    path = _h5(tmp_path / "s.h5", {"embeddings": np.zeros((3, 2))})
    with pytest.raises(FeatureFileError, match=r"no known feature dataset \(found: embeddings\)"):
        read_features(path)


@pytest.mark.parametrize(
    ("datasets", "match"),
    [
        ({"features": np.zeros(5, np.float32)}, "must be \\(N, D\\)"),
        ({"features": np.zeros((2, 3, 4), np.float32)}, "must be \\(N, D\\)"),
        ({"features": np.zeros((3, 4), np.float32), "coords": np.zeros((4, 2))}, "4 coords for 3"),
        ({"features": np.zeros((3, 4), np.float32), "coords": np.zeros((3, 3))}, "coords must be"),
        ({"features": np.zeros((3, 4), np.int64), "coords": np.zeros((3, 2))}, "floating point"),
    ],
)
def test_bad_shapes_and_dtypes(tmp_path: Path, datasets: dict, match: str) -> None:
    path = _h5(tmp_path / "s.h5", datasets)
    with pytest.raises(FeatureFileError, match=match):
        read_features(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_features_are_counted(tmp_path: Path, bad: float) -> None:
    feats, coords = _planted()
    feats[1, 2] = bad
    feats[4, 0] = bad
    feats[4, 1] = bad  # a second bad value in the same patch: patches are counted
    path = _h5(tmp_path / "s.h5", {"features": feats, "coords": coords})
    with pytest.raises(NonFiniteFeaturesError, match="2 of 7 patches have NaN or infinite"):
        read_features(path)


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    feats, coords = _planted(n=200, d=16)
    path = write_feature_file(tmp_path / "t.h5", feats, coords, grid=GRID, encoder="e")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureFileError, match="cannot read HDF5"):
        read_features(path)
    (tmp_path / "g.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(FeatureFileError, match="cannot read HDF5"):
        peek_features(tmp_path / "g.h5")
    (tmp_path / "g.pt").write_bytes(b"nor a torch file")
    with pytest.raises(FeatureFileError, match="cannot read torch file"):
        read_features(tmp_path / "g.pt")


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(FeatureFileError, match="file not found"):
        read_features(tmp_path / "nope.h5")
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(FeatureFileError, match="unsupported file suffix"):
        read_features(tmp_path / "x.npy")


def test_error_carries_path_and_reason(tmp_path: Path) -> None:
    path = _h5(tmp_path / "s.h5", {"other": np.zeros(2)})
    with pytest.raises(FeatureFileError) as info:
        read_features(path)
    assert info.value.path == str(path)
    assert "no known feature dataset" in info.value.reason


# ---------------------------------------------------------------------------------------------
# peek


def test_peek_reads_shapes_without_values(tmp_path: Path) -> None:
    feats, coords = _planted(n=9, d=3)
    feats[0, 0] = np.nan  # a read would fail: peek must not look at values
    _h5(tmp_path / "a.h5", {"features": feats[None], "coords": coords[None]})
    torch.save(torch.from_numpy(feats), tmp_path / "b.pt")
    assert peek_features(tmp_path / "a.h5") == (9, 3)
    assert peek_features(tmp_path / "b.pt") == (9, 3)
    info = inspect_features(tmp_path / "a.h5")
    assert (info.layout, info.dtype, info.has_coords) == ("clam", np.float32, True)


# ---------------------------------------------------------------------------------------------
# finding files


def _touch_feature(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_find_prefers_top_level_and_h5(tmp_path: Path) -> None:
    _touch_feature(tmp_path / "s1.pt")
    h5 = _touch_feature(tmp_path / "s1.h5")
    _touch_feature(tmp_path / "h5_files" / "s1.h5")
    assert find_feature_file(tmp_path, "s1") == h5
    located = FeatureIndex(tmp_path).locate("s1")
    assert located.path == h5 and located.ignored == (tmp_path / "s1.pt",)


def test_find_in_clam_subfolders_prefers_h5_over_pt(tmp_path: Path) -> None:
    _touch_feature(tmp_path / "pt_files" / "s.2.pt")
    h5 = _touch_feature(tmp_path / "h5_files" / "s.2.h5")
    _touch_feature(tmp_path / "h5_files" / "other.h5")
    assert find_feature_file(tmp_path, "s.2") == h5
    assert FeatureIndex(tmp_path).find("s.2") == h5
    assert find_feature_file(tmp_path, "missing") is None
    assert FeatureIndex(tmp_path).find("missing") is None


def test_find_two_encoder_folders_is_ambiguous(tmp_path: Path) -> None:
    _touch_feature(tmp_path / "uni" / "s.h5")
    _touch_feature(tmp_path / "conch" / "s.h5")
    with pytest.raises(FeatureFileError, match="ambiguous"):
        find_feature_file(tmp_path, "s")
    with pytest.raises(FeatureFileError, match="ambiguous"):
        FeatureIndex(tmp_path).find("s")


def test_find_ignores_deeper_levels_and_hidden_files(tmp_path: Path) -> None:
    _touch_feature(tmp_path / "a" / "b" / "s.h5")
    _touch_feature(tmp_path / ".s.h5")
    assert find_feature_file(tmp_path, "s") is None
    assert FeatureIndex(tmp_path).find("s") is None
    assert FeatureIndex(tmp_path).find("") is None
