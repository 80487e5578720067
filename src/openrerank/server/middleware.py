"""Pure-ASGI middleware: request log + request id, catch-all, request metrics, API-key auth, HEAD as GET (the
body guard is `body_guard.py`), and what they keep in a request's scope (its id, arrival, usage).

Each one answers in the error shape of the dialect that owns the path, so a client never sees a
foreign error body.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openrerank.observe.metrics import Metrics
from openrerank.runtimes.heap import HEAP
from openrerank.server.drain import RETRY_AFTER_S, Drain
from openrerank.server.errors import Dialect, Kind, dialect_for

log = logging.getLogger(__name__)
#: One line per request, HTTP here and gRPC (`grpc/service.py`): operators filter logs by this name.
access_log = logging.getLogger("openrerank.access")

HEALTH_PATHS = ("/v1/health/live", "/v1/health/ready", "/health", "/v1/health")
#: TEI's other health routes (its server.rs): `GET /` (the Inference API's probe) and `GET /ping` (SageMaker's).
#: Health on GET (and HEAD) alone: `POST /` is the model's task, which the API key guards.
HEALTH_GET_PATHS = ("/", "/ping")
#: Routes open without the API key: health probes and the API documentation (it holds no secrets).
PUBLIC_PATHS = (*HEALTH_PATHS, "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_PREFIXES = ("/docs-assets/",)
#: Prometheus' routes; open without the key with --metrics-public.
METRICS_PATHS = ("/v1/metrics", "/metrics")


def is_health(method: str, path: str) -> bool:
    """A health probe: open without the API key, logged at DEBUG, let through while a replica drains."""
    return path in HEALTH_PATHS or (method in ("GET", "HEAD") and path in HEALTH_GET_PATHS)


def is_public(method: str, path: str, public: tuple[str, ...] = PUBLIC_PATHS) -> bool:
    """Open without the API key: a health probe, a `public` path (the documentation), the docs' assets."""
    return is_health(method, path) or path in public or path.startswith(PUBLIC_PREFIXES)
REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
#: Status recorded for a request whose client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499
#: The route label of a path no route serves; its access line carries the path, cut to UNMATCHED_PATH_CHARS.
UNMATCHED = "unmatched"
UNMATCHED_PATH_CHARS = 200
#: The engine's stages a request's span gets a child for, in their order (usage's `<stage>_ms`).
TRACED_STAGES = ("tokenize", "queue", "inference")


def header_lines(scope: Scope, name: bytes) -> list[bytes]:
    """Every line of header `name` (lower case), in the order sent. A header may come as several lines, which
    `dict(scope["headers"])` reads as its last, while Starlette and FastAPI read the first: each reader here says
    which lines it means (RFC 9110 5.3: repeated lines of a list header are one comma-joined list)."""
    return [value for key, value in scope.get("headers") or () if key == name]


def first_header(scope: Scope, name: bytes, default: bytes = b"") -> bytes:
    """Header `name`'s first line, as Starlette's `request.headers[name]` reads it."""
    lines = header_lines(scope, name)
    return lines[0] if lines else default


def joined_headers(scope: Scope) -> dict[bytes, bytes]:
    """Every header once, its repeated lines joined with ", " (RFC 9110 5.3; W3C trace context joins `tracestate`
    so, and a `traceparent` sent twice no longer parses, rather than silently being the last)."""
    out: dict[bytes, bytes] = {}
    for key, value in scope.get("headers") or ():
        out[key] = out[key] + b", " + value if key in out else value
    return out


def request_state(scope: Scope) -> dict:
    return scope.setdefault("state", {})


def request_id(scope: Scope) -> str:
    """The request's id: one set earlier in the chain, else the caller's sane `x-request-id`, else a new one."""
    state = request_state(scope)
    rid = state.get("request_id")
    if rid is None:
        given = first_header(scope, REQUEST_ID_HEADER).decode("latin-1")
        rid = given if _REQUEST_ID_OK.fullmatch(given) else uuid.uuid4().hex
        state["request_id"] = rid
    return rid


def arrival(scope: Scope) -> float:
    """When the request arrived (`time.monotonic()`): its deadline counts from here."""
    return request_state(scope).setdefault("arrival", time.monotonic())


@functools.cache
def _template_pattern(template: str) -> re.Pattern[str]:
    """A route template as a pattern: `{name:path}` any rest of the path, `{name}` one segment."""
    parts = re.split(r"(\{[^}]*\})", template)
    return re.compile("".join((".+" if p.endswith(":path}") else "[^/]+") if p.startswith("{") else re.escape(p)
                              for p in parts))


def request_usage(scope: Scope) -> dict[str, Any]:
    """What a route recorded about its work (model, passages, tokens, timings); see api.common.record_usage."""
    return request_state(scope).setdefault("usage", {})


