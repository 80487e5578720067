"""The connection handling `openrerank serve` adds to uvicorn (`server/http_guard.py`), on a bare ASGI app under
uvicorn in this process: a request answered before its body is read is closed gently, and boundedly; and the
open-file limit `serve` raises at start (`server/http.py`), on a faked `resource`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from openrerank_bench.serve_process import free_port

from openrerank.server import http_guard
from openrerank.server.http import OPEN_MAX, raise_open_files_limit

WAIT_S = 10.0
KEEP_ALIVE_S = 1  # uvicorn's idle keep-alive timeout here (5 s by default)
SLOW_S = 1.5  # what POST /slow takes before it reads its body: longer than the short header timeout below
SEEN: list[str] = []  # the paths refusing_app was called for
REFUSED: list[tuple[int, str | None, str]] = []  # what the guard told of the requests it answered itself


async def refusing_app(scope, receive, send) -> None:
    """POST /refuse: 413 at once, body unread (as the body guard answers a declared oversize); POST /echo: the
    body read, on a connection kept open; else 200 once the body is read whole."""
    if scope["type"] != "http":
        return
    SEEN.append(scope["path"])
    if scope["path"] == "/slow":  # an answer still being computed when the next request's head stalls
        await asyncio.sleep(SLOW_S)
    body = b""
    while scope["path"] != "/refuse":
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    status = 413 if scope["path"] == "/refuse" else 200
    reply, close = (body, []) if scope["path"] in ("/echo", "/slow") else (b"no", [(b"connection", b"close")])
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"%d" % len(reply)), *close]})
    await send({"type": "http.response.body", "body": reply})


class Served:
    def __init__(self, header_timeout: float = 5.0) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(refusing_app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="off", ws="none", http=http_guard.guarded_protocol(
                                                        header_timeout, on_refusal=self.refused),
                                                    timeout_keep_alive=KEEP_ALIVE_S))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @staticmethod
    def refused(status: int, path: str | None, reason: str, client: object) -> None:
        assert client is not None
        REFUSED.append((status, path, reason))

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
def served(request) -> Iterator[Served]:
    SEEN.clear()
    REFUSED.clear()
    s = Served(getattr(request, "param", 5.0))
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
    monkeypatch.setattr(http_guard, "LINGER_S", 0.5)
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        sock.sendall(head("/refuse", 1 << 20) + b"x" * 1000)  # ... and nothing more, nor a close
        assert read_all(sock).startswith(b"HTTP/1.1 413")
        answered = time.monotonic()
        served.wait_closed()
        assert time.monotonic() - answered >= 0.4  # it waited for the client to go quiet


def test_a_client_that_never_stops_sending_is_closed_after_linger_max_s(served, monkeypatch):
    monkeypatch.setattr(http_guard, "LINGER_S", 1.0)  # 20 sends' gaps: a stalled test thread does not end it early
    monkeypatch.setattr(http_guard, "LINGER_MAX_S", 2.5)
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
    monkeypatch.setattr(http_guard, "LINGER_S", 1.0)
    monkeypatch.setattr(http_guard, "LINGER_MAX_S", 30.0)
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
    monkeypatch.setattr(http_guard, "LINGER_S", 60.0)  # a linger would outlast wait_closed
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


H2C_OFFER = (b"connection: Upgrade, HTTP2-Settings", b"upgrade: h2c", b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA")


def exchange(served: Served, *writes: bytes) -> bytes:
    """What the server answers to `writes` (sent 0.2 s apart), read until it closes."""
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(WAIT_S)
        for data in writes:
            sock.sendall(data)
            time.sleep(0.2)
        return read_all(sock)


def test_an_upgrade_offer_it_does_not_take_is_served_with_its_body(served):
    """llhttp stops at the head of a request offering `Upgrade: h2c` (curl --http2, Java's and Ktor's clients
    on plain http): the app got an empty body, and a body sent apart was parsed as the next request."""
    closing = b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    chunked = b"\r\n".join([b"POST /echo HTTP/1.1", b"host: x", b"transfer-encoding: chunked", *H2C_OFFER, b"", b""])
    for writes in ([head("/echo", 5, *H2C_OFFER) + b"hello" + closing],
                   [head("/echo", 5, b"connection: upgrade", b"upgrade: foo/1"), b"hello", closing],
                   [chunked + b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n" + closing]):
        SEEN.clear()
        answer = exchange(served, *writes)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 200 ") == 2, answer
        assert b"\r\n\r\nhelloHTTP/1.1 200 " in answer and SEEN == ["/echo", "/last"]
        served.wait_closed()


def test_an_upgrade_offer_it_does_not_take_with_connection_close_is_served_with_its_body(served):
    """With `Connection: Upgrade, close` llhttp skipped everything after the offer's head, its body too: the
    request waited for a body it never got (the app's body timeout, a 408)."""
    for offer in (b"upgrade: h2c", b"upgrade: websocket"):
        SEEN.clear()
        answer = exchange(served, head("/echo", 5, b"connection: Upgrade, close", offer) + b"hello")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nhello"), answer
        assert SEEN == ["/echo"]
        served.wait_closed()


def test_bytes_after_a_close_offers_body_are_not_read_as_a_request(served):
    """A `Connection: close` request is the connection's last: llhttp drops what follows it. The fresh parse
    after an ignored offer with close forgot the close: what followed the body was parsed as a next request,
    and a garbage one logged and counted as a 400 no client was sent."""
    for offer in (b"", b"upgrade: h2c", b"upgrade: websocket"):
        SEEN.clear()
        REFUSED.clear()
        connection = b"connection: Upgrade, close" if offer else b"connection: close"
        request = head("/echo", 5, connection, *([offer] if offer else [])) + b"hello"
        answer = exchange(served, request + b"GARBAGE \x01\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nhello"), answer
        served.wait_closed()
        assert SEEN == ["/echo"] and REFUSED == [], (offer, REFUSED)


def test_a_malformed_request_pipelined_behind_a_valid_one_is_answered_after_it(served):
    """uvicorn answered the malformed request at once, in plain text, and closed: the valid request's answer
    was lost (and it was logged as the client's disconnect)."""
    answer = exchange(served, head("/echo", 5) + b"hello" + b"garbage\r\n\r\n")
    first, _, rest = answer.partition(b"\r\n\r\nhello")
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 400 "), answer
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])  # in the error shape of the path's dialect
    assert body["object"] == "error" and body["message"].startswith("invalid HTTP request"), body
    served.wait_closed()
    assert SEEN == ["/echo"]


