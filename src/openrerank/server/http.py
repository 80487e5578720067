"""Run the app under uvicorn the way `openrerank serve` does: header limits, a drain, exit status that tells.

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
shape: uvicorn closed at once, losing their answers. An upgrade offer other than a websocket (h2c) is ignored
and the request served with its body (`server/http_edges.py`).

On SIGTERM/SIGINT the app's drain (`server/drain.py`) starts as uvicorn stops accepting connections: every
accepted request is answered, finished or with a retryable 503 once `--graceful-timeout` has passed. A second
signal ends the grace period at once (the same 503s now, then the clean-up); a signal after the grace period
ended exits at once, without the clean-up (status 128 + the signal's number, as a shell reports a death by it).
uvicorn's own second Ctrl-C skipped the app's clean-up (the models never stopped), logged a CancelledError
traceback and told the requests it cut that their grace period had run out.

Work that nobody waits for any more is not waited for either: a model load cut short by a signal (a Python
thread cannot be interrupted) and images still being prepared for requests already answered 503 kept the
process alive until they ended (a signal during a 55 s load took effect after it; `--graceful-timeout 4` ended
the process 8-13 s after SIGTERM), with every further signal ignored. The event loop's worker threads are
`WorkerThreads`, which the loop's closing does not join; once the server has stopped, the process waits at
most ABANDONED_WORK_WAIT_S for those still busy, then exits without them (`os._exit`, after flushing the log).

The exit status: 0 after a normal shutdown, on SIGTERM or SIGINT once the drain is done; 3 when the models
could not be loaded (the server stops by itself then, with one clear line on stderr, so a supervisor restarts
it or shows why). uvicorn re-raises the signal it shut down on to the handler it found, which made Ctrl-C end
in a KeyboardInterrupt traceback and status 1, and SIGTERM in a death by signal (143), after a clean
shutdown; `run` gives it handlers that let the process end with its own status instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from openrerank.runtimes.cache_entries import remove_own_staging
from openrerank.server.config import ServerConfig
from openrerank.server.drain import UVICORN_MARGIN_S
from openrerank.server.http_answers import (
    bad_request,
    coding_not_implemented,
    headers_too_large,
    headers_too_slow,
    request_path,
)

log = logging.getLogger(__name__)

#: `openrerank serve` exit status when a model cannot be loaded.
EXIT_LOAD_FAILED = 3

_HEAD_END = b"\r\n\r\n"
#: A connection answered before its request was read whole is closed once the client has been quiet for
#: LINGER_S, or LINGER_MAX_S after the answer at the latest (nginx's lingering_timeout and lingering_time).
LINGER_S = 2.0
LINGER_MAX_S = 30.0
#: Once the server has stopped, how long the process waits for worker threads still busy with work nobody waits
#: for (a model load cut short, images being prepared for requests already answered) before exiting without them.
ABANDONED_WORK_WAIT_S = 1.0


class _ClosingGently:
    """The transport as a request's cycle sees it: `close` goes through the protocol, which lingers when the
    request is not read whole (see `_close_gently`); everything else is the transport's own."""

    def __init__(self, transport: Any, close: Any) -> None:
        self._transport = transport
        self.close = close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(header_timeout: float, max_header_bytes: int = ServerConfig.max_header_bytes
                     ) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a deadline on each request's headers, a bound on their size, and a
    gentle close of a connection answered early ("auto" without httptools)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        from openrerank.server.http_edges import (
            OfferIgnoringParser,
            StopParsing,
            target_problem,
            unsupported_coding,
        )
    except ImportError:  # pragma: no cover - uvicorn[standard] ships httptools
        log.warning("httptools is not installed: no --header-timeout (uvicorn's h11 protocol has none)")
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

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.parser = OfferIgnoringParser(self)
            try:  # as uvicorn sets its own parser: answer a request pipelined before a close
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            except AttributeError:  # pragma: no cover - httptools < 0.6.3
                pass

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
            log.info("refusing a request from %s: request headers over %d bytes (--max-header-bytes)",
                     self.client, max_header_bytes)
            self._refuse(headers_too_large(self._head_start, max_header_bytes))

        def _refuse(self, answer: bytes) -> None:
            """Send `answer` to a request that cannot be served and close gently, after the answers to the
            requests pipelined before it (HTTP/1.1 answers in order): sending it at once lost those."""
            self._disarm()
            if self._refusal is None and not self._lingering:
                self._refusal = answer
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
            if broken is None:  # its request line, else the path of the request before it
                path = request_path(self._head_start, whole_line=True) or (
                    self.cycle.scope["path"] if self.cycle is not None else "/")
            else:
                path = broken.scope["path"]
                if self.pipeline and self.pipeline[0][0] is broken:
                    self.pipeline.popleft()  # not started: it never will be
                else:  # its app is told the client is gone, as uvicorn's close told it
                    broken.disconnected = True
                    broken.message_event.set()
            self._refuse(bad_request(path, problem))

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
                # after the answers to the requests before it, as every refusal (a pipelined head that
                # stalls must not cut off the answer still being computed for the request before it)
                self._refuse(headers_too_slow(self._head_start, header_timeout))

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            if not self.replaying:
                super().on_message_begin()
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
                self._refuse(coding_not_implemented(self.url.partition(b"?")[0].decode("latin-1"), coding))
                raise StopParsing
            problem = None if self.parser.should_upgrade() and self._should_upgrade() else target_problem(self.url)
            if problem is not None:  # uvicorn's own parse of it would fail inside this callback
                log.info("refusing a request from %s: %s", self.client, problem)
                self._refuse(bad_request(self.url.decode("latin-1"), problem))
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


