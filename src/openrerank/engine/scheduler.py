"""Per-model scheduler: the only path from requests to the backend.

Requests from any number of concurrent callers are admitted by their work (pending requests and
pending tokens are both bounded) into one queue. A dedicated worker thread (model work never runs on
the event loop) repeatedly plans a *window* of about `window_batches` batches from every unfinished
request -- each request contributes a max-min fair share, items are sorted by length across
requests, the batches of requests that finish in the window run first (`engine/planning.py`) -- and
runs it batch by batch. When a new request arrives mid-window, the rest of the window goes back and
is planned again with the newcomer, as soon as every request in the window has had a batch; so a
small request waits about one batch behind a big one, never for all of it, and a big request keeps
getting a share of every window.

Why the worker thread forms batches itself (as text-embeddings-inference's queue task does) rather
than an asyncio task: the model never idles waiting for a busy event loop to hand it the next batch.
The event loop only appends requests, abandons them (deadline, client disconnect) and receives results.

Failures stay where they belong: a batch that raises is re-run request by request, so only the
request whose input fails gets the error; a runtime that could score all but some rows (a sequence that
does not fit in device memory even alone: `RowsFailedError`) fails only those rows' requests, with no
re-run. If the worker thread itself dies, every accepted request is answered with `WorkerDiedError`, later
submits are refused at once and `alive` turns False (health checks report it).

Reranking and embedding share this one path: a request's items all serve one task (`core/work.py`), a
window's items are batched per task (a backend call runs one task, `engine/planning.py`), and an item's result
is a row of the request's result array: a score, or an embedding vector. Admission, deadlines, cancellation,
failure isolation and metrics (labelled by task) are the same for both.

Interface used outside the engine (the API layer, the Ray Serve adapter, the embeddings route):
`submit`, `start`, `stop`, `warmup`, and the read-only `alive`, `failure`, `pending`,
`pending_tokens`, `queued`, `retry_after`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from openrerank.core.work import TASKS, Task, WorkItem
from openrerank.engine.admission import budget_for, finish_estimate, observed_rate
from openrerank.engine.batching import MAX_PADDING, MIN_ROWS, BatchPolicy
from openrerank.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    DeadlineUnreachableError,
    EngineStoppedError,
    QueueFullError,
    RequestTooLargeError,
    WorkerDiedError,
)
from openrerank.engine.planning import give_back, plan_window
from openrerank.observe.metrics import Metrics
from openrerank.runtimes.base import Backend, RowsFailedError

log = logging.getLogger(__name__)

#: The default per-request token budget assumes at least one full batch every this many seconds of
#: `request_timeout`: work a slow CPU still finishes before the deadline.
SECONDS_PER_BUDGET_BATCH = 2.0
#: Default pending-token limit, in per-request budgets.
QUEUE_BUDGETS = 2


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 16384  # padded tokens per batch: pairs x longest pair
    max_batch_size: int = 128  # pairs per batch
    batch_wait_ms: float = 1.0  # how long the oldest queued request may wait for company
    max_queue: int = 1024  # pending requests (queued or being scored) before QueueFullError
    request_timeout: float = 120.0  # seconds from arrival to result
    #: Tokens one request may hold (None: `max_batch_tokens` x request_timeout / 2 s).
    max_request_tokens: int | None = None
    #: Tokens of all pending requests before QueueFullError (None: two request budgets). A request
    #: arriving at an idle scheduler is always admitted (if within its own budget).
    max_queue_tokens: int | None = None
    #: A window holds about this many batches' worth of work; bigger sorts better, smaller lets
    #: newly arrived requests in sooner.
    window_batches: int = 4
    #: Padding cap of each batch (engine/batching.py): tight on CPU, looser on GPU.
    max_padding: float = MAX_PADDING
    #: Pairs a batch may always reach whatever their padding.
    min_rows: int = MIN_ROWS

    @property
    def policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch_tokens, self.max_batch_size, self.max_padding, self.min_rows)

    @property
    def request_budget(self) -> int:
        if self.max_request_tokens:
            return self.max_request_tokens
        return self.max_batch_tokens * max(1, int(self.request_timeout / SECONDS_PER_BUDGET_BATCH))

    @property
    def queue_budget(self) -> int:
        return self.max_queue_tokens or QUEUE_BUDGETS * self.request_budget


@dataclass
class ScoreOutcome:
    scores: np.ndarray  # float32, one row per submitted item: scores (n,), or embeddings (n, dim)
    queue_ms: float  # submit -> first batch holding one of its items starts
    inference_ms: float  # first batch start -> last batch end
    batches: int = 0  # how many model batches its items were spread over


class _Request:
    """One submitted request. The worker owns `todo`/`scores`/`remaining`/timings; the loop owns `future`."""

    __slots__ = ("abandoned", "batches", "failed", "first_start", "future", "items", "last_end", "loop",
                 "remaining", "scores", "submitted", "task", "todo", "tokens")

    def __init__(self, items: list[WorkItem], loop: asyncio.AbstractEventLoop) -> None:
        self.items = items
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.submitted = time.perf_counter()
        self.tokens = sum(it.length for it in items)
        self.todo = sorted(range(len(items)), key=lambda i: items[i].length)  # not yet planned
        self.task: Task = items[0].task  # one task per request
        self.scores: np.ndarray | None = None  # made by its first batch: (n,) scores or (n, dim) embeddings
        self.remaining = len(items)
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.batches = 0
        self.abandoned = False  # deadline or cancellation: set by the loop under the lock
        self.failed = False  # its items failed in the model: set by the worker


_NEW, _RUNNING, _STOPPING, _STOPPED, _FAILED = "new", "running", "stopping", "stopped", "failed"


class Scheduler:
    def __init__(self, backend: Backend, config: SchedulerConfig, *, name: str,
                 metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.config = config
        self.name = name
        self.metrics = metrics
        self._cv = threading.Condition()
        # Guarded by self._cv:
        self._queue: deque[_Request] = deque()  # accepted, not yet seen by the worker
        self._queued_items = 0
        self._queued_tokens = 0
        self._pending = 0  # accepted and unfinished (queued, planned, or being scored)
        self._pending_tokens = 0
        self._state = _NEW
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._sec_per_token = 0.0  # moving average of model time per token, for Retry-After
        #: Measured model speed (engine/admission.py): sets the request budget and deadline admission.
        self.tokens_per_second: float | None = None
        # Worker thread only:
        self._active: list[_Request] = []  # seen by the worker, unfinished

    # -- public interface ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests accepted and not finished yet; the quantity `max_queue` bounds."""
        return self._pending

    @property
    def pending_tokens(self) -> int:
        """Tokens of the pending requests; the quantity `max_queue_tokens` bounds."""
        return self._pending_tokens

    @property
    def queued(self) -> int:
        """Requests accepted that the worker has not planned yet."""
        with self._cv:
            return len(self._queue)

    @property
    def alive(self) -> bool:
        """False once the worker thread has ended (stopped, or died of an error); True before the first
        start. Health checks (ready/live, Ray Serve's check_health) read this."""
        with self._cv:
            if self._state == _NEW:
                return True
            return self._state == _RUNNING and self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        """Why the worker died (the exception's type), or None."""
        return self._failure

    @property
    def retry_after(self) -> float:
        """Seconds until the pending work is likely done (1-60): backlog x measured time per token."""
        with self._cv:
            return self._retry_after_locked()

    async def start(self) -> None:
        with self._cv:
            self._start_locked()

    async def stop(self) -> None:
        """Refuse new work, finish everything accepted, then end the worker thread."""
        with self._cv:
            if self._state in (_NEW, _STOPPED, _FAILED):
                if self._state == _NEW:
                    self._state = _STOPPED
                return
            self._state = _STOPPING
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def warmup(self, items: Sequence[WorkItem]) -> None:
        """Score once synchronously (before serving) so first requests don't pay lazy init."""
        items = list(items)
        for task in TASKS:
            group = [it for it in items if it.task == task]
            for idx in self.config.policy.split(group):
                self.backend.compute([group[i] for i in idx])

    async def submit(self, items: Sequence[WorkItem], *, timeout: float | None = None,
                     deadline: float | None = None) -> ScoreOutcome:
        """Score `items` in batches shared with other requests; scores come back in item order.

        One call is one admission unit, whatever its size. `deadline` (a `time.monotonic()` instant,
        e.g. the request's arrival + timeout) or `timeout` (seconds from now; default the configured
        request timeout) bounds the wait. Raises RequestTooLargeError (over the per-request budget),
        QueueFullError (back-pressure), DeadlineExceededError, EngineStoppedError, WorkerDiedError,
        BatchFailedError.
        """
        items = list(items)
        if not items:
            return ScoreOutcome(np.zeros(0, dtype=np.float32), 0.0, 0.0)
        timeout = self.config.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout if deadline is None else deadline
        req = _Request(items, asyncio.get_running_loop())
        budget = self.request_budget
        if req.tokens > budget:
            self.count_rejected(req.task, "too_large")
            raise RequestTooLargeError("tokens", req.tokens, budget, "--max-request-tokens", self.budget_reason)
        with self._cv:
            if self._state == _FAILED:
                raise WorkerDiedError()
            if self._state in (_STOPPING, _STOPPED):
                raise EngineStoppedError()
            full = self._refusal_locked(req.tokens, deadline - time.monotonic())
            if full is None:
                self._start_locked()  # tolerate callers that never called start()
                self._queue.append(req)
                self._queued_items += len(items)
                self._queued_tokens += req.tokens
                self._pending += 1
                self._pending_tokens += req.tokens
                self._cv.notify_all()
        if full is not None:
            self.count_rejected(req.task, "queue_full")
            raise full
        self._set_depth()
        try:
            await asyncio.wait_for(req.future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self._abandon(req)
            self.count_rejected(req.task, "deadline")
            raise DeadlineExceededError(timeout) from None
        except asyncio.CancelledError:
            self._abandon(req)
            if self.metrics:
                self.metrics.cancelled.labels(self.name, req.task).inc()
            raise
        finally:
            with self._cv:
                self._pending -= 1
                self._pending_tokens -= req.tokens
            self._set_depth()
        assert req.scores is not None and req.first_start is not None and req.last_end is not None
        return ScoreOutcome(req.scores, (req.first_start - req.submitted) * 1e3,
                            (req.last_end - req.first_start) * 1e3, req.batches)

    # -- event-loop side helpers -----------------------------------------------------------------

    @property
    def request_budget(self) -> int:
        """Tokens one request may hold: `--max-request-tokens` if set, else what the measured rate scores in
        part of the request timeout (engine/admission.py), else the static default."""
        cfg = self.config
        if cfg.max_request_tokens or not self.tokens_per_second:
            return cfg.request_budget
        return budget_for(self.tokens_per_second, cfg.request_timeout)

    @property
    def queue_budget(self) -> int:
        return self.config.max_queue_tokens or QUEUE_BUDGETS * self.request_budget

    @property
    def budget_reason(self) -> str:
        """Why the request budget is what it is, for the refusal's message."""
        if self.config.max_request_tokens or not self.tokens_per_second:
            return "send fewer or shorter passages, or fewer chunks"
        return (f"this model scores ~{self.tokens_per_second:,.0f} tokens/s here (measured), so more would not "
                f"finish within the {self.config.request_timeout:g} s request timeout; send fewer or shorter "
                "passages, or fewer chunks")

    def _refusal_locked(self, tokens: int, left: float) -> QueueFullError | None:
        cfg = self.config
        if self._pending >= cfg.max_queue:
            return QueueFullError(f"{self._pending} requests", f"{cfg.max_queue}, --max-queue",
                                  self._retry_after_locked())
        if self._pending and self._pending_tokens + tokens > self.queue_budget:
            return QueueFullError(f"{self._pending_tokens} tokens", f"{self.queue_budget}, --max-queue-tokens",
                                  self._retry_after_locked())
        rate = self.tokens_per_second
        if self._pending and rate and not cfg.max_request_tokens:
            estimate = finish_estimate(tokens, self._pending, self._pending_tokens, rate)
            if estimate > left:
                return DeadlineUnreachableError(estimate, left, rate, self._retry_after_locked())
        return None

    def _retry_after_locked(self) -> float:
        return min(60.0, max(1.0, self._pending_tokens * self._sec_per_token))

    def count_rejected(self, task: Task, reason: str) -> None:
        """Count a refusal in `openrerank_rejected_total` (also for refusals made before submit)."""
        if self.metrics:
            self.metrics.rejected.labels(self.name, task, reason).inc()

    def _start_locked(self) -> None:
        if self._state == _RUNNING:
            return
        if self._state == _STOPPING:
            raise EngineStoppedError()
        self._state = _RUNNING
        self._thread = threading.Thread(target=self._work, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    def _abandon(self, req: _Request) -> None:
        """Free a request's queued work; its items already planned are skipped, a running batch discarded."""
        with self._cv:
            req.abandoned = True
            try:
                self._queue.remove(req)
            except ValueError:
                return  # the worker has it: it drops the request at its next batch
            self._queued_items -= len(req.items)
            self._queued_tokens -= req.tokens

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self._pending)
            self.metrics.queue_tokens.labels(self.name).set(self._pending_tokens)

    @staticmethod
    def _settle(req: _Request, exc: BaseException | None) -> None:
        if req.future.done():  # timed out or cancelled meanwhile
            return
        if exc is None:
            req.future.set_result(None)
        else:
            req.future.set_exception(exc)

    # -- worker thread ---------------------------------------------------------------------------

    def _post(self, req: _Request, exc: BaseException | None) -> None:
        try:
            req.loop.call_soon_threadsafe(self._settle, req, exc)
        except RuntimeError:  # its event loop is closed: nobody is waiting any more
            pass

    def _work(self) -> None:
        died = False
        try:
            while True:
                window = self._next_window()
                if window is None:
                    return
                self._run_window(window)
        except BaseException as exc:
            died = True
            log.critical("the scheduler worker of model %s died (%s); every pending request is answered 503 "
                         "and health checks now fail", self.name, type(exc).__name__, exc_info=True)
            with self._cv:
                self._failure = type(exc).__name__
        finally:
            with self._cv:
                leftover = [*self._queue, *self._active]
                self._queue.clear()
                self._active = []
                self._queued_items = self._queued_tokens = 0
                self._state = _FAILED if died else _STOPPED
            for req in leftover:  # only if the loop above died
                self._post(req, WorkerDiedError() if died else EngineStoppedError())

    def _next_window(self) -> list[list[tuple[_Request, int]]] | None:
        """Block until there is work (letting a lone newcomer wait `batch_wait_ms` for company), take in
        everything queued and plan the next window. None: stopped and drained."""
        cfg = self.config
        wait_s = cfg.batch_wait_ms / 1e3
        with self._cv:
            while True:
                self._active = [r for r in self._active if r.todo and not r.abandoned and not r.failed]
                if self._active and not self._queue:
                    break
                if self._queue:
                    if (self._active or self._state != _RUNNING or self._queued_items >= cfg.max_batch_size
                            or self._queued_tokens >= cfg.max_batch_tokens):
                        break
                    left = self._queue[0].submitted + wait_s - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                elif self._state != _RUNNING:
                    return None
                else:
                    self._cv.wait()
            self._active.extend(self._queue)
            self._queue.clear()
            self._queued_items = self._queued_tokens = 0
        return plan_window(self._active, cfg.policy, cfg.window_batches)

    def _run_window(self, window: list[list[tuple[_Request, int]]]) -> None:
        """Run the window's batches; once a newcomer is queued and every request in the rest of the
        window has had a batch here, hand the rest back to be planned again with the newcomer."""
        ran: set[int] = set()
        for k, batch in enumerate(window):
            self._run_batch(batch)
            ran.update(id(req) for req, _ in batch)
            rest = window[k + 1:]
            if not rest or not self._queue:  # unlocked read: a stale answer only delays the re-plan
                continue
            if all(id(req) in ran for b in rest for req, _ in b):
                returned: dict[_Request, list[int]] = defaultdict(list)
                for b in rest:
                    for req, i in b:
                        returned[req].append(i)
                for req, idx in returned.items():
                    give_back(req, idx)
                return

    def _run_batch(self, batch: list[tuple[_Request, int]]) -> None:
        with self._cv:
            live = [(req, i) for req, i in batch if not req.abandoned and not req.failed]
        if live:
            self._score(live, isolate=True)

    def _score(self, live: list[tuple[_Request, int]], *, isolate: bool) -> None:
        reqs = list(dict.fromkeys(req for req, _ in live))
        items = [req.items[i] for req, i in live]
        task = reqs[0].task  # the planner never mixes tasks in a batch
        start = time.perf_counter()
        for req in reqs:
            req.batches += 1
            if req.first_start is None:
                req.first_start = start
                if self.metrics:
                    self.metrics.queue_time.labels(self.name, task).observe(start - req.submitted)
        failed: set[_Request] = set()
        try:
            rows = self._check_rows(self.backend.compute(items), task, len(items))
        except RowsFailedError as exc:
            # Some items could not be computed even alone (e.g. out of device memory); the rest were.
            rows = self._check_rows(exc.outputs, task, len(items))
            failed = {live[i][0] for i in exc.failed}
            if self.metrics:
                self.metrics.batch_failures.labels(self.name, task).inc()
            log.warning("%d of %d items failed on %s (%s); failing their %d request(s) only",
                        len(exc.failed), len(items), self.name, exc.cause, len(failed))
            for req in failed:
                req.failed = True
                self._post(req, exc.cause)
        except Exception as exc:
            if self.metrics:
                self.metrics.batch_failures.labels(self.name, task).inc()
            if isolate and len(reqs) > 1:
                # Batches mix requests: find the one whose input fails instead of failing them all.
                log.warning("a batch of %d items from %d requests failed on %s (%s: %s); scoring each "
                            "request on its own", len(items), len(reqs), self.name, type(exc).__name__, exc)
                for req in reqs:
                    self._score([(r, i) for r, i in live if r is req], isolate=False)
                return
            log.error("scoring failed on %s for a request of %d items (%s: %s)", self.name,
                      len(reqs[0].items), type(exc).__name__, exc, exc_info=True)
            for req in reqs:
                req.failed = True  # its other items are skipped
                self._post(req, BatchFailedError(type(exc).__name__))
            return
        end = time.perf_counter()
        tokens = sum(it.length for it in items)
        with self._cv:
            per_token = (end - start) / max(1, tokens)
            s = self._sec_per_token
            self._sec_per_token = per_token if not s else 0.8 * s + 0.2 * per_token
            self.tokens_per_second = observed_rate(self.tokens_per_second, tokens, end - start,
                                                   self.config.max_batch_tokens)
        self._observe(items, task, end - start)
        for (req, i), row in zip(live, rows, strict=True):
            if req in failed:
                continue
            if req.scores is None:
                req.scores = np.empty((len(req.items), *rows.shape[1:]), dtype=np.float32)
            req.scores[i] = row
            req.remaining -= 1
        for req in reqs:
            if req in failed:
                continue
            req.last_end = end
            if req.remaining == 0:
                self._post(req, None)

    @staticmethod
    def _check_rows(output: object, task: Task, n: int) -> np.ndarray:
        """A backend's output as one float32 row per item: a score (rerank) or a vector (embed)."""
        rows = np.asarray(output, dtype=np.float32)
        if task == "rerank":
            rows = rows.reshape(-1)
        if rows.shape[0] != n or rows.ndim != (1 if task == "rerank" else 2):
            raise RuntimeError(f"backend returned shape {rows.shape} for {n} {task} items")
        return rows

    def _observe(self, items: list[WorkItem], task: Task, seconds: float) -> None:
        if not self.metrics:
            return
        longest = max(it.length for it in items)
        padded = longest * len(items)
        real = sum(it.length for it in items)
        m = self.metrics
        m.inference_time.labels(self.name, task).observe(seconds)
        m.batch_size.labels(self.name, task).observe(len(items))
        m.batch_tokens.labels(self.name, task).observe(padded)
        m.padding_ratio.labels(self.name, task).observe(1 - real / padded)
