"""Thread defaults that hold up on a shared machine: the resolution rules, short OpenMP waits
set before torch loads, and the value reaching training."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from oncoslide import _threads
from oncoslide._threads import (
    apply_num_threads,
    cpu_quota,
    describe_threads,
    prefer_short_waits,
    resolve_num_threads,
    usable_cores,
)
from oncoslide.errors import ConfigError


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Tests here change torch's thread count: put it back."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Eight cores in the affinity mask, no CPU quota, no OMP_NUM_THREADS."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(_threads, "cpu_quota", lambda root="": None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield


def _cgroup(root: Path, monkeypatch: pytest.MonkeyPatch, own: str, limits: dict[str, str]) -> Path:
    """A cgroup v2 tree under ``root`` with ``cpu.max`` files, this process in ``own``."""
    for folder, text in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(text + "\n")
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(_threads, "_own_cgroup", lambda: own)
    return root


# ---------------------------------------------------------------------------- resolution


@pytest.mark.usefixtures("cores")
def test_the_default_divides_the_usable_cores_among_the_workers() -> None:
    assert resolve_num_threads() == 8
    assert resolve_num_threads(workers=2) == 4
    assert resolve_num_threads(workers=3) == 2  # 3 x 2 <= 8: never more threads than cores
    assert resolve_num_threads(workers=8) == 1
    assert resolve_num_threads(workers=20) == 1  # at least one
    assert resolve_num_threads(workers=0) == 8  # in-process runs count as one worker


@pytest.mark.usefixtures("cores")
def test_an_explicit_value_wins_then_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_num_threads() == 3  # set by the user, or by Ray for its task
    assert resolve_num_threads(workers=4) == 3  # a per-process setting already
    assert resolve_num_threads(5) == 5
    assert resolve_num_threads(5, workers=4) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert resolve_num_threads() == 8  # malformed: ignored, as torch ignores it
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")  # nested levels: the outer one
    assert resolve_num_threads() == 2
    with pytest.raises(ConfigError, match="at least 1"):
        resolve_num_threads(0)


def test_usable_cores_follow_the_affinity_mask(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5, 7}, raising=False)
    monkeypatch.setattr(_threads, "_own_cgroup", lambda: "/")
    assert usable_cores(tmp_path) == 3  # taskset / Slurm: 3 of the machine's cores


def test_a_cgroup_cpu_quota_lowers_the_cores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    root = _cgroup(tmp_path, monkeypatch, "/", {".": "250000 100000"})
    assert cpu_quota(root) == 2.5
    assert usable_cores(root) == 2  # --cpus 2.5: rounded down
    (root / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(root) is None and usable_cores(root) == 16
    (root / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(root) == 1  # half a core: still one thread


def test_the_tightest_quota_of_the_cgroup_and_its_parents_counts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    limits = {"user.slice": "300000 100000", "user.slice/job": "max 100000"}
    root = _cgroup(tmp_path, monkeypatch, "/user.slice/job", limits)
    assert cpu_quota(root) == 3.0
    (root / "cpu.max").write_text("100000 100000\n")  # the root's own limit is the tightest
    assert cpu_quota(root) == 1.0


def test_a_cgroup_v1_quota_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_threads, "_own_cgroup", lambda: None)
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cpu_quota(tmp_path) is None


@pytest.mark.usefixtures("cores", "torch_threads")
def test_apply_sets_torch_and_the_log_line_says_what_and_why() -> None:
    torch.set_num_threads(1)
    assert apply_num_threads(workers=4) == 2
    assert torch.get_num_threads() == 2
    line = describe_threads(2, workers=4)
    assert "4 worker(s) x 2 thread(s)" in line and "8 usable core(s)" in line
    assert "OMP_WAIT_POLICY=" in line and "GOMP_SPINCOUNT=" in line


# ---------------------------------------------------------------------------- waiting


def test_short_waits_are_a_default_the_user_can_override(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    prefer_short_waits()
    assert (os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"]) == ("PASSIVE", "1000")
    # a policy the user chose: no spin count either (libgomp would take it over the policy)
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prefer_short_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "infinite")
    prefer_short_waits()
    assert os.environ["GOMP_SPINCOUNT"] == "infinite" and "OMP_WAIT_POLICY" not in os.environ


def _fresh(code: str, **env: str) -> str:
    chosen = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    clean = {k: v for k, v in os.environ.items() if k not in chosen}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_oncoslide_sets_the_policy_before_torch_loads() -> None:
    # libgomp reads the policy once, when torch loads it: importing the package (as the
    # command line does first) must set it without loading torch
    out = _fresh(
        "import sys, os, oncoslide.cli; print('torch' in sys.modules, "
        "os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert out == "False PASSIVE 1000"
    # a policy the user set is kept
    assert (
        _fresh(
            "import os, oncoslide; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="active"
        )
        == "active"
    )


def test_the_log_line_says_when_torch_loaded_first_and_the_policy_is_not_in_effect() -> None:
    out = _fresh(
        "import torch, oncoslide; from oncoslide._threads import describe_threads; "
        "print(describe_threads(1))"
    )
    assert "not in effect: torch was imported before oncoslide" in out


# ---------------------------------------------------------------------------- applied


@pytest.mark.usefixtures("torch_threads")
@pytest.mark.parametrize("requested", [None, 1])
def test_training_runs_with_the_resolved_threads(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, requested: int | None
) -> None:
    from oncoslide.cohort.table import load_cohort
    from oncoslide.training import cross_validate, make_config
    from oncoslide.training.module import MILModule

    # the default resolves to 1 (one usable core) or the explicit 1 wins over 3 usable cores;
    # torch starts at 2 either way, so a run that does not apply the value trains on 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads, "usable_cores", lambda: 1 if requested is None else 3)
    torch.set_num_threads(2)
    seen: set[int] = set()
    step = MILModule.training_step

    def spy(self: MILModule, *args: object, **kwargs: object) -> torch.Tensor:
        seen.add(torch.get_num_threads())
        return step(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MILModule, "training_step", spy)
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    cfg = make_config(
        task="survival", model="abmil", folds=2, epochs=1, batch_size=8, n_boot=0,
        progress=False, num_threads=requested,
    )  # fmt: skip
    result = cross_validate(cohort, cfg, tmp_path / "run")
    assert seen == {1}
    assert "torch: 1 thread(s)" in (result.out_dir / "run.log").read_text()
