"""The one runner of slide-encoder pre-training: Lightning, full-state checkpoints, exact resume,
RankMe, the encoder folder.

- Checkpoints: ``checkpoints/last.ckpt`` every ``checkpoint_every_n_steps`` optimiser steps
  and at the end, written atomically (temporary file + rename): model, optimiser, scheduler,
  loop counters, the data order's position (the loader's ``state_dict``) and the RNG states. A
  rerun of the same command (``resume=True``) continues from it; on CPU the losses after the
  checkpoint are those of an uninterrupted run (every random draw of a step is seeded by the
  step, the data order by the epoch).
- RankMe (Garrido et al. 2023: exp of the entropy of the normalised singular values of the
  embedding matrix) of a fixed probe set of bags, after each epoch. The encoder kept is the one
  with the highest RankMe among the epochs of the second half of the schedule (``select_from``;
  early epochs, still at the warm-up's learning rates, are not candidates): a label-free choice.
- Multi-process (``devices`` x ``num_nodes`` > 1): Lightning DDP with spawned workers (as
  ``oncoslide train``); each process takes every W-th batch of the epoch's order and the
  gradients are averaged. The first process writes the folder.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from rich.progress import Progress, TaskID

from oncoslide._io import atomic_path, write_table
from oncoslide._log import attach_sinks, get_logger, number, run_log, sinks
from oncoslide.errors import ConfigError
from oncoslide.features.schema import FeatureContract
from oncoslide.pretrain.bags import PretrainBags, ResumableLoader
from oncoslide.pretrain.base import PretrainMethod
from oncoslide.pretrain.folder import ENCODER_FILE, write_encoder_folder

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
BEST_ENCODER = "best-encoder.pt"
STEPS_FILE = "steps.csv"
HISTORY_FILE = "history.csv"
_log = get_logger("pretrain")


def rankme(embeddings: np.ndarray | torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of an (n, E) embedding matrix: exp(entropy of sigma / sum sigma)."""
    z = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"rankme needs a non-empty (n, E) matrix, got {tuple(z.shape)}")
    s = torch.linalg.svdvals(z)
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


@dataclass(frozen=True)
class PretrainResult:
    out_dir: Path
    history: list[dict[str, float]]
    chosen_epoch: int
    rankme: float
    steps: int
    seconds: float
    bags_per_second: float
    resumed_from_step: int


