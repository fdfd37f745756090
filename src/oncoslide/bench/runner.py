"""``oncoslide bench run``: resolve a benchmark, audit its splits, run the cells it lacks.

The driver resolves the spec against the data (every problem reported before any training),
audits every split, writes the split tables and the task descriptions, then runs the missing
cells on an executor:

- ``local`` (default): a pool of worker processes (``workers``; 0 runs in this process). Each
  worker keeps its own feature cache and slide embeddings, so a feature file is read once per
  worker, not once per cell.
- ``ray``: every cell is a Ray task on the cluster at ``address`` (a local instance if none).

Results come back to the driver, which records each finished cell in the results store in one
transaction. A killed run therefore leaves only whole cells behind, and running it again runs
exactly the cells that are missing. A cell that fails (bad data, a crash in a worker) is
reported in ``failures.csv`` and the other cells go on.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from rich.console import Console
from rich.markup import escape

from oncoslide._io import write_json, write_table
from oncoslide._log import get_logger, number, run_log
from oncoslide._ray import TaskFailed, map_unordered
from oncoslide._threads import describe_threads, resolve_num_threads, usable_cores
from oncoslide.bench.locks import CellLocks
from oncoslide.bench.protocols import Cell, CellRunner, applies, plan_cells
from oncoslide.bench.resolve import ResolvedBench, audit_bench_splits, resolve_bench
from oncoslide.bench.spec import BenchSpec
from oncoslide.bench.store import CellRecord, ResultStore
from oncoslide.errors import ConfigError, OncoslideError
from oncoslide.training.progress import make_progress, quiet_lightning

Executor = Literal["local", "ray"]

_LOG = get_logger("bench")


@dataclass
class BenchRun:
    """What a ``bench run`` did."""

    out_dir: Path
    n_cells: int
    n_already_done: int
    n_ran: int
    failures: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_elsewhere: int = 0  # cells another run on the same folder computed meanwhile


def default_workers(gpus: Sequence[int] = ()) -> int:
    """Worker processes for the local executor: one per GPU, else one per 4 usable cores (each
    trains multi-threaded)."""
    if gpus:
        return len(gpus)
    return max(1, usable_cores() // 4)


def visible_gpus() -> list[int]:
    """The CUDA devices this process sees (empty without CUDA)."""
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except Exception:  # a broken CUDA setup is the same as none for scheduling
        return []


def run_benchmark(
    spec: BenchSpec,
    out_dir: str | os.PathLike[str],
    *,
    executor: Executor = "local",
    workers: int | None = None,
    address: str | None = None,
    cache_gb: float = 4.0,
    gpus: Sequence[int] | None = None,
    gpus_per_cell: float = 0.0,
    num_threads: int | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> BenchRun:
    """Run (or resume) a benchmark into ``out_dir``; returns counts and failures.

    GPUs: the local executor pins worker k to ``gpus[k % len(gpus)]`` (default: every visible
    CUDA device; ``[]`` for none) and by default runs one worker per GPU. The Ray executor
    reserves ``gpus_per_cell`` GPUs for every cell (e.g. 1, or 0.5 to share a GPU between two
    cells); with 0, Ray hides the GPUs and cells train on CPU.

    Threads: ``num_threads`` torch threads per worker process; by default the cores this
    process may use divided among the local workers (workers x threads <= cores; see
    :mod:`oncoslide._threads`). The Ray executor reserves ``num_threads`` CPUs per cell (by
    default one, and Ray gives each task as many threads as CPUs it reserved).
    """
    out = Path(out_dir)
    console = console or Console(quiet=not progress)
    bar = make_progress(console, enabled=progress)
    with bar:
        checking = bar.add_task("checking feature files", total=None)

        def step(name: str, done: int, total: int) -> None:
            bar.update(checking, description=f"checking {name}", completed=done, total=total)

        bench = resolve_bench(spec, progress=step)
        bar.remove_task(checking)
    audit_bench_splits(bench)
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, bench)
    cells = plan_cells(bench)
    # run.log: every invocation appends its cells' lines, terminal or not
    with (
        run_log(out, f"benchmark {spec.name}"),
        ResultStore.in_dir(out) as store,
        CellLocks(out) as locks,
    ):
        store.set_meta("spec", spec.model_dump(mode="json"))
        store.set_meta("tasks", task_descriptions(bench))
        store.set_meta("plan", [c.key for c in cells])
        stored = store.data_keys()
        # a stored cell computed on other data (edited targets, feature files replaced in
        # place) is stale: it is deleted and runs again (unless another run has it)
        stale = [
            c
            for c in cells
            if stored.get(c.key) is not None
            and stored[c.key] != c.data_key
            and locks.try_claim(c.key)
        ]
        if stale:
            store.delete_cells(c.key for c in stale)
            for c in stale:
                del stored[c.key]
        missing = [c for c in cells if c.key not in stored]
        # another `bench run` on this folder computes the cells it has claimed
        mine = [c for c in missing if locks.try_claim(c.key)]
        claimed = {c.key for c in mine}
        elsewhere = [c for c in missing if c.key not in claimed]
        _prune_scratch(out / "work", locks)
        finished = store.done_keys()  # cells another run recorded while this one started
        for c in mine:
            if c.key in finished:
                locks.release(c.key)
        mine = [c for c in mine if c.key not in finished]
        run = BenchRun(out, len(cells), len(cells) - len(missing), 0, notes=list(bench.notes))
        run.n_already_done += len(missing) - len(mine) - len(elsewhere)
        if stale:
            run.notes.append(
                f"{len(stale)} stored cell(s) were computed on other data (targets or feature "
                f"files changed since, e.g. {stale[0].label}) and run again"
            )
        for fs in bench.feature_sets.values():
            if fs.exclude_note:
                run.notes.append(fs.exclude_note)
            skipped = [m.name for m in spec.models if not applies(m, fs)]
            if skipped:
                run.notes.append(
                    f"{fs.name}: slide embeddings; mil model(s) {skipped} need patch features "
                    "and do not run on it"
                )
        _LOG.info(
            "benchmark %s: %d cells, %d already done, %d to run%s -> %s",
            spec.name, run.n_cells, run.n_already_done, len(mine),
            f", {len(elsewhere)} computed by another run" if elsewhere else "", out,
            extra={"event": "start", "cells": run.n_cells, "done": run.n_already_done},
        )  # fmt: skip
        if not mine and not elsewhere:
            return run
        gpu_ids = visible_gpus() if gpus is None else [int(g) for g in gpus]
        workers = default_workers(gpu_ids) if workers is None else workers
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, got {workers}")
        if gpus_per_cell < 0:
            raise ConfigError(f"gpus_per_cell must be >= 0, got {gpus_per_cell}")
        threads: int | None = num_threads
        if executor == "local":
            threads = resolve_num_threads(num_threads, workers=max(1, workers))
            _LOG.info(
                describe_threads(threads, max(1, workers)),
                extra={"event": "threads", "threads": threads, "workers": workers},
            )
        elif num_threads is not None:
            resolve_num_threads(num_threads)  # refuses a bad value before Ray starts
        placement = _Placement(tuple(gpu_ids), float(gpus_per_cell), threads)

        def compute(todo: list[Cell]) -> None:
            if not todo:
                return
            results = _execute(bench, todo, out, executor, workers, address, cache_gb, placement)
            bar = make_progress(console, enabled=progress)
            with bar:
                overall = bar.add_task(f"{spec.name}: {len(todo)} cells", total=len(todo))
                for index, (cell, outcome) in enumerate(results, 1):
                    if isinstance(outcome, CellRecord):
                        outcome.info["data_key"] = cell.data_key
                        if store.record_cell(outcome):
                            run.n_ran += 1
                    else:
                        run.failures.append({"cell": cell.label, "key": cell.key, "error": outcome})
                        console.print(
                            f"[red]failed[/red] {escape(cell.label)}: "
                            f"{escape(outcome.splitlines()[0])}",
                            highlight=False,
                        )
                    # once the store holds the cell: the line never names a cell a kill loses
                    _log_cell(bench, cell, outcome, index, len(todo))
                    locks.release(cell.key)
                    bar.update(overall, advance=1, description=escape(cell.label))

        compute(mine)
        if elsewhere:
            # wait for the other run's cells; compute the ones it did not finish (killed)
            console.print(f"waiting for {len(elsewhere)} cell(s) another run is computing")
            _LOG.info(
                "waiting for %d cell(s) another run is computing",
                len(elsewhere),
                extra={"event": "waiting"},
            )
            for c in elsewhere:
                locks.wait_claim(c.key)
            finished = store.done_keys()
            left = [c for c in elsewhere if c.key not in finished]
            for c in elsewhere:
                if c.key in finished:
                    locks.release(c.key)
            run.n_elsewhere = len(elsewhere) - len(left)
            if run.n_elsewhere:
                run.notes.append(
                    f"{run.n_elsewhere} cell(s) were computed by another run on this folder"
                )
            compute(left)
        _LOG.info(
            "finished: %d cell(s) run, %d failed, %d already done",
            run.n_ran, len(run.failures), run.n_already_done + run.n_elsewhere,
            extra={"event": "finished", "ran": run.n_ran, "failed": len(run.failures)},
        )  # fmt: skip
    failures_path = out / "failures.csv"
    if run.failures:
        write_table(failures_path, pd.DataFrame(run.failures))
    elif failures_path.exists():
        failures_path.unlink()
    return run


def _log_cell(
    bench: ResolvedBench, cell: Cell, outcome: CellRecord | str, index: int, total: int
) -> None:
    """One line per finished cell: its score on the task's main metric, or why it failed."""
    fields: dict[str, Any] = {
        "event": "cell", "cell_key": cell.key, "cell": cell.label, "index": index, "total": total,
    }  # fmt: skip
    if isinstance(outcome, str):
        reason = outcome.splitlines()[0] if outcome else ""
        _LOG.warning(
            "[%d/%d] %s: failed: %s", index, total, cell.label, reason,
            extra={**fields, "status": "failed", "error": reason},
        )  # fmt: skip
        return
    task = bench.tasks.get(cell.task)
    metric = "c_index" if task is None or task.kind == "survival" else "auc"
    score = outcome.metrics.get(metric)
    _LOG.info(
        "[%d/%d] %s: %s %s (%.1f s)", index, total, cell.label, metric, number(score),
        outcome.seconds,
        extra={**fields, "status": "done", "metric": metric, "score": score,
               "seconds": outcome.seconds},
    )  # fmt: skip


