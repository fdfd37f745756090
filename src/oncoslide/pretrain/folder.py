"""The self-describing encoder folder a pre-training run writes (``oncoslide pretrain ... --out``)::

    encoder.json     format and version; the encoder (SLIDE_ENCODERS name, keywords, embedding
                     size); the method (name, keywords); the feature contract (patch encoder,
                     weights fingerprint, dimension, patch size, µm/px); the label-free choice
                     (epoch, RankMe) and the run's numbers; provenance (versions, seed)
    encoder.pt       the chosen encoder's state dict (torch.save; loads with weights_only=True)
    pretrain_slides.csv  the slides pre-trained on (slide_id, patient_id): evaluations keep
                     their patients out of test parts (oncoslide.cohort.exclusions)
    history.csv      per epoch: loss, RankMe, seconds, bags/s
    steps.csv        per optimiser step: loss (one row per step; a resumed run rewrites the
                     rows after its checkpoint)
    checkpoints/     last.ckpt (full state: resume) and best-encoder.pt (best RankMe so far)
    run.log          the run's log lines

:func:`load_slide_encoder` rebuilds the encoder from ``encoder.json`` + ``encoder.pt`` alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oncoslide._io import atomic_path, write_json
from oncoslide.errors import ConfigError
from oncoslide.features.schema import FeatureContract
from oncoslide.pretrain.base import SLIDE_ENCODERS, SlideEncoder

ENCODER_FORMAT = "oncoslide-slide-encoder"
ENCODER_VERSION = 1
ENCODER_FILE = "encoder.json"
WEIGHTS_FILE = "encoder.pt"


@dataclass(frozen=True, eq=False)
class LoadedEncoder:
    """A slide encoder rebuilt from its folder, in eval mode."""

    path: Path
    encoder: SlideEncoder
    name: str
    contract: FeatureContract
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)


def write_encoder_folder(
    out: str | os.PathLike[str],
    encoder: SlideEncoder,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    contract: FeatureContract,
    method: dict[str, Any],
    info: dict[str, Any],
) -> Path:
    """Write ``encoder.json`` and ``encoder.pt`` atomically (weights first)."""
    out = Path(out)
    state = state_dict if state_dict is not None else encoder.state_dict()
    with atomic_path(out / WEIGHTS_FILE, suffix=".pt.tmp") as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    from oncoslide.training.model_folder import versions

    write_json(
        out / ENCODER_FILE,
        {
            "format": ENCODER_FORMAT,
            "version": ENCODER_VERSION,
            "encoder": {
                "name": encoder.name,
                "config": encoder.config(),
                "embed_dim": int(encoder.embed_dim),
                "uses_coords": bool(encoder.uses_coords),
            },
            "method": method,
            "contract": contract.to_dict(),
            "info": info,
            "versions": versions(),
        },
    )
    return out


def load_slide_encoder(enc_dir: str | os.PathLike[str]) -> LoadedEncoder:
    """Rebuild the encoder of an encoder folder (raises ``ConfigError`` for a bad folder)."""
    path = Path(enc_dir)
    meta_file = path / ENCODER_FILE
    if not meta_file.is_file():
        raise ConfigError(f"{path} is not a slide-encoder folder (no {ENCODER_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as exc:
        raise ConfigError(f"{meta_file} is not valid JSON: {exc}") from None
    if meta.get("format") != ENCODER_FORMAT:
        raise ConfigError(f"{meta_file} is not a slide-encoder description ({ENCODER_FORMAT})")
    if int(meta.get("version", 0)) > ENCODER_VERSION:
        raise ConfigError(
            f"{meta_file} has format version {meta['version']}; this oncoslide reads up to "
            f"{ENCODER_VERSION}: update oncoslide"
        )
    # importing the package registers the built-in encoders
    import oncoslide.pretrain  # noqa: F401

    spec = meta["encoder"]
    encoder = SLIDE_ENCODERS.create(spec["name"], **spec["config"])
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{path}: the encoder weights ({WEIGHTS_FILE}) are missing")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    encoder.load_state_dict(state)
    encoder.eval()
    return LoadedEncoder(
        path=path,
        encoder=encoder,
        name=str(spec["name"]),
        contract=FeatureContract.from_dict(meta.get("contract", {})),
        info={"method": meta.get("method", {}), **meta.get("info", {})},
    )


__all__ = [
    "ENCODER_FILE",
    "ENCODER_FORMAT",
    "ENCODER_VERSION",
    "WEIGHTS_FILE",
    "LoadedEncoder",
    "load_slide_encoder",
    "write_encoder_folder",
]
