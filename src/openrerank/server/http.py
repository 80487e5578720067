"""Run the app under uvicorn the way `openrerank serve` does: header limits, a drain, exit status that tells.

uvicorn has no limit on how long a client may take to send its request headers, so a client that
trickles them (slowloris) holds a connection for ever. `header_timeout` closes such a connection with a
408; the body is bounded by the app's BodyGuardMiddleware (`--body-timeout`), idle keep-alive
connections by uvicorn's own keep-alive timeout. Nor does its httptools protocol bound the size of the
headers (1 MB, 32 MB headers were read whole): past `max_header_bytes` the connection gets a 431 in the
path's dialect and is closed, before the parser buffers more. A reverse proxy in front should still bound
connections per client (docs/reliability.md).

On SIGTERM/SIGINT the app's drain (`server/drain.py`) starts as uvicorn stops accepting connections: every
accepted request is answered, finished or with a retryable 503 once `--graceful-timeout` has passed.

The exit status: 0 after a normal shutdown, 3 when the models could not be loaded (the server stops by
itself then, with one clear line on stderr, so a supervisor restarts it or shows why).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

from openrerank.server.config import ServerConfig
from openrerank.server.drain import UVICORN_MARGIN_S
from openrerank.server.errors import dialect_for
from openrerank.server.responses import dumps

log = logging.getLogger(__name__)

#: `openrerank serve` exit status when a model cannot be loaded.
EXIT_LOAD_FAILED = 3

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 37\r\nconnection: close\r\n\r\nrequest headers not received in time\n")
_HEAD_END = b"\r\n\r\n"
#: How long a connection refused for oversize headers is still read (and dropped) before it is closed.
LINGER_S = 2.0


def headers_too_large(head_start: bytes, limit: int) -> bytes:
    """A whole 431 response, in the error shape of the dialect owning the request's path."""
    target = head_start.split(b"\r\n", 1)[0].split(b" ")
    path = target[1].split(b"?", 1)[0].decode("latin-1") if len(target) > 1 else "/"
    message = f"request headers exceed {limit} bytes (--max-header-bytes)"
    body = dumps(dialect_for(path).render(431, message, "too_large"))
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))


def guarded_protocol(header_timeout: float, max_header_bytes: int = ServerConfig.max_header_bytes
                     ) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a deadline on each request's headers and a bound on their size
    ("auto" without httptools)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] ships httptools
        log.warning("httptools is not installed: no --header-timeout (uvicorn's h11 protocol has none)")
        return "auto"

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        """Closes a connection whose request headers are not complete `header_timeout` seconds after the
        connection opened or the request's first byte arrived, and one whose request line and headers
        pass `max_header_bytes` (431)."""

        _header_timer: asyncio.TimerHandle | None = None
        _in_head = True  # the next bytes belong to a request's line and headers
        _head_bytes = 0
        _head_start = b""  # the head's first bytes: the request line, for the path's dialect
        _tail = b""  # the last bytes counted, to find a head end split across two reads
        _refused = False

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # the rest of an oversize head: read and dropped until the connection closes
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
            """Answer 431 and close gently: stop writing, drop what the client still sends for a moment,
            then close. Closing at once with unread bytes would reset the connection, and the client could
            lose the 431 (the reason servers linger on close)."""
            self._disarm()
            self._refused = True
            if self.transport.is_closing():
                return
            log.info("refusing a request from %s: request headers over %d bytes (--max-header-bytes)",
                     self.client, max_header_bytes)
            self.transport.write(headers_too_large(self._head_start, max_header_bytes))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes, self._head_start, self._tail = True, 0, b"", b""

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
                log.info("closing a connection from %s: request headers not received within %g s "
                         "(--header-timeout)", self.client, header_timeout)
                self.transport.write(_TIMEOUT_408)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._in_head = False
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # the next request's headers are timed from its first byte; until then the keep-alive
            # timeout applies

    return HeaderTimeoutProtocol


def run(app: Any, config: ServerConfig, sock: socket.socket) -> int:
    """Serve on the already bound `sock` until stopped; the exit status (see the module docstring).

    Logging is openrerank's (`openrerank.observe.logs`): uvicorn's own config and access log are off."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server that starts the app's drain as it stops accepting connections."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.state.drain.begin()
            await super().shutdown(sockets)

    server = DrainingServer(uvicorn.Config(
        app, log_config=None, log_level=config.log_level, access_log=False,
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
        timeout_graceful_shutdown=config.graceful_timeout + UVICORN_MARGIN_S,
        http=guarded_protocol(config.header_timeout, config.max_header_bytes)))

    def request_shutdown() -> None:
        server.should_exit = True

    app.state.request_shutdown = request_shutdown
    server.run(sockets=[sock])
    models = app.state.models
    if models.load_error:
        print(f"openrerank: error: {models.load_error}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0
