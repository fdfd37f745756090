"""Progress of training: rich bars for a terminal (one over folds, one over the current fold's
steps), and one log record per epoch (:class:`EpochLog`) for ``run.log`` and plain console lines
(see :mod:`oncoslide._log`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from oncoslide._log import attach_sinks, get_logger, number, sinks


def make_progress(console: Console | None = None, *, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


class FoldProgress(pl.Callback):
    """Advances a rich bar per training step and shows the last epoch's losses."""

    def __init__(self, progress: Progress, label: str, total_steps: int) -> None:
        self.progress = progress
        self.label = label
        self.task: TaskID = progress.add_task(label, total=total_steps)
        self._last = ""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.progress.advance(self.task)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if "val_loss" in metrics:
            self._last = (
                f" epoch {trainer.current_epoch + 1}: val loss {float(metrics['val_loss']):.3f}"
                f", score {float(metrics['val_score']):.3f}"
            )
            self.progress.update(self.task, description=self.label + self._last)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # early stopping ends a fold before its planned steps: show the bar as finished
        self.progress.update(self.task, total=self.progress.tasks[self._index()].completed)
        self.progress.remove_task(self.task)

    def _index(self) -> int:
        return next(i for i, t in enumerate(self.progress.tasks) if t.id == self.task)


class EpochLog(pl.Callback):
    """One INFO record per epoch on ``oncoslide.training``: train loss, validation loss and
    score (named ``score_name``), seconds; ``extra`` fields ``event="epoch"``, ``epoch``
    (1-based), ``epochs``, ``train_loss``, ``val_loss``, ``val_score``, ``seconds`` and the
    given ``fields`` (seed, fold).

    The record of an epoch is written when the module has completed its history row: at the
    next epoch's start or at the end of training (Lightning calls a callback's
    ``on_train_epoch_end`` before the module's). Only the first process writes; a spawned DDP
    worker first attaches the handlers its parent had (they are not inherited).
    """

    def __init__(self, label: str, epochs: int, score_name: str = "score", **fields: Any) -> None:
        self.label = label
        self.epochs = epochs
        self.score_name = score_name
        self.fields = fields
        self._sinks = sinks()
        self._pid = os.getpid()
        self._epoch: int | None = None
        self._started = 0.0
        self._stack: contextlib.ExitStack | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if os.getpid() != self._pid and trainer.is_global_zero and self._stack is None:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(attach_sinks(self._sinks))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._emit(trainer, pl_module)
        self._epoch = trainer.current_epoch
        self._started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._emit(trainer, pl_module)

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, self._epoch = self._epoch, None
        if epoch is None or not trainer.is_global_zero:
            return
        history: list[dict[str, float]] = getattr(pl_module, "history", [])
        row: dict[str, float] = next((h for h in reversed(history) if h.get("epoch") == epoch), {})
        seconds = time.perf_counter() - self._started
        values = {k: row.get(k) for k in ("train_loss", "val_loss", "val_score")}
        text = f"train loss {number(values['train_loss'], 4)}"
        if values["val_loss"] is not None:
            text += (
                f", val loss {number(values['val_loss'], 4)}"
                f", val {self.score_name} {number(values['val_score'])}"
            )
        get_logger("training").info(
            "%s epoch %d/%d: %s (%.1f s)",
            self.label,
            epoch + 1,
            self.epochs,
            text,
            seconds,
            extra={
                "event": "epoch",
                **self.fields,
                "epoch": epoch + 1,
                "epochs": self.epochs,
                **values,
                "seconds": seconds,
            },
        )


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up banners and hints; our own progress says what happens."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*`IterableDataset`.*")
        # frozen parts (zoo experts, a probed source) stay in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings(
            "ignore", message=".*Checkpoint directory.*exists and is not empty.*"
        )
        try:
            yield
        except SystemExit as exc:
            # On Ctrl+C Lightning tears down and calls sys.exit(1) from its KeyboardInterrupt
            # handler: that would skip the caller's message and exit code. Give the interrupt
            # back as what it was (it is the exit's context).
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
