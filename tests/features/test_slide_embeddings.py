"""Slide embeddings from per-slide files (TRIDENT's HDF5, .pt) or a table; every problem listed."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from oncoslide.features.slide_embeddings import SlideEmbeddingError, load_slide_embeddings


def _h5(path: Path, key: str, value: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=value)


def test_files_of_every_accepted_layout_and_a_table_give_the_same_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = {f"s{i}": rng.normal(size=6).astype(np.float32) for i in range(5)}
    folder = tmp_path / "slide_features_titan"
    folder.mkdir()
    _h5(folder / "s0.h5", "features", vectors["s0"])  # TRIDENT: (D,)
    _h5(folder / "s1.h5", "features", vectors["s1"][None, :])  # (1, D)
    _h5(folder / "s2.h5", "slide_embedding", vectors["s2"][None, None, :])  # (1, 1, D)
    torch.save(torch.from_numpy(vectors["s3"]), folder / "s3.pt")
    (folder / "sub").mkdir()
    torch.save({"embedding": torch.from_numpy(vectors["s4"][None])}, folder / "sub" / "s4.pt")
    ids = ["s3", "s0", "s4", "s1", "s2"]
    got = load_slide_embeddings(folder, ids)
    assert got.slide_ids == tuple(ids) and got.dim == 6
    np.testing.assert_array_equal(got.matrix, np.stack([vectors[s] for s in ids]))
    np.testing.assert_array_equal(
        got.vectors(["s2", "s0"]), np.stack([vectors["s2"], vectors["s0"]])
    )

    table = pd.DataFrame(np.stack(list(vectors.values())), columns=[f"d{k}" for k in range(6)])
    table.insert(0, "slide_id", list(vectors))
    for suffix in (".csv", ".parquet"):
        path = tmp_path / f"emb{suffix}"
        table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
        from_table = load_slide_embeddings(path, ids)
        np.testing.assert_allclose(from_table.matrix, got.matrix, rtol=1e-6)


def test_every_problem_of_a_folder_is_listed_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    folder.mkdir()
    _h5(folder / "ok1.h5", "features", np.ones(4))
    _h5(folder / "ok2.h5", "features", np.ones(4))
    _h5(folder / "short.h5", "features", np.ones(3))  # another dimension
    _h5(folder / "bag.h5", "features", np.ones((7, 4)))  # patch features, not an embedding
    _h5(folder / "nan.h5", "features", np.array([1.0, np.nan, 0.0, 0.0]))
    _h5(folder / "nokey.h5", "coords", np.ones(4))
    (folder / "corrupt.h5").write_bytes(b"not an hdf5 file")
    ids = ["ok1", "ok2", "short", "bag", "nan", "nokey", "corrupt", "absent"]
    with pytest.raises(SlideEmbeddingError) as info:
        load_slide_embeddings(folder, ids)
    text = str(info.value)
    assert "4 problems" in text
    assert "1 slide(s) have no file: absent" in text
    assert "3 file(s) cannot be used" in text and "bag" in text and "(7, 4)" in text
    assert "nokey" in text and "corrupt" in text
    assert "1 slide(s) have dimension 3, most have 4: short" in text
    assert "1 slide(s) have non-finite values: nan" in text


def test_table_problems_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "emb.csv"
    pd.DataFrame({"slide_id": ["a", "a", "b"], "d0": [1.0, 2.0, 3.0], "d1": ["x", 1, 2]}).to_csv(
        path, index=False
    )
    with pytest.raises(SlideEmbeddingError, match="non-numeric embedding column"):
        load_slide_embeddings(path, ["a", "b"])
    pd.DataFrame({"slide_id": ["a", "a", "b"], "d0": [1.0, 2.0, np.nan]}).to_csv(path, index=False)
    with pytest.raises(SlideEmbeddingError) as info:
        load_slide_embeddings(path, ["a", "b", "c"])
    text = str(info.value)
    assert "appear twice: a" in text and "no row: c" in text and "non-finite values: b" in text
    pd.DataFrame({"id": ["a"], "d0": [1.0]}).to_csv(path, index=False)
    with pytest.raises(SlideEmbeddingError, match="slide_id column"):
        load_slide_embeddings(path, ["a"])
    with pytest.raises(SlideEmbeddingError, match="not found"):
        load_slide_embeddings(tmp_path / "nowhere", ["a"])


class _Pickled:
    """Any class: a .pt holding an instance needs code to be unpickled."""

    def __init__(self) -> None:
        self.vector = [1.0, 2.0]


def test_a_pt_embedding_holding_code_is_refused_without_torchs_advice(tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    folder.mkdir()
    torch.save(torch.ones(4), folder / "s1.pt")
    torch.save(_Pickled(), folder / "s2.pt")
    with pytest.raises(SlideEmbeddingError) as info:
        load_slide_embeddings(folder, ["s1", "s2"])
    message = str(info.value)
    assert "s2.pt" in message and "contains Python code" in message
    assert "weights_only=False" not in message
