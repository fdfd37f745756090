"""The one Lightning module that trains every MIL model on every task."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from oncoslide._io import write_json
from oncoslide.errors import ConfigError
from oncoslide.models import MILOutput
from oncoslide.training.config import TrainConfig
from oncoslide.training.tasks import FoldTask

TARGET_KEYS = ("time", "event", "bin_index", "label")


def model_inputs(batch: dict[str, Tensor], uses_slide_index: bool) -> dict[str, Any]:
    """The keywords a model gets beyond (features, mask, coords): side inputs where the batch
    holds them (training-only inputs exist in training batches only), the slide index where the
    model declares it uses it."""
    kwargs: dict[str, Any] = {}
    side = {k.split(":", 1)[1]: v for k, v in batch.items() if k.startswith("side:")}
    if side:
        for k, v in batch.items():
            if k.startswith("side_present:"):
                side[f"{k.split(':', 1)[1]}_present"] = v
        kwargs["side"] = side
    if uses_slide_index:
        kwargs["slide_index"] = batch["slide_index"]
    return kwargs


def optimiser_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The trainable parameters in optimiser groups by learning rate: the groups a model's
    ``lr_scales()`` names (see :meth:`oncoslide.models.MILModel.lr_scales`) get ``lr * scale``,
    the rest ``lr``. The schedule scales every group alike."""
    hook = getattr(model, "lr_scales", None)
    scales: dict[str, float] = dict(hook()) if callable(hook) else {}
    scale_of: dict[str, float] = {}
    if scales:
        groups: dict[str, list[str]] = getattr(model, "parameter_groups")()  # noqa: B009
        unknown = sorted(set(scales) - set(groups))
        if unknown:
            raise ConfigError(f"lr_scales names unknown parameter groups {unknown}")
        for group, scale in scales.items():
            scale_of.update(dict.fromkeys(groups[group], float(scale)))
    by_scale: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_scale.setdefault(scale_of.get(name, 1.0), []).append(param)
    return [{"params": ps, "lr": lr * s, "lr_scale": s} for s, ps in sorted(by_scale.items())]


