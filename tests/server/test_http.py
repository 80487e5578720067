"""The connection handling `openrerank serve` adds to uvicorn (`server/http.py`), on a bare ASGI app under
uvicorn in this process: a request answered before its body is read is closed gently, and boundedly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from openrerank_bench.serve_process import free_port

from openrerank.server import http

WAIT_S = 10.0
KEEP_ALIVE_S = 1  # uvicorn's idle keep-alive timeout here (5 s by default)
SEEN: list[str] = []  # the paths refusing_app was called for


async def refusing_app(scope, receive, send) -> None:
    """POST /refuse: 413 at once, body unread (as the body guard answers a declared oversize); else 200
    once the body is read whole."""
    if scope["type"] != "http":
        return
    SEEN.append(scope["path"])
    if scope["path"] != "/refuse":
        while (await receive()).get("more_body"):
            pass
    status = 413 if scope["path"] == "/refuse" else 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"2"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": b"no"})


class Served:
    def __init__(self) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(refusing_app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="off", http=http.guarded_protocol(5.0),
                                                    timeout_keep_alive=KEEP_ALIVE_S))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def wait_accepted(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.connections():
            assert time.monotonic() < deadline, "the server never accepted the connection"
            time.sleep(0.01)

    def wait_closed(self) -> float:
        """Seconds until the server holds no connection (fails after WAIT_S)."""
        start = time.monotonic()
        while self.connections():
            assert time.monotonic() - start < WAIT_S, "the server kept the connection"
            time.sleep(0.02)
        return time.monotonic() - start


@pytest.fixture
def served() -> Iterator[Served]:
    SEEN.clear()
    s = Served()
    s.thread.start()
    deadline = time.monotonic() + WAIT_S
    while not s.server.started:
        assert time.monotonic() < deadline and s.thread.is_alive(), "server not started"
        time.sleep(0.02)
    yield s
    s.server.should_exit = True
    s.thread.join(WAIT_S)


def head(path: str, length: int, *extra: bytes) -> bytes:
    return b"\r\n".join([b"POST %s HTTP/1.1" % path.encode(), b"host: x", b"content-length: %d" % length,
                         *extra, b"", b""])


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_client_sending_its_whole_body_before_reading_gets_the_early_answer(served):
    """Without the gentle close the server closed with the body unread: the kernel reset the connection,
    the client's send failed, and the 413 already sent was lost with it."""
    body = b"x" * (32 << 20)  # far more than the socket buffers hold
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        sock.sendall(head("/refuse", len(body)) + body)
        assert read_all(sock).startswith(b"HTTP/1.1 413")
    served.wait_closed()


def test_expect_100_continue_gets_the_refusal_without_the_body(served):
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        sock.sendall(head("/refuse", 32 << 20, b"expect: 100-continue"))
        answer = read_all(sock)  # the server half-closes after its answer
        assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer
    served.wait_closed()


def test_a_quiet_client_is_closed_linger_s_after_the_answer(served, monkeypatch):
    monkeypatch.setattr(http, "LINGER_S", 0.5)
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        sock.sendall(head("/refuse", 1 << 20) + b"x" * 1000)  # ... and nothing more, nor a close
        assert read_all(sock).startswith(b"HTTP/1.1 413")
        answered = time.monotonic()
        served.wait_closed()
        assert time.monotonic() - answered >= 0.4  # it waited for the client to go quiet


def test_a_client_that_never_stops_sending_is_closed_after_linger_max_s(served, monkeypatch):
    monkeypatch.setattr(http, "LINGER_S", 1.0)  # 20 sends' gaps: a stalled test thread does not end it early
    monkeypatch.setattr(http, "LINGER_MAX_S", 2.5)
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(head("/refuse", 1 << 30))
        served.wait_accepted()

        def trickle() -> None:  # never quiet for LINGER_S
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    sock.sendall(b"x" * 1000)
                    time.sleep(0.05)

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            assert 2.0 < served.wait_closed() < WAIT_S
        finally:
            stop.set()
            sender.join(WAIT_S)


def test_the_keep_alive_timeout_does_not_cut_a_linger_short(served, monkeypatch):
    """A body still arriving over a slow link outlasts uvicorn's keep-alive timeout; closing then would reset
    the connection under the client as closing at once did."""
    monkeypatch.setattr(http, "LINGER_S", 1.0)
    monkeypatch.setattr(http, "LINGER_MAX_S", 30.0)
    sending_s = KEEP_ALIVE_S + 1.5
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        sock.sendall(head("/refuse", 1 << 30))
        start = time.monotonic()
        while time.monotonic() - start < sending_s:  # raises if the server resets the connection
            sock.sendall(b"x" * 1000)
            time.sleep(0.05)
        assert read_all(sock).startswith(b"HTTP/1.1 413")
        served.wait_closed()


def test_a_request_read_whole_is_closed_at_once(served, monkeypatch):
    monkeypatch.setattr(http, "LINGER_S", 60.0)  # a linger would outlast wait_closed
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        sock.sendall(head("/read", 5) + b"hello")
        assert read_all(sock).startswith(b"HTTP/1.1 200")
        served.wait_closed()


def test_requests_pipelined_behind_a_refused_one_are_dropped_as_a_close_drops_them(served):
    """A refusal with `Connection: close` ends the connection: a request queued behind it must not run, nor
    write its answer after the server has half-closed."""
    refused = head("/refuse", 2) + b"no"
    queued = head("/read", 5) + b"hello"
    unfinished = head("/read", 1 << 20) + b"x" * 1000  # still arriving when the refusal goes out
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        sock.sendall(refused + queued + unfinished)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413") and answer.count(b"HTTP/1.1") == 1
    served.wait_closed()
    assert SEEN == ["/refuse"]
