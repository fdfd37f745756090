"""Progress records: run.log in an output folder, plain console lines, nothing left attached."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from oncoslide._log import RUN_LOG, Sink, console_lines, get_logger, run_log, sinks


class _Flushes(io.StringIO):
    """A stream that records what had been written at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_run_log_appends_each_invocation_with_a_header_and_only_while_it_runs(
    tmp_path: Path,
) -> None:
    log = get_logger("test")
    log.info("before")
    with run_log(tmp_path, "first job") as path:
        assert path == tmp_path / RUN_LOG
        log.info("epoch %d", 1, extra={"event": "epoch"})
    log.info("between")
    with run_log(tmp_path, "second job"):
        log.info("epoch %d", 2)
    lines = (tmp_path / RUN_LOG).read_text().splitlines()
    assert len(lines) == 4, lines
    assert "==== first job: oncoslide" in lines[0] and "command:" in lines[0]
    assert lines[1].endswith(" epoch 1") and lines[3].endswith(" epoch 2")
    assert "==== second job" in lines[2]
    assert lines[1][:4].isdigit()  # a timestamp first
    text = "\n".join(lines)
    assert "before" not in text and "between" not in text


def test_run_log_records_a_failure_and_reraises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad fold"), run_log(tmp_path, "job"):
        raise ValueError("bad fold\nsecond line")
    last = (tmp_path / RUN_LOG).read_text().splitlines()[-1]
    assert last.endswith("failed: ValueError: bad fold")
    with pytest.raises(KeyboardInterrupt), run_log(tmp_path, "job"):
        raise KeyboardInterrupt
    assert "interrupted" in (tmp_path / RUN_LOG).read_text().splitlines()[-1]


def test_handlers_and_level_are_restored(tmp_path: Path) -> None:
    root = logging.getLogger("oncoslide")
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    with console_lines(stream), run_log(tmp_path, "job"):
        # INFO records get through although logging is left at its WARNING default
        assert root.getEffectiveLevel() <= logging.INFO
        assert sinks() == (Sink("file", str(tmp_path / RUN_LOG)),)  # StringIO: no worker copy
    assert root.level == level and root.handlers == handlers
    assert sinks() == ()


def test_console_lines_are_plain_and_flushed_one_by_one() -> None:
    stream = _Flushes()
    log = get_logger("test")
    with console_lines(stream):
        log.info("seed 0 fold 1 epoch 2/3: train loss 0.5")
        log.info("seed 0 fold 1 epoch 3/3: train loss 0.4")
    log.info("after")
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "seed 0 fold 1 epoch 2/3: train loss 0.5",
        "seed 0 fold 1 epoch 3/3: train loss 0.4",
    ]
    # each line was on its way out before the next was written
    assert stream.flushed[0] == lines[0] + "\n"
    assert "\x1b" not in stream.getvalue()


class _FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_line_that_cannot_be_written_is_dropped_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with console_lines(_FullDisk()):
        get_logger("test").info("seed 0 fold 0 epoch 1/2")
    assert "Logging error" not in capsys.readouterr().err
