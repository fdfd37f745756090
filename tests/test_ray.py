"""The shared Ray loop: results as tasks finish, failures as values, shared arguments."""

from __future__ import annotations

import numpy as np
import pytest

from oncoslide._ray import TaskFailed, map_unordered


def _scaled_sum(item: int, table: np.ndarray, scale: float) -> float:
    if item == 3:
        raise ValueError("item three is bad")
    return float(table[item].sum() * scale)


def test_map_unordered_yields_every_item_once_and_failures_as_values() -> None:
    ray = pytest.importorskip("ray")
    table = np.arange(20.0).reshape(5, 4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = dict(map_unordered(_scaled_sum, range(5), table, 0.5))
        assert ray.is_initialized()  # an instance started by the caller is left running
    finally:
        ray.shutdown()
    assert sorted(out) == [0, 1, 2, 3, 4]
    for i in (0, 1, 2, 4):
        assert out[i] == pytest.approx(table[i].sum() * 0.5)
    failed = out[3]
    assert isinstance(failed, TaskFailed) and "item three is bad" in failed.message
