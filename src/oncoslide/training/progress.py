"""Rich progress bars for cross-validation: one bar over folds, one over the current fold's steps."""

from __future__ import annotations

import contextlib
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
        warnings.filterwarnings(
            "ignore", message=".*Checkpoint directory.*exists and is not empty.*"
        )
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
