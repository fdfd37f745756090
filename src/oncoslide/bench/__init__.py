"""Benchmarks: tasks x feature sets x models, leakage-controlled, with a results store and a leaderboard.

    from oncoslide.bench import load_spec, run_benchmark, build_leaderboard
    spec = load_spec("bench.yaml")
    run_benchmark(spec, "bench/")
    build_leaderboard("bench/", html="bench/index.html")

See docs/bench.md.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "load_spec": "oncoslide.bench.spec",
    "spec_from_dict": "oncoslide.bench.spec",
    "BenchSpec": "oncoslide.bench.spec",
    "resolve_bench": "oncoslide.bench.resolve",
    "run_benchmark": "oncoslide.bench.runner",
    "build_leaderboard": "oncoslide.bench.report",
    "ResultStore": "oncoslide.bench.store",
    "shuffle_features": "oncoslide.bench.shuffle",
}


def __getattr__(name: str) -> Any:
    # training pulls in Lightning (seconds): import the parts only when they are used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oncoslide.bench' has no attribute {name!r}")


__all__ = sorted(_LAZY)
