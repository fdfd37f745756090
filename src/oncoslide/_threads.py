"""How many CPU threads torch uses, and how they wait: chosen so that training does not collapse
when another job shares the machine.

Two measured causes of collapse on a shared CPU (docs/training.md, ``benchmarks/bench_threads.py``):

* OpenMP worker threads that *spin* at the end of each parallel region. MIL training runs many
  small matrix products, so threads meet at a barrier thousands of times a second; when one of
  them is descheduled by another process, the others burn their time slices spinning for it
  (libgomp spins about 3 ms by default). On 2 cores with one kept busy, a 5-fold run took 3x
  its idle time, 11x with other load, and a run that took 60 s with one thread took 280 s with
  two. :func:`prefer_short_waits` makes waiting threads spin briefly (``GOMP_SPINCOUNT=1000``,
  about 10 us) and then sleep (``OMP_WAIT_POLICY=PASSIVE``, which other OpenMP runtimes
  read): 1.7x busy/idle, and as fast as before on an idle machine, where sleeping at once
  (passive alone) cost 17%. OpenMP runtimes read
  these once, when torch loads them, so this runs when ``oncoslide`` is imported.
* More threads than the cores this process may use (a CPU affinity from taskset, Slurm or a
  cgroup cpuset, or a container's CPU quota), or workers x threads above them: the default
  here is the usable cores divided among the worker processes.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from oncoslide.errors import ConfigError

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
# about 10 us of spinning (libgomp's estimate: 100,000 spins per ms) before sleeping; libgomp
# itself spins this long with OMP_WAIT_POLICY=ACTIVE once its threads outnumber the cores
SHORT_SPIN = "1000"
_torch_loaded_first = False


def prefer_short_waits() -> None:
    """Let idle OpenMP threads spin briefly, then sleep, unless the user chose how they wait.

    Only effective before torch (its OpenMP runtime) is loaded; child processes inherit it.
    """
    global _torch_loaded_first
    chosen = WAIT_POLICY in os.environ or SPIN_COUNT in os.environ
    _torch_loaded_first = "torch" in sys.modules and not chosen
    if not chosen:
        # libgomp (Linux wheels) takes the spin count over the policy; others read the policy
        os.environ[SPIN_COUNT] = SHORT_SPIN
        os.environ[WAIT_POLICY] = "PASSIVE"


def usable_cores(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int:
    """The cores this process may run on: its CPU affinity, lowered to its cgroup's CPU quota
    (a container started with ``--cpus 2`` sees every core of the host but gets two)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    if quota is not None:
        # rounded down: threads beyond the quota are throttled all together, the collapse again
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cpu_quota(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time per period allowed to this process's cgroup (the tightest limit of
    the cgroup and its parents), or None where there is none or it cannot be read."""
    root = Path(cgroup_root)
    limits: list[float] = []
    try:
        own = _own_cgroup()
    except OSError:
        own = None
    if own is not None:  # cgroup v2: cpu.max is "<quota> <period>" or "max <period>"
        folder = root / own.lstrip("/")
        while True:
            limits += _read_limit(folder / "cpu.max")
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    # cgroup v1 (the controller folder as mounted in a container)
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            limits.append(quota / period)
    return min(limits) if limits else None


def _own_cgroup() -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _read_limit(path: Path) -> list[float]:
    try:
        quota, period = path.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            return [int(quota) / int(period)]
    except (OSError, ValueError):
        pass
    return []


def resolve_num_threads(requested: int | None = None, workers: int = 1) -> int:
    """torch threads for one of ``workers`` processes sharing this machine.

    An explicit value wins, then ``OMP_NUM_THREADS`` (set by the user, or by Ray for each task),
    else the usable cores divided among the workers (at least one), so that workers x threads
    never exceeds the cores this process may use.
    """
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"num_threads must be at least 1, not {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env:
        try:
            if int(env) >= 1:
                return int(env)
        except ValueError:
            pass  # a malformed value: torch ignores it too
    return max(1, usable_cores() // max(1, workers))


def apply_num_threads(requested: int | None = None, workers: int = 1) -> int:
    """Set torch's intra-op threads to :func:`resolve_num_threads` and return the value."""
    import torch

    threads = resolve_num_threads(requested, workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def describe_threads(threads: int, workers: int = 1) -> str:
    """One line for logs: what was chosen and from what."""
    per = f"{workers} worker(s) x {threads} thread(s)" if workers > 1 else f"{threads} thread(s)"
    policy = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in (WAIT_POLICY, SPIN_COUNT))
    if _torch_loaded_first:
        policy += " (not in effect: torch was imported before oncoslide)"
    return f"torch: {per}, {usable_cores()} usable core(s), {policy}"


__all__ = [
    "apply_num_threads",
    "cpu_quota",
    "describe_threads",
    "prefer_short_waits",
    "resolve_num_threads",
    "usable_cores",
]
