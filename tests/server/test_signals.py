"""Signals at awkward moments, on a real server process: while the models load, with work nobody waits for any
more, a second and a third signal, a body still arriving when the grace period ends (docs/reliability.md,
Shutdown).

The stuck work is made to order (`stalling_serve.py`: a load, a tokenization or a clean-up that waits for
ever), so nothing here is timed: "exits" means within EXIT_S, where before the process never exited (or
only when the stuck work ended, 55 s for a real model's load)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from openrerank.engine.preparing import INLINE_TEXTS
from tests.server.faults import in_thread, until
from tests.server.stalling_serve import LOAD_STALLED, MODELS_STOPPED, QUERY_STALLED, STOP_STALLED
from tests.server.test_shutdown import in_flight
from tests.support import ServerProcess, nim_body, run_server

STALLING = [str(Path(__file__).with_name("stalling_serve.py"))]
#: How long a stopping server may take here: far more than it needs, far less than "never".
EXIT_S = 30


@contextlib.contextmanager
def stalling_server(tmp_path: Path, model_dir: Path, stall: dict[str, str], *args: str) -> Iterator[ServerProcess]:
    server = ServerProcess(["--model", f"tiny={model_dir}", "--backend", "torch", "--threads", "1", *args],
                           tmp_path, env=stall, program=STALLING)
    try:
        yield server
    finally:
        if server.proc.poll() is None:  # it did not exit (the failure being tested): don't leave it behind
            server.proc.kill()
            server.proc.wait()


def exit_status(server: ServerProcess, what: str) -> int:
    try:
        return server.proc.wait(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server was still running {EXIT_S} s after {what}:\n{server.output()[-3000:]}")


def wait_live(server: ServerProcess) -> None:
    def live() -> bool:
        assert server.proc.poll() is None, server.output()[-3000:]
        try:
            return httpx.get(f"{server.url}/v1/health/live", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    until(live, "the server to answer /v1/health/live")


def fails(get, url: str) -> bool:
    try:
        get(url, timeout=5)
    except httpx.TransportError:
        return True
    return False


def rank_in_thread(server: ServerProcess, query: str):
    def post() -> httpx.Response:
        with server.client() as c:
            # more texts than a slice tokenized on the event loop (`preparing.tiny`): a long tokenization, which
            # the stall stands for, runs on a worker thread
            return c.post("/v1/ranking", json=nim_body(query, ["a river", "a road"] * INLINE_TEXTS))

    return in_thread(post)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_models_load_exits_without_waiting_for_the_load(tmp_path, tiny_model_dir, sig):
    # Before, closing the event loop joined the thread loading the model (a Python thread cannot be stopped),
    # and every further signal was ignored: the process ended when the load did, here never.
    with stalling_server(tmp_path, tiny_model_dir, {"STALL_LOAD": "1"}) as server:
        wait_live(server)
        until(lambda: LOAD_STALLED in server.output(), "the model load to begin")
        assert httpx.get(f"{server.url}/v1/health/ready", timeout=5).status_code == 503
        server.proc.send_signal(sig)
        status = exit_status(server, f"{sig.name} during the model load")
    log = server.output()
    assert status == 0, log[-3000:]
    assert "stopping before every model was loaded (not loaded: tiny)" in log
    assert "exiting without waiting for 1 job" in log
    assert "Traceback" not in log and " ERROR " not in log


def test_work_abandoned_at_the_end_of_the_grace_period_does_not_keep_the_process(tmp_path, tiny_model_dir):
    # The request is answered 503 when the grace period ends, but its tokenization goes on in a worker thread
    # (images being tiled, in the case reported); before, the process waited for that thread to end.
    with stalling_server(tmp_path, tiny_model_dir, {"STALL_QUERY": "stuck"}, "--graceful-timeout", "1") as server:
        server.wait_ready(180)
        answer = rank_in_thread(server, "stuck")
        until(lambda: QUERY_STALLED in server.output(), "the request's tokenization to begin")
        server.proc.send_signal(signal.SIGTERM)
        response = answer()
        status = exit_status(server, "the grace period ended")
    log = server.output()
    assert response.status_code == 503 and "1 s grace period" in response.json()["message"], response.text
    assert status == 0, log[-3000:]
    assert MODELS_STOPPED in log and "exiting without waiting for 1 job" in log


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_answers_what_still_runs_now_and_still_cleans_up(tmp_path, tiny_model_dir, second):
    # Before, a second SIGINT was uvicorn's force-quit: the request was told its 120 s grace period had run out,
    # the lifespan was cancelled (the models never stopped) with a CancelledError traceback; a second SIGTERM
    # did nothing at all.
    with stalling_server(tmp_path, tiny_model_dir, {"STALL_QUERY": "stuck"}, "--graceful-timeout", "120") as server:
        server.wait_ready(180)
        answer = rank_in_thread(server, "stuck")
        until(lambda: QUERY_STALLED in server.output(), "the request's tokenization to begin")
        with server.client() as probe:
            assert probe.get("/v1/health/ready").status_code == 200  # its connection is kept alive
            server.proc.send_signal(signal.SIGINT)
            # while draining, a readiness probe fails by its connection (docs/reliability.md): the kept one is
            # closed, a new one refused
            until(lambda: fails(probe.get, "/v1/health/ready"), "the kept-alive probe to fail")
            until(lambda: fails(httpx.get, f"{server.url}/v1/health/ready"), "a new probe to be refused")
        assert "shutting down: finishing accepted requests" in server.output()
        server.proc.send_signal(second)
        response = answer()
        status = exit_status(server, f"a second signal ({second.name})")
    log = server.output()
    message = response.json()["message"]
    assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
    assert "a second shutdown signal" in message and "grace period" not in message, message
    assert status == 0, log[-3000:]
    assert MODELS_STOPPED in log  # the clean-up ran
    assert "Traceback" not in log and " ERROR " not in log and "CancelledError" not in log
    assert "force quit" not in log  # uvicorn's line: not what a second signal does here


def test_a_signal_after_the_grace_period_ended_exits_at_once(tmp_path, tiny_model_dir):
    # The clean-up sticks (a model worker finishing a long batch, say): one more signal must end the process.
    with stalling_server(tmp_path, tiny_model_dir, {"STALL_STOP": "1"}, "--graceful-timeout", "60") as server:
        server.wait_ready(180)
        server.proc.send_signal(signal.SIGTERM)
        until(lambda: STOP_STALLED in server.output(), "the clean-up to begin")
        server.proc.send_signal(signal.SIGTERM)  # ends the grace period now
        until(lambda: "shutting down now (a second signal)" in server.output(), "the grace period to end")
        server.proc.send_signal(signal.SIGTERM)  # and this one the process
        status = exit_status(server, "a third signal")
    log = server.output()
    assert status == 128 + signal.SIGTERM, log[-3000:]
    assert "SIGTERM after the grace period ended: exiting now, without the clean-up" in log
    assert MODELS_STOPPED not in log


def test_a_body_still_arriving_when_the_grace_period_ends_is_answered_503_then(tmp_path, tiny_model_dir):
    # Before, the body guard waited only on --body-timeout while reading: the request was cut by uvicorn's own
    # deadline 3 s later, which logged "ERROR ... Cancel 1 running task(s), timeout graceful shutdown exceeded".
    args = ["--model", f"tiny={tiny_model_dir}", "--graceful-timeout", "1", "--body-timeout", "300"]
    body = b'{"query": {"text": "rivers"}, "passages": [{"text": "a river"}]}'
    with run_server(args, tmp_path) as server, server.client() as c, \
            socket.create_connection(("127.0.0.1", server.port)) as upload:
        upload.sendall(b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
        until(lambda: in_flight(c) >= 2, "the upload to be in flight")  # it and this metrics request
        server.proc.send_signal(signal.SIGTERM)
        upload.settimeout(EXIT_S)
        answer = b""
        deadline = time.monotonic() + EXIT_S
        while time.monotonic() < deadline and (chunk := upload.recv(65536)):
            answer += chunk
        status = exit_status(server, "the grace period ended")
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in head.lower() and b'"object":"error"' in payload and b"grace period" in payload
    log = server.output()
    assert status == 0
    assert "still sending its body when the shutdown grace period ended" in log
    assert "timeout graceful shutdown exceeded" not in log and " ERROR " not in log