def run_pretraining(
    method: PretrainMethod,
    dataset: PretrainBags,
    out: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int = 4,
    checkpoint_every_n_steps: int = 50,
    devices: int = 1,
    num_nodes: int = 1,
    seed: int = 0,
    resume: bool = True,
    probe_size: int = 64,
    select_from: float = 0.5,
    grad_clip: float | None = 1.0,
    accelerator: str = "auto",
    progress: Progress | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> PretrainResult:
    """Pre-train ``method`` on ``dataset``; write the encoder folder ``out`` (module docstring).

    Give ``epochs`` or ``max_steps`` (optimiser steps; the last epoch may be partial).
    """
    if (epochs is None) == (max_steps is None):
        raise ConfigError("give exactly one of epochs and max_steps")
    if (epochs is not None and epochs < 1) or (max_steps is not None and max_steps < 1):
        raise ConfigError("epochs and max_steps must be >= 1")
    if checkpoint_every_n_steps < 1:
        raise ConfigError("checkpoint_every_n_steps must be >= 1")
    if devices < 1 or num_nodes < 1:
        raise ConfigError("devices and num_nodes must be >= 1")
    if not 0.0 <= select_from < 1.0:
        raise ConfigError("select_from must be in [0, 1)")
    out = Path(out)
    world = devices * num_nodes
    n_batches = -(-len(dataset) // batch_size)
    steps_per_epoch = -(-n_batches // world)
    total = epochs * steps_per_epoch if epochs is not None else int(max_steps or 0)
    n_epochs = epochs if epochs is not None else math.ceil(total / steps_per_epoch)
    method.total_steps = total
    method.seed = seed
    settings = {
        "method": method.name,
        "method_config": method.config(),
        "encoder_config": method.encoder.config(),
        "seed": seed,
        "batch_size": batch_size,
        "n_bags": len(dataset),
        "units": [u.unit_id for u in dataset.units[:5]],
        "epochs": epochs,
        "max_steps": max_steps,
        "world": world,
        "max_patches": dataset.max_patches,
    }
    method.run_settings = settings
    ckpt_dir = out / CHECKPOINT_DIR
    last = ckpt_dir / LAST
    resumed_from = 0
    if last.exists() and not resume:
        shutil.rmtree(ckpt_dir)
        for name in (STEPS_FILE, HISTORY_FILE, ENCODER_FILE):
            (out / name).unlink(missing_ok=True)
    if last.exists():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        theirs = saved.get("oncoslide_run", {})
        changed = sorted(k for k in settings if _jsonish(theirs.get(k)) != _jsonish(settings[k]))
        if changed:
            raise ConfigError(
                f"{out} holds a checkpoint of another run (different {', '.join(changed)}): "
                "give another --out, or --no-resume to start over"
            )
        resumed_from = int(saved.get("global_step", 0))
        _truncate_steps(out / STEPS_FILE, resumed_from)
        del saved
    else:
        (out / STEPS_FILE).unlink(missing_ok=True)

    pl.seed_everything(seed, workers=True, verbose=False)
    loader = ResumableLoader(dataset, batch_size, seed, total)
    probe = _probe_indices(len(dataset), probe_size, seed)
    contract = dataset.contract()
    recorder = _Recorder(
        out,
        loader,
        dataset,
        probe,
        every=checkpoint_every_n_steps,
        n_epochs=n_epochs,
        total=total,
        select_from=select_from,
        world=world,
        contract=contract,
        progress=progress if world == 1 else None,
    )
    gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    from oncoslide.training.cv import _SpawnedDDP
    from oncoslide.training.progress import quiet_lightning

    started = time.perf_counter()
    if resumed_from >= total and (out / ENCODER_FILE).exists():  # finished: nothing to do
        return _result(out, time.perf_counter() - started, resumed_from)
    import pandas as pd

    from oncoslide.cohort.exclusions import PRETRAIN_SLIDES_FILE

    out.mkdir(parents=True, exist_ok=True)
    # which slides the encoder saw: evaluations keep their patients out of test parts
    # (oncoslide.cohort.exclusions reads this file; embed-slides copies it to its manifest)
    write_table(
        out / PRETRAIN_SLIDES_FILE,
        pd.DataFrame(
            [(s, u.patient_id) for u in dataset.units for s in u.slide_ids],
            columns=["slide_id", "patient_id"],
        ).drop_duplicates(),
    )
    with run_log(out, f"pre-training {method.name}"), quiet_lightning():
        # label-free set-up from the bags (a tokenizer); deterministic, so a resumed run
        # fits what the checkpoint holds anyway
        method.prepare(dataset, seed)
        trainer = pl.Trainer(
            # the trainer sees the run as one epoch of `total` steps (ResumableBatches): a
            # resumed run restarts inside it; epochs (RankMe, history) are counted here
            max_epochs=1,
            max_steps=total,
            accelerator="gpu" if gpu else "cpu",
            devices=devices,
            num_nodes=num_nodes,
            # methods train parts the loss does not always reach (a last block's anchor
            # update, an output norm used only for embeddings): DDP must not wait for them
            strategy="auto"
            if world == 1
            else _SpawnedDDP(start_method="spawn", find_unused_parameters=True),
            deterministic=True if not gpu else "warn",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[recorder, *callbacks],
            gradient_clip_val=grad_clip,
            use_distributed_sampler=False,
            default_root_dir=out,
        )
        _log.info(
            "pre-training %s on %d bags: %s%d steps (%d per epoch), checkpoint every %d "
            "steps, %d process(es)%s",
            method.name,
            len(dataset),
            f"{epochs} epochs = " if epochs is not None else "",
            total,
            steps_per_epoch,
            checkpoint_every_n_steps,
            world,
            f", resuming at step {resumed_from}" if resumed_from else "",
            extra={"event": "pretrain_start", "steps": total, "resumed_from": resumed_from},
        )
        trainer.fit(method, loader, ckpt_path=last if last.exists() else None)
    return _result(out, time.perf_counter() - started, resumed_from)


def _result(out: Path, seconds: float, resumed_from: int) -> PretrainResult:
    import json

    info = json.loads((out / ENCODER_FILE).read_text())["info"]
    return PretrainResult(
        out_dir=out,
        history=list(info.get("history", [])),
        chosen_epoch=int(info["chosen_epoch"]),
        rankme=float(info["rankme"]),
        steps=int(info["steps"]),
        seconds=seconds,
        bags_per_second=float(info.get("bags_per_second", math.nan)),
        resumed_from_step=resumed_from,
    )


def _jsonish(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _probe_indices(n: int, size: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, 23])
    return sorted(int(i) for i in rng.permutation(n)[: max(2, min(size, n))])


def _truncate_steps(path: Path, step: int) -> None:
    """Keep the step rows up to the checkpoint's step (a killed run wrote some after it)."""
    if not path.exists():
        return
    rows = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                if int(row["step"]) <= step:
                    rows.append(row)
            except (KeyError, TypeError, ValueError):  # a line cut by the kill
                continue
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "epoch", "loss"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("step", "epoch", "loss")} for r in rows)


def read_steps(out: str | os.PathLike[str]) -> list[tuple[int, float]]:
    """(step, loss) rows of a run's ``steps.csv``."""
    with (Path(out) / STEPS_FILE).open(newline="") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]


