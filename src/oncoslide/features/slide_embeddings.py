"""Slide-level embeddings: one vector per slide, from a slide encoder run elsewhere.

Slide foundation models (TITAN, PRISM, GigaPath's slide encoder, Threads, ...) turn a slide's
patch features into one embedding. TRIDENT writes them as ``slide_features_<encoder>/`` with one
HDF5 file per slide; other tools write a table. Both are read here so a benchmark can evaluate
them with the same frozen-embedding protocol as pooled patch features.

Accepted sources:

- a folder of per-slide files, found by slide id as patch feature files are
  (:func:`~oncoslide.features.readers.find_feature_file`: ``<slide_id>.h5``, ``.hdf5`` or
  ``.pt``, directly or one subfolder down). An HDF5 file holds the vector in a dataset named
  ``features`` (TRIDENT), ``feats``, ``embedding`` or ``slide_embedding``; a ``.pt`` file holds a
  tensor or array, or a dict with one of those keys. Shapes (D,), (1, D) and (1, 1, D) are
  accepted.
- a table (``.csv``, ``.tsv`` or ``.parquet``) with a ``slide_id`` column and one numeric column
  per dimension (every other column is taken as a dimension, in table order).

Every problem (missing slides, unreadable files, wrong shapes, dimensions that disagree,
non-finite values) is collected and raised at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from oncoslide._io import TABLE_SUFFIXES, read_table_file
from oncoslide.errors import FeatureFileError, ProblemsError
from oncoslide.features.readers import FeatureIndex

PathLike = str | os.PathLike[str]

#: Dataset (HDF5) or dict (``.pt``) keys searched for the slide vector, in order.
SLIDE_EMBEDDING_KEYS: tuple[str, ...] = ("features", "feats", "embedding", "slide_embedding")
_MAX_LISTED = 20  # problems of one kind listed by name before the rest are counted


class SlideEmbeddingError(ProblemsError):
    """Slide embeddings that cannot be used (every problem listed)."""

    what = "slide embeddings"


@dataclass(frozen=True, eq=False)
class SlideEmbeddings:
    """One embedding per slide: row k of ``matrix`` belongs to ``slide_ids[k]``."""

    slide_ids: tuple[str, ...]
    matrix: NDArray[np.float32]
    source: str = ""
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row", {s: i for i, s in enumerate(self.slide_ids)})

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def vectors(self, slide_ids: Sequence[str]) -> NDArray[np.float32]:
        """The (len(slide_ids), D) embeddings of the given slides; KeyError for unknown ids."""
        return self.matrix[[self._row[s] for s in slide_ids]]


def is_table_source(source: PathLike) -> bool:
    """Whether ``source`` names a table file rather than a folder of per-slide files."""
    path = Path(source)
    return path.suffix.lower() in TABLE_SUFFIXES and not path.is_dir()


def load_slide_embeddings(source: PathLike, slide_ids: Sequence[str]) -> SlideEmbeddings:
    """Read the embeddings of ``slide_ids`` from a folder of per-slide files or a table.

    Raises:
        SlideEmbeddingError: listing every problem (missing slides, unreadable files, shapes,
            disagreeing dimensions, non-finite values).
    """
    path = Path(source)
    ids = [str(s) for s in dict.fromkeys(slide_ids)]
    problems: list[str] = []
    if is_table_source(path):
        vectors = _from_table(path, ids, problems)
    elif path.is_dir():
        vectors = _from_folder(path, ids, problems)
    else:
        raise SlideEmbeddingError(
            ["not found: expected a folder of per-slide files or a .csv/.tsv/.parquet table"],
            str(path),
        )
    dims: dict[int, list[str]] = {}
    for sid, vec in vectors.items():
        dims.setdefault(vec.size, []).append(sid)
    if len(dims) > 1:
        common = max(dims, key=lambda d: len(dims[d]))
        for dim, sids in sorted(dims.items()):
            if dim != common:
                problems.append(
                    f"{len(sids)} slide(s) have dimension {dim}, most have {common}: "
                    f"{_listed(sids)}"
                )
    bad = [sid for sid, vec in vectors.items() if not np.isfinite(vec).all()]
    if bad:
        problems.append(f"{len(bad)} slide(s) have non-finite values: {_listed(bad)}")
    if problems:
        raise SlideEmbeddingError(problems, str(path))
    if not ids:
        raise SlideEmbeddingError(["no slide ids were asked for"], str(path))
    matrix = np.stack([vectors[s] for s in ids]).astype(np.float32)
    return SlideEmbeddings(tuple(ids), matrix, str(path))


def _listed(items: Sequence[str]) -> str:
    head = ", ".join(items[:_MAX_LISTED])
    return head + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _from_table(path: Path, ids: list[str], problems: list[str]) -> dict[str, np.ndarray]:
    found: list[str] = []
    df = read_table_file(path, found, string_columns=("slide_id",))
    if df is None:
        problems += found
        return {}
    if "slide_id" not in df.columns:
        problems.append(f"the table needs a slide_id column (it has {list(df.columns)[:10]})")
        return {}
    dims = [c for c in df.columns if c != "slide_id"]
    if not dims:
        problems.append("the table has no embedding columns besides slide_id")
        return {}
    values = df[dims].apply(pd.to_numeric, errors="coerce")
    non_numeric = [str(c) for c in dims if (values[c].isna() & df[c].notna()).any()]
    if non_numeric:
        problems.append(f"non-numeric embedding column(s): {_listed(non_numeric)}")
        return {}
    duplicated = df["slide_id"][df["slide_id"].duplicated()].astype(str).unique().tolist()
    if duplicated:
        problems.append(f"{len(duplicated)} slide id(s) appear twice: {_listed(duplicated)}")
    matrix = values.to_numpy(dtype=np.float64)
    rows = {str(s): i for i, s in enumerate(df["slide_id"])}
    missing = [s for s in ids if s not in rows]
    if missing:
        problems.append(f"{len(missing)} slide(s) have no row: {_listed(missing)}")
    return {s: matrix[rows[s]] for s in ids if s in rows}


def _from_folder(folder: Path, ids: list[str], problems: list[str]) -> dict[str, np.ndarray]:
    index = FeatureIndex(folder)
    missing, unreadable = [], []
    vectors: dict[str, np.ndarray] = {}
    for sid in ids:
        try:
            file = index.find(sid)
        except FeatureFileError as exc:
            unreadable.append(f"{sid} ({exc})")
            continue
        if file is None:
            missing.append(sid)
            continue
        try:
            vectors[sid] = _read_vector(file)
        except FeatureFileError as exc:
            unreadable.append(f"{sid} ({exc})")
    if missing:
        problems.append(f"{len(missing)} slide(s) have no file: {_listed(missing)}")
    if unreadable:
        problems.append(f"{len(unreadable)} file(s) cannot be used: {_listed(unreadable)}")
    return vectors


def _read_vector(path: Path) -> np.ndarray:
    if path.suffix.lower() in {".pt", ".pth"}:
        raw = _read_torch(path)
    else:
        try:
            with h5py.File(path, "r") as f:
                key = next((k for k in SLIDE_EMBEDDING_KEYS if k in f), None)
                if key is None:
                    raise FeatureFileError(
                        path, f"no dataset named {' / '.join(SLIDE_EMBEDDING_KEYS)}"
                    )
                raw = f[key][()]
        except OSError as exc:
            raise FeatureFileError(path, f"unreadable HDF5 file ({exc})") from None
    arr = np.asarray(raw)
    if arr.dtype.kind not in "fiu":
        raise FeatureFileError(path, f"the embedding is not numeric ({arr.dtype})")
    if arr.ndim == 0 or any(n != 1 for n in arr.shape[:-1]):
        raise FeatureFileError(
            path,
            f"a slide embedding must have shape (D,), (1, D) or (1, 1, D), got {arr.shape}; "
            "a (N, D) array is a bag of patch features (use level: patch)",
        )
    return arr.reshape(-1).astype(np.float64)


def _read_torch(path: Path) -> Any:
    import pickle

    import torch

    from oncoslide.features.readers import _unsafe_pickle_message

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # never repeat torch's advice to run the file's code
        raise FeatureFileError(path, _unsafe_pickle_message(str(exc))) from None
    except Exception as exc:  # torch raises many types for a bad file
        raise FeatureFileError(path, f"unreadable .pt file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict):
        key = next((k for k in SLIDE_EMBEDDING_KEYS if k in obj), None)
        if key is None:
            raise FeatureFileError(path, f"no key named {' / '.join(SLIDE_EMBEDDING_KEYS)}")
        obj = obj[key]
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().numpy()
    return obj


__all__ = [
    "SLIDE_EMBEDDING_KEYS",
    "SlideEmbeddingError",
    "SlideEmbeddings",
    "is_table_source",
    "load_slide_embeddings",
]
