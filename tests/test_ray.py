"""The shared Ray loop: results as tasks finish, failures as values, shared arguments."""

from __future__ import annotations

import re

import numpy as np
import pytest

from oncoslide._ray import TaskFailed, map_unordered


def _scaled_sum(item: int, table: np.ndarray, scale: float) -> float:
    if item == 3:
        raise ValueError("item three is bad")
    return float(table[item].sum() * scale)


@pytest.mark.usefixtures("one_ray_instance")
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


@pytest.mark.usefixtures("one_ray_instance")
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


def test_an_unreachable_address_is_one_config_error_within_seconds() -> None:
    pytest.importorskip("ray")
    import time

    from oncoslide.errors import ConfigError

    started = time.perf_counter()
    # nothing listens on port 1: Ray itself would retry for many minutes, then print a traceback
    said = re.escape("cannot reach the Ray cluster at 127.0.0.1:1: ")
    with pytest.raises(ConfigError, match=said) as err:
        dict(map_unordered(_scaled_sum, range(2), np.zeros((2, 2)), 1.0, address="127.0.0.1:1"))
    assert time.perf_counter() - started < 30
    assert "\n" not in str(err.value) and "--address" in str(err.value)


@pytest.mark.parametrize("address", ["head-node", "host:port", ":6379"])
def test_an_address_without_host_and_port_is_refused(address: str) -> None:
    from oncoslide._ray import check_reachable
    from oncoslide.errors import ConfigError

    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        check_reachable(address)


def test_auto_and_local_addresses_are_left_to_ray() -> None:
    from oncoslide._ray import check_reachable

    for address in (None, "auto", "local"):
        check_reachable(address)  # no host to try: nothing raised


def test_a_failed_ray_start_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    from oncoslide.errors import ConfigError

    def refuse(**kwargs: object) -> None:  # as Ray says it with no cluster to find
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify one.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    said = "cannot find a running Ray cluster: Could not find any running Ray instance.$"
    with pytest.raises(ConfigError, match=said):
        dict(map_unordered(_scaled_sum, range(2), np.zeros((2, 2)), 1.0, address="auto"))
