"""`openrerank serve --replicas N` stopping (server/ray_local.py, server/ray_drain.py): it drains as one server
does (server/drain.py), in what the clients see.

Before, the launcher called serve.shutdown() at once, which took Serve's proxy down under the requests still
being scored: the client lost its answer ("Server disconnected without sending a response") although the
replica computed it. Then serve.delete() drained them, but took the route off the proxy at once (a new request,
a readiness probe: Serve's plain-text 404), let Serve kill a replica whose request outlasted the grace period
(Serve's plain-text 500, not the app's 503), and a second signal cut every connection (exit 130, a
KeyboardInterrupt traceback). The work each request holds is sized on this machine
(tests/server/test_shutdown.py).
"""

from __future__ import annotations

import concurrent.futures
import math
import shutil
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from openrerank.server.ray_drain import reports
from openrerank.server.ray_local import descendants
from tests.server.test_shutdown import passages, seconds_per_passage
from tests.support import ServerProcess, nim_body

#: seconds of scoring each in-flight request holds, on whatever machine runs this: many times the wait before
#: the signal, so both are still being scored when it comes (checked below: they answer after it)
WORK_S = 6
#: How long the requests may take to reach the replicas, and the drain to show (a replica looks at the
#: launcher's flag and reports what it holds every 0.1 s).
SHOWS_S = 30


def start(tmp_path, grace: float) -> ServerProcess:
    """Two replicas; the grace period set as an operator's container sets it, by its variable."""
    server = ServerProcess(["--replicas", "2", "--threads", "1"], tmp_path,
                           env={"RAY_DEDUP_LOGS": "0", "OPENRERANK_GRACEFUL_TIMEOUT": str(grace)})
    server.wait_ready(240)
    return server


def in_flight(server: ServerProcess, tags: tuple[str, ...], pool: concurrent.futures.Executor, work_s: float
              ) -> tuple[list[concurrent.futures.Future], int]:
    """Requests holding `work_s` seconds of scoring each, sent now; (their futures, passages each)."""
    with server.client() as c:
        n = min(512, math.ceil(work_s / seconds_per_passage(c)))

    def post(tag: str) -> tuple[httpx.Response, float]:
        with server.client() as c:
            return c.post("/v1/ranking", json=nim_body(tag, passages(tag, n), truncate="END")), time.monotonic()

    # the signal comes once the replicas hold them all (a request still on its way would be refused 503), as
    # they report it every 0.1 s: first the report of the timing requests above must be gone
    deadline = time.monotonic() + SHOWS_S
    while (now := held(server)) > 0:
        assert time.monotonic() < deadline, f"the replicas still report {now} requests held"
        time.sleep(0.05)
    futures = [pool.submit(post, tag) for tag in tags]
    while (now := held(server)) < len(tags):
        assert time.monotonic() < deadline, f"the replicas hold {now} of the {len(tags)} requests sent"
        assert not any(f.done() for f in futures), [f.result()[0].text[:300] for f in futures if f.done()]
        time.sleep(0.05)
    return futures, n


def held(server: ServerProcess) -> int:
    """The requests the server's replicas hold, as they report them to its launcher (server/ray_drain.py), in
    the launcher's private directory: the one whose replicas are this server's processes."""
    ours = set(descendants(server.proc.pid))
    for directory in Path(tempfile.gettempdir()).glob("openrerank-drain-*"):
        found = reports(directory)
        if found and set(found) <= ours:
            return sum(report.held for report in found.values())
    return 0


def is_unavailable(r: httpx.Response, says: str) -> bool:
    """The NIM dialect's retryable 503 (not Serve's plain-text 404 or 500), saying `says`."""
    return (r.status_code == 503 and r.headers["content-type"] == "application/json"
            and r.json()["object"] == "error" and says in r.json()["message"] and r.headers["retry-after"] == "1")


def refused_while_draining(server: ServerProcess) -> None:
    """New requests get 200 until a replica has seen the drain, then the dialect's 503 (never a 404), and the
    readiness probe soon says 503."""
    deadline = time.monotonic() + SHOWS_S
    with server.client() as c:
        while True:
            r = c.post("/v1/ranking", json=nim_body("new", ["a", "b"]))
            if r.status_code != 200:
                break
            assert time.monotonic() < deadline, "the drain never refused a new request"
            time.sleep(0.05)
        assert is_unavailable(r, "shutting down and takes no new requests"), (r.status_code, r.text)
        # each replica sees the flag on its own (every 0.1 s, later on a loaded machine), and the proxy sends a
        # probe to either: ready until the one it reaches has seen it, then 503 (never Serve's 404)
        while (ready := c.get("/v1/health/ready")).status_code == 200:
            assert time.monotonic() < deadline, "the readiness probe never said 503"
            time.sleep(0.05)
        assert ready.status_code == 503, (ready.status_code, ready.text)


