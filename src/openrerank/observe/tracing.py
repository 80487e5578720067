"""Optional OpenTelemetry tracing (`serve --otlp-endpoint URL`, the `otel` extra), as TEI offers.

Each scored request becomes a server span (joined to the caller's trace through a `traceparent` header) with
three children, `tokenize`, `queue` and `inference`, timed by the engine's own measurements. The scheduler
batches many requests on one worker thread, so the children are recorded after the fact from the request's
timings rather than opened around shared code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from openrerank.extras import require

SERVICE_NAME = "openrerank"


def check_tracing_available() -> None:
    """Raise MissingExtraError (one line, with the install command) when the otel extra is absent."""
    for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        require(module, "otel", "--otlp-endpoint")


class Tracer:
    """Exports spans over OTLP/HTTP to `endpoint` (`/v1/traces` is appended unless the URL has a path)."""

    def __init__(self, endpoint: str, service_name: str = SERVICE_NAME) -> None:
        check_tracing_available()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        url = endpoint.rstrip("/")
        if url.count("/") <= 2:  # scheme://host:port only
            url += "/v1/traces"
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer = self.provider.get_tracer("openrerank")

    def record(self, name: str, headers: Mapping[str, str], start_ns: int, stages_ms: dict[str, float],
               attributes: dict[str, Any]) -> None:
        """One server span from `start_ns` with a child per stage, laid end to end in `stages_ms` order."""
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = extract(dict(headers))
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=start_ns,
                                      attributes={k: v for k, v in attributes.items() if v is not None})
        ctx = set_span_in_context(span)
        at = start_ns
        for stage, ms in stages_ms.items():
            end = at + int(ms * 1e6)
            self.tracer.start_span(stage, context=ctx, start_time=at).end(end_time=end)
            at = end
        span.end(end_time=max(at, time.time_ns()))

    def shutdown(self) -> None:
        self.provider.shutdown()
