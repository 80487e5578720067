"""The worker thread's loop: take in admitted requests, plan a window of batches, run it batch by batch.

The worker repeatedly plans a *window* of about `window_batches` batches from every unfinished request --
each request contributes a max-min fair share, items are sorted by length across requests, the batches of
requests that finish in the window run first (`engine/planning.py`) -- and runs it batch by batch
(`engine/batch_runner.py`). When a new request arrives mid-window, the rest of the window goes back and is
planned again with the newcomer, as soon as every request in the window has had a batch; so a small request
waits about one batch behind a big one, never for all of it, and a big request keeps getting a share of
every window. A lone newcomer may wait `batch_wait_ms` for company before its window is planned.

If the loop itself dies, admission closes (`FAILED`, with the exception's type as `failure`) and every
accepted request is answered with `WorkerDiedError`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from openrerank.engine.admission import FAILED, RUNNING, STOPPED, AdmissionQueue
from openrerank.engine.batch_runner import Batch, BatchRunner
from openrerank.engine.errors import EngineStoppedError, WorkerDiedError
from openrerank.engine.pending import PendingRequest, post
from openrerank.engine.planning import give_back, plan_window
from openrerank.runtimes.heap import HEAP

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, admission: AdmissionQueue, runner: BatchRunner, name: str) -> None:
        self.admission = admission
        self.runner = runner
        self.name = name
        self._active: list[PendingRequest] = []  # seen by the worker, unfinished (worker thread only)

    def run(self) -> None:
        """The thread's body: until stopped and drained, or until it dies."""
        adm = self.admission
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
            with adm.cv:
                adm.failure = type(exc).__name__
        finally:
            with adm.cv:
                leftover = [*adm.take_locked(), *self._active]
                self._active = []
                adm.state = FAILED if died else STOPPED
            for req in leftover:  # only if the loop above died
                post(req, WorkerDiedError() if died else EngineStoppedError())

    def _next_window(self) -> list[Batch] | None:
        """Block until there is work (letting a lone newcomer wait `batch_wait_ms` for company), take in
        everything queued and plan the next window. None: stopped and drained."""
        adm = self.admission
        cfg = adm.config
        wait_s = cfg.batch_wait_ms / 1e3
        with adm.cv:
            while True:
                self._active = [r for r in self._active if r.todo and not r.abandoned and not r.failed]
                if self._active and not adm.queue:
                    break
                if adm.queue:
                    if (self._active or adm.state != RUNNING or adm.queued_items >= cfg.policy.max_size
                            or adm.queued_tokens >= cfg.policy.max_tokens):
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
        return plan_window(self._active, cfg.policy, cfg.window_batches)

    def _run_window(self, window: list[Batch]) -> None:
        """Run the window's batches; once a newcomer is queued and every request in the rest of the
        window has had a batch here, hand the rest back to be planned again with the newcomer."""
        ran: set[int] = set()
        for k, batch in enumerate(window):
            self._run_batch(batch)
            ran.update(id(req) for req, _ in batch)
            rest = window[k + 1:]
            if not rest or not self.admission.queue:  # unlocked read: a stale answer only delays the re-plan
                continue
            if all(id(req) in ran for b in rest for req, _ in b):
                returned: dict[PendingRequest, list[int]] = defaultdict(list)
                for b in rest:
                    for req, i in b:
                        returned[req].append(i)
                for req, idx in returned.items():
                    give_back(req, idx)
                return

    def _run_batch(self, batch: Batch) -> None:
        with self.admission.cv:
            live = [(req, i) for req, i in batch if not req.abandoned and not req.failed]
        if live:
            self.runner.run(live, isolate=True)
            HEAP.after_batch()  # what the batch's new tensor sizes freed goes back to the OS (runtimes/heap.py)