def test_ctrl_c_drains_the_requests_in_flight_and_refuses_new_ones(tmp_path):
    server = start(tmp_path, 60)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures, n = in_flight(server, ("a", "b"), pool, WORK_S)
            server.proc.send_signal(signal.SIGINT)
            signalled = time.monotonic()
            refused_while_draining(server)
            answers = [f.result(timeout=180) for f in futures]
        for r, done in answers:
            assert r.status_code == 200 and len(r.json()["rankings"]) == n, r.text[:300]
            assert done > signalled, "a request finished before the signal: raise WORK_S"
        assert server.proc.wait(timeout=120) == 0
    finally:
        server.stop()


def test_a_request_past_the_grace_period_gets_the_dialects_503(tmp_path):
    grace = 1
    server = start(tmp_path, grace)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            futures, _ = in_flight(server, ("a",), pool, grace + WORK_S)
            server.proc.send_signal(signal.SIGTERM)
            r, _ = futures[0].result(timeout=180)
        # at the grace period's end, or at once where the replica's scheduler sees it cannot finish by then
        # (`Scheduler.drain_by`: "would not be finished before its grace period ends")
        assert is_unavailable(r, "grace period"), (r.status_code, r.text)
        assert server.proc.wait(timeout=120) == 0
        # named as set: the launcher said `--graceful-timeout`, a flag nobody typed
        assert "the replicas hold, for up to 1 s (OPENRERANK_GRACEFUL_TIMEOUT='1')" in server.output()
    finally:
        server.stop()


def test_a_second_signal_answers_503_now_and_exits_0(tmp_path):
    server = start(tmp_path, 60)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            futures, _ = in_flight(server, ("a",), pool, 4 * WORK_S)
            server.proc.send_signal(signal.SIGTERM)
            refused_while_draining(server)  # the replicas drain: the first signal has been taken
            server.proc.send_signal(signal.SIGTERM)
            r, _ = futures[0].result(timeout=180)
        assert is_unavailable(r, "second shutdown signal"), (r.status_code, r.text)
        assert server.proc.wait(timeout=120) == 0
        assert "KeyboardInterrupt" not in server.output()
    finally:
        server.stop()


def replica_loading(pid: int) -> bool:
    """Whether a replica of the launcher `pid` has started (Ray titles its process `ray::ServeReplica:...`)."""
    for child in descendants(pid):
        try:
            if b"ServeReplica" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize(("sig", "when"), [
    (signal.SIGTERM, "replica"), (signal.SIGINT, "replica"),
    (signal.SIGTERM, "ray"),  # inside ray.init, whose own handler exited 15
])
def test_a_signal_while_the_replicas_load_stops_the_start(tmp_path, sig, when):
    """It was taken only once every replica had loaded (serve.run waits without looking at signals): the launcher
    printed "ready", then drained, long after the signal (Kubernetes' SIGKILL comes after 30 s)."""
    server = ServerProcess(["--replicas", "1", "--threads", "1"], tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not (replica_loading(server.proc.pid) if when == "replica" else descendants(server.proc.pid)):
            assert server.proc.poll() is None, server.output()[-3000:]
            assert time.monotonic() < deadline, f"no {when} process started"
            time.sleep(0.02)
        seen = set(descendants(server.proc.pid))
        server.proc.send_signal(sig)
        signalled = time.monotonic()
        while server.proc.poll() is None:  # every process it starts meanwhile, to find any left behind
            seen |= set(descendants(server.proc.pid))
            assert time.monotonic() < signalled + 60, "the launcher did not stop"
            time.sleep(0.05)
        output = server.output()
        assert server.proc.returncode == 0, output[-3000:]
        assert " ready on " not in output and "stopping before every replica started" in output, output[-3000:]
        time.sleep(2)
        assert not [p for p in seen if Path(f"/proc/{p}").exists()], "processes left behind"
    finally:
        server.stop()


def test_a_replica_that_does_not_start_ends_the_start_with_exit_1(tmp_path, tiny_model_dir):
    """Serve's DEPLOY_FAILED (here a model whose weights do not load in the replica, past the launcher's checks)
    is one error line and exit 1, never "ready" (`ray_local.start_replicas`, which replaced serve.run's raise)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    server = ServerProcess(["--replicas", "1", "--threads", "1", "--model", f"broken={broken}"], tmp_path)
    try:
        assert server.proc.wait(timeout=240) == 1, server.output()[-3000:]
        output = server.output()
        assert "openrerank serve: error: the replicas did not start: " in output, output[-3000:]
        assert " ready on " not in output
    finally:
        server.stop()
