"""The one Ray loop the package needs: run a function per item as Ray tasks, results as they
finish. Feature extraction (one task per slide) and benchmarks (one task per cell) share it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from oncoslide.errors import ConfigError

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class TaskFailed:
    """A Ray task that raised, or whose worker or node was lost."""

    message: str


def map_unordered(
    fn: Callable[..., Result],
    items: Iterable[Item],
    *shared: Any,
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Iterator[tuple[Item, Result | TaskFailed]]:
    """Run ``fn(item, *shared)`` as one Ray task per item, each reserving ``num_cpus`` CPUs and
    ``num_gpus`` GPUs (Ray hides every GPU from a task that reserves none, so GPU work must ask).

    Yields ``(item, result)`` as tasks finish, or ``(item, TaskFailed(...))`` when a task
    raised or its worker or node was lost, so one lost task never stops the others. ``shared``
    arguments go to the object store once, not once per task. Ray is started on ``address``
    (None: a local instance; "auto": a running cluster) unless it is already running, and shut
    down afterwards only if it was started here.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'oncoslide[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    try:
        remote: Any = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
        shared_refs = [ray.put(value) for value in shared]
        refs = {remote.remote(item, *shared_refs): item for item in items}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task raised, or its worker or node was lost
                    yield refs[ref], TaskFailed(f"ray task failed: {exc}")
                else:
                    yield refs[ref], result
    finally:
        if started_here:
            ray.shutdown()
