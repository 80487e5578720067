"""serve --otlp-endpoint --grpc-port: a gRPC call is a span as an HTTP request is, joined to the trace its
`traceparent` metadata names (before, no gRPC call had a span)."""

from __future__ import annotations

import time

import tritonclient.grpc as grpcclient
from openrerank_bench.serve_process import free_port

from tests.server.grpc.support import MODEL, failure, infer, status_of
from tests.support import run_server
from tests.test_tracing import Collector, collector, received_spans  # skipped without the otel extra

TRACE_ID = "77777777777777777777777777777777"
INFER = "inference.GRPCInferenceService/ModelInfer"


def test_grpc_calls_are_spans_joined_to_the_callers_trace(tmp_path, tiny_model_dir):
    port = free_port()
    with collector() as endpoint:
        args = ["--model", f"{MODEL}={tiny_model_dir}", "--grpc-port", str(port), "--otlp-endpoint", endpoint]
        with run_server(args, tmp_path, env={"OTEL_BSP_SCHEDULE_DELAY": "200"}):
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            traced = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
            infer(client, "paris", ["a", "b"], headers=traced)
            assert status_of(failure(infer, client, "paris", ["a"], model="nope", headers=traced)) == "NOT_FOUND"
            assert client.is_server_live()  # a probe: not traced
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(received_spans(Collector.received)) < 5:
                time.sleep(0.2)
    spans = received_spans(Collector.received)
    calls = [s for s in spans if s.name == INFER]
    assert len(calls) == 2, sorted(s.name for s in spans)
    assert {s.trace_id.hex() for s in calls} == {TRACE_ID}
    codes = {next(a.value.int_value for a in s.attributes if a.key == "rpc.grpc.status_code"): s for s in calls}
    assert sorted(codes) == [0, 5]  # OK, NOT_FOUND
    assert codes[5].status.code == 0  # unset: a client's mistake is no error of the server's span
    children = [s for s in spans if s.name != INFER]
    assert {s.name for s in children} == {"tokenize", "queue", "inference"}
    assert all(s.parent_span_id == codes[0].span_id for s in children)
