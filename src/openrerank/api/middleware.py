"""Pure-ASGI middleware: request metrics, API-key auth, body size / encoding guard.

Each one answers in the error shape of the dialect that owns the path, so a client never sees a
foreign error body.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openrerank.api.errors import dialect_for
from openrerank.metrics import Metrics

PUBLIC_PATHS = ("/v1/health/live", "/v1/health/ready", "/health", "/v1/health")
_JSON_CT = (b"content-type", b"application/json")


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
            label = scope["path"] if scope["path"] in self.routes() else "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_latency.labels(label, str(status)).observe(time.perf_counter() - start)


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but health; constant-time comparison."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        msg = "missing or invalid API key: send 'Authorization: Bearer <key>'"
        resp = dialect_for(scope["path"]).response(401, msg, "auth", headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


class BodyGuardMiddleware:
    """Reads POST bodies up front: refuses oversize (413) and non-UTF-8 (400) before any parsing,
    and treats bodies sent without a JSON content type (e.g. `curl -d`) as JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, 413, dialect, size)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            resp = dialect.response(400, f"request body is not valid UTF-8 (byte {exc.start})", "validation")
            await resp(scope, receive, send)
            return
        ctype = headers.get(b"content-type", b"")
        if not ctype.startswith(b"application/json") and not ctype.endswith(b"+json"):
            scope = dict(scope)
            scope["headers"] = [h for h in scope["headers"] if h[0] != b"content-type"] + [_JSON_CT]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, status, dialect, size) -> None:
        msg = f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes (--max-body-bytes)"
        await dialect.response(status, msg, "too_large", headers={"Connection": "close"})(scope, receive, send)
