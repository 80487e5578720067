"""How many CPUs this process may use: its affinity set, capped by its cgroup's CPU quota.

A container limited with `docker run --cpus 2` or a Kubernetes `resources.limits.cpu: 2` on a 64-core node
still sees all 64 cores in its affinity set: the limit is a CFS quota (CPU time per period), not a set of
cores. Threads sized to the 64 then share two CPUs' worth of time and are throttled every period, which
costs latency and throughput. The quota is read the way Go's automaxprocs and the JVM read it: cgroup v2
`cpu.max` or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`, from the process's own cgroup up to the mount's
root (a parent's limit binds too), and rounded down (at least 1): a thread the quota cannot run is a thread
that waits.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

PROC_SELF = Path("/proc/self")
_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space in a path as \040


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _mounts(proc: Path) -> list[tuple[str, Path, str, set[str]]]:
    """(root within the hierarchy, mount point, fs type, super options) of each cgroup mount."""
    mounts = []
    try:
        lines = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3 or not rest[0].startswith("cgroup"):
            continue
        mounts.append((_unescape(fields[3]), Path(_unescape(fields[4])), rest[0], set(rest[2].split(","))))
    return mounts


def _groups(proc: Path) -> list[tuple[set[str], str]]:
    """(controllers, path) of each line of /proc/self/cgroup; v2's line has no controllers."""
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((set(parts[1].split(",")) - {""}, parts[2]))
    return out


def _chain(mount_root: str, mount_point: Path, path: str) -> list[Path]:
    """The process's cgroup folder under `mount_point` and each parent up to the mount point."""
    relative = os.path.relpath(path, mount_root)
    folder = mount_point if relative.startswith("..") else mount_point / relative
    chain = [folder]
    while folder != mount_point and mount_point in folder.parents:
        folder = folder.parent
        chain.append(folder)
    return chain


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
    limits = []
    groups = _groups(proc)
    for root, point, fstype, options in _mounts(proc):
        for controllers, path in groups:
            if fstype == "cgroup2" and not controllers:
                limits += [q for q in map(_quota_v2, _chain(root, point, path)) if q is not None]
            elif fstype == "cgroup" and "cpu" in options and "cpu" in controllers:
                limits += [q for q in map(_quota_v1, _chain(root, point, path)) if q is not None]
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