def _prune_scratch(work: Path, locks: CellLocks) -> None:
    """Remove scratch folders that killed cells left behind (never one a running cell uses).

    A cell trains in ``work/cell-<key>/``; its owner holds the cell's lock, so a folder whose
    lock can be taken belongs to no running cell.
    """
    if not work.is_dir():
        return
    for folder in work.iterdir():
        name = folder.name
        if not (folder.is_dir() and name.startswith("cell-")):
            continue
        key = name[len("cell-") :]
        if len(key) == 20 and all(ch in "0123456789abcdef" for ch in key):
            held = locks.holds(key)
            if not held and not locks.try_claim(key):
                continue  # another run's cell is training there
            shutil.rmtree(folder, ignore_errors=True)
            if not held:
                locks.release(key)
        else:  # the random names of earlier versions: no owner can be known, none is current
            shutil.rmtree(folder, ignore_errors=True)


def task_descriptions(bench: ResolvedBench) -> list[dict[str, Any]]:
    """What the leaderboard says about each task (kind, classes, patients, split, exclusions)."""
    return [
        {
            "task": t.name,
            "kind": t.kind,
            "classes": list(t.classes),
            "metric": "c_index" if t.kind == "survival" else "auc",
            "n_patients": len(t.patients),
            "n_events": t.n_events,
            "split": t.describe_split(),
            "excluded": bench.exclusion_report(t),
        }
        for t in bench.tasks.values()
    ]


