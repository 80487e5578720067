"""The body guard: a POST body read whole, within its time, size and encoding limits, before any route sees it;
then the route is watched for the client going away and for the end of the shutdown grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openrerank.core.settings import Shown, setting_name
from openrerank.observe.metrics import Metrics
from openrerank.server import body_budget, body_coding
from openrerank.server.body_budget import BodyBudget, BodyHold
from openrerank.server.drain import RETRY_AFTER_S, Drain
from openrerank.server.errors import Kind, dialect_for
from openrerank.server.middleware import (
    first_header,
    header_lines,
    request_id,
    request_state,
    shutting_down_response,
)

log = logging.getLogger(__name__)

_JSON_CT = (b"content-type", b"application/json")


def is_json_media_type(content_type: bytes) -> bool:
    """Whether FastAPI reads a body of this type as JSON (application/json or application/*+json, parameters and
    case aside); the body guard declares any other body JSON. A prefix test let `application/jsonl`, `json5` and
    `json-seq` through, which FastAPI then handed to the route as bytes ("Input should be a valid dictionary")."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class BodyGuardMiddleware:
    """Reads POST bodies up front, within `body_timeout` seconds (408 otherwise: a client that sends
    slowly, or declares more than it sends, cannot hold a connection forever); refuses oversize (413)
    and non-UTF-8 (400) before any parsing, after undoing a gzip or deflate Content-Encoding
    (`server/body_coding.py`); treats bodies sent without a JSON content type (e.g.
    `curl -d`) as JSON; refuses a body that would take the bodies held at once past their budget (the dialect's
    overload answer, `body_budget.py`). Then, while the route runs, it watches for the client going away
    (`http.disconnect`) and cancels the route, so abandoned work leaves the model's queue; and for the end
    of the shutdown grace period, when an unfinished route is cancelled and answered 503 (retryable).
    `shown`: how its refusals name the settings not typed as flags (core/settings.py)."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float, metrics: Metrics | None = None,
                 drain: Drain | None = None, *, budget: BodyBudget, shown: Shown | None = None) -> None:
        # No default body timeout here: ServerConfig.body_timeout (--body-timeout) is the one, and the app passes it.
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout
        self.metrics = metrics
        self.drain = drain
        self.budget = budget  # bodies held at once (`body_budget.py`)
        self.shown = shown or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        hold = self.budget.hold()
        try:
            await self._guard(scope, receive, send, hold)
        finally:  # every way out: answered, refused, timed out, disconnected, cancelled
            hold.release()

    async def _guard(self, scope: Scope, receive: Receive, send: Send, hold: BodyHold) -> None:
        dialect = dialect_for(scope["path"])
        declared = first_header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_bytes:
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
                       f"{setting_name('body-timeout', self.shown)})")
                await dialect.response(408, msg, Kind.TIMEOUT_BODY,
                                       headers={"Connection": "close"})(scope, receive, send)
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
            # Counted as it arrives, not from the declared length: headers alone cost nothing, and eight
            # connections that declared 8 MiB and sent none held the whole budget (every POST refused).
            if size > hold.size and not hold.resize(size):
                await self._overloaded(scope, receive, send, dialect, size, hold)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        chunks.clear()  # held to the request's end otherwise: each body twice
        # The route gets the decoded body. Repeated lines are one list (RFC 9110 5.3): "gzip" twice is "gzip, gzip".
        if codings := header_lines(scope, b"content-encoding"):
            coding = b", ".join(codings)
            try:  # on a worker thread: zlib lets go of the GIL, and 16 bodies of 8 MiB inflated on the loop kept
                # a liveness probe waiting 1-2 s
                body = await asyncio.to_thread(body_coding.decode, body, coding, self.max_bytes, self.shown)
            except body_coding.BodyCodingError as exc:
                await dialect.response(exc.status, str(exc), exc.kind, headers=exc.headers)(scope, receive, send)
                return
        if not hold.resize(len(body)):  # inflated
            await self._overloaded(scope, receive, send, dialect, len(body), hold)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            resp = dialect.response(400, f"request body is not valid UTF-8 (byte {exc.start})", Kind.VALIDATION)
            await resp(scope, receive, send)
            return
        if not is_json_media_type(first_header(scope, b"content-type")):  # the line FastAPI reads: the first
            scope = dict(scope)
            scope["headers"] = [h for h in scope["headers"] if h[0] != b"content-type"] + [_JSON_CT]
        body_budget.keep(scope, hold)  # released once a route has parsed the body (`body_budget.release`)
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
        part = await self.drain.race(receive(), max(0.0, deadline - time.monotonic()))
        return None if part is None else part.result()

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

    async def _overloaded(self, scope: Scope, receive: Receive, send: Send, dialect: Any, size: int,
                          hold: BodyHold) -> None:
        """The dialect's overload answer (503, TEI/Cohere/Infinity 429) to a body of `size` bytes (so far) that
        would pass `--max-body-bytes-in-flight`, counted in `openrerank_rejected_total` as `bodies_in_flight`;
        `hold`: its own share, which the other bodies' count leaves out."""
        if self.metrics:
            task = "embed" if "embed" in scope["path"] else "rerank"
            self.metrics.rejected.labels("", task, "bodies_in_flight").inc()
        others, limit = self.budget.held - hold.size, self.budget.limit
        msg = (f"server overloaded: other requests' bodies of {others} bytes are being received or wait for their "
               f"parse, and this one's {size} bytes would pass the limit of {limit} bytes "
               f"({setting_name('max-body-bytes-in-flight', self.shown)}); retry later")
        headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
        await dialect.response(503, msg, Kind.OVERLOADED, headers=headers)(scope, receive, send)

    async def _reject(self, scope, receive, send, status, dialect, size) -> None:
        msg = (f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes "
               f"({setting_name('max-body-bytes', self.shown)})")
        await dialect.response(status, msg, Kind.TOO_LARGE, headers={"Connection": "close"})(scope, receive, send)
