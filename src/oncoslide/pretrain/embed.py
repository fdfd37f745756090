"""One embedding per slide from a pre-trained slide encoder (``oncoslide embed-slides``).

The output folder holds ``<slide_id>.h5`` files with a dataset ``features`` of shape (E,), the
layout :func:`~oncoslide.features.slide_embeddings.load_slide_embeddings` reads (a benchmark's
``level: slide`` feature set), and ``slide_embeddings.json`` (the encoder, its folder and
weights digest, the dimension, the slides). Every slide is embedded whole (all its patches) in
its own coordinate frame. A rerun skips the slides already embedded by the same weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from oncoslide._io import atomic_path, write_json
from oncoslide.cohort.exclusions import pretrain_slides_of
from oncoslide.errors import ConfigError
from oncoslide.features.readers import FeatureIndex, read_features
from oncoslide.features.schema import FeatureContract
from oncoslide.pretrain.bags import feature_slide_ids
from oncoslide.pretrain.folder import WEIGHTS_FILE, LoadedEncoder, load_slide_encoder

MANIFEST = "slide_embeddings.json"


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    slide_ids: list[str]
    embed_dim: int
    written: int
    skipped: int


def weights_digest(enc_dir: str | os.PathLike[str]) -> str:
    return hashlib.sha256((Path(enc_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]


def embed_slides(
    encoder: LoadedEncoder | str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    slide_ids: Sequence[str] | None = None,
    device: str = "cpu",
    on_slide: Callable[[int, int, str], None] | None = None,
) -> EmbedResult:
    """Embed every slide of ``features_dir`` (or ``slide_ids``) into ``out``.

    Raises ``ConfigError`` when the features do not match the encoder's feature contract
    (patch encoder, weights, dimension, patch size, resolution), before anything is written.
    """
    loaded = encoder if isinstance(encoder, LoadedEncoder) else load_slide_encoder(encoder)
    digest = weights_digest(loaded.path)
    out = Path(out)
    ids = list(slide_ids) if slide_ids is not None else feature_slide_ids(features_dir)
    if not ids:
        raise ConfigError(f"no feature files in {features_dir}")
    index = FeatureIndex(features_dir)
    paths = {}
    for sid in ids:
        path = index.find(sid)
        if path is None:
            raise ConfigError(f"slide {sid} has no feature file in {features_dir}")
        paths[sid] = path
    model = loaded.encoder.to(device).eval()
    written = skipped = 0
    checked = False
    for i, sid in enumerate(ids):
        target = out / f"{sid}.h5"
        if _done(target, digest):
            skipped += 1
        else:
            slide = read_features(paths[sid], slide_id=sid)
            if not checked:
                problems = loaded.contract.mismatches(FeatureContract.of(slide))
                if problems:
                    raise ConfigError(
                        f"the encoder {loaded.path} was pre-trained on other features: "
                        + "; ".join(problems)
                    )
                checked = True
            has_coords = not bool((slide.coords == -1).all(axis=1).any())
            if loaded.encoder.uses_coords and not has_coords:
                raise ConfigError(
                    f"slide {sid}: the {loaded.name} encoder needs patch coordinates, "
                    "the feature file has none"
                )
            feats = torch.from_numpy(np.asarray(slide.features, dtype=np.float32)).to(device)
            coords = (
                torch.from_numpy(np.asarray(slide.coords, dtype=np.float32)).to(device)
                if has_coords
                else None
            )
            with torch.no_grad():
                vec = model(feats, coords).float().cpu().numpy()
            with atomic_path(target, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=vec.astype(np.float32))
                f.attrs["slide_encoder"] = loaded.name
                f.attrs["encoder_weights"] = digest
                f.attrs["n_patches"] = slide.n_patches
            written += 1
        if on_slide is not None:
            on_slide(i + 1, len(ids), sid)
    write_json(
        out / MANIFEST,
        {
            "slide_encoder": loaded.name,
            "encoder_dir": str(loaded.path.resolve()),
            "encoder_weights": digest,
            "embed_dim": loaded.embed_dim,
            "features": str(Path(features_dir).resolve()),
            "slides": ids,
            # the encoder's pre-training slides (None: its folder predates the list), so a
            # benchmark or few-shot run keeps their patients out of test parts by itself
            "pretrain_slides": pretrain_slides_of(loaded.path),
        },
    )
    return EmbedResult(out, ids, loaded.embed_dim, written, skipped)


def _done(target: Path, digest: str) -> bool:
    if not target.exists():
        return False
    try:
        with h5py.File(target, "r") as f:
            return bool(f.attrs.get("encoder_weights") == digest and "features" in f)
    except OSError:
        return False


__all__ = ["MANIFEST", "EmbedResult", "embed_slides", "weights_digest"]
