"""Graceful shutdown that answers every accepted request.

On SIGTERM (or SIGINT) the HTTP runner (`server/http.py`) stops accepting connections and calls
`Drain.begin()`. Requests already accepted keep running for `--graceful-timeout` seconds (no new
connection is accepted, so load balancers see the server gone; the readiness probes say 503). When the grace
period ends, every request still running is cancelled inside the app (its queued model work is dropped) and
answered with its dialect's retryable 503 (`Retry-After`, `Connection: close`), so a client always gets an
answer it can act on instead of a dropped connection or uvicorn's plain-text 500. uvicorn's own deadline is
set a little later (`UVICORN_MARGIN_S`), so it never cancels a request before the app has answered it.

A second SIGTERM or SIGINT during the drain ends the grace period at once (`Drain.end_now`): every request
still running is answered the same way now, with a message that says so, and the clean-up (models stopped)
still runs; a signal after the grace period has ended (by time or by that second signal) ends the process at
once, clean-up or not (`server/http.py`).

gRPC drains on the same grace period (`server/grpc/server.py`): it refuses new calls from the moment the
drain begins (UNAVAILABLE, `CLOSED_MESSAGE`), and a call still running when the period ends is answered
UNAVAILABLE with the same message as HTTP's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from openrerank.core.settings import Shown, setting_name

log = logging.getLogger(__name__)

T = TypeVar("T")

#: uvicorn cancels whatever is still running this long after the app's grace period ended; by then every
#: request has had its 503.
UVICORN_MARGIN_S = 3.0
#: What a client should wait before retrying (elsewhere, or here once restarted).
RETRY_AFTER_S = 1
#: A call that arrives once the drain has begun (gRPC: HTTP no longer accepts the connection).
CLOSED_MESSAGE = ("the server is shutting down and takes no new requests; retry it (another replica, or this one "
                  "once restarted)")


class Drain:
    """The shutdown state of one server: not draining, draining (grace running), or expired (the grace period
    ran out, or was ended early by a second signal). `shown`: how its log names `--graceful-timeout` when the
    operator set it otherwise (core/settings.py)."""

    def __init__(self, grace: float, shown: Shown | None = None) -> None:
        self.grace = grace
        self.grace_setting = setting_name("graceful-timeout", shown)
        self.draining = False
        self.cut_short = False  # ended early by a second signal, not by the time running out
        self.ends_at: float | None = None  # the grace period's end, a `time.monotonic()` instant, once begun
        self._began = asyncio.Event()
        self._expired = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def begin(self) -> None:
        """Start the grace period (on the event loop; idempotent)."""
        if self.draining:
            return
        self.draining = True
        self.ends_at = time.monotonic() + self.grace
        self._began.set()
        log.info("shutting down: finishing accepted requests for up to %g s (%s); the rest will be answered 503 "
                 "(a second SIGTERM/SIGINT answers them now)", self.grace, self.grace_setting)
        self._timer = asyncio.get_running_loop().call_later(self.grace, self._expired.set)

    def end_now(self) -> None:
        """End the grace period now (a second signal; on the event loop): what still runs is answered 503."""
        if self.expired:
            return
        self.draining = self.cut_short = True
        self.ends_at = time.monotonic()
        self._began.set()
        if self._timer is not None:
            self._timer.cancel()
        log.warning("shutting down now (a second signal): requests still running are answered 503; a further "
                    "signal ends the process without waiting for the clean-up")
        self._expired.set()

    async def race(self, work: Awaitable[T], timeout: float | None = None) -> asyncio.Future[T] | None:
        """`work` run until it ends, the grace period ends or `timeout` seconds pass: its finished task (its
        result or exception read from it), or None, once it was cancelled and has stopped. Cancelling the caller
        cancels the work too, and an exception the work raised as it was cancelled is read, never left for
        asyncio to log as "never retrieved" (a gRPC call cancelled in the turn its work failed did)."""
        task = asyncio.ensure_future(work)
        expiry = asyncio.ensure_future(self.wait_expired())
        try:
            await asyncio.wait((task, expiry), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            expiry.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))
            if not task.cancelled():
                task.exception()  # read: whoever waits for it, nobody may
        return None if task.cancelled() else task

    async def wait_begun(self) -> None:
        await self._began.wait()

    async def wait_expired(self) -> None:
        await self._expired.wait()

    def ending(self) -> str:
        """What ended the grace period, for log lines."""
        if self.cut_short:
            return "a second signal ended the shutdown grace period"
        return "the shutdown grace period ended"

    def message(self) -> str:
        if self.cut_short:
            return ("the server was told to stop at once (a second shutdown signal) before this request finished; "
                    "retry it (another replica, or this one once restarted)")
        return (f"the server is shutting down and this request did not finish within its {self.grace:g} s grace "
                "period; retry it (another replica, or this one once restarted)")