class MILModule(pl.LightningModule):
    """Wraps a registry model with its fold task (loss, validation score) and optimiser.

    Validation is scored over the whole validation part at the end of each epoch (a Cox loss
    then compares every pair of the part, not only pairs inside a minibatch); the logged
    ``val_loss`` and ``val_score`` drive early stopping and checkpoint choice. They use the task
    loss and metric only: a model's auxiliary losses (``MILOutput.aux_losses``) are added to the
    training loss with their weights and logged per epoch as ``train_aux_<name>``. The test part
    never passes through this module's training or validation hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        fold_task: FoldTask,
        config: TrainConfig,
        steps_per_epoch: int,
        *,
        aux_weights: dict[str, float] | None = None,
        uses_slide_index: bool = False,
        uses_targets: bool = False,
        history_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.fold_task = fold_task
        self.config = config
        # optimiser steps per epoch (batches / gradient accumulation), for the schedule
        self.steps_per_epoch = max(1, math.ceil(steps_per_epoch / config.accumulate_grad_batches))
        self.aux_weights = dict(aux_weights or {})
        self.uses_slide_index = uses_slide_index
        # models that declare ``uses_targets`` get the batch's targets in training steps only
        # (supervised contrastive terms, curricula); never in validation or prediction
        self.uses_targets = uses_targets
        self._aux_sums: dict[str, list[float]] = {}
        self.history_path = history_path
        self._val_logits: list[Tensor] = []
        self._val_targets: list[dict[str, Tensor]] = []
        self.history: list[dict[str, float]] = []
        self._train_losses: list[float] = []
        self.train_patches = 0  # patches through training steps, for throughput reports

    def forward(self, batch: dict[str, Tensor]) -> MILOutput:
        return self.model(
            batch["features"],
            batch["mask"],
            batch.get("coords"),
            **model_inputs(batch, self.uses_slide_index),
        )

    # -- training -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # a model with a schedule of its own (e.g. a curriculum) learns where training stands
        hook = getattr(self.model, "set_training_progress", None)
        if callable(hook):
            hook(self.current_epoch, self.config.epochs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.uses_targets:
            targets = {k: batch[k] for k in TARGET_KEYS if k in batch}
            out = self.model(
                batch["features"],
                batch["mask"],
                batch.get("coords"),
                targets=targets,
                **model_inputs(batch, self.uses_slide_index),
            )
        else:
            out = self(batch)
        if out.loss_views is not None:  # one task loss per view, averaged (MILOutput)
            views = out.loss_views
            task_loss = torch.stack(
                [
                    self.fold_task.loss(views[:, v], batch, sample_weight=out.sample_weight)
                    for v in range(views.shape[1])
                ]
            ).mean()
        else:
            task_loss = self.fold_task.loss(out.logits, batch, sample_weight=out.sample_weight)
        loss = task_loss
        for name, value in out.aux_losses.items():
            if name not in self.aux_weights:
                raise ConfigError(
                    f"the model returned an auxiliary loss {name!r} it does not declare "
                    f"(declared: {', '.join(self.aux_weights) or 'none'})"
                )
            loss = loss + self.aux_weights[name] * value
            self._aux_sums.setdefault(name, []).append(float(value.detach()))
        self._train_losses.append(float(task_loss.detach()))
        self.train_patches += int(batch["mask"].sum())
        return loss

    def on_train_epoch_end(self) -> None:
        mean = float(np.mean(self._train_losses)) if self._train_losses else math.nan
        self._train_losses.clear()
        row = {"epoch": self.current_epoch, "train_loss": mean}
        for name, values in self._aux_sums.items():
            row[f"train_aux_{name}"] = float(np.mean(values))
        self._aux_sums = {}
        if self.history and self.history[-1].get("epoch") == self.current_epoch:
            self.history[-1].update(row)
        else:
            self.history.append(row)

    def on_fit_end(self) -> None:
        # multi-process training: the main process does not share this object's attributes
        if self.history_path is not None and self.trainer.is_global_zero:
            write_json(
                self.history_path,
                {
                    "history": self.history,
                    "train_patches": self.train_patches,
                    "epochs_run": self.current_epoch,
                },
            )

    def restore_history(self) -> int:
        """After multi-process training, in the main process: the workers' history; returns
        the number of epochs run."""
        assert self.history_path is not None
        saved = json.loads(self.history_path.read_text())
        self.history = saved["history"]
        self.train_patches = saved["train_patches"]
        self.history_path.unlink()
        return int(saved["epochs_run"])

    # -- validation -----------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(batch)
        self._val_logits.append(out.logits.detach().float().cpu())
        self._val_targets.append({k: batch[k].cpu() for k in TARGET_KEYS if k in batch})

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits)
        targets = {k: torch.cat([t[k] for t in self._val_targets]) for k in self._val_targets[0]}
        self._val_logits.clear()
        self._val_targets.clear()
        val_loss = self.fold_task.full_loss(logits, targets)
        score = self.fold_task.validation_score(logits, targets)
        # NaN scores (e.g. a validation part without comparable pairs) must not win selection
        score = score if np.isfinite(score) else -math.inf
        self.log("val_loss", val_loss, prog_bar=False, batch_size=len(logits))
        self.log("val_score", score, prog_bar=False, batch_size=len(logits))
        row = {"epoch": self.current_epoch, "val_loss": val_loss, "val_score": score}
        if self.history and self.history[-1].get("epoch") == self.current_epoch:
            self.history[-1].update(row)
        else:
            self.history.append(row)

    # -- prediction -----------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        result: dict[str, Any] = {
            "index": batch["index"].cpu(),
            "logits": out.logits.float().cpu(),
            "embedding": out.embedding.float().cpu(),
        }
        return result

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimiser_class = torch.optim.Adam if self.config.optimizer == "adam" else torch.optim.AdamW
        optimizer = optimiser_class(
            optimiser_groups(self.model, self.config.lr),
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
        )
        total = self.config.epochs * self.steps_per_epoch
        warmup = min(total - 1, round(self.config.warmup_epochs * self.steps_per_epoch))

        def schedule(step: int) -> float:
            # linear warm-up, then cosine decay to 0 over the planned schedule
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
