"""The cgroup folders that bind this process: its own group in each hierarchy, and each parent up to the mount.

A container's limits (`docker run --cpus/--memory`, a Kubernetes pod's `resources.limits`) are files in these
folders, and a parent's limit binds as much as the process's own (a pod's limit sits on the pod's folder, the
container's says `max`). Read from /proc/self/mountinfo and /proc/self/cgroup, so a cgroup namespace (the
group is the mount's root) and the host's view (the path mapped through the mount's root) both work, on v1
(a hierarchy per controller) and v2 (one hierarchy). `core/cpus.py` reads the CPU quota here, `core/memory.py`
the memory limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
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


def group_folders(controller: str, proc: Path = PROC_SELF) -> Iterator[tuple[int, Path]]:
    """(cgroup version, folder) of every folder whose limits on `controller` (v1's name: "cpu", "memory") bind
    this process, its own first in each hierarchy. `proc` is /proc/self (a folder of the same shape in tests)."""
    groups = _groups(proc)
    for root, point, fstype, options in _mounts(proc):
        for controllers, path in groups:
            if fstype == "cgroup2" and not controllers:
                yield from ((2, folder) for folder in _chain(root, point, path))
            elif fstype == "cgroup" and controller in options and controller in controllers:
                yield from ((1, folder) for folder in _chain(root, point, path))
