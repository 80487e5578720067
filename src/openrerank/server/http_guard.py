"""The connection guard `openrerank serve` puts on uvicorn's httptools protocol (`server/http.py` runs it).

uvicorn has no limit on how long a client may take to send its request headers, so a client that trickles them
(slowloris) holds a connection for ever. `header_timeout` closes such a connection with a 408 (in the path's
dialect once the request line arrived); the body is bounded by the app's BodyGuardMiddleware
(`--body-timeout`), idle keep-alive connections by uvicorn's own keep-alive timeout. Nor does its httptools
protocol bound the size of the headers (1 MB, 32 MB headers were read whole): past `max_header_bytes` the
connection gets a 431 in the path's dialect and is closed, before the parser buffers more. And uvicorn closes
a connection as soon as a `Connection: close` answer is out, even one sent before the request's body was read
(the body guard's 413 on a declared length): the kernel then resets the connection and a client still sending
loses the answer. Such a connection is closed gently instead (half-closed, the rest of the body read and
dropped, bounded by LINGER_S and LINGER_MAX_S). A reverse proxy in front should still bound connections per
client (docs/reliability.md). A request that cannot be served (unreadable: 400; a transfer coding other than
chunked: 501; headers too large: 431) is answered after the requests pipelined before it, in the path's error
shape: uvicorn closed at once, losing their answers. An upgrade offer the server does not take
(h2c; a websocket too, `server/http.py` runs uvicorn with ws="none") is ignored and the request served with its
body (`server/http_edges.py`).

Each request the guard answers itself, before the app has it, is counted and logged as the app's answers are
(`refusal_recorder`, `middleware.record_refusal`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from openrerank.core.settings import Shown, setting_name
from openrerank.server.config import ServerConfig
from openrerank.server.http_answers import (
    bad_request,
    coding_not_implemented,
    headers_too_large,
    headers_too_slow,
    request_path,
)

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"
#: A connection answered before its request was read whole is closed once the client has been quiet for
#: LINGER_S, or LINGER_MAX_S after the answer at the latest (nginx's lingering_timeout and lingering_time).
LINGER_S = 2.0
LINGER_MAX_S = 30.0
class _ClosingGently:
    """The transport as a request's cycle sees it: `close` goes through the protocol, which lingers when the
    request is not read whole (see `_close_gently`); everything else is the transport's own."""

    def __init__(self, transport: Any, close: Any) -> None:
        self._transport = transport
        self.close = close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: Told of each request the connection's guard answers itself (status, path or None, why, the client's address).
OnRefusal = Callable[[int, "str | None", str, Any], None]


