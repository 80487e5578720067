"""Graceful shutdown that answers every accepted request.

On SIGTERM (or SIGINT) the HTTP runner (`server/http.py`) stops accepting connections and calls
`Drain.begin()`. Requests already accepted keep running for `--graceful-timeout` seconds (no new
connection is accepted, so load balancers see the server gone; the readiness probes say 503). When the grace
period ends, every request still running is cancelled inside the app (its queued model work is dropped) and
answered with its dialect's retryable 503 (`Retry-After`, `Connection: close`), so a client always gets an
answer it can act on instead of a dropped connection or uvicorn's plain-text 500. uvicorn's own deadline is
set a little later (`UVICORN_MARGIN_S`), so it never cancels a request before the app has answered it.

gRPC drains on the same grace period (`server/grpc/server.py`): it refuses new calls from the moment the
drain begins, and a call still running when the period ends is answered UNAVAILABLE with the same message.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

#: uvicorn cancels whatever is still running this long after the app's grace period ended; by then every
#: request has had its 503.
UVICORN_MARGIN_S = 3.0
#: What a client should wait before retrying (elsewhere, or here once restarted).
RETRY_AFTER_S = 1


class Drain:
    """The shutdown state of one server: not draining, draining (grace running), or expired."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self._began = asyncio.Event()
        self._expired = asyncio.Event()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def begin(self) -> None:
        """Start the grace period (on the event loop; idempotent)."""
        if self.draining:
            return
        self.draining = True
        self._began.set()
        log.info("shutting down: finishing accepted requests for up to %g s (--graceful-timeout); the rest "
                 "will be answered 503", self.grace)
        asyncio.get_running_loop().call_later(self.grace, self._expired.set)

    async def wait_begun(self) -> None:
        await self._began.wait()

    async def wait_expired(self) -> None:
        await self._expired.wait()

    def message(self) -> str:
        return (f"the server is shutting down and this request did not finish within its {self.grace:g} s grace "
                "period; retry it (another replica, or this one once restarted)")
