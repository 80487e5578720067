"""serve --otlp-endpoint: each scored request is a server span with tokenize/queue/inference children, joined
to the caller's trace; received by a real OTLP/HTTP endpoint (a tiny collector in this process)."""

from __future__ import annotations

import http.server
import threading
import time
from typing import ClassVar

import pytest

from tests.support import nim_body, run_server

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/v1/traces":
            _Collector.received.append(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _spans(payloads: list[bytes]) -> list:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for raw in payloads:
        req = ExportTraceServiceRequest()
        req.ParseFromString(raw)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
    return spans


def test_request_spans_reach_an_otlp_endpoint(tmp_path, tiny_model_dir):
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        args = ["--model", f"tiny={tiny_model_dir}", "--otlp-endpoint", endpoint]
        with run_server(args, tmp_path, env={"OTEL_BSP_SCHEDULE_DELAY": "200"}) as server:
            with server.client() as c:
                resp = c.post("/v1/ranking", json=nim_body("paris", ["a", "b"]),
                              headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
            assert resp.status_code == 200
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(_spans(_Collector.received)) < 4:
                time.sleep(0.2)
    finally:
        collector.shutdown()
    spans = _spans(_Collector.received)
    by_name = {s.name: s for s in spans}
    assert {"POST /v1/ranking", "tokenize", "queue", "inference"} <= set(by_name), sorted(by_name)
    root = by_name["POST /v1/ranking"]
    assert root.trace_id.hex() == trace_id  # joined to the caller's trace
    for stage in ("tokenize", "queue", "inference"):
        child = by_name[stage]
        assert child.parent_span_id == root.span_id and child.trace_id == root.trace_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["openrerank.model"].string_value == "tiny" and attrs["openrerank.passages"].int_value == 2
