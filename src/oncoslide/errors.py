"""Typed errors raised by the library. Only the CLI turns them into messages and exit codes."""

from __future__ import annotations

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


class SplitLeakageError(OncoslideError):
    """A split puts a patient in two parts, or a test fold is not disjoint from training."""


class ConfigError(OncoslideError):
    """A configuration value is invalid or inconsistent with the data."""


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
