"""Run the app under uvicorn the way `openrerank serve` does: the connection guard (`server/http_guard.py`:
header limits, gentle closes, refusals answered in order), a drain, exit status that tells.

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
from openrerank.server.http_guard import guarded_protocol, refusal_recorder

log = logging.getLogger(__name__)

#: `openrerank serve` exit status when a model cannot be loaded.
EXIT_LOAD_FAILED = 3

#: Once the server has stopped, how long the process waits for worker threads still busy with work nobody waits
#: for (a model load cut short, images being prepared for requests already answered) before exiting without them.
ABANDONED_WORK_WAIT_S = 1.0
#: Below this many open files a server says so at start: each connection holds one, and the event loop accepts
#: and closes the ones past the limit without a line in the log (`prlimit --nofile=64`: 252 of 300 clients
#: got an empty reply, and the log said nothing).
FEW_OPEN_FILES = 1024
#: macOS's OPEN_MAX: its hard limit is unlimited, but setrlimit refuses a soft limit above this (EINVAL, a
#: ValueError in Python), so raising to the hard limit failed and the limit stayed at macOS's default 256. Go's
#: runtime raises to min(hard, OPEN_MAX) on Darwin for this reason.
OPEN_MAX = 10240


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


def raise_open_files_limit() -> int:
    """Raise the soft open-file limit to the hard one (as Go's runtime does), or where that is refused to
    `OPEN_MAX` (macOS), and warn when even that is below `FEW_OPEN_FILES`. Returns the limit now in force."""
    import resource

    infinite = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == infinite or soft < hard:
        below_hard = hard == infinite or OPEN_MAX < hard
        for limit in [hard, OPEN_MAX] if soft != infinite and soft < OPEN_MAX and below_hard else [hard]:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            except (ValueError, OSError) as exc:  # an infinite hard limit the kernel caps lower (macOS: OPEN_MAX)
                log.debug("open-file limit not raised to %s: %s", "unlimited" if limit == infinite else limit, exc)
            else:
                soft = limit
                break
    if soft != resource.RLIM_INFINITY and soft < FEW_OPEN_FILES:
        log.warning("the open-file limit is %d: each connection holds one, and connections past it are accepted "
                    "and closed without an answer or a line in this log; raise it (`ulimit -n`, docker/podman "
                    "`--ulimit nofile=N:N`)", soft)
    return soft


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

    # ws="none": the server has no WebSocket routes. uvicorn's default ("auto", with `websockets` installed) took
    # every `Upgrade: websocket` request into its handshake: a text/plain 400 or an empty 403 on any path (a health
    # route, without the API key's 401), in no access log and no metric. Now the offer is ignored, as an h2c one
    # is (`http_edges.OfferIgnoringParser`), and the request served as plain HTTP.
    server = DrainingServer(uvicorn.Config(
        app, log_config=None, log_level=config.log_level, access_log=False, ws="none",
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile, ssl_ca_certs=config.ssl_ca_certs,
        ssl_cert_reqs=ssl.CERT_REQUIRED if config.ssl_ca_certs else ssl.CERT_NONE,
        timeout_graceful_shutdown=config.graceful_timeout + UVICORN_MARGIN_S,
        http=guarded_protocol(config.header_timeout, config.max_header_bytes, refusal_recorder(app), app.state.shown)))

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