class WorkerThreads(ThreadPoolExecutor):
    """The event loop's default executor (`asyncio.to_thread`: model loading, tokenization, image preparation),
    as asyncio makes it, except that shutting it down never waits: what still runs when the loop closes was
    abandoned (its request answered, its load cut short), and a Python thread cannot be interrupted. It counts
    the work it holds, so `run` knows whether any is still busy."""

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="asyncio")
        self._idle = threading.Condition()
        self._busy = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        with self._idle:
            self._busy += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future | None) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)  # nobody waits for queued work any more either

    def still_busy(self, timeout: float) -> int:
        """How many jobs are still running (or queued) after waiting up to `timeout` seconds for none to be."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy <= 0, timeout)
            return self._busy


def _shut_down_already(signum: int, frame: object) -> None:
    """Where uvicorn re-raises the signal it shut down on (module docstring): the shutdown is done."""


def exit_now(status: int) -> None:
    """End the process at once with `status`, the log flushed: no waiting for threads (see the module docstring).
    A model conversion cut short cannot clean up after itself then: its staging folder is removed here."""
    remove_own_staging()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say there
            pass
    os._exit(status)


def run(app: Any, config: ServerConfig, sock: socket.socket) -> int:
    """Serve on the already bound `sock` until stopped; the exit status (see the module docstring). When
    worker threads are still busy with abandoned work once the server has stopped, the process ends here.

    Logging is openrerank's (`openrerank.observe.logs`): uvicorn's own config and access log are off."""
    import uvicorn

    threads = WorkerThreads()

    class DrainingServer(uvicorn.Server):
        """uvicorn's server that starts the app's drain as it stops accepting connections, ends the grace period
        on a second signal, and exits on a signal after it ended."""

        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            self.loop.set_default_executor(threads)
            await super().serve(sockets)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.state.drain.begin()
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit or self.loop is None:
                super().handle_exit(sig, frame)  # the first: stop accepting, drain
                return
            if app.state.drain.expired:
                log.warning("%s after the grace period ended: exiting now, without the clean-up",
                            signal.Signals(sig).name)
                exit_now(128 + sig)
            self.loop.call_soon_threadsafe(app.state.drain.end_now)  # not uvicorn's force-quit (docstring)

    server = DrainingServer(uvicorn.Config(
        app, log_config=None, log_level=config.log_level, access_log=False,
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile, ssl_ca_certs=config.ssl_ca_certs,
        ssl_cert_reqs=ssl.CERT_REQUIRED if config.ssl_ca_certs else ssl.CERT_NONE,
        timeout_graceful_shutdown=config.graceful_timeout + UVICORN_MARGIN_S,
        http=guarded_protocol(config.header_timeout, config.max_header_bytes)))

    def request_shutdown() -> None:
        server.should_exit = True

    app.state.request_shutdown = request_shutdown
    previous = {sig: signal.signal(sig, _shut_down_already) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
        busy = threads.still_busy(ABANDONED_WORK_WAIT_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = 0
    models = app.state.models
    if models.load_error:
        if config.log_format == "json":  # already logged as a JSON record by the loader: one format a stream
            log.error("openrerank: error: %s", models.load_error)
        else:
            print(f"openrerank: error: {models.load_error}", file=sys.stderr)
        status = EXIT_LOAD_FAILED
    if busy:
        log.info("exiting without waiting for %d job(s) nobody waits for any more (a model load cut short, "
                 "images prepared for requests already answered)", busy)
        exit_now(status)
    return status
