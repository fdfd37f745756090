"""Typed errors raised by the library. Only the CLI turns them into messages and exit codes."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable


class OncoslideError(Exception):
    """Base class of every error the library raises on purpose."""


class ProblemsError(OncoslideError):
    """An input with several problems: all of them are listed at once, never only the first."""

    what = "input"

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        where = f" {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{self.what}{where} has {n} problem{'s' if n != 1 else ''}:\n{lines}")


class CohortValidationError(ProblemsError):
    """A cohort table (and the feature files it names) failed validation."""

    what = "cohort table"


class OmicsValidationError(ProblemsError):
    """An omics table or its gene-group definition failed validation."""

    what = "omics table"


class FeatureFileError(OncoslideError):
    """A feature file is missing, unreadable, or does not follow a known layout."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"feature file {self.path}: {reason}")


class AmbiguousFeatureFileError(FeatureFileError):
    """Several feature files for one slide in different subfolders of the features folder
    (e.g. features of two encoders): ``folders`` are those subfolders, relative to it."""

    def __init__(self, features_dir: object, slide_id: str, files: Iterable[str]) -> None:
        self.features_dir, self.slide_id = str(features_dir), slide_id
        self.files = tuple(files)
        self.folders = tuple(sorted({os.path.dirname(f) or "." for f in self.files}))
        super().__init__(
            os.path.join(self.features_dir, slide_id),
            f"ambiguous: several feature files for slide {slide_id!r} ({', '.join(self.files)}); "
            "point features_dir at the folder of one encoder",
        )


class NonFiniteFeaturesError(FeatureFileError):
    """A feature file whose values include NaN or infinity (``n_bad`` of ``n_patches`` rows)."""

    def __init__(self, path: object, n_bad: int, n_patches: int) -> None:
        self.n_bad, self.n_patches = int(n_bad), int(n_patches)
        super().__init__(
            path, f"{n_bad} of {n_patches} patches have NaN or infinite feature values"
        )


class StudyError(ProblemsError):
    """A study file (``oncoslide init``'s ``study.yaml``) with unknown keys or bad values."""

    what = "study file"


class SplitLeakageError(OncoslideError):
    """A split puts a patient in two parts, or a test fold is not disjoint from training."""


class ConfigError(OncoslideError):
    """A configuration value is invalid or inconsistent with the data."""


class DataChangedError(ConfigError):
    """A run folder, model folder or stored result was computed on other data than given now."""


class UnknownNameError(OncoslideError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class SlideError(OncoslideError):
    """A slide cannot be opened or read, or its metadata (e.g. microns per pixel) is unusable."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"slide {self.path}: {reason}")


class EncoderError(OncoslideError):
    """A patch encoder cannot be built: unknown name, missing optional package or weights."""


# What a failed write means, in words a user can act on (EDQUOT is missing on some platforms).
_OS_REASONS: dict[int, str] = {
    code: text
    for code, text in (
        (errno.ENOSPC, "the disk is full"),
        (getattr(errno, "EDQUOT", None), "the disk quota is exceeded"),
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "permission denied"),
        (errno.EFBIG, "the file is too large for the file system"),
        (errno.ENOTDIR, "a folder on the path is a file"),
        (errno.EISDIR, "it is a folder"),
        (errno.EEXIST, "it already exists"),
    )
    if code is not None
}


def os_error_code(exc: OSError) -> int | None:
    """The errno of ``exc``, also when a library (pyarrow, h5py) put it only in the message."""
    if exc.errno is not None:
        return exc.errno
    text = str(exc)
    return next((code for code in _OS_REASONS if os.strerror(code) in text), None)


def _system_text(exc: OSError, code: int | None) -> str:
    return exc.strerror or (os.strerror(code) if code is not None else str(exc))


def describe_os_error(exc: OSError) -> str:
    """Why a file operation failed, in one line: "the disk is full (No space left on device)"."""
    code = os_error_code(exc)
    system = _system_text(exc, code)
    plain = _OS_REASONS.get(code) if code is not None else None
    text = system if plain is None or plain.lower() == system.lower() else f"{plain} ({system})"
    return " ".join(text.split())  # some libraries' messages span lines


class WriteError(OncoslideError, OSError):
    """A file could not be written (disk full, quota, read-only, permission, a file where a
    folder should be). Still an ``OSError``, so code that handled those keeps handling them."""

    def __init__(self, path: object, cause: OSError) -> None:
        self.path = str(path)
        self.reason = describe_os_error(cause)
        code = os_error_code(cause)
        OSError.__init__(self, code, _system_text(cause, code), self.path)

    def __str__(self) -> str:  # OSError would prefix "[Errno N]" and quote the path
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self) -> tuple[object, ...]:
        # pickled across worker processes: rebuilt from the path and the cause's errno and text
        return (type(self), (self.path, OSError(self.errno, self.strerror)))
