"""`oncoslide demo --quick` runs end to end (slow: a few minutes), and its benchmark is the example."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.demo import DEMO_BENCH_YAML

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bench-demo.yaml"


def test_the_demo_benchmark_is_the_shipped_example() -> None:
    assert EXAMPLE.read_text() == DEMO_BENCH_YAML


@pytest.mark.slow
def test_quick_demo_runs_and_reports_every_entry(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 0, result.output
    results = pd.read_csv(tmp_path / "results.csv")
    entries = set(zip(results["feature_set"], results["model"], strict=True))
    assert entries == {(f, m) for f in ("sim", "shuffled") for m in ("abmil", "meanpool", "linear")}
    assert set(results["task"]) == {"os", "msi"}
    assert (tmp_path / "bench" / "index.html").is_file()
    assert (tmp_path / "real-slide" / "cmu_small_region.h5").is_file()
    assert "demo finished" in result.output
    # not a terminal here: a plain line per benchmark cell, as under a batch scheduler
    assert "[60/60]" in result.output
    assert result.output.count("os · sim · abmil · seed 0 fold") == 5
