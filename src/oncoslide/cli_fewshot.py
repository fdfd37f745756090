"""``oncoslide fewshot``: few-shot linear probes of named feature sets on one cohort.

Registered in :mod:`oncoslide.cli`; the work is :func:`oncoslide.evaluation.fewshot_sets.few_shot_sets`.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from oncoslide.cli import console
from oncoslide.errors import ConfigError


def _shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"--k {text!r}: expected comma-separated integers, e.g. 1,4,16,64"
        ) from None
    if not shots:
        raise ConfigError("--k names no k")
    return shots


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fewshot_cmd(
    cohort: Path = typer.Option(..., "--cohort", "-c", help="cohort table (one row per slide)"),
    task: str = typer.Option(..., "--task", "-t", help="survival, or a label column"),
    sets: list[str] = typer.Option(
        ...,
        "--set",
        help="NAME=PATH, repeated: slide embeddings (embed-slides folder or table) or a patch "
        "feature folder (mean-pooled); force the level with NAME=slide:PATH or NAME=patch:PATH",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="folder for draws, summary, curves"),
    k: str = typer.Option("1,4,16,64", "--k", help="labelled patients per class (comma list)"),
    draws: int = typer.Option(10, "--draws", help="repeated draws per fold and k"),
    folds: int = typer.Option(5, "--folds", help="patient-level folds (the same for every set)"),
    seed: int = typer.Option(0, "--seed", help="splits and draws"),
    reference: str | None = typer.Option(
        None, "--reference", help="the set the others are compared with [default: the first]"
    ),
    time_col: str = typer.Option("time", "--time-col", help="survival time column"),
    event_col: str = typer.Option("event", "--event-col", help="survival event column"),
    exclude: list[Path] = typer.Option(
        [],
        "--exclude",
        help="patients to keep out of every test part (seen in an encoder's pre-training): a "
        "table with a patient_id or slide_id column, an encoder folder or a slide-embedding "
        "folder; repeatable. Slide-embedding sets exclude their encoder's own by themselves",
    ),
) -> None:
    """Few-shot linear probes (k labelled patients per class, drawn from each fold's training
    part) of each feature set on the same splits and draws, with paired comparisons."""
    from oncoslide.evaluation.fewshot import FewShotConfig
    from oncoslide.evaluation.fewshot_sets import (
        few_shot_sets,
        parse_feature_set,
        write_few_shot_run,
    )

    sources = [parse_feature_set(s) for s in sets]
    config = FewShotConfig(shots=_shots(k), draws=draws, seed=seed)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    with console.status("few-shot probes") as status:
        run = few_shot_sets(
            cohort,
            task,
            sources,
            config=config,
            folds=folds,
            reference=reference,
            time_col=time_col,
            event_col=event_col,
            exclude_from=exclude,
            on_step=lambda text: status.update(escape(text)),
        )
    paths = write_few_shot_run(run, out, sources=sources, config=config, task=task)
    for src in sources:
        what = (
            "slide embeddings (mean per patient)"
            if src.level == "slide"
            else "patch features (mean-pooled)"
        )
        console.print(f"{escape(src.name)}: {what} from {escape(str(src.path))}", highlight=False)
    if run.excluded:
        console.print(
            f"{len(run.excluded)} patient(s) seen in pre-training are kept out of the test parts",
            highlight=False,
        )
    table = Table(
        title=f"{escape(task)}: mean {run.metric} over {folds} folds x {draws} draws "
        f"({run.n_patients} patients)",
        title_justify="left",
    )
    table.add_column("k", justify="right")
    names = [s.name for s in sources]
    for name in names:
        table.add_column(escape(name), justify="right")
    others = [n for n in names if n != run.reference]
    for name in others:
        table.add_column(f"{escape(name)} - {escape(run.reference)}", justify="right")
    summary = run.summary[run.summary["metric"] == run.metric]
    for shots in sorted(summary["k"].unique()):
        cells = [str(shots)]
        for name in names:
            hit = summary[(summary["embedding"] == name) & (summary["k"] == shots)]
            cells.append(
                "-"
                if hit.empty
                else f"{hit['mean'].iloc[0]:.3f} ({hit['lo'].iloc[0]:.2f}-{hit['hi'].iloc[0]:.2f})"
            )
        for name in others:
            cmp = run.comparison
            hit = cmp[(cmp["a"] == name) & (cmp["metric"] == run.metric) & (cmp["k"] == shots)]
            cells.append(
                "-"
                if hit.empty
                else f"{hit['diff'].iloc[0]:+.3f} (p {_fmt_p(float(hit['p_wilcoxon'].iloc[0]))})"
            )
        table.add_row(*cells)
    console.print(table)
    console.print(
        "draw intervals: central 95 % of the draws; p: Wilcoxon signed-rank over paired draws",
        highlight=False,
    )
    for what, path in paths.items():
        console.print(f"{what}: {escape(str(path))}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``fewshot`` to the command line."""
    from oncoslide.cli import _friendly

    app.command("fewshot")(_friendly(fewshot_cmd))


__all__ = ["fewshot_cmd", "register"]
