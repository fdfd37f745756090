"""Progress records of long jobs: the ``oncoslide`` logger tree, ``run.log``, plain console lines.

The library reports what a job does (each epoch and fold of a training run, each benchmark cell,
each extracted slide) as INFO records of loggers under ``oncoslide``, with the numbers also in
the record's attributes (``extra``: ``event``, ``seed``, ``fold``, ``epoch``, ...). It configures
no handler for the caller with one exception: while a job writes its folder, :func:`run_log`
appends the job's records to ``<folder>/run.log``, terminal or not. How records reach the console
is the command line's choice (:func:`console_lines`: one plain line per record, flushed at once,
for output that is not a terminal; rich progress bars otherwise).

Processes a job spawns (DDP workers) start without the parent's handlers: :func:`sinks` describes
the ones attached here so that the worker can attach the same (:func:`attach_sinks`); a file
opened in append mode by two processes interleaves whole lines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

ROOT = "oncoslide"
RUN_LOG = "run.log"
_FORMATTER = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")


def get_logger(name: str) -> logging.Logger:
    """The logger ``oncoslide.<name>``."""
    return logging.getLogger(f"{ROOT}.{name}")


@dataclass(frozen=True)
class Sink:
    """A handler attached here, described so that another process can attach the same."""

    kind: Literal["file", "stdout", "stderr"]
    path: str = ""


_ATTACHED: list[tuple[Sink | None, logging.Handler]] = []


class _Quiet(logging.Handler):
    """A line that cannot be written (a full disk, a closed pipe) is dropped, not printed as a
    traceback per record: the job's own writes report such a failure once, in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class _FileHandler(_Quiet, logging.FileHandler):
    pass


class _StreamHandler(_Quiet, logging.StreamHandler):  # type: ignore[type-arg]
    pass


def sinks() -> tuple[Sink, ...]:
    """The handlers attached by :func:`run_log` and :func:`console_lines` now (picklable)."""
    return tuple(sink for sink, _ in _ATTACHED if sink is not None)


@contextlib.contextmanager
def _attached(handler: logging.Handler, sink: Sink | None) -> Iterator[logging.Handler]:
    root = logging.getLogger(ROOT)
    level = root.level
    # INFO records must reach the handler even where logging is left at its WARNING default
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    handler.setFormatter(_FORMATTER)
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    _ATTACHED.append((sink, handler))
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        _ATTACHED.remove((sink, handler))
        root.setLevel(level)
        handler.close()


def command_line() -> str:
    """This process's command, as a user would type it (``oncoslide train ...``)."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("oncoslide", "cli.py", "__main__.py"):
        argv[0] = "oncoslide"
    return shlex.join(argv)


def _header(what: str) -> str:
    from oncoslide import __version__

    return (
        f"==== {what}: oncoslide {__version__}, pid {os.getpid()} on {socket.gethostname()}; "
        f"command: {command_line()}"
    )


@contextlib.contextmanager
def run_log(folder: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Append the records of ``oncoslide`` loggers to ``folder/run.log`` while the block runs.

    The file is opened in append mode (a resumed run continues its log) and starts each
    invocation with a header line: ``what``, the version, process and command. An exception
    leaving the block is recorded in the file alone (the caller reports it) and re-raised.
    Lines are written and flushed as records arrive.
    """
    path = Path(folder) / RUN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _FileHandler(path, mode="a", encoding="utf-8")
    with _attached(handler, Sink("file", str(path))):
        # only into the file: the console already shows the command it ran
        handler.handle(_record(logging.INFO, _header(what)))
        try:
            yield path
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                message = "interrupted: finished work is kept; the same command resumes"
            else:
                first = str(exc).splitlines()[0] if str(exc) else ""
                message = f"failed: {type(exc).__name__}: {first}"
            handler.handle(_record(logging.ERROR, message))
            raise


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.getLogger(ROOT).makeRecord(ROOT, level, __file__, 0, message, (), None)


@contextlib.contextmanager
def console_lines(stream: IO[str] | None = None) -> Iterator[None]:
    """Show the records as plain timestamped lines on ``stream`` (default: standard output),
    each flushed as it is written, for output that is not a terminal (a file, a pipe, a batch
    scheduler's log)."""
    stream = stream if stream is not None else sys.stdout
    sink = (
        Sink("stdout") if stream is sys.stdout else Sink("stderr") if stream is sys.stderr else None
    )
    with _attached(_StreamHandler(stream), sink):
        yield


@contextlib.contextmanager
def attach_sinks(described: Sequence[Sink]) -> Iterator[None]:
    """Attach handlers like the described ones (in a process that does not have them)."""
    with contextlib.ExitStack() as stack:
        for sink in described:
            handler: logging.Handler
            if sink.kind == "file":
                handler = _FileHandler(sink.path, mode="a", encoding="utf-8")
            else:
                handler = _StreamHandler(sys.stdout if sink.kind == "stdout" else sys.stderr)
            stack.enter_context(_attached(handler, sink))
        yield


def number(value: float | None, digits: int = 3) -> str:
    """A metric or loss for a log line: ``nan`` for missing or non-finite values."""
    if value is None:
        return "nan"
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "nan"
