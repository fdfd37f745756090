"""Slide-encoder pre-training: the contract (:mod:`.base`), unlabelled bags (:mod:`.bags`), the
one runner (:mod:`.runner`), the encoder folder (:mod:`.folder`), slide embeddings
(:mod:`.embed`) and the methods (PAMA in :mod:`.pama`). See docs/pretrain.md."""

from oncoslide.pretrain.bags import PretrainBags
from oncoslide.pretrain.base import (
    PRETRAINERS,
    SLIDE_ENCODERS,
    Bag,
    PretrainMethod,
    SlideEncoder,
    create_method,
)
from oncoslide.pretrain.folder import LoadedEncoder, load_slide_encoder, write_encoder_folder
from oncoslide.pretrain.runner import PretrainResult, rankme, read_steps, run_pretraining

# built-in methods register themselves on import
from oncoslide.pretrain import pama as _pama  # noqa: F401  # isort: skip
from oncoslide.pretrain import threads as _threads  # noqa: F401  # isort: skip

__all__ = [
    "PRETRAINERS",
    "SLIDE_ENCODERS",
    "Bag",
    "LoadedEncoder",
    "PretrainBags",
    "PretrainMethod",
    "PretrainResult",
    "SlideEncoder",
    "create_method",
    "load_slide_encoder",
    "rankme",
    "read_steps",
    "run_pretraining",
    "write_encoder_folder",
]