def route_label(path: str, routes: set[str]) -> str:
    """A request's route for logs and metric labels: the route path (a route with a parameter, its template:
    `/v1/models/{model_id:path}`), the static mount for its files (Swagger UI's assets), else "unmatched"
    (bounded label values whatever clients send)."""
    if path in routes:
        return path
    for template in routes:
        if "{" in template and _template_pattern(template).fullmatch(path):
            return template
    for prefix in PUBLIC_PREFIXES:
        if path.startswith(prefix) and prefix.rstrip("/") in routes:
            return prefix.rstrip("/")
    return UNMATCHED


class RequestLogMiddleware:
    """One access line per request (INFO; health and metrics at DEBUG) and an `x-request-id` on every answer:
    the caller's, when it sent a sane one, else a new one. With tracing on, the request's spans as well."""

    def __init__(self, app: ASGIApp, routes: Callable[[], set[str]], tracer: Any = None) -> None:
        self.app = app
        self.routes = routes
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = joined_headers(scope)
        rid = request_id(scope)
        arrival(scope)
        status = 500
        start = time.perf_counter()
        start_ns = time.time_ns()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = list(message.get("headers") or [])
                if not any(k.lower() == REQUEST_ID_HEADER for k, _ in sent):
                    message["headers"] = [*sent, (REQUEST_ID_HEADER, rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if request_state(scope).get("disconnected"):
                status = CLIENT_CLOSED
            self._log(scope, status, rid, (time.perf_counter() - start) * 1e3, start_ns, headers)

    def _log(self, scope: Scope, status: int, request_id: str, total_ms: float, start_ns: int,
             headers: dict[bytes, bytes]) -> None:
        path = scope["path"]
        route = route_label(path, self.routes())
        usage = request_usage(scope)
        fields = {"protocol": "http", "method": scope["method"], "route": route, "status": status,
                  # the path itself only where the route does not say it; bounded, as a client chose it
                  "path": path[:UNMATCHED_PATH_CHARS] if route == UNMATCHED else None,
                  "model": usage.get("model"), "passages": usage.get("passages"), "texts": usage.get("texts"),
                  "tokens": usage.get("tokens"), "tokenize_ms": usage.get("tokenize_ms"),
                  "queue_ms": usage.get("queue_ms"), "inference_ms": usage.get("inference_ms"),
                  "total_ms": total_ms, "request_id": request_id,
                  "reason": request_state(scope).get("error") if status >= 400 else None}
        # probes and scrapes come every few seconds: their lines are DEBUG, every other request's INFO
        quiet = is_health(scope["method"], path) or path in METRICS_PATHS
        access_log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %d", scope["method"], route, status,
                       extra={"fields": fields, "in_message": ("method", "route", "status")})
        if self.tracer is not None and not quiet:  # nor traced: a span every few seconds would bury the rest
            attrs = {"http.request.method": scope["method"], "http.route": route,
                     "http.response.status_code": status, "openrerank.request_id": request_id}
            # OTel's HTTP conventions: a server span is an error for a 5xx only (a 4xx is the client's mistake)
            error = (request_state(scope).get("error") or f"HTTP {status}") if status >= 500 else None
            text_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
            trace_request(self.tracer, f"{scope['method']} {route}", text_headers, start_ns, usage, attrs, error)


def record_refusal(metrics: Metrics, routes: set[str], status: int, path: str | None, reason: str,
                   client: Any) -> None:
    """A request the connection's guard answered itself, before the app had it (unreadable, headers too large
    or too slow, a transfer coding it cannot read: server/http_guard.py), counted and logged as the app's answers
    are: such 400s were in no metric, and the log had only uvicorn's bare "Invalid HTTP request received."."""
    route = route_label(path or "", routes)
    metrics.requests.labels(route, str(status), "http").inc()
    fields = {"protocol": "http", "method": "-", "route": route, "status": status,
              "path": (path or "")[:UNMATCHED_PATH_CHARS] if route == UNMATCHED else None,
              "client": f"{client[0]}:{client[1]}" if client else None, "reason": reason}
    access_log.info("- %s %d", route, status, extra={"fields": fields, "in_message": ("method", "route", "status")})


def trace_request(tracer: Any, name: str, headers: dict[str, str], start_ns: int, usage: dict[str, Any],
                  attributes: dict[str, Any], error: str | None) -> None:
    """One request's server span (HTTP or gRPC; `tracer`: an `observe.tracing.Tracer`, None when tracing is
    off), with the model's attributes and a child per stage the engine timed, where the request got that far."""
    if tracer is None:
        return
    stages = {stage: usage[f"{stage}_ms"] for stage in TRACED_STAGES if f"{stage}_ms" in usage}
    attrs = {**attributes, "openrerank.model": usage.get("model"), "openrerank.passages": usage.get("passages"),
             "openrerank.tokens": usage.get("tokens")}
    tracer.record(name, headers, start_ns, stages, attrs, error)


def scope_dialect(scope: Scope) -> Dialect:
    """The dialect a route chose for this request (one path, two forms: /rerank), else the path's owner."""
    return request_state(scope).get("dialect") or dialect_for(scope["path"])


def shutting_down_response(scope: Scope, drain: Drain | None, message: str | None = None) -> Response:
    """The dialect's retryable 503 for a request the server will not finish because it is stopping (`message`:
    another reason, such as `drain.CLOSED_MESSAGE` for one that arrived once the drain had begun)."""
    if message is None:
        message = drain.message() if drain is not None else "the server is shutting down; retry this request"
    return scope_dialect(scope).response(503, message, Kind.UNAVAILABLE, headers={
        "Retry-After": str(RETRY_AFTER_S), "Connection": "close", "x-request-id": request_id(scope)})


def _no_thread(exc: BaseException) -> bool:
    """Python could not start a thread (asyncio's worker threads, a timer): the process's thread limit."""
    return isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)


