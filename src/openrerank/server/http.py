"""Run the app under uvicorn the way `openrerank serve` does: slow-header limit, exit status that tells.

uvicorn has no limit on how long a client may take to send its request headers, so a client that
trickles them (slowloris) holds a connection for ever. `header_timeout` closes such a connection with a
408; the body is bounded by the app's BodyGuardMiddleware (`--body-timeout`), idle keep-alive
connections by uvicorn's own keep-alive timeout. A reverse proxy in front should still bound
connections per client (docs/reliability.md).

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

log = logging.getLogger(__name__)

#: `openrerank serve` exit status when a model cannot be loaded.
EXIT_LOAD_FAILED = 3

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 37\r\nconnection: close\r\n\r\nrequest headers not received in time\n")


def guarded_protocol(header_timeout: float) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a deadline on each request's headers ("auto" without httptools)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] ships httptools
        log.warning("httptools is not installed: no --header-timeout (uvicorn's h11 protocol has none)")
        return "auto"

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        """Closes a connection whose request headers are not complete `header_timeout` seconds after the
        connection opened or the request's first byte arrived."""

        _header_timer: asyncio.TimerHandle | None = None

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

    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, log_level=config.log_level, access_log=False,
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
        timeout_graceful_shutdown=config.graceful_timeout, http=guarded_protocol(config.header_timeout)))

    def request_shutdown() -> None:
        server.should_exit = True

    app.state.request_shutdown = request_shutdown
    server.run(sockets=[sock])
    models = app.state.models
    if models.load_error:
        print(f"openrerank: error: {models.load_error}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0
