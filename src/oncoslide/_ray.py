"""The one Ray loop the package needs: run a function per item as Ray tasks, results as they
finish. Feature extraction (one task per slide) and benchmarks (one task per cell) share it."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from oncoslide.errors import ConfigError, describe_os_error

# How long the reachability check waits for a TCP connection to the cluster's address. Ray itself
# retries an unreachable address for many minutes (20 attempts of about 40 s) and then ends in a
# long traceback; a cluster that does not answer within seconds is better reported at once.
CONNECT_TIMEOUT_S = 5.0

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
        ConfigError: Ray is not installed, or the cluster at ``address`` cannot be reached.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'oncoslide[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        check_reachable(address)
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            # e.g. a port that answers but is not a Ray cluster, or 'auto' with none running
            first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
            what = {None: "start a local Ray instance", "auto": "find a running Ray cluster"}
            doing = what.get(address, f"connect to the Ray cluster at {address}")
            raise ConfigError(f"cannot {doing}: {first.strip()}") from None
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


def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``ConfigError`` in one line unless something listens at a ``HOST:PORT`` (or
    ``ray://HOST:PORT``) Ray address. ``None``, ``"auto"`` and ``"local"`` name no host: Ray
    resolves them itself.
    """
    if address is None or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or 'local'"
        )
    errors: list[str] = []
    for candidate in _candidate_hosts(host):
        try:
            with socket.create_connection((candidate, int(port)), timeout=timeout):
                return
        except TimeoutError:
            errors.append(f"no answer within {timeout:g} s")
        except OSError as exc:
            errors.append(describe_os_error(exc))
    raise ConfigError(
        f"cannot reach the Ray cluster at {address}: {errors[0]}; start one there "
        "(`ray start --head`) or check --address"
    )


def _candidate_hosts(host: str) -> list[str]:
    """The host, and for a loopback name also this machine's address: Ray connects to the
    latter when given 127.0.0.1 or localhost, and a cluster may listen only there."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return [host]
    try:
        import ray.util

        own = str(ray.util.get_node_ip_address())
    except Exception:  # no network or no Ray: the loopback address alone
        return [host]
    return [host] if own == host else [host, own]
