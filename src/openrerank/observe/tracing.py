"""Optional OpenTelemetry tracing (`serve --otlp-endpoint URL`, the `otel` extra), as TEI offers.

Each request becomes a server span (joined to the caller's trace through a `traceparent` header, or gRPC
metadata), its status ERROR for a server fault, with a child per stage the engine timed (`tokenize`, `queue`,
`inference`) when the request reached the model. The scheduler batches many requests on one worker thread, so
the children are recorded after the fact from the request's timings rather than opened around shared code.

Spans leave in batches on the SDK's own thread; a collector that is slow or down never delays a request. Its
exports are bounded (EXPORT_TIMEOUT_S) and so is the final flush when the server stops (SHUTDOWN_WAIT_S): the
flush waited an export's 10 s timeout and more on the event loop, and a stopping server ignored signals meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from openrerank.extras import require

log = logging.getLogger(__name__)

#: `service.name` unless OTEL_SERVICE_NAME (or `service.name` in OTEL_RESOURCE_ATTRIBUTES) says otherwise.
SERVICE_NAME = "openrerank"
#: Seconds one export to the collector may take, retries included (the SDK's default: 10), unless
#: OTEL_EXPORTER_OTLP_TRACES_TIMEOUT or OTEL_EXPORTER_OTLP_TIMEOUT sets it.
EXPORT_TIMEOUT_S = 2.0
#: Seconds a stopping server waits for the last spans to leave; what is still queued then is dropped.
SHUTDOWN_WAIT_S = 3.0
#: The OTLP endpoint's schemes: the exporter speaks OTLP/HTTP only.
ENDPOINT_SCHEMES = ("http", "https")
_TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")


def check_tracing_available() -> None:
    """Raise MissingExtraError (one line, with the install command) when the otel extra is absent."""
    for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        require(module, "otel", "--otlp-endpoint")


def _resource() -> Any:
    """The service's resource: the OTEL_* variables' attributes (the SDK's rules), with `service.name`
    SERVICE_NAME where they name none (a hard-coded name used to override OTEL_SERVICE_NAME)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    named = "service.name" in OTELResourceDetector().detect().attributes
    return Resource.create({} if named else {"service.name": SERVICE_NAME})


class Tracer:
    """Exports spans over OTLP/HTTP to `endpoint` (`/v1/traces` is appended unless the URL has a path)."""

    def __init__(self, endpoint: str) -> None:
        check_tracing_available()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        url = endpoint.rstrip("/")
        if url.count("/") <= 2:  # scheme://host:port only
            url += "/v1/traces"
        self.endpoint = url
        timeout = None if any(os.environ.get(v) for v in _TIMEOUT_VARIABLES) else EXPORT_TIMEOUT_S
        exporter = OTLPSpanExporter(endpoint=url, timeout=timeout)
        # shut down by the app (`shutdown`), bounded; the SDK's own exit hook would wait unbounded
        self.provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(exporter,
                                                            export_timeout_millis=EXPORT_TIMEOUT_S * 1e3))
        self.tracer = self.provider.get_tracer("openrerank")

    def record(self, name: str, headers: Mapping[str, str], start_ns: int, stages_ms: dict[str, float],
               attributes: dict[str, Any], error: str | None = None) -> None:
        """One server span from `start_ns` with a child per stage, laid end to end in `stages_ms` order; its
        status ERROR with `error` as description when that is given (a server fault, not a client mistake)."""
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

        parent = extract(dict(headers))
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=start_ns,
                                      attributes={k: v for k, v in attributes.items() if v is not None})
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        ctx = set_span_in_context(span)
        at = start_ns
        for stage, ms in stages_ms.items():
            end = at + int(ms * 1e6)
            self.tracer.start_span(stage, context=ctx, start_time=at).end(end_time=end)
            at = end
        span.end(end_time=max(at, time.time_ns()))

    def shutdown(self, wait_s: float = SHUTDOWN_WAIT_S) -> bool:
        """Send the spans still queued and stop, waiting at most `wait_s` seconds (blocking: call it off the
        event loop); False, and a log line, when the collector did not take them in time: they are dropped."""
        stopping = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        stopping.start()
        stopping.join(wait_s)
        if stopping.is_alive():
            log.warning("tracing: the OTLP endpoint %s did not take the last spans within %g s; they are dropped",
                        self.endpoint, wait_s)
            return False
        return True