def _write_plan(out: Path, bench: ResolvedBench) -> None:
    for task in bench.tasks.values():
        write_table(out / "splits" / f"{task.name}.csv", task.splits)
    write_json(
        out / "bench.json",
        {"spec": bench.spec.model_dump(mode="json"), "tasks": task_descriptions(bench)},
    )


# ------------------------------------------------------------------------------ executors

Outcome = tuple[Cell, "CellRecord | str"]


@dataclass(frozen=True)
class _Placement:
    """Where cells run: local workers' GPUs, each Ray cell's GPU share, and torch threads per
    process (None: each process resolves its own, e.g. from Ray's OMP_NUM_THREADS)."""

    gpus: tuple[int, ...] = ()
    gpus_per_cell: float = 0.0
    num_threads: int | None = None


def _execute(
    bench: ResolvedBench,
    cells: list[Cell],
    out: Path,
    executor: Executor,
    workers: int,
    address: str | None,
    cache_gb: float,
    placement: _Placement,
) -> Iterator[Outcome]:
    work = out / "work"
    if executor == "ray":
        return _run_ray(
            bench, cells, work, address, cache_gb, placement.gpus_per_cell, placement.num_threads
        )
    if executor != "local":
        raise ConfigError(f"unknown executor {executor!r}: use 'local' or 'ray'")
    if workers == 0:
        return _run_inline(bench, cells, work, cache_gb, placement.num_threads)
    return _run_pool(bench, cells, work, workers, cache_gb, placement.gpus, placement.num_threads)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OncoslideError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_tb(exc.__traceback__))}"


