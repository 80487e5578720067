"""The body guard reads a repeated header line as FastAPI does: Content-Type's first line, Content-Encoding's
lines as one list (RFC 9110 5.3). It read the last line of each (a dict of the lines): a text/plain then
application/json body reached FastAPI as text and was refused "Input should be a valid dictionary", and gzip
on two lines undid one gzip of two."""

from __future__ import annotations

import gzip
import json
import socket

import pytest

from openrerank.server import body_coding
from openrerank.server.config import ServerConfig
from tests.server.faults import WAIT_S, HeldCall, InProcessServer, live_while_held, until

BODY = json.dumps({"query": {"text": "paris"}, "passages": [{"text": "paris is a city"}]}).encode()


@pytest.mark.parametrize("types", [("text/plain", "application/json"), ("application/json", "text/plain")])
def test_a_repeated_content_type_is_read_as_fastapi_reads_it(tiny_server, types):
    with tiny_server.client() as c:
        r = c.post("/v1/ranking", content=BODY, headers=[("content-type", t) for t in types])
    assert r.status_code == 200, r.text


def test_content_encoding_on_two_lines_is_one_list(tiny_server):
    twice = gzip.compress(gzip.compress(BODY))
    with tiny_server.client() as c:
        lines = c.post("/v1/ranking", content=twice, headers=[
            ("content-type", "application/json"), ("content-encoding", "gzip"), ("content-encoding", "gzip")])
        one = c.post("/v1/ranking", content=twice, headers={"content-type": "application/json",
                                                              "content-encoding": "gzip, gzip"})
    assert lines.status_code == one.status_code == 200, lines.text
    assert lines.json() == one.json()


def test_a_compressed_body_is_inflated_off_the_event_loop(tiny_model_dir, monkeypatch):
    """16 deflated bodies inflating to 8 MiB each, inflated one after another on the event loop, kept a liveness
    probe waiting 1-2 s. The inflation is held here: the probe must be answered meanwhile (on the loop, it could
    not be until the inflation ended), and the request then answers normally."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    held = HeldCall(body_coding.decode)
    monkeypatch.setattr(body_coding, "decode", held)
    with InProcessServer(config) as server:
        live_while_held(server, held, lambda c: c.post("/v1/ranking", content=gzip.compress(BODY), headers={
            "content-type": "application/json", "content-encoding": "gzip"}), "inflated")


def read_answer(sock: socket.socket) -> tuple[bytes, dict]:
    """The status line and JSON body of the one answer on `sock`, read until the server closes."""
    sock.settimeout(WAIT_S)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body)


def head_of(length: int) -> bytes:
    return (b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % length)


def test_an_oversize_body_names_the_variable_that_set_the_limit(env_server):
    """OPENRERANK_MAX_BODY_BYTES=20000 was named `--max-body-bytes` (tests/conftest.py's LIMITS_ENV)."""
    with env_server.client() as c:
        r = c.post("/v1/ranking", content=b" " * 30_000, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["message"] == ("request body of 30000 bytes exceeds the limit of 20000 bytes "
                                   "(OPENRERANK_MAX_BODY_BYTES='20000')")


def test_a_body_too_slow_names_the_variable_that_set_the_timeout(env_server):
    """OPENRERANK_BODY_TIMEOUT=2 was named `--body-timeout`."""
    with socket.create_connection(("127.0.0.1", env_server.port)) as sock:
        sock.sendall(head_of(1000) + b'{"query":')  # declares more than it sends
        status, body = read_answer(sock)
    assert status.startswith(b"HTTP/1.1 408"), status
    assert body["message"] == "request body not received within 2 s (9 bytes arrived; OPENRERANK_BODY_TIMEOUT='2')"


def test_the_bodies_in_flight_refusal_names_the_variable_that_set_their_budget(env_server):
    """OPENRERANK_MAX_BODY_BYTES_IN_FLIGHT=30000 was named `--max-body-bytes-in-flight`: one body of 15,000 bytes
    held (its sender still sending), a second one's 16,000 would pass the budget."""
    def whole_body_of(size: int) -> tuple[bytes, dict]:
        """A whole body: answered at once (refused, or a 4xx for spaces that are not JSON), nothing left held."""
        with socket.create_connection(("127.0.0.1", env_server.port)) as sock:
            sock.sendall(head_of(size) + b" " * size)
            return read_answer(sock)

    answers: list[tuple[bytes, dict]] = []
    with socket.create_connection(("127.0.0.1", env_server.port)) as held:
        held.sendall(head_of(19_000) + b" " * 15_000)
        # until the server has read what was sent (a fixed sleep raced it under load), within its 2 s body timeout
        until(lambda: answers.append(whole_body_of(16_000)) or answers[-1][0].startswith(b"HTTP/1.1 503"),
              "the held body to count")
    _, body = answers[-1]
    assert body["message"].endswith("would pass the limit of 30000 bytes "
                                    "(OPENRERANK_MAX_BODY_BYTES_IN_FLIGHT='30000'); retry later"), body