@pytest.mark.parametrize("served", [0.5], indirect=True)  # a header timeout shorter than /slow's answer
def test_a_pipelined_head_that_stalls_is_refused_after_the_answer_before_it(served):
    """The 408 for a next request's head that stalls was written at once and the connection closed, cutting off
    the answer still being computed for the request before it."""
    answer = exchange(served, head("/slow", 5) + b"hello" + b"POST /echo HTTP/1.1\r\nhost: x\r\n")
    first, _, rest = answer.partition(b"\r\n\r\nhello")
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 408 "), answer
    served.wait_closed()
    assert SEEN == ["/slow"]


def test_an_unreadable_body_pipelined_behind_a_valid_request_is_refused_after_its_answer(served):
    """The refusal waited for the refused request's own cycle, which never runs: the 400 never came, and the
    connection closed at the keep-alive timeout."""
    broken = b"\r\n".join([b"POST /echo HTTP/1.1", b"host: x", b"transfer-encoding: chunked", b"", b""])
    answer = exchange(served, head("/echo", 5) + b"hello" + broken + b"ZZ\r\nhello\r\n")
    first, _, rest = answer.partition(b"\r\n\r\nhello")
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 400 "), answer
    assert b"invalid HTTP request" in rest, rest
    served.wait_closed()
    assert SEEN == ["/echo"]


