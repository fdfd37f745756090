"""Slow: test-time adaptation on the simulator's ``site-shift`` preset (unchanged), through
``benchmarks/bench_tta.py`` (simulator seed 0, 3 folds, 10 epochs: a few minutes on 2 cores).

The metric is the balanced accuracy of MSI on the unseen (shifted) site, the labels of which
adaptation never reads (tests/training/test_adapt.py checks that). Measured here (2026-12-01,
the defaults of then, entropy steps with decision matching): 0.505 unadapted -> 0.624 adapted, in-distribution 0.732:
53 % of the loss recovered; the entropy steps alone (``im``) reach 0.663 on this seed, so
decision matching costs 0.04 here (it gains on the confirmation seeds on average); 247 s for
the module on 2 cores under load. The issue's bar holds on this seed but not in general: on the
confirmation seeds 3-9 of the full benchmark (5 folds, 20 epochs) the defaults recover 41 % of
the mean loss; see docs/training.md#adapting-to-a-new-site.

Per-tissue alignment alone (``--adapt-align tissues --adapt-steps 0 --adapt-match none``,
``tissues_only``): the site's tissue clusters paired with training's by label-free signatures
and shifted onto them; here 0.505 -> 0.719 (94 %; 100 % on the full benchmark's seed 0, a
development seed; 229 s for the module with this variant, 2 cores under load). Since
2026-12-01 it is the default, so ``adapted`` is this variant too; the entropy steps with
decision matching (the previous default) are ``im_match`` in the bench.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_tta.py"


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    work = tmp_path_factory.mktemp("bench-tta")
    args = ["--seeds", "0", "--folds", "3", "--epochs", "10", "--work", str(work)]
    args += ["--variants", "tent", "im", "adapted", "tissues_only"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=3600,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    print(proc.stdout)
    return pd.read_csv(work / "bench_tta.csv").set_index("metric")


def test_the_planted_shift_costs_balanced_accuracy(measured: pd.DataFrame) -> None:
    ba = measured.loc["balanced_accuracy"]
    # the same patients with the transform undone (from the truth files) score higher
    assert ba["undone"] > ba["unadapted"] + 0.05
    assert ba["in_distribution"] > ba["unadapted"] + 0.05


def test_adaptation_improves_balanced_accuracy_and_entropy_alone_collapses(
    measured: pd.DataFrame,
) -> None:
    ba = measured.loc["balanced_accuracy"]
    assert ba["adapted"] > ba["unadapted"] + 0.02
    # plain Tent (no diversity term) puts every bag of the site in one class: why the default
    # has the diversity term
    assert ba["tent"] == pytest.approx(0.5, abs=0.02)


def test_adaptation_recovers_half_of_the_balanced_accuracy_lost_on_the_unseen_site(
    measured: pd.DataFrame,
) -> None:
    ba = measured.loc["balanced_accuracy"]
    lost = ba["in_distribution"] - ba["unadapted"]
    assert ba["adapted"] - ba["unadapted"] >= 0.5 * lost


def test_per_tissue_alignment_recovers_half_of_the_balanced_accuracy_lost(
    measured: pd.DataFrame,
) -> None:
    ba = measured.loc["balanced_accuracy"]
    lost = ba["in_distribution"] - ba["unadapted"]
    assert ba["tissues_only"] - ba["unadapted"] >= 0.5 * lost
    # and the ranking: the AUC rises too
    auc = measured.loc["auc"]
    assert auc["tissues_only"] > auc["unadapted"] + 0.03
