"""Every simulator preset at its default size, run from the command line as a user would.

Each preset is simulated by ``oncoslide simulate OUT --preset NAME`` in a fresh process (import
time included); the script prints the wall time, the share of the one-minute budget, the ratio
to the ``demo`` preset timed in the same run, peak memory of the child process, patches written
and disk use. Presets must each stay under a minute on 2 CPU cores.

    python benchmarks/bench_simulate.py             # about a minute on 2 CPU cores
    python benchmarks/bench_simulate.py --presets spatial pan-cancer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oncoslide.simulate import list_presets

BUDGET_S = 60.0


def run(preset: str, out: Path) -> tuple[float, float, dict]:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "oncoslide.cli", "simulate", str(out), "--preset", preset]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{preset} failed: {child.stderr.read().decode() if child.stderr else ''}")
    peak_mb = usage.ru_maxrss / 1024
    summary = json.loads((out / "truth.json").read_text())["summary"]
    summary["disk_mb"] = round(
        sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1
    )
    return seconds, peak_mb, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=list_presets())
    args = parser.parse_args()
    presets = ["demo", *[p for p in args.presets if p != "demo"]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            out = Path(tmp) / preset
            seconds, peak_mb, summary = run(preset, out)
            rows.append((preset, seconds, peak_mb, summary))
            shutil.rmtree(out)
    base = rows[0][1]
    print(
        f"{'preset':<14} {'seconds':>8} {'of 60 s':>8} {'x demo':>7} {'peak MB':>8} {'patches':>9} {'disk MB':>8}"
    )
    for preset, seconds, peak_mb, summary in rows:
        print(
            f"{preset:<14} {seconds:8.1f} {seconds / BUDGET_S:8.2f} {seconds / base:7.2f} "
            f"{peak_mb:8.0f} {summary['n_patches']:9d} {summary['disk_mb']:8.1f}"
        )
    slow = [p for p, s, _, _ in rows if s > BUDGET_S]
    if slow:
        print(f"over the one-minute budget: {', '.join(slow)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
