"""Structured survival targets, laid out as scikit-survival does: fields ``event`` and ``time``.

A survival target is a 1-D structured numpy array with exactly two fields, an event indicator
and a time. Its fields are found **by name, never by position** (:func:`survival_fields`), so
``("event", "time")``, ``("time", "event")``, ``("status", "time")`` and scikit-survival's data
sets (``("fstat", "lenfol")``, ``("cens", "time")``, ``("Status", "Survival_in_days")``, ...)
are all read the same way:

1. Names are compared case-insensitively (``.``, ``-`` and spaces count as ``_``).
   Event-indicator names: :data:`EVENT_FIELD_NAMES`; time names: :data:`TIME_FIELD_NAMES`.
2. One field with a known name and one with an unknown name: the unknown one is the other part.
3. Two unknown names: the one boolean field is the event indicator (scikit-survival demands a
   boolean event field); otherwise the target is refused.
4. Refused: two event names, two time names, a name that announces a *censoring* indicator
   (``censored``, ``is_censored``, ``censoring``...: True would mean censored, the opposite of an
   event indicator), a boolean time field, any number of fields other than two.

Whatever its name (``cens`` and ``censor`` included, as in scikit-survival's GBSG2 and AIDS data),
the indicator means True/1 = the event was observed, False/0 = censored. Its values must be
exactly 0/1 or bool; anything else (2, -1, 0.5, NaN) is refused rather than cast to bool. Times
must be finite and >= 0 (0 is allowed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from oncoslide._checks import as_vector
from oncoslide.errors import ConfigError

__all__ = [
    "EVENT_FIELD_NAMES",
    "SURVIVAL_DTYPE",
    "TIME_FIELD_NAMES",
    "make_survival",
    "read_survival",
    "split_survival",
    "survival_fields",
]

SURVIVAL_DTYPE = np.dtype([("event", "?"), ("time", "<f8")])

#: Field names read as the event indicator (True/1 = event observed), after normalisation.
EVENT_FIELD_NAMES: frozenset[str] = frozenset(
    {"event", "events", "status", "observed", "event_observed", "death", "dead", "fstat", "cens",
     "censor", "delta", "e"}
)  # fmt: skip
#: Field names read as the time (of the event or the censoring), after normalisation.
TIME_FIELD_NAMES: frozenset[str] = frozenset(
    {"time", "times", "duration", "durations", "futime", "follow_up", "followup", "lenfol",
     "survival_time", "survival_in_days", "time_to_event", "t"}
)  # fmt: skip
_CENSORING_WORDS = ("censored", "censoring")


def _normalise(name: str) -> str:
    return name.strip().lower().replace(".", "_").replace("-", "_").replace(" ", "_")


def _kind(name: str) -> str | None:
    key = _normalise(name)
    if key in EVENT_FIELD_NAMES:
        return "event"
    if key in TIME_FIELD_NAMES:
        return "time"
    return None


def survival_fields(dtype: np.dtype) -> tuple[str, str]:
    """The ``(event_field, time_field)`` names of a survival target's dtype, found by name.

    Raises:
        ConfigError: not a two-field structured dtype, or fields that cannot be told apart or
            would be misread (see the module docstring for the rules).
    """
    names = dtype.names
    if names is None or len(names) != 2:
        found = "no fields" if names is None else f"fields {names}"
        raise ConfigError(
            "a survival target is a structured array with two fields, an event indicator and a "
            f"time; got {found}"
        )
    for name in names:
        if any(word in _normalise(name) for word in _CENSORING_WORDS):
            raise ConfigError(
                f"field {name!r} looks like a censoring indicator (True = censored); a survival "
                "target holds an event indicator (True/1 = event observed): name it 'event'"
            )
    kinds = [_kind(name) for name in names]
    if kinds[0] is not None and kinds[0] == kinds[1]:
        raise ConfigError(f"fields {names} are two {kinds[0]} fields; one must be the other part")
    if kinds[0] is None and kinds[1] is None:
        is_bool = [dtype.fields[name][0] == np.bool_ for name in names]  # type: ignore[index]
        if is_bool.count(True) != 1:
            raise ConfigError(
                f"cannot tell the event field from the time field of {names}: name them e.g. "
                f"'event' and 'time' (event names: {sorted(EVENT_FIELD_NAMES)}; time names: "
                f"{sorted(TIME_FIELD_NAMES)}), or make the event field the only boolean one"
            )
        kinds = ["event" if b else "time" for b in is_bool]
    elif None in kinds:
        known = kinds[0] if kinds[0] is not None else kinds[1]
        other = "time" if known == "event" else "event"
        kinds = [k if k is not None else other for k in kinds]
    event_field, time_field = names if kinds[0] == "event" else names[::-1]
    if dtype.fields[time_field][0] == np.bool_:  # type: ignore[index]
        raise ConfigError(f"the time field {time_field!r} of {names} is boolean")
    return event_field, time_field


def read_survival(
    y: object, name: str, problems: list[str]
) -> tuple[NDArray[np.bool_], NDArray[np.float64]] | None:
    """Read a survival target into ``(event, time)``, recording every problem in ``problems``.

    Returns None when the fields cannot be read at all; otherwise the arrays (also when their
    values have problems: event codes other than 0/1, non-finite or negative times).
    """
    arr = np.asarray(y)
    if arr.dtype.names is None or arr.ndim != 1:
        problems.append(
            f"{name} must be a 1-D structured array with an event and a time field, got "
            f"{'dtype ' + str(arr.dtype) if arr.dtype.names is None else f'{arr.ndim} dims'}"
        )
        return None
    try:
        event_field, time_field = survival_fields(arr.dtype)
    except ConfigError as exc:
        problems.append(f"{name}: {exc}")
        return None
    raw = arr[event_field]
    try:
        codes_ok = raw.dtype == np.bool_ or (
            raw.dtype.kind in "iuf" and bool(np.isin(raw, (0, 1)).all())
        )
    except TypeError:
        codes_ok = False
    if not codes_ok:
        bad = np.unique(raw[~np.isin(raw, (0, 1))]) if raw.dtype.kind in "iuf" else raw[:0]
        shown = f": {bad.tolist()[:5]}" if bad.size else f" (dtype {raw.dtype})"
        problems.append(
            f"{name}: event field {event_field!r} must hold 0/1 or booleans (True/1 = event), "
            f"found other values{shown}"
        )
        event = np.zeros(arr.size, dtype=bool)
    else:
        event = np.asarray(raw, dtype=bool)
    time = as_vector(arr[time_field], f"{name} field {time_field!r}", problems)
    if time is None:
        return None
    negative = int((time < 0).sum())  # NaN compares False: counted as non-finite only
    if negative:
        problems.append(
            f"{name} has {negative} negative time(s) (field {time_field!r}); times must be >= 0"
        )
    return event, time


def make_survival(
    event: Sequence[object] | np.ndarray, time: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Build a structured array from event indicators (0/1 or bool) and times."""
    event = np.asarray(event)
    time = np.asarray(time, dtype=np.float64)
    if event.shape != time.shape or event.ndim != 1:
        raise ConfigError(
            f"event and time must be 1-D of equal length, got {event.shape} and {time.shape}"
        )
    if event.dtype != np.bool_:
        if not np.isin(event, (0, 1)).all():
            raise ConfigError("event indicators must be 0 or 1")
        event = event.astype(bool)
    if not np.isfinite(time).all() or (time < 0).any():
        raise ConfigError("survival times must be finite and non-negative")
    y = np.empty(time.shape[0], dtype=SURVIVAL_DTYPE)
    y["event"] = event
    y["time"] = time
    return y


def split_survival(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (event as bool, time as float64) from a structured survival array.

    Fields are found by name (:func:`survival_fields`); event codes must be 0/1 or bool and
    times finite and >= 0.

    Raises:
        ConfigError: listing every problem of the target.
    """
    problems: list[str] = []
    result = read_survival(y, "survival target", problems)
    if problems or result is None:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid survival target:\n{lines}")
    return result
