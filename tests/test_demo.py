"""`oncoslide demo --quick` runs end to end (slow: about two minutes)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from oncoslide.cli import app


@pytest.mark.slow
def test_quick_demo_runs_and_reports_every_job(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 0, result.output
    results = pd.read_csv(tmp_path / "results.csv")
    assert {"abmil", "mean-pool", "abmil (permuted outcomes)"} <= set(results["model"])
    assert (tmp_path / "real-slide" / "cmu_small_region.h5").is_file()
    assert "demo finished" in result.output
