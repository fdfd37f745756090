"""Per-cell locks, so that two ``bench run`` on one folder never compute the same cell twice.

One lock file, ``OUT/.cells.lock``; a cell's lock is one byte of it (POSIX record lock at an
offset taken from the cell key), held by the driver process from the moment it claims the cell
until the cell is recorded (or failed). Record locks belong to the process: they vanish when it
dies, however it dies, so a killed run never leaves a cell locked. On systems without ``fcntl``
every lock is granted (one run per folder, as before).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux / macOS
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILENAME", "CellLocks"]

LOCK_FILENAME = ".cells.lock"


def _offset(key: str) -> int:
    # 60 bits of the (hex) cell key: distinct cells never share a byte in practice
    return int(key[:15], 16)


class CellLocks:
    """Claims on cells of one benchmark folder (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / LOCK_FILENAME
        self._fd: int | None = None
        self._held: set[str] = set()
        if fcntl is not None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)

    def _lock(self, key: str, command: int) -> bool:
        if self._fd is None or fcntl is None:
            return True
        try:
            fcntl.lockf(self._fd, command, 1, _offset(key), os.SEEK_SET)
        except BlockingIOError:
            return False
        except OSError as exc:  # e.g. EAGAIN / EACCES from some file systems
            if exc.errno in (11, 13):
                return False
            raise
        return True

    def holds(self, key: str) -> bool:
        return key in self._held

    def try_claim(self, key: str) -> bool:
        """Claim a cell unless another process holds it."""
        if key in self._held:
            return True
        if fcntl is None or self._lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB):
            self._held.add(key)
            return True
        return False

    def wait_claim(self, key: str) -> None:
        """Claim a cell, waiting while another process holds it."""
        if key in self._held:
            return
        if fcntl is not None:
            self._lock(key, fcntl.LOCK_EX)
        self._held.add(key)

    def release(self, key: str) -> None:
        if key in self._held:
            self._held.discard(key)
            if fcntl is not None:
                self._lock(key, fcntl.LOCK_UN)

    def close(self) -> None:
        self._held.clear()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # releases every record lock of this process on the file
            self._fd = None

    def __enter__(self) -> CellLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
