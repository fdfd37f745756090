"""What ``oncoslide predict --adapt`` prints: per site, how far it sat from training and what
adapting did, then the metrics before and after when the cohort has targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape

from oncoslide.training.adapt import ADAPTATION_FILE, ADAPTATION_TABLE


def _num(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3f}"


def print_adaptation(console: Console, out: Path) -> None:
    doc = json.loads((out / ADAPTATION_FILE).read_text())
    console.print(
        f"[bold]adapted[/] to {len(doc['sites'])} site(s) without their labels "
        f"({escape(doc['objective_note'])}) -> {escape(str(out / ADAPTATION_FILE))}"
    )
    for site in doc["sites"]:
        steps = site["objective"]
        change = f", objective {steps[0]:.3f} -> {steps[-1]:.3f}" if steps else ""
        console.print(
            f"  {escape(site['site'])}: {site['patients']} patients, offset "
            f"{site['shift']['mean_abs_offset_sd']:.2f} sd, |log sd ratio| "
            f"{site['shift']['mean_abs_log_sd_ratio']:.2f}{change}"
        )
        decisions = site.get("decisions") or {}
        if decisions:
            shares = ", ".join(f"{r:.2f}" for r in decisions["site_rates"])
            target = ", ".join(f"{r:.2f}" for r in decisions["training_rates"])
            console.print(f"    predicted shares per class {shares} (training part: {target})")
    table = out / ADAPTATION_TABLE
    if not table.exists():
        return
    rows = pd.read_csv(table, dtype={"site": str})
    console.print(f"  before -> after adapting ({escape(str(table))}):")
    for r in rows.itertuples():
        console.print(
            f"    {escape(str(r.site))} {escape(str(r.metric))}: {_num(float(r.before))} -> "
            f"{_num(float(r.after))} ({r.patients} patients)"
        )
