"""``oncoslide transfer report``: the transfer report page (issue 13). Registered on cli.py's
``transfer`` group by :func:`register` (called at the end of cli.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape


def transfer_report_cmd(
    matrix: Path = typer.Argument(..., help="transfer matrix folder (oncoslide transfer matrix)"),
    bench: list[Path] | None = typer.Option(
        None,
        "--bench",
        help="benchmark folder with one survival task per target cancer (the cancer-specific "
        "model and transfer methods as entries); repeat for several (e.g. rare targets under "
        "5 x 5 CV, the others under 5 x 1), each task in one only",
    ),
    world: Path | None = typer.Option(
        None, "--world", help="simulated world folder (or its truth.json): the planted truth"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    baseline: str = typer.Option(
        "abmil", "--baseline", help="the benchmark entry's model of the cancer-specific model"
    ),
    rare_max: int = typer.Option(60, "--rare-max", min=1, help="rare: at most this many patients"),
    n_boot: int = typer.Option(1000, "--n-boot", min=100, help="paired bootstrap replicates"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap draws"),
) -> None:
    """One page: the matrix, the planted similarity, gains over the cancer-specific model, routing."""
    from oncoslide.cli import console
    from oncoslide.transfer.report import transfer_report

    report = transfer_report(
        matrix, out, bench=bench or None, world=world, baseline=baseline, rare_max=rare_max,
        n_boot=n_boot, seed=seed,
    )  # fmt: skip
    console.print(escape(report.summary_text()), highlight=False)
    console.print(f"[green]written[/] {escape(str(report.html_path))}", highlight=False)


def register(transfer_app: typer.Typer) -> None:
    """Add ``report`` to the ``transfer`` group."""
    from oncoslide.cli import _friendly

    transfer_app.command("report")(_friendly(transfer_report_cmd))
