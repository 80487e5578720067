"""Pure-ASGI middleware: request log + request id, catch-all, request metrics, API-key auth, HEAD as GET, body
guard (size, encoding, slow bodies, client disconnects).

Each one answers in the error shape of the dialect that owns the path, so a client never sees a
foreign error body.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from openrerank.server import body_coding
from openrerank.server.drain import RETRY_AFTER_S, Drain
from openrerank.server.errors import Dialect, dialect_for

log = logging.getLogger(__name__)
access_log = logging.getLogger("openrerank.access")

HEALTH_PATHS = ("/v1/health/live", "/v1/health/ready", "/health", "/v1/health")
#: Routes open without the API key: health probes and the API documentation (it holds no secrets).
PUBLIC_PATHS = (*HEALTH_PATHS, "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_PREFIXES = ("/docs-assets/",)
#: Prometheus' routes; open without the key with --metrics-public.
METRICS_PATHS = ("/v1/metrics", "/metrics")
#: Probes and scrapes come every few seconds: their lines are DEBUG, every other request's INFO.
_QUIET_PATHS = (*HEALTH_PATHS, *METRICS_PATHS)
_JSON_CT = (b"content-type", b"application/json")
REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
#: Status recorded for a request whose client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499


def request_state(scope: Scope) -> dict:
    return scope.setdefault("state", {})


def request_id(scope: Scope) -> str:
    """The request's id: one set earlier in the chain, else the caller's sane `x-request-id`, else a new one."""
    state = request_state(scope)
    rid = state.get("request_id")
    if rid is None:
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        rid = given if _REQUEST_ID_OK.fullmatch(given) else uuid.uuid4().hex
        state["request_id"] = rid
    return rid


def arrival(scope: Scope) -> float:
    """When the request arrived (`time.monotonic()`): its deadline counts from here."""
    return request_state(scope).setdefault("arrival", time.monotonic())


def request_usage(scope: Scope) -> dict[str, Any]:
    """What a route recorded about its work (model, passages, tokens, timings); see api.common.record_usage."""
    return request_state(scope).setdefault("usage", {})


def route_label(path: str, routes: set[str]) -> str:
    """A request's route for logs and metric labels: the route path, the static mount for its files (Swagger
    UI's assets), else "unmatched" (bounded label values whatever clients send)."""
    if path in routes:
        return path
    for prefix in PUBLIC_PREFIXES:
        if path.startswith(prefix) and prefix.rstrip("/") in routes:
            return prefix.rstrip("/")
    return "unmatched"


def is_json_media_type(content_type: bytes) -> bool:
    """Whether FastAPI reads a body of this type as JSON (application/json or application/*+json, parameters and
    case aside); the body guard declares any other body JSON. A prefix test let `application/jsonl`, `json5` and
    `json-seq` through, which FastAPI then handed to the route as bytes ("Input should be a valid dictionary")."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


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
        headers = dict(scope["headers"])
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
                  "model": usage.get("model"), "passages": usage.get("passages"), "texts": usage.get("texts"),
                  "tokens": usage.get("tokens"),
                  "queue_ms": usage.get("queue_ms"), "inference_ms": usage.get("inference_ms"),
                  "total_ms": total_ms, "request_id": request_id,
                  "reason": request_state(scope).get("error") if status >= 400 else None}
        level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
        access_log.log(level, "%s %s %d", scope["method"], route, status,
                       extra={"fields": fields, "in_message": ("method", "route", "status")})
        if self.tracer is not None and "model" in usage:
            stages = {k: usage[f"{k}_ms"] for k in ("tokenize", "queue", "inference") if f"{k}_ms" in usage}
            attrs = {"http.request.method": scope["method"], "http.route": route,
                     "http.response.status_code": status, "openrerank.model": usage.get("model"),
                     "openrerank.passages": usage.get("passages"), "openrerank.tokens": usage.get("tokens"),
                     "openrerank.request_id": request_id}
            self.tracer.record(f"{scope['method']} {route}", {k.decode("latin-1"): v.decode("latin-1")
                               for k, v in headers.items()}, start_ns, stages, attrs)


def scope_dialect(scope: Scope) -> Dialect:
    """The dialect a route chose for this request (one path, two forms: /rerank), else the path's owner."""
    return request_state(scope).get("dialect") or dialect_for(scope["path"])