def _run_inline(
    bench: ResolvedBench, cells: list[Cell], work: Path, cache_gb: float, threads: int | None
) -> Iterator[Outcome]:
    runner = CellRunner(bench, work_dir=work, cache_gb=cache_gb, num_threads=threads)
    try:
        with quiet_lightning():
            for cell in cells:
                try:
                    yield cell, runner.run(cell)
                except Exception as exc:  # one bad cell must not stop the benchmark
                    yield cell, _describe(exc)
    finally:
        runner.close()


# One runner per worker process, built once from the benchmark sent at start-up.
_WORKER: CellRunner | None = None


def _die_with_parent() -> None:
    """Linux: a worker is killed when the driver dies (a killed run leaves no orphans)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        # SIGKILL: Lightning handles SIGTERM itself (and would finish the fold); the driver
        # records results, so a worker has nothing to save
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # other systems: the worker exits when it next reads from the closed pool


def _init_worker(
    bench: ResolvedBench,
    work: Path,
    cache_gb: float,
    threads: int | None,
    gpus: tuple[int, ...],
    started: Any,
) -> None:
    global _WORKER
    _die_with_parent()
    with started.get_lock():  # the k-th worker to start takes GPU k (round robin)
        k = started.value
        started.value += 1
    if gpus:
        # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[k % len(gpus)])
    _WORKER = CellRunner(bench, work_dir=work, cache_gb=cache_gb, num_threads=threads)


def _worker_run(cell: Cell) -> CellRecord | str:
    assert _WORKER is not None
    try:
        with quiet_lightning():
            return _WORKER.run(cell)
    except Exception as exc:
        return _describe(exc)


def _run_pool(
    bench: ResolvedBench,
    cells: list[Cell],
    work: Path,
    workers: int,
    cache_gb: float,
    gpus: tuple[int, ...],
    threads: int | None,
) -> Iterator[Outcome]:
    ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch threads
    started = ctx.Value("i", 0)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(bench, work, cache_gb / workers, threads, gpus, started),
    ) as pool:
        # a bounded window keeps results flowing into the store as cells finish
        pending: dict[Future[CellRecord | str], Cell] = {}
        queue = list(cells)
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                cell = queue.pop(0)
                pending[pool.submit(_worker_run, cell)] = cell
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                cell = pending.pop(fut)
                try:
                    yield cell, fut.result()
                except Exception as exc:  # the worker died (e.g. out of memory)
                    yield cell, _describe(exc)


def _ray_cell(
    cell: Cell, bench: ResolvedBench, work: str, cache_gb: float, threads: int | None
) -> CellRecord | str:
    global _WORKER
    if _WORKER is None or _WORKER.bench.spec != bench.spec:
        _WORKER = CellRunner(bench, work_dir=work, cache_gb=cache_gb, num_threads=threads)
    return _worker_run(cell)


def _run_ray(
    bench: ResolvedBench,
    cells: list[Cell],
    work: Path,
    address: str | None,
    cache_gb: float,
    gpus_per_cell: float,
    threads: int | None,
) -> Iterator[Outcome]:
    tasks = map_unordered(
        _ray_cell, cells, bench, str(work), cache_gb, threads,
        address=address, num_cpus=float(threads or 1), num_gpus=gpus_per_cell,
    )  # fmt: skip
    for cell, outcome in tasks:
        yield cell, outcome.message if isinstance(outcome, TaskFailed) else outcome


__all__ = ["BenchRun", "default_workers", "run_benchmark", "task_descriptions"]
