"""A real server (the app under uvicorn, on a free port) run in this process, so a test can hold the
model, poison one input or kill the worker, and watch what clients see over HTTP.

Imported by tests/server/test_faults.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import uvicorn
from openrerank_bench.serve_process import free_port

from openrerank.core.work import WorkItem
from openrerank.families.scorer import Scorer
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.http_guard import guarded_protocol

WAIT_S = 60.0


class Fatal(BaseException):
    """Escapes the scheduler's per-batch handling: kills the worker thread."""


class GatedScorer(Scorer):
    """Wraps a model's real backend: can hold batches, fail any batch holding `poison_token`, or die."""

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.runtime = inner.runtime
        self.pad_id = inner.pad_id
        self.poison_token: int | None = None
        self.fatal = False
        self.batches: list[int] = []  # size of every batch that entered score()
        self.started = threading.Semaphore(0)
        self._gate = threading.Event()
        self._gate.set()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=WAIT_S), "no batch started"

    def score(self, items: Sequence[WorkItem]) -> np.ndarray:
        self.batches.append(len(items))
        self.started.release()
        assert self._gate.wait(WAIT_S), "the test never released the backend"
        if self.fatal:
            raise Fatal("the worker dies")
        if self.poison_token is not None and any(self.poison_token in it.input_ids for it in items):
            raise RuntimeError("poisoned input")
        return self.inner.score(items)


class InProcessServer:
    """`create_app(config)` served by uvicorn on 127.0.0.1 in a thread; every model's backend gated."""

    def __init__(self, config: ServerConfig) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http=guarded_protocol(config.header_timeout)))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.backends: dict[str, GatedScorer] = {}

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(main())

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "in-process server not ready"
            assert self.thread.is_alive(), "in-process server died"
            time.sleep(0.1)
        for model in self.app.state.models.models():
            gated = GatedScorer(model.scheduler.scorer)
            model.scheduler.scorer = gated
            self.backends[model.name] = gated
        return self

    def __exit__(self, *exc: Any) -> None:
        for backend in self.backends.values():
            backend.fatal = False
            backend.release()
        self.server.should_exit = True
        self.thread.join(60)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=WAIT_S, **kw)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` (or await it, if it returns a coroutine) on the server's event loop."""
        async def run() -> Any:
            out = fn()
            return await out if asyncio.iscoroutine(out) else out

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT_S)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.app.state.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class HeldCall:
    """Wraps a function run in the server (a validation, a parse): says when a call started and holds it until
    released (at most `WAIT_S`)."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.entered, self.released = threading.Event(), threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.released.wait(WAIT_S)
        return self.call(*args, **kwargs)


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start `fn` in a thread; the returned callable joins it and returns (or raises) its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "request thread still running"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def live_while_held(server: InProcessServer, held: HeldCall, send: Callable[[httpx.Client], httpx.Response],
                    what: str) -> httpx.Response:
    """`send` a request on a thread of its own; while `held` holds it (a parse, a validation, an inflation), the
    liveness probe must be answered (200); then release it and return its answer, which must be a 200 too."""
    answer = in_thread(lambda: send(server.client()))
    try:
        assert held.entered.wait(WAIT_S), f"the body was never {what}"
        with server.client() as probe:
            live = probe.get("/v1/health/live", timeout=5)
    finally:
        held.released.set()
    assert live.status_code == 200
    r = answer()
    assert r.status_code == 200, r.text
    return r
