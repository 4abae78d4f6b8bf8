"""How many CPU threads a worker's torch ops use, and how they wait: ``--threads`` and OpenMP's policy.

A CPU worker computes with torch's intra-op threads (GNU OpenMP in the CPU wheel). Two defaults of
OpenMP hurt on a shared host:

- **Thread count.** OpenMP starts one thread per CPU of the affinity mask, blind to a container's CPU
  quota: a pod limited to 2 CPUs on a 64-core node would run 64 threads that the kernel then
  throttles. ``usable_cpus`` is the smaller of the affinity mask and the cgroup quota (v2
  ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, the tightest over the ancestors),
  shared between the host's ranks of a group.
- **Waiting.** Between parallel regions libgomp spins a while (``GOMP_SPINCOUNT``) before it sleeps.
  With a free core per thread that saves a wake-up; when other processes hold the cores, a spinning
  thread burns the time slice the thread it waits for needs, and a decode step of a 135M model went
  from 72 ms to 300–2,500 ms at a load of 2–4 on 2 cores (benchmarks/threads.py). Workers therefore
  default to ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once), which libgomp reads when it is
  loaded: ``gpu_workers/__init__.py`` sets it before anything imports torch; a value the operator
  set is kept. On a host of its own, ``GOMP_SPINCOUNT=300000`` (bounded spinning, which overrides
  the passive policy's 0) measured ~8% faster at batch 1 and ~20% at batch 8 (docs/OPERATIONS.md).

``--threads N`` (``RYZ_THREADS``) overrides the count; ``OMP_NUM_THREADS`` set by the operator is
honoured as before when ``--threads`` is not given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from broker.errors import ConfigError
from gpu_workers.kv_memory import CGROUP_ROOT, SELF_CGROUP, cgroup_dirs


def _quota_cpus(text: str) -> float | None:
    """CPUs of a v2 ``cpu.max`` line (``"200000 100000"`` -> 2.0; ``"max 100000"`` -> None)."""
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit() or int(parts[1]) == 0:
        return None
    return int(parts[0]) / int(parts[1])


def cgroup_cpu_limit(*, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs this process' cgroup may use (quota / period, the smallest over the cgroup and its
    ancestors), or None where no CPU quota applies or cgroups are not mounted."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: the unified hierarchy
            for d in cgroup_dirs(root, path):
                try:
                    cpus = _quota_cpus((d / "cpu.max").read_text())
                except OSError:
                    continue
                if cpus is not None:
                    limits.append(cpus)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy (often "cpu,cpuacct")
            for d in cgroup_dirs(root / controllers, path) or cgroup_dirs(root / "cpu", path):
                try:
                    quota = int((d / "cpu.cfs_quota_us").read_text())
                    period = int((d / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                if quota > 0 and period > 0:  # -1: no quota
                    limits.append(quota / period)
    return min(limits) if limits else None


def usable_cpus(*, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP,
                affinity: set[int] | None = None) -> int:
    """Whole CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota
    (a fractional quota rounds up: 1.5 CPUs can keep 2 threads busy part of the time); at least 1."""
    cpus = len(affinity if affinity is not None else os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root=root, self_cgroup=self_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def torch_threads(requested: int | None, *, ranks_on_host: int = 1,
                  environ: Mapping[str, str] = os.environ, cpus: int | None = None) -> int | None:
    """The intra-op thread count for one rank: ``requested`` (``--threads``) when given; None (leave
    torch's own) where the operator set ``OMP_NUM_THREADS``; else the usable CPUs shared between
    the host's ``ranks_on_host`` ranks. ConfigError for a count below 1."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads (RYZ_THREADS) must be at least 1, got {requested}")
        return requested
    if "OMP_NUM_THREADS" in environ:
        return None
    return max(1, (cpus if cpus is not None else usable_cpus()) // max(1, ranks_on_host))


def apply_threads(requested: int | None, *, ranks_on_host: int = 1) -> int:
    """Set torch's intra-op threads for this rank (see ``torch_threads``); returns the count in use."""
    import torch

    count = torch_threads(requested, ranks_on_host=ranks_on_host)
    if count is not None:
        torch.set_num_threads(count)
    return torch.get_num_threads()
