"""The memory this process may still use: its cgroup's memory limit less what the limited group holds now.

A container limited with `docker run --memory 500m` or a Kubernetes `resources.limits.memory` still sees the
host's memory in /proc/meminfo; past the limit the kernel's OOM killer ends the process (SIGKILL: every
request in flight lost, the pod restarted). The limit is read as `core/cpus.py` reads the CPU quota: cgroup v2
`memory.max` or v1 `memory.limit_in_bytes`, from the process's own group up to the mount's root (the tightest
binds; "max", or v1's "no limit", 2^63 rounded to a page, means none). What counts against it is the limited
group's usage less its inactive file pages (the kubelet's working set): usage alone counts page cache the
kernel drops before it kills anyone, and this process's RSS counts library pages another group paid for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openrerank.core.cgroups import PROC_SELF, group_folders

#: A limit at or above this is no limit (v1 writes none as 9223372036854771712; no machine has 1 EiB).
NO_LIMIT = 1 << 60
#: Per version: (limit file, usage file, memory.stat key of the inactive file pages it may drop).
_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
          1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


@dataclass(frozen=True)
class MemoryLimit:
    """The memory limit that binds this process first and what its group holds now, in bytes."""

    limit: int
    used: int
    folder: Path  # the group whose limit it is

    @property
    def room(self) -> int:
        """Bytes the group may still take before the kernel kills."""
        return max(0, self.limit - self.used)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(folder: Path, key: str) -> int:
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def rss_bytes(proc: Path = PROC_SELF) -> int | None:
    """This process's resident set (VmRSS), None where /proc does not say."""
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit(proc: Path = PROC_SELF) -> MemoryLimit | None:
    """The memory limit of the process's groups that leaves it the least room, and what that group uses now
    (its usage less its inactive file pages; this process's RSS where the group's usage cannot be read), or None
    without a limit. The least room, not the lowest limit: a parent with a looser limit that siblings fill (a
    pod's own limit shared by sidecars, a systemd slice's MemoryMax) kills this process as surely as its own."""
    found: MemoryLimit | None = None
    for version, folder in group_folders("memory", proc):
        limit_file, usage_file, inactive = _FILES[version]
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= NO_LIMIT:
            continue
        usage = _read_int(folder / usage_file)
        used = usage - _stat(folder, inactive) if usage is not None else rss_bytes(proc)
        group = MemoryLimit(limit, max(0, used or 0), folder)
        if found is None or group.room < found.room:
            found = group
    return found
