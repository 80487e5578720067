"""No engine pins threads to cores outside what the process was given, and two servers on one host never pin
to the same core (OpenVINO's default pinning put two one-thread servers on core 0 while core 1 idled).

Read from the kernel (every thread's affinity, /proc/PID/task), not timed, so it holds on any machine with
two or more CPUs available.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from openrerank.runtimes.openvino_convert import openvino_available
from tests.support import ServerProcess, nim_body

ALLOWED = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two or more CPUs available")


def affinities(pid: int) -> dict[int, frozenset[int]]:
    """Every thread of the process and the CPUs it may run on (threads that ended meanwhile are skipped)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except OSError:
            pass
    return out


@pytest.mark.parametrize(("backend", "threads"), [
    ("openvino", 1), ("onnx", 1), ("torch", 1),
    ("openvino", len(ALLOWED)),  # where OpenVINO's pinning shows on any machine: a thread per core
])
def test_two_servers_started_together_do_not_pin_to_one_core(backend, threads, tiny_model_dir, tmp_path: Path):
    if backend == "openvino" and not openvino_available():
        pytest.skip("OpenVINO is not installed")
    args = ["--model", f"tiny={tiny_model_dir}", "--backend", backend, "--threads", str(threads),
            "--log-level", "warning"]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    servers = [ServerProcess(args, tmp_path / name) for name in ("a", "b")]  # both start before either is ready
    try:
        for server in servers:
            server.wait_ready(300)
        for server in servers:  # inference threads start lazily: score once more after warm-up
            with server.client() as c:
                body = nim_body("what is the capital of france", ["paris is in france", "bananas"] * 20)
                assert c.post("/v1/ranking", json=body).status_code == 200
        pinned = []
        for server in servers:
            threads_of = affinities(server.proc.pid)
            assert len(threads_of) > 1
            narrowed = {tid: cpus for tid, cpus in threads_of.items() if cpus != ALLOWED}
            for tid, cpus in narrowed.items():
                assert cpus <= ALLOWED, f"{backend}: thread {tid} bound to {sorted(cpus)}, not in {sorted(ALLOWED)}"
            pinned.append(frozenset().union(*narrowed.values()))
        shared = pinned[0] & pinned[1]
        assert not shared, f"{backend}: threads of both servers are pinned to CPU(s) {sorted(shared)}"
    finally:
        for server in servers:
            server.stop()


# A process serving a pre-exported IR never imports PyTorch; OpenVINO pins only then (importing torch first
# happens to turn its pinning off), so the compile settings are checked in such processes too.
_ENGINE_ONLY = """
import json, os, sys, threading
import numpy as np
import openvino as ov
from openrerank.runtimes.openvino_runtime import compile_config
assert "torch" not in sys.modules
compiled = ov.Core().compile_model(sys.argv[1], "CPU", compile_config("fp32", int(sys.argv[2])))
request = compiled.create_infer_request()
ids = np.full((16, 64), 7, dtype=np.int64)
feeds = {p.get_any_name(): (np.ones_like(ids) if "mask" in p.get_any_name() else
                            np.zeros_like(ids) if "type" in p.get_any_name() else ids) for p in compiled.inputs}
def work():
    for _ in range(10):  # enough work that the plugin's worker threads join in (and would be pinned)
        request.infer(feeds)
worker = threading.Thread(target=work)  # like the scheduler's worker thread
worker.start(); worker.join()
out = {}
for t in os.listdir("/proc/self/task"):
    try:
        out[t] = sorted(os.sched_getaffinity(int(t)))
    except ProcessLookupError:  # a thread that ended between listing and asking
        pass
print(json.dumps(out))
"""


def test_openvino_processes_without_torch_do_not_pin_to_one_core():
    """Two processes serving the default model's IR on every CPU (a tiny model runs on one thread only)."""
    if not openvino_available():
        pytest.skip("OpenVINO is not installed")
    import json
    import subprocess
    import sys

    from openrerank.engine.loading import LoadOptions, load_model

    loaded = load_model("default", LoadOptions(backend="openvino", dtype="fp32", backend_choice="rules"))
    ir = loaded.scorer.runtime.conversion.path
    loaded.close()
    procs = [subprocess.Popen([sys.executable, "-c", _ENGINE_ONLY, str(ir), str(len(ALLOWED))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    pinned = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        threads_of = {int(t): frozenset(c) for t, c in json.loads(out.strip().splitlines()[-1]).items()}
        narrowed = [cpus for cpus in threads_of.values() if cpus != ALLOWED]
        assert all(cpus <= ALLOWED for cpus in narrowed)
        pinned.append(frozenset().union(*narrowed))
    assert not pinned[0] & pinned[1], f"both processes pin threads to CPU(s) {sorted(pinned[0] & pinned[1])}"
