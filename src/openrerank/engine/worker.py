"""The worker thread's loop: take in admitted requests, plan a window of batches, run it batch by batch.

The worker repeatedly plans a *window* of about `window_batches` batches from every unfinished request --
each request contributes a max-min fair share, items are sorted by length across requests, the batches of
requests that finish in the window run first (`engine/planning.py`) -- and runs it batch by batch
(`engine/batch_runner.py`). When a new request arrives mid-window, the rest of the window goes back and is
planned again with the newcomer, as soon as every request in the window has had a batch; so a small request
waits about one batch behind a big one, never for all of it, and a big request keeps getting a share of
every window.

**Waiting for company.** A newcomer on an idle worker may wait `batch_wait_ms` for others to share its batches,
but only while company may come: another request is queued already, or one is being tokenized
(`Scheduler.arriving`: past the first admission check, not yet submitted). A lone request with nobody arriving
is planned at once: it used to wait the whole 1 ms for nobody, 3.5% of a 1-passage request's time
(docs/reliability.md, "Waiting for company").

**Shutting down.** Once the server's drain has begun (`Scheduler.drain_by`), fair shares would have several big
requests advance together and miss the grace period's end together, all answered 503 with their scoring wasted.
The window in progress goes back, and from then on the requests are served one after another, shortest first,
each whole (which finishes the most of them in the time left); one that would not finish even so, within
admission's margin (`rates.DEADLINE_SHARE` of the time left; once kept, by the end itself), is answered at once
(`ShutdownDeadlineError`, retryable), so its client can retry elsewhere without waiting for the end.

**Lanes.** Where the scorer's runtime runs several batches at once (`Runtime.lanes`: OpenVINO streams,
ONNX Runtime concurrent runs, each lane on its share of the threads), the worker hands each batch to the
next free lane instead of running it itself, and plans the next window while the last batches still run.
A window with fewer batches than lanes has its largest batches halved (`planning.spread`), so a lone small
request still uses every lane. Batches finish out of order; a request is answered when its last one does.

If the loop itself dies, admission closes (`FAILED`, with the exception's type as `failure`) and every
accepted request is answered with `WorkerDiedError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait

from openrerank.engine.admission import FAILED, RUNNING, STOPPED, AdmissionQueue
from openrerank.engine.batch_runner import Batch, BatchRunner
from openrerank.engine.errors import EngineStoppedError, ShutdownDeadlineError, WorkerDiedError
from openrerank.engine.pending import PendingRequest, post
from openrerank.engine.planning import give_back, plan_window, spread
from openrerank.engine.rates import at_risk, drain_order
from openrerank.runtimes.heap import HEAP

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, admission: AdmissionQueue, runner: BatchRunner, name: str) -> None:
        self.admission = admission
        self.runner = runner
        self.name = name
        self._active: list[PendingRequest] = []  # seen by the worker, unfinished (worker thread only)
        self._drain_kept: set[PendingRequest] = set()  # kept by the drain's last plan (`rates.drain_order`)
        self._pool: ThreadPoolExecutor | None = None  # the lanes, when the scorer has more than one
        self._free: threading.Semaphore | None = None  # one permit per idle lane
        self._in_flight: dict[Future, Batch] = {}  # batches handed to a lane (worker thread only)
        self._lane_failed = False  # a lane died: set under the admission lock, read by the worker

    def run(self) -> None:
        """The thread's body: until stopped and drained, or until it dies."""
        adm = self.admission
        died = False
        lanes = max(1, self.runner.scorer.lanes)
        if lanes > 1:
            self._pool = ThreadPoolExecutor(lanes, thread_name_prefix=f"{self.name}-lane")
            self._free = threading.Semaphore(lanes)
        try:
            while True:
                window = self._next_window()
                if window is None:
                    self._finish_lanes()
                    return
                self._run_window(spread(window, lanes))
        except BaseException as exc:
            died = True
            log.critical("the scheduler worker of model %s died (%s); every pending request is answered 503 "
                         "and health checks now fail", self.name, type(exc).__name__, exc_info=True)
            with adm.cv:
                adm.failure = type(exc).__name__
        finally:
            if died:
                self._finish_lanes(raise_error=False)
            with adm.cv:
                leftover = [*adm.take_locked(), *self._active, *self._unanswered()]
                self._active = []
                adm.state = FAILED if died else STOPPED
            for req in leftover:  # only if the loop above died
                post(req, WorkerDiedError() if died else EngineStoppedError())

    def _next_window(self) -> list[Batch] | None:
        """Block until there is work (letting a newcomer wait `batch_wait_ms` while company may come), take in
        everything queued and plan the next window. None: stopped and drained."""
        adm = self.admission
        cfg = adm.config
        wait_s = cfg.batch_wait_ms / 1e3
        with adm.cv:
            while True:
                if self._lane_failed:
                    break
                self._active = [r for r in self._active if r.todo and not r.abandoned and not r.failed]
                if self._active and not adm.queue:
                    break
                if adm.queue:
                    if (self._active or adm.state != RUNNING or adm.queued_items >= cfg.policy.max_size
                            or adm.queued_tokens >= cfg.policy.max_tokens or not self._company_may_come()):
                        break
                    left = adm.queue[0].submitted + wait_s - time.perf_counter()
                    if left <= 0:
                        break
                    adm.cv.wait(left)
                elif adm.state != RUNNING:
                    return None
                else:
                    adm.cv.wait()
            self._active.extend(adm.take_locked())
            rate = adm.work_per_second
            drain_ends, adm.replan = adm.drain_ends, False
        self._raise_lane_error()
        now = time.monotonic()
        if drain_ends is not None:
            first = self._drain_first(drain_ends - now, rate)
        else:
            first = at_risk([(r.work_left, r.deadline - now) for r in self._active], rate) if rate else []
        return plan_window(self._active, cfg.policy, cfg.window_batches, self.runner.scorer.padded_shape, first)

    def _company_may_come(self) -> bool:
        """(Under the admission lock.) Whether waiting may bring the queued requests company: another is queued
        already (more may follow, as they did), or one is being tokenized and submits when done."""
        adm = self.admission
        return len(adm.queue) > 1 or adm.arriving > 0

    def _drain_first(self, left: float, rate: float | None) -> list[int]:
        """Shutting down with `left` seconds of grace: the requests one after another, shortest first, each
        given its whole need (`first`); those that would not finish even so, with admission's margin (those kept
        by the last plan: without), are answered now (`ShutdownDeadlineError`), not at the grace period's end
        with their scoring wasted."""
        promised = [i for i, r in enumerate(self._active) if r in self._drain_kept]
        kept, doomed = drain_order([r.work_left for r in self._active], left, rate, promised)
        for i, finish in doomed:
            req = self._active[i]
            self.admission.abandon(req)  # its items already planned are skipped
            post(req, ShutdownDeadlineError(finish, left))
        self._active = [self._active[i] for i, _ in kept]
        self._drain_kept = set(self._active)
        return list(range(len(self._active)))

    def _run_window(self, window: list[Batch]) -> None:
        """Run the window's batches; once a newcomer is queued and every request in the rest of the
        window has had a batch here, hand the rest back to be planned again with the newcomer."""
        ran: set[int] = set()
        for k, batch in enumerate(window):
            self._wait_for_lane()
            rest = window[k:]
            if k and (self.admission.replan or
                      (self.admission.queue and all(id(req) in ran for b in rest for req, _ in b))):
                # (unlocked reads of the queue and the flag: a stale answer only delays the re-plan)
                self._release_lane()
                returned: dict[PendingRequest, list[int]] = defaultdict(list)
                for b in rest:
                    for req, i in b:
                        returned[req].append(i)
                for req, idx in returned.items():
                    give_back(req, idx)
                return
            self._start(batch)
            ran.update(id(req) for req, _ in batch)

    # -- lanes -----------------------------------------------------------------------------------

    def _wait_for_lane(self) -> None:
        """Block until a lane is free (no-op with one lane: the worker runs batches itself); re-raise what
        killed a lane, so the worker dies of it as it would have running the batch itself."""
        if self._free is None:
            return
        self._free.acquire()
        self._raise_lane_error()

    def _release_lane(self) -> None:
        if self._free is not None:
            self._free.release()

    def _start(self, batch: Batch) -> None:
        if self._pool is None:
            self._run_batch(batch)
            return
        future = self._pool.submit(self._run_batch, batch)
        self._in_flight[future] = batch
        future.add_done_callback(self._lane_done)

    def _raise_lane_error(self) -> None:
        for future in [f for f in self._in_flight if f.done() and f.exception() is None]:
            del self._in_flight[future]
        for future in self._in_flight:
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]

    def _lane_done(self, future: Future) -> None:
        """A lane finished a batch: free the lane; if the lane died, wake the worker to die of it too."""
        self._release_lane()
        if future.exception() is not None:
            with self.admission.cv:
                self._lane_failed = True
                self.admission.cv.notify_all()

    def _finish_lanes(self, *, raise_error: bool = True) -> None:
        """Wait for every batch still running on a lane (drain, or the worker's death), then stop the lanes."""
        if self._pool is None:
            return
        wait(list(self._in_flight))
        if raise_error:
            self._raise_lane_error()
        self._pool.shutdown(wait=True)

    def _unanswered(self) -> list[PendingRequest]:
        """Requests of batches whose lane died: nobody else will answer them."""
        return [req for future, batch in self._in_flight.items() if future.exception() is not None
                for req, _ in batch]

    def _run_batch(self, batch: Batch) -> None:
        with self.admission.cv:
            live = [(req, i) for req, i in batch if not req.abandoned and not req.failed]
        if live:
            self.runner.run(live, isolate=True)
            HEAP.after_batch()  # what the batch's new tensor sizes freed goes back to the OS (runtimes/heap.py)
