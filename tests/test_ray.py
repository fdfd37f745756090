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


def _gpu_ids(item: int) -> list[int]:
    import ray

    return [int(g) for g in ray.get_gpu_ids()]


def test_map_unordered_reserves_the_gpus_it_is_asked_for() -> None:
    ray = pytest.importorskip("ray")
    # one logical GPU (no hardware needed): Ray hands device 0 only to tasks that reserve it
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with_gpu = dict(map_unordered(_gpu_ids, range(3), num_gpus=0.5))
        without = dict(map_unordered(_gpu_ids, range(3)))
    finally:
        ray.shutdown()
    assert all(ids == [0] for ids in with_gpu.values()), with_gpu
    assert all(ids == [] for ids in without.values())