def test_a_proxy_request_is_refused_after_the_answer_before_it(served):
    """`CONNECT host:443` (the one method llhttp takes an authority-form target for) failed inside uvicorn's
    parser callback: a bare "User callback error", charged to the request before it, whose answer was dropped."""
    target = b"example.com:443"
    answer = exchange(served, head("/echo", 5) + b"hello" + b"CONNECT " + target + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    first, _, rest = answer.partition(b"\r\n\r\nhello")
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 400 "), answer
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])  # not a path of any dialect: NIM's shape
    assert body["object"] == "error" and f"request target '{target.decode()}' is not a path" in body["message"], body
    served.wait_closed()
    assert SEEN == ["/echo"]


def test_an_unreadable_body_is_refused_at_once(served):
    """The request whose body cannot be read is the one answered 400, without waiting for its app."""
    start = time.monotonic()
    broken = b"\r\n".join([b"POST /echo HTTP/1.1", b"host: x", b"transfer-encoding: chunked", b"", b""])
    answer = exchange(served, broken + b"ffffffffffffffffff\r\nhello\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"invalid HTTP request" in answer, answer
    served.wait_closed()
    assert time.monotonic() - start < 5


def test_a_transfer_coding_other_than_chunked_gets_501(served):
    """llhttp takes `Transfer-Encoding: gzip, chunked` and handed the app the body still gzipped as if it were
    the request's (RFC 9112 section 6.1: 501 for a transfer coding the server does not know)."""
    request = b"\r\n".join([b"POST /echo HTTP/1.1", b"host: x", b"transfer-encoding: gzip, chunked", b"", b""])
    answer = exchange(served, request + b"5\r\nhello\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501 "), answer
    assert "Transfer-Encoding 'gzip'" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]
    served.wait_closed()
    assert SEEN == []


