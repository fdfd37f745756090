"""``oncoslide explain`` and ``oncoslide report``: prototypes of a trained run, and one page per
patient. Registered on the main app by :func:`register` (called at the end of cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

_RUN_HELP = "run folder written by `oncoslide train`"


def _cohort_of(run: Path, cohort: Path | None, features: Path | None, slides: Path | None,
               study_file: Path | None) -> tuple[Any, Any, Path | None]:  # fmt: skip
    """The run's settings and its cohort (with features), as ``heatmap`` finds them."""
    from oncoslide.cli import _load_cohort, _run_data, _study
    from oncoslide.report.attention import read_run

    config, _ = read_run(run)
    table, feats, slides = _run_data(run, cohort, features, slides, _study(study_file))
    c = _load_cohort(
        table,
        feats,
        time_col=config.time_col,
        event_col=config.event_col,
        label_cols=() if config.is_survival else (config.task,),
    )
    return config, c, slides


def explain(
    run: Path = typer.Argument(..., help=_RUN_HELP),
    prototypes: int = typer.Option(8, "--prototypes", "-k", min=2, help="k-means clusters"),
    seed: int = typer.Option(0, "--seed", help="which seed's splits and fold models"),
    max_fit_patches: int = typer.Option(
        50_000, "--max-fit-patches", min=2, help="training patches (at most) fitting each fold"
    ),
    representatives: int = typer.Option(
        6, "--representatives", min=0, help="example patches per prototype"
    ),
    rank_by: str = typer.Option(
        "outcome",
        "--rank-by",
        help="order P1, P2, ... by association with the outcome, or with the model's risk "
        "(outcome | model)",
    ),
    cohort: Path | None = typer.Option(
        None, "--cohort", "-c", help="the run's cohort table [default: the one it recorded]"
    ),
    features: Path | None = typer.Option(
        None, "--features", "-f", help="the run's feature folder [default: the one it recorded]"
    ),
    slides: Path | None = typer.Option(
        None, "--slides", help="folder of the slide files, for example patches"
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="[default: RUN/explain]"),
    study_file: Path | None = typer.Option(None, "--config", help="study file (oncoslide init)"),
) -> None:
    """Morphological prototypes of a run: attention share, risk association, example patches,
    and what moves each patient's score (all out-of-fold).

    k-means on patch features is fitted on each fold's training patients only; every patient
    is assigned and scored by the fold that held it out. Writes prototypes.csv, patients.csv,
    patches.parquet, representatives.csv, prototypes.png and explain.json.
    """
    from oncoslide.cli import console
    from oncoslide.report.prototypes import ExplainConfig, explain_run

    settings = ExplainConfig(
        n_prototypes=prototypes,
        seed=seed,
        max_fit_patches=max_fit_patches,
        n_representatives=representatives,
        rank_by=rank_by,  # type: ignore[arg-type]  # checked by ExplainConfig
    )
    _, c, slides_dir = _cohort_of(run, cohort, features, slides, study_file)
    result = explain_run(
        run,
        c,
        settings=settings,
        out_dir=out,
        slides_dir=slides_dir,
        on_fold=lambda done, total: console.print(f"fold {done}/{total} explained"),
    )
    _print_prototypes(result.prototypes)
    for note in result.notes:
        console.print(f"[dim]note:[/] {escape(note)}", highlight=False)
    console.print(f"[green]written[/] {escape(str(result.out_dir))}/", highlight=False)


def _print_prototypes(table: Any) -> None:
    from rich.table import Table

    from oncoslide.cli import console

    view = Table(title="prototypes (P1: strongest association with the outcome)")
    for col in ("prototype", "patch share", "attention share", "outcome log ratio (p)",
                "risk corr", "contribution"):  # fmt: skip
        view.add_column(col)
    for r in table.itertuples():
        view.add_row(
            escape(str(r.prototype)),
            f"{r.patch_share:.3f}",
            f"{r.attention_share:.3f}",
            f"{r.outcome_log_ratio:.3f} ({r.outcome_p:.2g})",
            f"{r.risk_corr:.3f}",
            f"{r.mean_contribution:+.3f}",
        )
    console.print(view)


def report(
    run: Path = typer.Argument(..., help=_RUN_HELP),
    patient: list[str] = typer.Option(..., "--patient", "-p", help="patient id (repeatable)"),
    seed: int = typer.Option(0, "--seed", help="which seed's out-of-fold prediction"),
    n_boot: int = typer.Option(200, "--n-boot", min=20, help="patch-bootstrap resamples"),
    prototypes: int = typer.Option(
        8, "--prototypes", "-k", min=2, help="k of `explain` when it has not run yet"
    ),
    cohort: Path | None = typer.Option(
        None, "--cohort", "-c", help="the run's cohort table [default: the one it recorded]"
    ),
    features: Path | None = typer.Option(
        None, "--features", "-f", help="the run's feature folder [default: the one it recorded]"
    ),
    slides: Path | None = typer.Option(None, "--slides", help="folder of the slide files"),
    out: Path | None = typer.Option(None, "--out", "-o", help="[default: RUN/reports]"),
    study_file: Path | None = typer.Option(None, "--config", help="study file (oncoslide init)"),
) -> None:
    """One self-contained HTML page per patient of a survival run: the out-of-fold prediction
    with a patch-bootstrap interval, the patient's Kaplan-Meier risk group, the attention
    heatmap, the tissue prototypes that moved the score, and a plain-language summary made
    from those numbers by fixed templates. Not a diagnosis.

    Runs `oncoslide explain` first (with --prototypes) when RUN/explain does not exist.
    """
    from oncoslide.cli import console
    from oncoslide.report.patient import ReportConfig, patient_report
    from oncoslide.report.prototypes import EXPLAIN_DIR, ExplainConfig, explain_run

    settings = ReportConfig(seed=seed, n_boot=n_boot)
    _, c, slides_dir = _cohort_of(run, cohort, features, slides, study_file)
    if not (run / EXPLAIN_DIR / "explain.json").exists():
        console.print(f"{escape(str(run / EXPLAIN_DIR))} is missing: running explain first")
        explain_run(
            run,
            c,
            settings=ExplainConfig(n_prototypes=prototypes, seed=seed),
            slides_dir=slides_dir,
        )
    for pid in patient:
        result = patient_report(
            run,
            c,
            pid,
            settings=settings,
            out_dir=None if out is None else out / pid,
            slides_dir=slides_dir,
        )
        console.print(f"[green]{escape(pid)}[/]: {escape(str(result.html))}", highlight=False)
        for note in result.notes:
            console.print(f"[dim]note:[/] {escape(note)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``explain`` and ``report`` to the command line."""
    from oncoslide.cli import _friendly

    app.command("explain")(_friendly(explain))
    app.command("report")(_friendly(report))
