"""Cross-cancer prognosis transfer (CROPKT): a zoo of per-cancer models and the matrix of how
each transfers to every other cancer. See docs/transfer.md."""

from __future__ import annotations

from oncoslide.transfer.matrix import TransferMatrix, clustered_order, transfer_matrix
from oncoslide.transfer.zoo import Zoo, ZooEntry, build_zoo, load_zoo

__all__ = [
    "TransferMatrix",
    "Zoo",
    "ZooEntry",
    "build_zoo",
    "clustered_order",
    "load_zoo",
    "transfer_matrix",
]