def test_each_request_the_guard_answers_itself_is_told_once_with_its_path_and_why(served):
    """They were in no metric and no access line (the app never had them): an unreadable request left only
    uvicorn's bare "Invalid HTTP request received." at WARNING."""
    exchange(served, b"garbage\r\n\r\n")
    exchange(served, head("/echo", 5) + b"hello" + b"CONNECT example.com:443 HTTP/1.1\r\nhost: x\r\n\r\n")
    exchange(served, b"POST /v1/rerank HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
    exchange(served, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 70_000 + b"\r\n\r\n")
    (garbage, connect, coding, large) = REFUSED
    assert garbage[:2] == (400, None) and garbage[2].startswith("invalid HTTP request: "), garbage
    assert connect[:2] == (400, "example.com:443") and "not a proxy" in connect[2], connect
    assert coding[:2] == (501, "/v1/rerank") and "gzip" in coding[2], coding
    assert large[:2] == (431, "/v1/models") and "--max-header-bytes" in large[2], large
    assert SEEN == ["/echo"]  # the app had none of them


@pytest.mark.parametrize("served", [0.5], indirect=True)
def test_a_stalled_head_is_told_but_a_connection_that_sent_nothing_is_no_request(served):
    exchange(served, b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\n")  # ... and never the rest
    with socket.create_connection(("127.0.0.1", served.port)) as sock:  # nothing at all
        sock.settimeout(WAIT_S)
        assert read_all(sock).startswith(b"HTTP/1.1 408")  # answered, but it made no request to count
    assert [(status, path) for status, path, _ in REFUSED] == [(408, "/v1/ranking")]
    assert "--header-timeout" in REFUSED[0][2]


def test_headers_too_large_name_the_variable_that_set_the_limit(env_server):
    """`openrerank serve` hands the guard how the operator set its limits: OPENRERANK_MAX_HEADER_BYTES=4096
    (tests/conftest.py's LIMITS_ENV) was named `--max-header-bytes`, in the answer and the access log."""
    answer = exchange(env_server, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 5000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    named = "(OPENRERANK_MAX_HEADER_BYTES='4096')"
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"] == f"request headers exceed 4096 bytes {named}"
    assert f"request headers over 4096 bytes {named}" in env_server.output()


def test_headers_too_slow_name_the_variable_that_set_the_timeout(env_server):
    """OPENRERANK_HEADER_TIMEOUT=1 was named `--header-timeout`, in the answer and the access log."""
    answer = exchange(env_server, b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\n")  # ... and never the rest
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    why = "request headers not received within 1 s (OPENRERANK_HEADER_TIMEOUT='1')"
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"] == why
    assert why in env_server.output()


WEBSOCKET_OFFER = (b"upgrade: websocket\r\nconnection: Upgrade, close\r\n"
                   b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n")


def test_a_websocket_upgrade_offer_is_served_as_plain_http(env_server):
    """The server has no WebSocket routes, but uvicorn took every `Upgrade: websocket` request into its
    handshake: an empty 403 (a valid key) or a text/plain 400 on any path, a health route included, in no
    access log. `serve` runs uvicorn with ws="none": the offer is ignored, as an h2c one is."""
    ready = exchange(env_server, b"GET /v1/health/ready HTTP/1.1\r\nhost: x\r\n" + WEBSOCKET_OFFER + b"\r\n")
    assert ready.startswith(b"HTTP/1.1 200 "), ready[:300]
    body = b'{"bad": 1}'
    bad = exchange(env_server, b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\n" % len(body) + WEBSOCKET_OFFER + b"\r\n" + body)
    assert bad.startswith(b"HTTP/1.1 400 "), bad[:300]
    answer = json.loads(bad.split(b"\r\n\r\n", 1)[1])  # NIM's error shape, from the app's own handlers
    assert answer["object"] == "error" and answer["type"] == "validation", answer
    request_id = dict(line.split(b": ", 1) for line in bad.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])[
        b"x-request-id"].decode()
    deadline = time.monotonic() + WAIT_S  # its access line is written once the answer has gone out
    while f"request_id={request_id}" not in env_server.output():
        assert time.monotonic() < deadline, "no access line for the request"
        time.sleep(0.05)


class FakeNofile:
    """RLIMIT_NOFILE as a host gives it: the limits, and the soft limits setrlimit refuses (as macOS refuses any
    above OPEN_MAX with EINVAL, a ValueError in Python, even under an unlimited hard limit)."""

    def __init__(self, soft: int, hard: int, refused) -> None:
        self.limits, self.refused, self.asked = (soft, hard), refused, []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.asked.append(limits)
        if self.refused(limits[0]):
            raise ValueError("current limit exceeds maximum limit")
        self.limits = limits


def _nofile(monkeypatch, soft: int, hard: int, refused) -> FakeNofile:
    fake = FakeNofile(soft, hard, refused)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    return fake


@pytest.mark.parametrize("infinity", [resource.RLIM_INFINITY, 2**63 - 1])  # this host's; macOS's
def test_macos_unlimited_hard_open_file_limit_raises_the_soft_one_to_open_max(monkeypatch, caplog, infinity):
    """macOS: soft 256, hard unlimited, and setrlimit refuses more than OPEN_MAX: the limit stayed at 256, and
    connections past about 250 were dropped without a word."""
    monkeypatch.setattr(resource, "RLIM_INFINITY", infinity)
    fake = _nofile(monkeypatch, 256, infinity, lambda soft: soft == infinity or soft > OPEN_MAX)
    with caplog.at_level("WARNING", logger="openrerank.server.http"):
        assert raise_open_files_limit() == OPEN_MAX == 10240
    assert fake.asked == [(infinity, infinity), (OPEN_MAX, infinity)] and fake.limits == (OPEN_MAX, infinity)
    assert not caplog.records


def test_the_soft_open_file_limit_goes_to_the_hard_one_and_a_refusal_below_open_max_is_warned_of(monkeypatch,
                                                                                                   caplog):
    fake = _nofile(monkeypatch, 1024, 65536, lambda soft: False)
    assert raise_open_files_limit() == 65536 and fake.asked == [(65536, 65536)]
    fake = _nofile(monkeypatch, 256, 4096, lambda soft: True)  # OPEN_MAX is above the hard limit: not asked
    with caplog.at_level("WARNING", logger="openrerank.server.http"):
        assert raise_open_files_limit() == 256
    assert fake.asked == [(4096, 4096)] and "the open-file limit is 256" in caplog.text
