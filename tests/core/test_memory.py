"""The memory a process may still use under a cgroup memory limit (`docker run --memory`, a Kubernetes memory
limit), which /proc/meminfo does not show.

Most cases build a /proc/self-shaped folder and cgroup trees under tmp_path (tests/core/test_cpus.py's helpers);
the last starts the real server in a real cgroup-v1 memory limit where this machine lets the test create one.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from openrerank.core.memory import memory_limit, rss_bytes
from tests.core.test_cpus import fake_proc, v1_group, write
from tests.support import DL19

MIB = 2**20


def test_v2_limit_of_a_parent_binds_and_its_usage_less_inactive_file_is_used(tmp_path):
    """The pod's folder limits, the container's says `max`: the pod's usage counts, less page cache it may drop."""
    mount = tmp_path / "cgroup"
    write(mount / "kubepods" / "pod1" / "ctr", memory_max="max", memory_current=str(100 * MIB))
    write(mount / "kubepods" / "pod1", memory_max=str(512 * MIB), memory_current=str(300 * MIB),
          memory_stat=f"anon {200 * MIB}\nfile {100 * MIB}\ninactive_file {40 * MIB}")
    write(mount / "kubepods", memory_max=str(4096 * MIB), memory_current=str(1000 * MIB))
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr", [f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw"])
    limit = memory_limit(proc)
    assert (limit.limit, limit.used, limit.room) == (512 * MIB, 260 * MIB, 252 * MIB)
    assert limit.folder == mount / "kubepods" / "pod1"


def test_v1_reads_the_memory_hierarchy_only_and_its_hierarchical_inactive_file(tmp_path):
    memory, cpu = tmp_path / "memory", tmp_path / "cpu"
    write(memory / "docker" / "abc", memory_limit_in_bytes=str(400 * MIB), memory_usage_in_bytes=str(250 * MIB),
          memory_stat=f"inactive_file {1 * MIB}\ntotal_inactive_file {50 * MIB}")
    write(memory / "docker", memory_limit_in_bytes="9223372036854771712")  # v1's "no limit"
    write(cpu / "docker" / "abc", memory_limit_in_bytes=str(10 * MIB))  # not the memory controller's
    proc = fake_proc(tmp_path, "4:memory:/docker/abc\n3:cpu:/docker/abc\n0::/\n", [
        f"35 31 0:32 / {memory} rw - cgroup cgroup rw,memory",
        f"32 31 0:29 / {cpu} rw - cgroup cgroup rw,cpu",
    ])
    limit = memory_limit(proc)
    assert (limit.limit, limit.used, limit.room) == (400 * MIB, 200 * MIB, 200 * MIB)


def test_no_limit_max_and_unreadable_usage(tmp_path):
    mount = tmp_path / "cgroup"
    write(mount, memory_max="max", memory_current=str(MIB))
    proc = fake_proc(tmp_path, "0::/", [f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw"])
    assert memory_limit(proc) is None
    assert memory_limit(tmp_path / "absent") is None
    write(mount, memory_max=str(300 * MIB))  # a limit without memory.current: this process's RSS counts
    (mount / "memory.current").unlink()
    (proc / "status").write_text("Name:\tpython\nVmRSS:\t  204800 kB\n")
    assert rss_bytes(proc) == 200 * MIB
    assert memory_limit(proc).room == 100 * MIB


def test_a_looser_parent_that_siblings_fill_binds_first(tmp_path):
    """The container's own limit is lower, but the pod's (pod-level resources, shared by sidecars) has less room
    left: that room is the one a batch must fit in, and its folder the one the start-up line names."""
    mount = tmp_path / "cgroup"
    write(mount / "kubepods" / "pod1" / "ctr", memory_max=str(800 * MIB), memory_current=str(300 * MIB),
          memory_stat="inactive_file 0")
    write(mount / "kubepods" / "pod1", memory_max=str(1000 * MIB), memory_current=str(900 * MIB),
          memory_stat="inactive_file 0")
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr", [f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw"])
    limit = memory_limit(proc)
    assert (limit.limit, limit.room, limit.folder) == (1000 * MIB, 100 * MIB, mount / "kubepods" / "pod1")
    write(mount / "kubepods" / "pod1", memory_current=str(400 * MIB))  # the siblings left: the container binds
    limit = memory_limit(proc)
    assert (limit.limit, limit.room, limit.folder) == (800 * MIB, 500 * MIB, mount / "kubepods" / "pod1" / "ctr")


def test_the_used_memory_past_the_limit_leaves_no_room(tmp_path):
    mount = tmp_path / "cgroup"
    write(mount, memory_max=str(100 * MIB), memory_current=str(150 * MIB))
    proc = fake_proc(tmp_path, "0::/", [f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw"])
    assert memory_limit(proc).room == 0


def _oom_kills(group: Path) -> int:
    lines = (group / "memory.oom_control").read_text().splitlines()
    return next((int(line.split()[1]) for line in lines if line.startswith("oom_kill ")), 0)


@pytest.mark.skipif(not (DL19 / "corpus.jsonl.gz").is_file(), reason="needs the DL19 corpus")
def test_a_server_in_a_500_mib_limit_refuses_what_it_cannot_hold_instead_of_being_killed():
    """8 concurrent 256-passage DL19 requests at the defaults: the old server formed batches of 16,384 tokens
    across them (~400 MB of activations) and the kernel killed it (every request lost); now its batches are
    capped by the room the loaded model leaves, some requests are answered and the rest refused, retryably."""
    with gzip.open(DL19 / "corpus.jsonl.gz", "rt") as corpus:
        texts = [json.loads(line)["text"] for _, line in zip(range(8 * 256), corpus, strict=False)]
    bodies = [json.dumps({"truncate": "END", "query": {"text": "what is the definition of anthropology"},
                          "passages": [{"text": t} for t in texts[i * 256:(i + 1) * 256]]}) for i in range(8)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENRERANK_LOG_LEVEL": "info"}
    engine = ["--backend", "openvino", "--dtype", "fp32"]  # built here, outside the limit (this run's cache)
    subprocess.run([sys.executable, "-m", "openrerank.cli.main", "export", *engine], env=env, check=True,
                   capture_output=True, timeout=120)
    with v1_group("memory", {"memory.limit_in_bytes": str(500 * MIB)}) as group, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        server = subprocess.Popen(
            [sys.executable, "-m", "openrerank.cli.main", "serve", "--port", str(port), "--threads", "1",
             "--request-timeout", "30", *engine], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and server.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/v1/health/ready", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            else:
                pytest.skip(f"the default model does not load within 500 MiB here: {''.join(log)[-500:]}")
            kills = _oom_kills(group)
            answers: list[httpx.Response | Exception] = []

            def send(body: str) -> None:
                try:
                    answers.append(httpx.post(base + "/v1/ranking", content=body, timeout=60,
                                              headers={"content-type": "application/json"}))
                except httpx.HTTPError as exc:
                    answers.append(exc)

            clients = [threading.Thread(target=send, args=(b,)) for b in bodies]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            assert server.poll() is None and _oom_kills(group) == kills, f"killed: {answers}"
            codes = sorted(a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers)
            assert 200 in codes and set(codes) <= {200, 503}, codes
            assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
            metrics = httpx.get(base + "/v1/metrics").text
            assert codes.count(503) == 0 or 'openrerank_rejected_total{' in metrics
            assert any("a memory limit of 500 MiB" in line and "caps --max-body-bytes-in-flight" in line
                       and "--max-batch-tokens at" in line for line in log), "".join(log)
        finally:
            server.kill()
            server.wait()
