"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash at any point leaves either the old file or the new one, never a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from oncoslide.errors import ConfigError, WriteError, os_error_code


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any threads start
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# Failures of the writes into the temporary file that are about the disk, not about the data:
# they become a WriteError naming the target. Other errors of the caller's code pass unchanged.
_DISK_ERRNOS = frozenset(
    code
    for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EFBIG)
    if code is not None
)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``target``.

    Raises ``WriteError`` (an ``OSError`` naming ``target``) when the folder or the temporary
    file cannot be made, the disk fills up while writing, or the rename fails.
    """
    target = Path(target)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent
        )
        os.close(fd)
        tmp_path = Path(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~_UMASK)
    except OSError as exc:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise WriteError(target, exc) from exc
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if isinstance(exc, WriteError) or os_error_code(exc) not in _DISK_ERRNOS:
                raise
            raise WriteError(target, exc) from exc
        try:
            os.replace(tmp_path, target)
        except OSError as exc:
            raise WriteError(target, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def check_folder_target(out: str | os.PathLike[str]) -> Path:
    """``out`` as a Path, refused (``ConfigError``) when it names an existing non-folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    return out


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_table(target: str | os.PathLike[str], df: pd.DataFrame) -> None:
    """Write a CSV or Parquet table (chosen by suffix) atomically."""
    target = Path(target)
    with atomic_path(target) as tmp:
        if target.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


def read_table_file(
    path: str | os.PathLike[str], problems: list[str], string_columns: tuple[str, ...] = ()
) -> pd.DataFrame | None:
    """Read a CSV, TSV or Parquet table; on failure add a problem and return None.

    ``string_columns`` are read as strings from text tables, so ids such as "007" keep their
    zeros. Nothing raises: callers collect every problem of an input before reporting.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        problems.append(f"unsupported table format {path.suffix!r}: use .csv, .tsv or .parquet")
        return None
    if not path.is_file():
        problems.append("file not found")
        return None
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        sep = "\t" if suffix == ".tsv" else ","
        return pd.read_csv(path, sep=sep, dtype=dict.fromkeys(string_columns, str))
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        problems.append(f"cannot read the table ({type(exc).__name__}: {exc})")
        return None


_SEPARATORS = {",": "','", "\t": "tabs", ";": "';'", "|": "'|'"}


def separator_hint(path: str | os.PathLike[str]) -> str | None:
    """A hint when a text table's header line splits on another separator than its suffix's.

    A table saved with ';' (the spreadsheet default in many locales) is read as one column
    named "a;b;c", which callers report as missing columns; this says why. None when the
    header splits best on the separator that was used, or the file is not a text table.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return None
    used = "\t" if suffix == ".tsv" else ","
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return None
    counts = {sep: header.count(sep) for sep in _SEPARATORS}
    best = max(counts, key=lambda sep: counts[sep])
    if best == used or counts[best] <= counts[used]:
        return None
    fix = {",": "rename it to .csv", "\t": "rename it to .tsv"}.get(
        best, "save it with commas (.csv) or tabs (.tsv)"
    )
    return (
        f"the file seems to be separated by {_SEPARATORS[best]}; oncoslide reads "
        f"comma-separated .csv and tab-separated .tsv files: {fix}"
    )


def read_mapping_file(
    path: str | os.PathLike[str], what: str, holds: str, *, allow_empty: bool = False
) -> dict[str, Any]:
    """Read a YAML file (JSON when the suffix is .json) that must hold a mapping.

    ``what`` names the file in messages ("benchmark spec"), ``holds`` what the mapping holds;
    an empty file is an empty mapping when ``allow_empty``. Raises ``ConfigError``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    text = path.read_text()
    as_json = path.suffix == ".json"
    try:
        data = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if as_json else "YAML"
        raise ConfigError(f"{what} {path} is not valid {kind}: {exc}") from None
    if data is None and allow_empty:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of {holds}")
    return data


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
