"""A small name -> factory registry, shared by models, encoders and methods (timm style).

>>> MODELS = Registry("model")
>>> @MODELS.register("mean", reference="...")
... class MeanPool: ...
>>> MODELS.create("mean", in_dim=1536, n_outputs=4)  # doctest: +SKIP

Unknown names raise :class:`~oncoslide.errors.UnknownNameError` listing the known ones; keyword
arguments the factory does not accept raise :class:`~oncoslide.errors.ConfigError` naming the entry,
before anything is built.
"""

from __future__ import annotations

import builtins
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from oncoslide.errors import ConfigError, UnknownNameError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Named factories (classes or functions) of one kind, each with free-form metadata."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._metadata: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[F], F]:
        """Decorator registering a class or function under ``name`` with ``metadata``.

        The factory is returned unchanged, so the decorated class stays usable directly.
        Registering a name twice is an error (a silent override would hide a typo or a clash).
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise ConfigError(f"{self.kind} names must be non-empty strings without spaces around")

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            if not callable(factory):
                raise ConfigError(f"{self.kind} {name!r}: only callables can be registered")
            self._factories[name] = factory
            self._metadata[name] = dict(metadata)
            return factory

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an entry (plugins and tests that register temporary entries)."""
        self.get(name)  # raises for unknown names
        del self._factories[name], self._metadata[name]

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``."""
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._factories) from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the entry ``name`` with ``kwargs``; bad keywords raise a ``ConfigError``."""
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as err:  # unknown or missing keyword: say which entry and why
            raise ConfigError(f"{self.kind} {name!r}: {err}") from None
        except ValueError:  # some builtins have no introspectable signature: just call
            pass
        return factory(**kwargs)

    def metadata(self, name: str) -> dict[str, Any]:
        """A copy of the metadata given at registration."""
        self.get(name)  # raises for unknown names
        return dict(self._metadata[name])

    def list(self, pattern: str = "*") -> builtins.list[str]:
        """Sorted registered names matching the shell-style ``pattern`` (fnmatch)."""
        return sorted(n for n in self._factories if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._factories)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