class CatchAllMiddleware:
    """Anything unexpected becomes a 500 in the dialect's shape carrying a request id, logged once with
    the same id; never a plain-text 500 or a crashed connection.

    A request cancelled from outside the app (the server ending past its grace period; normally the drain
    has answered it before) gets the dialect's retryable 503 rather than escaping as a cancellation, which
    uvicorn would turn into a plain-text 500."""

    def __init__(self, app: ASGIApp, drain: Drain | None = None) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival(scope)
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            if started or request_state(scope).get("disconnected"):
                raise  # the answer is under way, or its client is gone (a replica under Ray Serve)
            log.warning("%s %s cancelled by the server before its answer (request id %s); answered 503",
                        scope.get("method"), scope.get("path"), request_id(scope))
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # answered here: the cancellation ends with this request
            await shutting_down_response(scope, self.drain)(scope, receive, send)
        except Exception as exc:
            rid = request_id(scope)
            if started:
                log.error("unhandled %s on %s %s (request id %s)", type(exc).__name__, scope.get("method"),
                          scope.get("path"), rid, exc_info=exc)
                return  # the answer is under way: the server closes the connection
            if _no_thread(exc):  # capacity, not a bug: retryable, and no traceback per request
                log.warning("%s %s refused: %s (the process is at its thread limit: `ulimit -u`, a cgroup's "
                            "pids.max; request id %s)", scope.get("method"), scope.get("path"), exc, rid)
                message = "server overloaded: no thread could be started for this request; retry later"
                headers = {"Retry-After": str(RETRY_AFTER_S), "x-request-id": rid}
                resp = scope_dialect(scope).response(503, message, Kind.OVERLOADED, headers=headers)
                await resp(scope, receive, send)
                return
            log.error("unhandled %s on %s %s (request id %s)", type(exc).__name__, scope.get("method"),
                      scope.get("path"), rid, exc_info=exc)
            message = f"internal server error (request id {rid})"
            resp = scope_dialect(scope).response(500, message, Kind.INTERNAL, headers={"x-request-id": rid})
            await resp(scope, receive, send)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], set[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # known route paths; anything else is labelled "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            with HEAP.request():  # idle again: what refused requests freed goes back to the OS (runtimes/heap.py)
                await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            if request_state(scope).get("disconnected"):
                status = CLIENT_CLOSED
            label = route_label(scope["path"], self.routes())
            self.metrics.requests.labels(label, str(status), "http").inc()
            self.metrics.request_latency.labels(label, str(status), "http").observe(time.perf_counter() - start)


def bearer_matches(authorization: bytes, key: bytes) -> bool:
    """`authorization` is `Bearer <key>`: the scheme name case-insensitive (RFC 7235 section 2.1: `bearer`,
    `BEARER` are the same scheme), the key compared in constant time. HTTP and gRPC check keys with this."""
    scheme, _, token = authorization.partition(b" ")
    return hmac.compare_digest(token.lstrip(b" "), key) & (scheme.lower() == b"bearer")


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but health and the docs (`bearer_matches`), on exactly one
    header line: with two, the first (what Starlette, TEI and vLLM read) and the last (what a dict of the lines
    reads) could disagree, and a wrong key followed by the right one authenticated."""

    def __init__(self, app: ASGIApp, api_key: str, metrics_public: bool = False) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.public = (*PUBLIC_PATHS, *(METRICS_PATHS if metrics_public else ()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["method"], scope["path"], self.public):
            await self.app(scope, receive, send)
            return
        given = header_lines(scope, b"authorization")
        if len(given) == 1 and bearer_matches(given[0], self.expected):
            await self.app(scope, receive, send)
            return
        msg = "missing or invalid API key: send 'Authorization: Bearer <key>'"
        if len(given) > 1:
            msg = f"{len(given)} Authorization headers: send one, 'Authorization: Bearer <key>'"
        resp = dialect_for(scope["path"]).response(401, msg, Kind.AUTH, headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


class HeadMiddleware:
    """HEAD answered as the same path's GET, with its status and headers and no body: RFC 9110 section 9.1 says a
    server MUST support HEAD wherever it supports GET, and load balancers probe health with it. FastAPI's routes
    take only the methods they declare; doing it here covers every GET route at once and keeps the OpenAPI
    document free of a HEAD twin of each GET operation. A path without GET answers HEAD as it answers GET (405)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
