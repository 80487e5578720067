"""Per-model scheduler: the only path from requests to the model's scorer.

Requests from any number of concurrent callers are admitted by their work (`engine/admission.py`: pending
requests and pending tokens are both bounded) into one queue. A dedicated worker thread (model work never
runs on the event loop) plans windows of batches across every unfinished request and runs them
(`engine/worker.py`, `engine/planning.py`); a batch that fails is isolated to the requests whose input
fails it (`engine/batch_runner.py`); every step is counted (`engine/scheduler_metrics.py`).

Why the worker thread forms batches itself (as text-embeddings-inference's queue task does) rather
than an asyncio task: the model never idles waiting for a busy event loop to hand it the next batch.
The event loop only appends requests, abandons them (deadline, client disconnect) and receives results.

Reranking and embedding share this one path: a request's items all serve one task (`core/work.py`), a
window's items are batched per task (a scorer call runs one task, `engine/planning.py`), and an item's result
is a row of the request's result array: a score, or an embedding vector. Listwise blocks (`BlockItem`) take the
same path; a block's result is a small matrix whose height varies with the block, so their rows are held in an
object array. Admission, deadlines, cancellation, failure isolation and metrics (labelled by task) are the same
for all three.

Interface used outside the engine (the server, the Ray Serve adapter, the embeddings route):
`arriving`, `submit`, `start`, `stop`, `warmup`, and the read-only `alive`, `failure`, `pending`,
`pending_tokens`, `queued`, `retry_after`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from openrerank.core.work import TASKS, Task, WorkItem
from openrerank.engine.admission import (
    FAILED,
    NEW,
    RUNNING,
    STOPPED,
    STOPPING,
    AdmissionQueue,
    SchedulerConfig,
)
from openrerank.engine.batch_runner import BatchRunner
from openrerank.engine.errors import (
    DeadlineExceededError,
    EngineStoppedError,
    RequestTooLargeError,
    ShutdownDeadlineError,
)
from openrerank.engine.pending import PendingRequest, ScoreOutcome
from openrerank.engine.planning import spread
from openrerank.engine.rates import DEADLINE_MARGIN_S
from openrerank.engine.scheduler_metrics import SchedulerMetrics
from openrerank.engine.speed_record import KeptSpeed, SpeedRecord
from openrerank.engine.worker import Worker
from openrerank.families.scorer import Scorer
from openrerank.observe.metrics import Metrics

__all__ = ["Scheduler", "SchedulerConfig", "ScoreOutcome"]


class Scheduler:
    def __init__(self, scorer: Scorer, config: SchedulerConfig, *, name: str,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.name = name
        self.metrics = metrics
        self._admission = AdmissionQueue(config)
        self._cv = self._admission.cv  # guards the admission queue and the lifecycle state
        self._counts = SchedulerMetrics(metrics, name)
        self._runner = BatchRunner(scorer, name, self._counts, self._admission)
        self._worker = Worker(self._admission, self._runner, name)
        self._thread: threading.Thread | None = None

    def reconfigure(self, config: SchedulerConfig) -> None:
        """Serve under `config` from the next window on (the server caps its batches to a memory limit once every
        model has loaded, `server/app.py`)."""
        with self._cv:
            self.config = config
            self._admission.config = config

    @property
    def scorer(self) -> Scorer:
        return self._runner.scorer

    @scorer.setter
    def scorer(self, scorer: Scorer) -> None:
        self._runner.scorer = scorer

    # -- read-only state -------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests accepted and not finished yet; the quantity `max_queue` bounds."""
        return self._admission.pending

    @property
    def pending_tokens(self) -> int:
        """Tokens of the pending requests; the quantity `max_queue_tokens` bounds."""
        return self._admission.pending_tokens

    @property
    def queued(self) -> int:
        """Requests accepted that the worker has not planned yet."""
        with self._cv:
            return len(self._admission.queue)

    @property
    def alive(self) -> bool:
        """False once the worker thread has ended (stopped, or died of an error); True before the first
        start. Health checks (ready/live, Ray Serve's check_health) read this."""
        with self._cv:
            state = self._admission.state
            if state == NEW:
                return True
            return state == RUNNING and self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        """Why the worker died (the exception's type), or None."""
        return self._admission.failure

    @property
    def work_per_second(self) -> float | None:
        """The model's measured speed here, in work per second (engine/admission.py); None until measured."""
        return self._admission.work_per_second

    @work_per_second.setter
    def work_per_second(self, rate: float | None) -> None:
        self._admission.work_per_second = rate

    @property
    def knee(self) -> float | None:
        """The attention knee by which admission weighs long sequences: the model's FLOPs' (families/cost.py)
        until the served batches fit another (engine/knee_fit.py)."""
        return self._admission.knee

    @knee.setter
    def knee(self, knee: float | None) -> None:
        self._admission.set_knee(knee)

    def keep_speed(self, record: SpeedRecord) -> KeptSpeed | None:
        """Start with the knee and rate an earlier start's served batches showed here (`speed_record.py`),
        and keep this start's in the record when the knee moves and at `stop`; what it starts with, or None."""
        return self._admission.keep_speed(record)

    @property
    def request_budget(self) -> int:
        """What one request may hold: `--max-request-tokens` tokens, else work (tokens of short sequences)
        from the measured speed."""
        return self._admission.request_budget

    def weigh(self, items: Sequence[WorkItem]) -> float:
        """The work of these items (engine/rates.py)."""
        return self._admission.weigh(items)

    def over_budget(self, tokens: int, work: float, *, partial: bool = False) -> RequestTooLargeError | None:
        """Why a request of `tokens` (`work`) is over the per-request budget, or None (`partial`: so far)."""
        return self._admission.over_budget(tokens, work, partial=partial)

    @contextmanager
    def arriving(self, task: Task) -> Iterator[None]:
        """Around a request's tokenizing, before its `submit`: QueueFullError (counted) at once when
        --max-queue requests are pending, so an overloaded server refuses before preparing the work (`submit`
        checks again, with the rest of admission); else the request counts as arriving until the block ends.

        A request queued alone waits `batch_wait_ms` for company only while another is arriving or queued
        (`worker.py`); one on an idle server is planned at once. The count drops without waking the worker
        when the block ends normally (the `submit` that follows at once wakes it, with the request, or without
        it where it has nothing to score or is refused), and wakes it when the block fails: the request is not
        coming."""
        adm = self._admission
        with self._cv:
            full = adm.queue_full_locked()
            if full is None:
                adm.arriving += 1
        if full is not None:
            self._counts.rejected(task, "queue_full")
            raise full
        try:
            yield
        except BaseException:
            with self._cv:
                adm.arriving -= 1
                self._cv.notify_all()
            raise
        with self._cv:
            adm.arriving -= 1

    def _not_coming(self) -> None:
        """A request that was arriving submits nothing after all (nothing to score, or refused): wake the worker,
        which may be waiting for it as company (`arriving` leaves that to the submit that follows)."""
        with self._cv:
            self._cv.notify_all()

    def count_rejected(self, task: Task, reason: str) -> None:
        """Count a refusal in `openrerank_rejected_total` (also for refusals made before submit)."""
        self._counts.rejected(task, reason)

    @property
    def retry_after(self) -> float:
        """Seconds until the pending work is likely done (1-60): backlog x measured time per token."""
        with self._cv:
            return self._admission.retry_after_locked()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        with self._cv:
            self._start_locked()

    def drain_by(self, ends_at: float) -> None:
        """The server is shutting down and answers what is unfinished at `ends_at` (a `time.monotonic()`
        instant) itself: from now on the worker serves the pending requests one after another, shortest first,
        and answers at once those that would not finish by then, with admission's margin (`worker.py`,
        "Shutting down")."""
        adm = self._admission
        with self._cv:
            adm.drain_ends = ends_at if adm.drain_ends is None else min(adm.drain_ends, ends_at)
            adm.replan = True
            self._cv.notify_all()

    async def stop(self) -> None:
        """Refuse new work, finish everything accepted, then end the worker thread."""
        adm = self._admission
        with self._cv:
            if adm.state in (NEW, STOPPED, FAILED):
                if adm.state == NEW:
                    adm.state = STOPPED
                return
            adm.state = STOPPING
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)
        await asyncio.to_thread(adm.save_speed)  # for the next start (speed_record.py)

    def _start_locked(self) -> None:
        adm = self._admission
        if adm.state == RUNNING:
            return
        if adm.state == STOPPING:
            raise EngineStoppedError()
        adm.state = RUNNING
        self._thread = threading.Thread(target=self._run_worker, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    def _run_worker(self) -> None:
        self._worker.run()

    def warmup(self, items: Sequence[WorkItem]) -> None:
        """Score once synchronously (before serving) so first requests don't pay lazy init: the batches a lone
        request of `items` makes (`planning.spread` over the lanes, as the worker would), each on every lane.

        Every lane, because a lane's state is its own: each OpenVINO stream runs its own infer request, and
        seemingly its own per-shape kernels (on an Intel AMX CPU a first request cost 1.67x a warm one with two
        lanes, of which the warm-up had reached one, and 1.38x with one lane; docs/engine.md). The `lanes`
        copies of a batch run at once, so each holds a lane of its own while it runs."""
        items = list(items)
        lanes = max(1, self.scorer.lanes)
        pool = ThreadPoolExecutor(lanes, thread_name_prefix=f"{self.name}-warmup") if lanes > 1 else None
        try:
            for task in TASKS:
                group = [it for it in items if it.task == task]
                cuts = self.config.policy.split(group, self.scorer.padded_shape)
                for batch in spread([[group[i] for i in idx] for idx in cuts], lanes):
                    if pool is None:
                        self.scorer.compute(batch)
                    else:
                        list(pool.map(self.scorer.compute, [batch] * lanes))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    # -- submitting ------------------------------------------------------------------------------

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
            self._not_coming()
            return ScoreOutcome(np.zeros(0, dtype=np.float32), 0.0, 0.0)
        timeout = self.config.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout if deadline is None else deadline
        req = PendingRequest(items, asyncio.get_running_loop())
        req.deadline = deadline
        adm = self._admission
        req.work = adm.weigh(items)
        too_large = adm.too_large(req)
        if too_large is not None:
            self._counts.rejected(req.task, "too_large")
            self._not_coming()
            raise too_large
        with self._cv:
            adm.check_open_locked()
            full = adm.refusal_locked(req.tokens, req.work, deadline, time.monotonic())
            if full is None:
                self._start_locked()  # tolerate callers that never called start()
                adm.accept_locked(req)
        if full is not None:
            self._counts.rejected(req.task, "queue_full")
            self._not_coming()
            raise full
        self._counts.depth(adm.pending, adm.pending_tokens)
        try:
            await asyncio.wait_for(req.future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            adm.abandon(req)
            self._counts.rejected(req.task, "deadline")
            raise DeadlineExceededError(timeout) from None
        except asyncio.CancelledError:
            adm.abandon(req)
            if deadline - time.monotonic() <= DEADLINE_MARGIN_S:  # its client's deadline (gRPC) ended it
                self._counts.rejected(req.task, "deadline")
            else:
                self._counts.cancelled(req.task)
            raise
        except ShutdownDeadlineError:
            self._counts.rejected(req.task, "shutdown")
            raise
        finally:
            adm.release(req)
            self._counts.depth(adm.pending, adm.pending_tokens)
        return req.outcome()