def guarded_protocol(header_timeout: float, max_header_bytes: int = ServerConfig.max_header_bytes,
                     on_refusal: OnRefusal | None = None, shown: Shown | None = None) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a deadline on each request's headers, a bound on their size, and a
    gentle close of a connection answered early ("auto" without httptools). Each request it answers itself,
    before the app has it, goes to `on_refusal` (the app's metrics and access log: `middleware.record_refusal`).
    `shown`: how its answers and log name the two settings when not typed as flags (core/settings.py)."""
    timeout_setting = setting_name("header-timeout", shown)
    size_setting = setting_name("max-header-bytes", shown)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        from openrerank.server.http_edges import (
            OfferIgnoringParser,
            StopParsing,
            target_problem,
            unsupported_coding,
        )
    except ImportError:  # pragma: no cover - uvicorn[standard] ships httptools
        log.warning("httptools is not installed: no %s (uvicorn's h11 protocol has none)", timeout_setting)
        return "auto"

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        """Closes a connection whose request headers are not complete `header_timeout` seconds after the
        connection opened or the request's first byte arrived, and one whose request line and headers
        pass `max_header_bytes` (431); and closes gently a connection answered before its request was
        read whole (a 413 sent on the declared length, a 408), so the client still sending reads it."""

        _header_timer: asyncio.TimerHandle | None = None
        _in_head = True  # the next bytes belong to a request's line and headers
        _head_bytes = 0
        _head_start = b""  # the head's first bytes: the request line, for the path's dialect
        _tail = b""  # the last bytes counted, to find a head end split across two reads
        _lingering = False  # answered and closing: what the client still sends is dropped
        _linger_timer: asyncio.TimerHandle | None = None
        _linger_end = 0.0
        _refusal: bytes | None = None  # an answer to a request it cannot serve, sent after those before it
        _running: Any = None  # the request cycle the app runs now (`self.cycle` is the last one parsed)
        replaying = False  # OfferIgnoringParser is replaying a body's framing: not a request
        _begun = False  # a request's first byte was parsed and its message is not complete yet

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.parser = OfferIgnoringParser(self)

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                self._linger_until_quiet()  # the rest of a refused request: read and dropped
                return
            if self._refusal is not None:  # a request it cannot serve waits for its answer: the rest is dropped
                return
            if self._in_head:  # count before the parser buffers anything: it would take any size
                seen = self._tail + data
                end = seen.find(_HEAD_END)
                self._head_bytes += len(data) if end < 0 else end + len(_HEAD_END) - len(self._tail)
                self._tail = seen[-3:]
                if len(self._head_start) < 8192:
                    self._head_start += data[:8192]
                if self._head_bytes > max_header_bytes:
                    self._headers_too_large()
                    return
            super().data_received(data)

        def _headers_too_large(self) -> None:
            self._refuse(headers_too_large(self._head_start, max_header_bytes, shown), request_path(self._head_start),
                         f"request headers over {max_header_bytes} bytes ({size_setting})")

        def _refuse(self, answer: bytes, path: str | None, reason: str, counted: bool = True) -> None:
            """Send `answer` to a request that cannot be served and close gently, after the answers to the
            requests pipelined before it (HTTP/1.1 answers in order): sending it at once lost those. It is
            counted and logged as the app's answers are (`on_refusal`; not `counted`: a connection that sent
            nothing, no request): it was in no metric, and unreadable requests left only uvicorn's bare
            "Invalid HTTP request received." at WARNING."""
            self._disarm()
            if self._refusal is None and not self._lingering:
                self._refusal = answer
                if on_refusal is not None and counted:
                    on_refusal(int(answer[9:12]), path, reason, self.client)
                self._send_refusal()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def _send_refusal(self) -> None:
            """The refusal waiting, once no request before it is still to be answered: the one running done and
            none queued. (Not `self.cycle`: that is the refused request's own cycle when its body could not be
            read while it was queued, which never runs, so the refusal waited for the keep-alive timeout.)"""
            cycle = self._running
            if (self._refusal is None or self._lingering or self.transport.is_closing() or self.pipeline
                    or (cycle is not None and not cycle.response_complete and not cycle.disconnected)):
                return
            self.transport.write(self._refusal)
            self._linger()

        def send_400_response(self, msg: str) -> None:
            """A request llhttp cannot read: a 400 in the path's error shape, after the answers to the requests
            before it (uvicorn answered in plain text and closed at once: those answers were lost, and their
            requests logged as the client's disconnect)."""
            problem = str(sys.exception() or msg)  # llhttp's reason; called while uvicorn handles its error
            broken = None if self._in_head else self.cycle  # the request whose body could not be read
            if broken is None:  # its request line's path (None: unreadable), answered in that path's dialect,
                own = request_path(self._head_start, whole_line=True)  # else the request before it's
                path = own or (self.cycle.scope["path"] if self.cycle is not None else "/")
            else:
                own = path = broken.scope["path"]
                if self.pipeline and self.pipeline[0][0] is broken:
                    self.pipeline.popleft()  # not started: it never will be
                else:  # its app is told the client is gone, as uvicorn's close told it
                    broken.disconnected = True
                    broken.message_event.set()
            self._refuse(bad_request(path, problem), own, f"invalid HTTP request: {problem}")

        def _close_gently(self) -> None:
            """The cycle's `transport.close()`: at once if the request was read whole, else a lingering
            close. Closing with the client's bytes unread makes the kernel reset the connection, and a
            client still sending its body loses the answer already sent (RFC 9112 section 9.6)."""
            if self._in_head or self.transport.is_closing():
                self.transport.close()
            else:
                self._linger()

        def _linger(self) -> None:
            """Stop writing, drop what the client still sends, close once it is quiet for LINGER_S (or has
            closed its side: asyncio closes on EOF), LINGER_MAX_S from now at the latest."""
            if self._lingering or self.transport.is_closing():
                return
            self._lingering = True
            if self.transport.can_write_eof():  # not under TLS
                self.transport.write_eof()
            self._linger_end = self.loop.time() + LINGER_MAX_S
            self._linger_until_quiet()

        def _linger_until_quiet(self) -> None:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            when = min(self.loop.time() + LINGER_S, self._linger_end)
            self._linger_timer = self.loop.call_at(when, self.transport.close)

        def on_message_complete(self) -> None:
            if self.parser.should_upgrade() and not self._should_upgrade():
                return  # the head of an upgrade offer ignored: its body follows (OfferIgnoringParser)
            super().on_message_complete()
            self._in_head, self._head_bytes, self._head_start, self._tail = True, 0, b"", b""
            self._begun = False

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                why = f"request headers not received within {header_timeout:g} s ({timeout_setting})"
                if not self._begun:  # a connection that sent nothing: no request to count
                    log.info("closing a connection from %s: %s", self.client, why)
                # after the answers to the requests before it, as every refusal (a pipelined head that
                # stalls must not cut off the answer still being computed for the request before it)
                self._refuse(headers_too_slow(self._head_start, header_timeout, shown),
                             request_path(self._head_start), why, counted=self._begun)

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            if not self.replaying:
                super().on_message_begin()
                self._begun = True
                self._arm()

        def on_url(self, url: bytes) -> None:
            if not self.replaying:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if not self.replaying:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self.replaying:
                return
            self._disarm()
            self._in_head = False
            coding = unsupported_coding(self.headers)
            if coding is not None:  # before the app has it: its body cannot be read
                path = self.url.partition(b"?")[0].decode("latin-1")
                self._refuse(coding_not_implemented(path, coding), path, f"Transfer-Encoding {coding!r} not supported")
                raise StopParsing
            problem = None if self.parser.should_upgrade() and self._should_upgrade() else target_problem(self.url)
            if problem is not None:  # uvicorn's own parse of it would fail inside this callback
                target = self.url.decode("latin-1")
                self._refuse(bad_request(target, problem), target, problem)
                raise StopParsing
            super().on_headers_complete()
            if self.cycle is not None and self.cycle.transport is self.transport:  # a new request's cycle
                self.cycle.transport = _ClosingGently(self.transport, self._close_gently)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            if self._lingering:  # requests pipelined behind a refused one are dropped, as a close drops them
                self.pipeline.clear()
            super().on_response_complete()
            self._send_refusal()
            if self._lingering:  # the linger bounds the connection now, not the keep-alive timeout
                self._unset_keepalive_if_required()
            # the next request's headers are timed from its first byte; until then the keep-alive
            # timeout applies

    return HeaderTimeoutProtocol


def refusal_recorder(app: Any) -> OnRefusal:
    """What the connection's guard tells of a request it answers itself: counted and logged by the app's
    metrics and access log (`middleware.record_refusal`)."""
    from openrerank.server.middleware import record_refusal

    def record(status: int, path: str | None, reason: str, client: Any) -> None:
        record_refusal(app.state.metrics, app.state.route_paths(), status, path, reason, client)

    return record
