"""CPUs a process may use: the affinity set capped by the cgroup CPU quota (`docker run --cpus`, a Kubernetes
CPU limit), which the affinity set alone does not show.

Most cases build a /proc/self-shaped folder and cgroup trees of the kernel's layout under tmp_path; the last
starts a real process in a real cgroup-v1 quota where this machine lets the test create one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openrerank.core import cpus
from openrerank.core.cpus import available_cpus, cpu_quota


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    return proc


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


@pytest.fixture
def many_cores(monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 64)


def test_v2_limit_of_a_parent_binds_and_is_rounded_down(tmp_path, many_cores):
    """A pod's limit sits on the pod's folder, the container's says `max`: the tightest on the way up counts."""
    mount = tmp_path / "cgroup"
    write(mount / "kubepods" / "pod1" / "ctr", cpu_max="max 100000")
    write(mount / "kubepods" / "pod1", cpu_max="250000 100000")
    write(mount / "kubepods", cpu_max="max 100000")
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr",
                     [f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"])
    assert cpu_quota(proc) == 2.5
    assert available_cpus(proc) == 2


def test_v2_inside_a_cgroup_namespace_reads_the_mount_point(tmp_path, many_cores):
    mount = tmp_path / "cgroup"
    write(mount, cpu_max="50000 100000")  # --cpus 0.5: still one thread
    proc = fake_proc(tmp_path, "0::/\n", [f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw"])
    assert cpu_quota(proc) == 0.5
    assert available_cpus(proc) == 1


def test_v1_without_a_cgroup_namespace_maps_the_path_through_the_mount_root(tmp_path, many_cores):
    """Docker on cgroup v1: /proc/self/cgroup names the host's path, the mount's root is that same folder."""
    mount = tmp_path / "cpu,cpuacct"
    write(mount, cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    proc = fake_proc(tmp_path, "5:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", [
        f"40 31 0:34 /docker/abc {tmp_path / 'cpuset'} ro - cgroup cgroup rw,cpuset",
        f"41 31 0:35 /docker/abc {mount} ro - cgroup cgroup rw,cpu,cpuacct",
    ])
    write(tmp_path / "cpuset", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")  # not the cpu controller
    assert cpu_quota(proc) == 3.0
    assert available_cpus(proc) == 3


def test_v1_no_quota_and_an_escaped_mount_point(tmp_path, many_cores):
    mount = tmp_path / "cg roup"
    write(mount / "job", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    write(mount, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    escaped = str(mount).replace(" ", "\\040")
    proc = fake_proc(tmp_path, "3:cpu:/job\n", [f"32 31 0:29 / {escaped} rw - cgroup cgroup rw,cpu"])
    assert cpu_quota(proc) is None
    assert available_cpus(proc) == 64
    write(mount / "job", cpu_cfs_quota_us="150000")
    assert cpu_quota(proc) == 1.5


def test_the_affinity_set_stays_the_cap_under_a_loose_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 2)
    mount = tmp_path / "cgroup"
    write(mount, cpu_max="800000 100000")
    proc = fake_proc(tmp_path, "0::/", [f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw"])
    assert available_cpus(proc) == 2


def test_no_cgroup_information_leaves_the_affinity_set(tmp_path, many_cores):
    assert cpu_quota(tmp_path / "absent") is None
    assert available_cpus(tmp_path / "absent") == 64
    garbled = fake_proc(tmp_path, "nonsense\n", ["not a mountinfo line", "1 2 3 - cgroup2"])
    assert cpu_quota(garbled) is None


CGROUP_V1 = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def v1_group(controller: str, files: dict[str, str]):
    """A real cgroup-v1 group of `controller` with `files` written (its limits), for the processes written into
    its cgroup.procs; removed after, its processes sent back to the root group first."""
    root = CGROUP_V1 / controller
    if not ((root / "cgroup.procs").is_file() and os.access(root, os.W_OK)):
        pytest.skip(f"no writable cgroup-v1 {controller} controller here")
    group = root / f"openrerank-test-{os.getpid()}"
    group.mkdir()
    try:
        for name, text in files.items():
            (group / name).write_text(text)
        yield group
    finally:
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                (root / "cgroup.procs").write_text(pid)
        deadline = time.monotonic() + 10
        while True:  # a group is busy until the kernel has moved its last task out
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two or more CPUs to cap")
def test_a_server_in_a_one_cpu_quota_defaults_to_one_thread_and_says_why():
    """The server's start checks run inside a real 1-CPU quota (they stop at a busy port, nothing loads)."""
    with v1_group("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}) as group, \
            socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = ("import sys; from openrerank.runtimes.base import default_threads; print(default_threads()); "
                "from openrerank.cli.main import main; sys.argv = ['openrerank', 'serve', '--port', sys.argv[1]]; "
                "main()")
        done = subprocess.run(
            [sys.executable, "-c", code, str(busy.getsockname()[1])], capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OPENRERANK_LOG_LEVEL": "info"},
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    cores = len(os.sched_getaffinity(0))
    assert done.stdout.split()[0] == "1", done.stdout + done.stderr
    assert f"a CPU quota of 1.00 CPUs caps this process at 1 of the {cores} cores" in done.stderr, done.stderr