def shutting_down_response(scope: Scope, drain: Drain | None) -> Response:
    """The dialect's retryable 503 for a request the server will not finish because it is stopping."""
    message = drain.message() if drain is not None else "the server is shutting down; retry this request"
    return scope_dialect(scope).response(503, message, "unavailable", headers={
        "Retry-After": str(RETRY_AFTER_S), "Connection": "close", "x-request-id": request_id(scope)})


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
            log.error("unhandled %s on %s %s (request id %s)", type(exc).__name__, scope.get("method"),
                      scope.get("path"), rid, exc_info=exc)
            if started:
                return  # the answer is under way: the server closes the connection
            message = f"internal server error (request id {rid})"
            resp = scope_dialect(scope).response(500, message, "internal", headers={"x-request-id": rid})
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
    """`Authorization: Bearer <key>` on every route but health (`bearer_matches`)."""

    def __init__(self, app: ASGIApp, api_key: str, metrics_public: bool = False) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.public = (*PUBLIC_PATHS, *(METRICS_PATHS if metrics_public else ()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public or scope["path"].startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        if bearer_matches(dict(scope["headers"]).get(b"authorization", b""), self.expected):
            await self.app(scope, receive, send)
            return
        msg = "missing or invalid API key: send 'Authorization: Bearer <key>'"
        resp = dialect_for(scope["path"]).response(401, msg, "auth", headers={"WWW-Authenticate": "Bearer"})
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


class BodyGuardMiddleware:
    """Reads POST bodies up front, within `body_timeout` seconds (408 otherwise: a client that sends
    slowly, or declares more than it sends, cannot hold a connection forever); refuses oversize (413)
    and non-UTF-8 (400) before any parsing, after undoing a gzip or deflate Content-Encoding
    (`server/body_coding.py`); treats bodies sent without a JSON content type (e.g.
    `curl -d`) as JSON. Then, while the route runs, it watches for the client going away
    (`http.disconnect`) and cancels the route, so abandoned work leaves the model's queue; and for the end
    of the shutdown grace period, when an unfinished route is cancelled and answered 503 (retryable)."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float = 60.0, metrics: Metrics | None = None,
                 drain: Drain | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout
        self.metrics = metrics
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        dialect = dialect_for(scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, 413, dialect, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        deadline = time.monotonic() + self.body_timeout
        while more:
            message = await self._next_part(receive, deadline)
            if message is None and self.drain is not None and self.drain.expired:
                log.warning("%s %s still sending its body when %s (%d bytes arrived); answered 503 (request id %s)",
                            scope["method"], scope["path"], self.drain.ending(), size, request_id(scope))
                await shutting_down_response(scope, self.drain)(scope, receive, send)
                return
            if message is None:
                msg = (f"request body not received within {self.body_timeout:g} s ({size} bytes arrived; "
                       "--body-timeout)")
                await dialect.response(408, msg, "timeout_body", headers={"Connection": "close"})(scope, receive, send)
                return
            if message["type"] == "http.disconnect":  # gone while sending: the client's doing (499), not a 500
                request_state(scope)["disconnected"] = True
                if self.metrics:
                    self.metrics.disconnects.inc()
                log.info("client disconnected from %s %s while sending its body (%d bytes arrived)",
                         scope["method"], scope["path"], size)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, 413, dialect, size)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if (coding := headers.get(b"content-encoding")) is not None:  # the route gets the decoded body
            try:
                body = body_coding.decode(body, coding, self.max_bytes)
            except body_coding.BodyCodingError as exc:
                await dialect.response(exc.status, str(exc), exc.kind, headers=exc.headers)(scope, receive, send)
                return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            resp = dialect.response(400, f"request body is not valid UTF-8 (byte {exc.start})", "validation")
            await resp(scope, receive, send)
            return
        if not is_json_media_type(headers.get(b"content-type", b"")):
            scope = dict(scope)
            scope["headers"] = [h for h in scope["headers"] if h[0] != b"content-type"] + [_JSON_CT]
        await self._run_watching(scope, body, receive, send)

    async def _next_part(self, receive: Receive, deadline: float) -> Message | None:
        """The body's next message, or None when `deadline` (`--body-timeout`) or the end of the shutdown grace
        period comes first: a request still uploading is answered then, not at uvicorn's later deadline."""
        if self.drain is None:
            try:
                return await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return None
        if self.drain.expired:
            return None
        part = asyncio.ensure_future(receive())
        expiry = asyncio.ensure_future(self.drain.wait_expired())
        try:
            await asyncio.wait((part, expiry), timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            expiry.cancel()
            if not part.done():
                part.cancel()
            await asyncio.gather(part, expiry, return_exceptions=True)
        return part.result() if part.done() and not part.cancelled() else None

    async def _run_watching(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Run the route; cancel it if the client disconnects before the answer is complete, or answer the
        dialect's retryable 503 if the server's shutdown grace period ends first (`server/drain.py`)."""
        gone = asyncio.Event()
        started = answered = False
        sent_body = False

        async def replay() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def tracking_send(message: Message) -> None:
            nonlocal started, answered
            if message["type"] == "http.response.start":
                started = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not answered:
                        gone.set()
                    return

        route = asyncio.ensure_future(self.app(scope, replay, tracking_send))
        helpers = [asyncio.ensure_future(watch())]
        if self.drain is not None:
            helpers.append(asyncio.ensure_future(self.drain.wait_expired()))
        try:
            waiting = {route, *helpers}
            while not route.done():
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if route.done():
                    break
                if gone.is_set() or (self.drain is not None and self.drain.expired and not started):
                    await self._cancel(route)
                    if gone.is_set():
                        request_state(scope)["disconnected"] = True
                        if self.metrics:
                            self.metrics.disconnects.inc()
                        log.info("client disconnected from %s %s before its answer; its work was cancelled "
                                 "(request id %s)", scope["method"], scope["path"], request_id(scope))
                    else:
                        log.warning("%s %s not finished when %s; answered 503 (request id %s)", scope["method"],
                                    scope["path"], self.drain.ending(), request_id(scope))
                        await shutting_down_response(scope, self.drain)(scope, replay, send)
                    return
                waiting = {route, *(h for h in helpers if not h.done())}
        except asyncio.CancelledError:  # the server itself is cancelling us: take the route along
            await self._cancel(route)
            raise
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        route.result()  # re-raise what the route raised

    @staticmethod
    async def _cancel(route: asyncio.Future) -> None:
        """Cancel the route and wait until it has let go of its work (its queued model work is dropped)."""
        route.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await route

    async def _reject(self, scope, receive, send, status, dialect, size) -> None:
        msg = f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes (--max-body-bytes)"
        await dialect.response(status, msg, "too_large", headers={"Connection": "close"})(scope, receive, send)