class _Recorder(pl.Callback):
    """Per step: steps.csv, the loader's position, the progress bar, periodic checkpoints.
    Per epoch: RankMe of the probe bags, history.csv, best-encoder.pt, one log line. At the
    end: the encoder folder. Only the first process writes; its state (history, best) is saved
    in the checkpoints."""

    def __init__(
        self,
        out: Path,
        loader: ResumableLoader,
        dataset: PretrainBags,
        probe: list[int],
        *,
        every: int,
        n_epochs: int,
        total: int,
        select_from: float,
        world: int,
        contract: FeatureContract,
        progress: Progress | None,
    ) -> None:
        self.out = out
        self.loader = loader
        self.dataset = dataset
        self.probe = probe
        self.every = every
        self.n_epochs = n_epochs
        self.total = total
        self.select_from = select_from
        self.world = world
        self.contract = contract
        self.progress = progress
        self.task: TaskID | None = None
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self._sinks = sinks()
        self._pid = os.getpid()
        self._stack: contextlib.ExitStack | None = None
        self._epoch_start = 0.0
        self._epoch_bags = 0
        self._recent: list[tuple[float, int]] = []

    # -- state saved in checkpoints -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.best = dict(state_dict.get("best", {}))

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if os.getpid() != self._pid and trainer.is_global_zero and self._stack is None:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(attach_sinks(self._sinks))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progress is not None and self.task is None:
            self.task = self.progress.add_task(
                f"pretrain {getattr(pl_module, 'name', '')}",
                total=self.total,
                completed=int(trainer.global_step),
            )
        self._epoch_start = time.perf_counter()

    # -- per step -------------------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        method = pl_module
        assert isinstance(method, PretrainMethod)
        step = int(trainer.global_step)
        per = self.loader.batches.steps_per_epoch
        epoch = (step - 1) // per  # 0-based epoch of the step just done
        loss = method.step_losses[-1] if method.step_losses else math.nan
        self._epoch_bags += len(batch) * self.world
        self.loader.mark(step)
        now = time.perf_counter()
        self._recent = [*self._recent[-19:], (now, len(batch) * self.world)]
        if trainer.is_global_zero:
            path = self.out / STEPS_FILE
            new = not path.exists()
            with path.open("a", newline="") as fh:
                if new:
                    fh.write("step,epoch,loss\n")
                fh.write(f"{step},{epoch + 1},{loss!r}\n")
            if self.progress is not None and self.task is not None:
                rate = self._rate()
                self.progress.update(
                    self.task,
                    completed=step,
                    description=(
                        f"pretrain {method.name} epoch {epoch + 1}/{self.n_epochs}: "
                        f"loss {loss:.4f}, {rate:.1f} bags/s"
                    ),
                )
        if step % per == 0 or step == self.total:  # an epoch (or the run) is complete
            method.step_losses.clear()
            if trainer.is_global_zero:
                self._epoch_end(trainer, method, epoch)
            self._epoch_start = time.perf_counter()
            self._epoch_bags = 0
        # the run's last state is saved in on_train_end, after the folder
        if step % self.every == 0 and step < self.total:
            self._checkpoint(trainer)

    def _rate(self) -> float:
        if len(self._recent) < 2:
            return math.nan
        span = self._recent[-1][0] - self._recent[0][0]
        return sum(n for _, n in self._recent[1:]) / span if span > 0 else math.nan

    def _checkpoint(self, trainer: pl.Trainer) -> None:
        target = self.out / CHECKPOINT_DIR / LAST
        if trainer.is_global_zero:
            with atomic_path(target, suffix=".ckpt.tmp") as tmp:
                trainer.save_checkpoint(tmp)
        else:  # a collective call: only the first process writes
            trainer.save_checkpoint(target.with_suffix(".unused"))

    # -- per epoch ------------------------------------------------------------------------
    def _epoch_end(self, trainer: pl.Trainer, method: PretrainMethod, epoch: int) -> None:
        seconds = time.perf_counter() - self._epoch_start
        z = self._probe_embeddings(method)
        score = rankme(z)
        row = {
            "epoch": epoch + 1,
            "step": int(trainer.global_step),
            # from steps.csv: a resumed epoch's mean includes the steps before the kill
            "loss": self._epoch_loss(epoch + 1),
            "rankme": score,
            "seconds": seconds,
            "bags_per_s": self._epoch_bags / seconds if seconds > 0 else math.nan,
        }
        self.history = [h for h in self.history if h["epoch"] != epoch + 1] + [row]
        write_table(self.out / HISTORY_FILE, _frame(self.history))
        first = math.floor(self.select_from * self.n_epochs)  # 0-based first candidate epoch
        candidate = epoch >= first or epoch == self.n_epochs - 1
        if candidate and (not self.best or score > self.best["rankme"]):
            self.best = {"epoch": epoch + 1, "rankme": score}
            with atomic_path(self.out / CHECKPOINT_DIR / BEST_ENCODER, suffix=".pt.tmp") as tmp:
                torch.save(
                    {k: v.detach().cpu() for k, v in method.encoder.state_dict().items()}, tmp
                )
        _log.info(
            "pre-training %s epoch %d/%d: loss %s, RankMe %.2f, %.1f bags/s (%.1f s)",
            method.name,
            epoch + 1,
            self.n_epochs,
            number(row["loss"], 4),
            score,
            row["bags_per_s"],
            seconds,
            extra={"event": "pretrain_epoch", **row},
        )

    def _epoch_loss(self, epoch: int) -> float:
        path = self.out / STEPS_FILE
        if not path.exists():
            return math.nan
        with path.open(newline="") as fh:
            values = [float(r["loss"]) for r in csv.DictReader(fh) if r["epoch"] == str(epoch)]
        return float(np.mean(values)) if values else math.nan

    @torch.no_grad()
    def _probe_embeddings(self, method: PretrainMethod) -> np.ndarray:
        rows = []
        for i in self.probe:
            bag = self.dataset.load(i, subsample=True, epoch=0)
            coords = None if bag.coords is None else bag.coords.to(method.device)
            rows.append(method.encoder.embed(bag.features.to(method.device), coords).float().cpu())
        return torch.stack(rows).numpy()

    # -- the end --------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._write_folder(trainer, pl_module)
        # the final state, after the folder: a rerun of a finished run finds both
        self._checkpoint(trainer)

    def _write_folder(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        method = pl_module
        assert isinstance(method, PretrainMethod)
        best_file = self.out / CHECKPOINT_DIR / BEST_ENCODER
        state = (
            torch.load(best_file, map_location="cpu", weights_only=True)
            if best_file.exists()
            else None
        )
        # the exported encoder: the chosen epoch's weights, then its label-free readout fit
        encoder = copy.deepcopy(method.encoder)
        if state is not None:
            encoder.load_state_dict(state)
        method.fit_readout(encoder, self.dataset, int(method.seed))
        state = encoder.state_dict()
        done = [h for h in self.history if h.get("bags_per_s") is not None]
        rate = float(np.mean([h["bags_per_s"] for h in done])) if done else math.nan
        extra_files = method.folder_files()
        for name, tensors in extra_files.items():
            with atomic_path(self.out / name, suffix=".pt.tmp") as tmp:
                torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
        write_encoder_folder(
            self.out,
            encoder,
            state_dict=state,
            contract=self.contract,
            method={
                "name": method.name,
                "config": method.config(),
                **({"files": sorted(extra_files)} if extra_files else {}),
            },
            info={
                "chosen_epoch": int(self.best.get("epoch", len(self.history))),
                "rankme": float(self.best.get("rankme", math.nan)),
                "selection": f"highest RankMe of epochs >= {self.select_from:.2f} x epochs",
                "steps": int(trainer.global_step),
                "epochs_run": len(self.history),
                "history": self.history,
                "bags_per_second": rate,
                "probe_bags": len(self.probe),
                "processes": self.world,
                "seed": int(method.seed),
                "n_bags": len(self.dataset),
            },
        )
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=self.total)
        _log.info(
            "pre-training %s done: %d steps; encoder of epoch %d (RankMe %.2f) in %s",
            method.name,
            int(trainer.global_step),
            int(self.best.get("epoch", 0)),
            float(self.best.get("rankme", math.nan)),
            self.out,
            extra={"event": "pretrain_done"},
        )


def _frame(history: list[dict[str, float]]) -> Any:
    import pandas as pd

    return pd.DataFrame(history)


__all__ = [
    "PretrainResult",
    "rankme",
    "read_steps",
    "run_pretraining",
]
