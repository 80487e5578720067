"""Per-model scheduler: the only path from requests to the backend.

Requests from any number of concurrent callers land in one bounded FIFO queue. A dedicated worker
thread (model work never runs on the event loop) repeatedly takes a *window* of the oldest queued
requests, sorts all their items by length and cuts them into batches that respect both the
padded-token budget (pairs x longest pair) and the pair cap, then runs those batches before it looks
at newer requests. Sorting across requests keeps padding small; committing to a window keeps FIFO
fairness (a request only ever waits for windows of older requests, so newer short requests cannot
starve an old long one); a request bigger than one batch simply spans several batches.

Why the worker thread forms batches itself (as text-embeddings-inference's queue task does) rather
than an asyncio task: the model never idles waiting for a busy event loop to hand it the next batch.
The event loop only appends requests, abandons them (deadline, cancellation) and receives results.

Reranking and embedding share this one path: a request's items all serve one task (`schemas/work.py`), a
window's items are batched per task (a backend call runs one task), and an item's result is a row of the
request's result array: a score, or an embedding vector. Limits, deadlines, cancellation and metrics (labelled
by task) are the same for both.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from openrerank.backends.base import Backend
from openrerank.engine.batching import MAX_PADDING, BatchPolicy
from openrerank.engine.errors import DeadlineExceededError, EngineStoppedError, QueueFullError
from openrerank.metrics import Metrics
from openrerank.schemas.work import TASKS, Task, WorkItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 16384  # padded tokens per batch: pairs x longest pair
    max_batch_size: int = 128  # pairs per batch
    batch_wait_ms: float = 1.0  # how long the oldest queued request may wait for company
    max_queue: int = 1024  # pending requests (queued or being scored) before QueueFullError
    request_timeout: float = 120.0  # seconds from submit to result
    #: A window holds about this many batches' worth of queued work; bigger sorts better, smaller
    #: lets newly arrived requests in sooner.
    window_batches: int = 4
    #: Padding cap of each batch (engine/batching.py): tight on CPU, looser on GPU.
    max_padding: float = MAX_PADDING

    @property
    def policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch_tokens, self.max_batch_size, self.max_padding)


@dataclass
class ScoreOutcome:
    scores: np.ndarray  # float32, one row per submitted item: scores (n,), or embeddings (n, dim)
    queue_ms: float  # submit -> first batch holding one of its items starts
    inference_ms: float  # first batch start -> last batch end
    batches: int = 0  # how many model batches its items were spread over


class _Request:
    """One submitted request. The worker owns `scores`/`remaining`/timings; the loop owns `future`."""

    __slots__ = ("abandoned", "batches", "failed", "first_start", "future", "items", "last_end", "loop",
                 "remaining", "scores", "submitted", "task", "tokens")

    def __init__(self, items: list[WorkItem], loop: asyncio.AbstractEventLoop) -> None:
        self.items = items
        self.task: Task = items[0].task  # one task per request
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.submitted = time.perf_counter()
        self.tokens = sum(it.length for it in items)
        self.scores: np.ndarray | None = None  # made by its first batch: (n,) scores or (n, dim) embeddings
        self.remaining = len(items)
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.batches = 0
        self.abandoned = False  # deadline or cancellation: set by the loop under the lock
        self.failed = False  # a batch holding its items raised: set by the worker


_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"


class Scheduler:
    def __init__(self, backend: Backend, config: SchedulerConfig, *, name: str,
                 metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.config = config
        self.name = name
        self.metrics = metrics
        self._cv = threading.Condition()
        # Everything below is guarded by self._cv.
        self._queue: deque[_Request] = deque()  # accepted, not yet taken into a window
        self._queued_items = 0
        self._queued_tokens = 0
        self._pending = 0  # accepted and unfinished (queued, in a window, or being scored)
        self._pending_items = 0
        self._state = _NEW
        self._thread: threading.Thread | None = None
        self._sec_per_item = 0.0  # moving average of model time per item, for Retry-After

    # -- public interface ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests accepted and not finished yet; the quantity `max_queue` bounds."""
        return self._pending

    @property
    def queued(self) -> int:
        """Requests waiting that no batch window has taken yet."""
        with self._cv:
            return len(self._queue)

    async def start(self) -> None:
        with self._cv:
            self._start_locked()

    async def stop(self) -> None:
        """Refuse new work, finish everything accepted, then end the worker thread."""
        with self._cv:
            if self._state in (_NEW, _STOPPED):
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

    async def submit(self, items: Sequence[WorkItem], *, timeout: float | None = None) -> ScoreOutcome:
        """Score `items` in batches shared with other requests; scores come back in item order.

        `timeout` (seconds from now) overrides the configured request timeout for this request.
        """
        items = list(items)
        if not items:
            return ScoreOutcome(np.zeros(0, dtype=np.float32), 0.0, 0.0)
        timeout = self.config.request_timeout if timeout is None else timeout
        req = _Request(items, asyncio.get_running_loop())
        with self._cv:
            if self._state in (_STOPPING, _STOPPED):
                raise EngineStoppedError()
            if self._pending >= self.config.max_queue:
                retry = min(60.0, max(1.0, self._pending_items * self._sec_per_item))
                pending = self._pending
                full = True
            else:
                full = False
                self._start_locked()  # tolerate callers that never called start()
                self._queue.append(req)
                self._queued_items += len(items)
                self._queued_tokens += req.tokens
                self._pending += 1
                self._pending_items += len(items)
                self._cv.notify_all()
        if full:
            if self.metrics:
                self.metrics.rejected.labels(self.name, req.task, "queue_full").inc()
            raise QueueFullError(pending, self.config.max_queue, retry_after=retry)
        self._set_depth()
        try:
            await asyncio.wait_for(req.future, timeout)
        except TimeoutError:
            self._abandon(req)
            if self.metrics:
                self.metrics.rejected.labels(self.name, req.task, "deadline").inc()
            raise DeadlineExceededError(timeout) from None
        except asyncio.CancelledError:
            self._abandon(req)
            raise
        finally:
            with self._cv:
                self._pending -= 1
                self._pending_items -= len(items)
            self._set_depth()
        assert req.scores is not None and req.first_start is not None and req.last_end is not None
        return ScoreOutcome(req.scores, (req.first_start - req.submitted) * 1e3,
                            (req.last_end - req.first_start) * 1e3, req.batches)

    # -- event-loop side helpers -----------------------------------------------------------------

    def _start_locked(self) -> None:
        if self._state == _RUNNING:
            return
        if self._state == _STOPPING:
            raise EngineStoppedError()
        self._state = _RUNNING
        self._thread = threading.Thread(target=self._work, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    def _abandon(self, req: _Request) -> None:
        """Free a request's queued items; any of its items already running are discarded after."""
        with self._cv:
            req.abandoned = True
            try:
                self._queue.remove(req)
            except ValueError:
                return  # already taken into a window: the worker skips its items
            self._queued_items -= len(req.items)
            self._queued_tokens -= req.tokens

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self._pending)

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
        try:
            while True:
                window = self._next_window()
                if window is None:
                    return
                for batch in self._plan(window):
                    self._run_batch(batch)
        except BaseException:
            log.exception("scheduler worker for %s died", self.name)
            raise
        finally:
            with self._cv:
                leftover = list(self._queue)
                self._queue.clear()
                self._queued_items = self._queued_tokens = 0
                self._state = _STOPPED
            for req in leftover:  # only if the loop above died unexpectedly
                self._post(req, EngineStoppedError())

    def _next_window(self) -> list[_Request] | None:
        """Block until there is work, let the oldest request wait `batch_wait_ms` for company,
        then take the oldest requests, about `window_batches` batches' worth. None: stop."""
        cfg = self.config
        wait_s = cfg.batch_wait_ms / 1e3
        with self._cv:
            while True:
                if self._queue:
                    if (self._state != _RUNNING or self._queued_items >= cfg.max_batch_size
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
            max_tokens = cfg.window_batches * cfg.max_batch_tokens
            max_items = cfg.window_batches * cfg.max_batch_size
            window: list[_Request] = []
            tokens = n = 0
            while self._queue and (not window or (tokens < max_tokens and n < max_items)):
                req = self._queue.popleft()
                window.append(req)
                tokens += req.tokens
                n += len(req.items)
            self._queued_items -= n
            self._queued_tokens -= tokens
            return window

    def _plan(self, window: list[_Request]) -> list[list[tuple[_Request, int]]]:
        """All items of the window, per task, sorted by length, cut into budget-respecting batches."""
        batches: list[list[tuple[_Request, int]]] = []
        for task in TASKS:
            flat = [(req, i) for req in window if req.task == task for i in range(len(req.items))]
            groups = self.config.policy.split([req.items[i] for req, i in flat])
            batches.extend([flat[j] for j in g] for g in groups)
        return batches

    def _run_batch(self, batch: list[tuple[_Request, int]]) -> None:
        with self._cv:
            live = [(req, i) for req, i in batch if not req.abandoned and not req.failed]
        if not live:
            return
        reqs = list(dict.fromkeys(req for req, _ in live))
        items = [req.items[i] for req, i in live]
        task = reqs[0].task
        start = time.perf_counter()
        for req in reqs:
            req.batches += 1
            if req.first_start is None:
                req.first_start = start
                if self.metrics:
                    self.metrics.queue_time.labels(self.name, task).observe(start - req.submitted)
        try:
            rows = np.asarray(self.backend.compute(items), dtype=np.float32)
            if task == "rerank":
                rows = rows.reshape(-1)
            if rows.shape[0] != len(items) or rows.ndim != (1 if task == "rerank" else 2):
                raise RuntimeError(f"backend returned shape {rows.shape} for {len(items)} {task} items")
        except Exception as exc:
            log.exception("batch of %d items failed on %s", len(items), self.name)
            for req in reqs:
                req.failed = True  # its remaining items in this window are skipped
                self._post(req, exc)
            return
        end = time.perf_counter()
        with self._cv:
            per_item = (end - start) / len(items)
            self._sec_per_item = per_item if not self._sec_per_item else 0.8 * self._sec_per_item + 0.2 * per_item
        self._observe(items, task, end - start)
        for (req, i), row in zip(live, rows, strict=True):
            if req.scores is None:
                req.scores = np.empty((len(req.items), *rows.shape[1:]), dtype=np.float32)
            req.scores[i] = row
            req.remaining -= 1
        for req in reqs:
            req.last_end = end
            if req.remaining == 0:
                self._post(req, None)

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
