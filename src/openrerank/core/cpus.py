"""How many CPUs this process may use: its affinity set, capped by its cgroup's CPU quota.

A container limited with `docker run --cpus 2` or a Kubernetes `resources.limits.cpu: 2` on a 64-core node
still sees all 64 cores in its affinity set: the limit is a CFS quota (CPU time per period), not a set of
cores. Threads sized to the 64 then share two CPUs' worth of time and are throttled every period, which
costs latency and throughput. The quota is read the way Go's automaxprocs and the JVM read it: cgroup v2
`cpu.max` or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`, from the process's own cgroup up to the mount's
root (a parent's limit binds too; `core/cgroups.py` finds the folders), and rounded down (at least 1): a
thread the quota cannot run is a thread that waits.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from openrerank.core.cgroups import PROC_SELF, group_folders


def _quota_v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)


def _quota_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cpu_quota(proc: Path = PROC_SELF) -> float | None:
    """CPUs' worth of time per period the process's cgroups allow (the tightest on the way to the root), or
    None without a quota. `proc` is /proc/self (a folder of the same shape in tests)."""
    read = {1: _quota_v1, 2: _quota_v2}
    limits = [q for version, folder in group_folders("cpu", proc) if (q := read[version](folder)) is not None]
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """Cores in the process's affinity set (taskset, a cpuset, a Ray replica's binding)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def available_cpus(proc: Path = PROC_SELF) -> int:
    """CPUs the process may keep busy: its affinity set, capped by its CPU quota rounded down (at least 1)."""
    cores = affinity_cpus()
    quota = cpu_quota(proc)
    return cores if quota is None else max(1, min(cores, math.floor(quota + 1e-9)))
