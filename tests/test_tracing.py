"""serve --otlp-endpoint: every request is a server span (a scored one with tokenize/queue/inference children),
joined to the caller's trace; received by a real OTLP/HTTP endpoint (a tiny collector in this process), or, in
process, by the SDK's in-memory exporter. A collector that never answers does not hold a stopping server."""

from __future__ import annotations

import contextlib
import http.server
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from openrerank.observe.tracing import SERVICE_NAME, SHUTDOWN_WAIT_S, Tracer
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from tests.support import ServerProcess, nim_body, run_server

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")


class Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/v1/traces":
            Collector.received.append(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def received_spans(payloads: list[bytes]) -> list:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for raw in payloads:
        req = ExportTraceServiceRequest()
        req.ParseFromString(raw)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
    return spans


@contextlib.contextmanager
def collector() -> Iterator[str]:
    """A tiny OTLP/HTTP endpoint in this process: its URL; what it receives is in `Collector.received`."""
    Collector.received.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_request_spans_reach_an_otlp_endpoint(tmp_path, tiny_model_dir):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with collector() as endpoint:
        args = ["--model", f"tiny={tiny_model_dir}", "--otlp-endpoint", endpoint]
        with run_server(args, tmp_path, env={"OTEL_BSP_SCHEDULE_DELAY": "200"}) as server:
            with server.client() as c:
                resp = c.post("/v1/ranking", json=nim_body("paris", ["a", "b"]),
                              headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
            assert resp.status_code == 200
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(received_spans(Collector.received)) < 4:
                time.sleep(0.2)
    spans = received_spans(Collector.received)
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



TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}


@pytest.fixture
def exported(monkeypatch) -> Callable[[], list]:
    """In this process, an app's tracer exports to the SDK's InMemorySpanExporter instead of OTLP/HTTP: call
    the result for every span exported so far (an app's spans are all there once it has stopped)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporters: list[InMemorySpanExporter] = []

    def exporter(**kw) -> InMemorySpanExporter:
        exporters.append(InMemorySpanExporter())
        return exporters[-1]

    monkeypatch.setattr("opentelemetry.exporter.otlp.proto.http.trace_exporter.OTLPSpanExporter", exporter)
    return lambda: [span for e in exporters for span in e.get_finished_spans()]


def traced(**kw) -> ServerConfig:
    return ServerConfig(otlp_endpoint="http://127.0.0.1:1", **kw)


def test_every_request_is_a_span_and_only_a_server_fault_is_an_error(tiny_model_dir, exported):
    """Before, only a request that reached a model had a span: a 4xx or 5xx had none (README: a span per
    request). Now each has one, ERROR for a 5xx only (OTel's HTTP conventions: a 4xx is the client's mistake),
    with children only for the stages it reached; probes are not traced (one every few seconds)."""
    from opentelemetry.trace import StatusCode

    with TestClient(create_app(traced(models=[f"tiny={tiny_model_dir}"]), wait_for_models=True)) as c:
        assert c.post("/v1/ranking", json=nim_body("paris", ["a", "b"]), headers=TRACEPARENT).status_code == 200
        assert c.post("/v1/ranking", json={"query": {"text": "a"}}, headers=TRACEPARENT).status_code == 400
        assert c.get("/no/such/path", headers=TRACEPARENT).status_code == 404
        assert c.get("/v1/health/ready").status_code == 200
    with TestClient(create_app(traced(models=["default"]), load_models=False)) as c:  # not ready: a 503
        assert c.post("/v1/ranking", json=nim_body("q", ["a"]), headers=TRACEPARENT).status_code == 503
    spans = exported()
    servers = [s for s in spans if s.parent is None or s.parent.is_remote]
    by_status = {s.attributes["http.response.status_code"]: s for s in servers}
    assert sorted(by_status) == [200, 400, 404, 503], [s.name for s in servers]  # no span for the probe
    for span in servers:
        assert f"{span.context.trace_id:032x}" == TRACE_ID  # each joined to the caller's trace
    assert by_status[404].name == "GET unmatched" and by_status[400].name == "POST /v1/ranking"
    assert by_status[503].status.status_code == StatusCode.ERROR
    assert all(by_status[s].status.status_code == StatusCode.UNSET for s in (200, 400, 404))
    children = [s for s in spans if s.parent is not None and not s.parent.is_remote]
    assert {s.name for s in children} == {"tokenize", "queue", "inference"}
    assert {s.parent.span_id for s in children} == {by_status[200].context.span_id}  # the scored request's
    assert by_status[200].attributes["openrerank.model"] == "tiny"


def test_otel_service_name_names_the_service(monkeypatch):
    """A hard-coded `service.name` overrode OTEL_SERVICE_NAME, which the OTel SDK spec says sets it."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert Tracer("http://127.0.0.1:1").provider.resource.attributes["service.name"] == SERVICE_NAME
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,deployment.environment=eu")
    resource = Tracer("http://127.0.0.1:1").provider.resource.attributes
    assert resource["service.name"] == "from-attributes" and resource["deployment.environment"] == "eu"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "reranker-eu")  # wins over OTEL_RESOURCE_ATTRIBUTES (the spec)
    assert Tracer("http://127.0.0.1:1").provider.resource.attributes["service.name"] == "reranker-eu"


def test_a_collector_that_never_answers_does_not_hold_a_stopping_server(tmp_path, tiny_model_dir):
    """The span export's final flush waited its 10 s timeout (and more) on the event loop after SIGTERM: the
    server took 12-19 s to exit, ignoring further signals. Now the flush is bounded and off the loop."""
    hole = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    args = ["--model", f"tiny={tiny_model_dir}", "--threads", "1", "--otlp-endpoint",
            f"http://127.0.0.1:{hole.getsockname()[1]}"]
    server = ServerProcess(args, tmp_path)
    try:
        server.wait_ready(180)
        with server.client() as c:  # a span queued for the collector as the server stops
            assert c.post("/v1/ranking", json=nim_body("paris", ["a", "b"])).status_code == 200
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status = server.proc.wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        hole.close()
    assert status == 0, server.output()[-3000:]
    assert took < SHUTDOWN_WAIT_S + 5, f"{took:.1f} s after SIGTERM:\n{server.output()[-3000:]}"
