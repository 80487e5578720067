"""The body guard reads a repeated header line as FastAPI does: Content-Type's first line, Content-Encoding's
lines as one list (RFC 9110 5.3). It read the last line of each (a dict of the lines): a text/plain then
application/json body reached FastAPI as text and was refused "Input should be a valid dictionary", and gzip
on two lines undid one gzip of two."""

from __future__ import annotations

import gzip
import json

import pytest

from openrerank.server import body_coding
from openrerank.server.config import ServerConfig
from tests.server.faults import HeldCall, InProcessServer, live_while_held

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
