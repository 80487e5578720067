"""Run one batch on the model's scorer, fill each request's rows, and keep failures where they belong.

Batches may run on several lanes at once (`engine/worker.py`): what they share of a request (its rows,
counts and completion) is updated under one lock, the scoring itself runs outside it.

A batch mixes requests. If it raises, it is re-run request by request, so only the request whose input fails
gets the error (`BatchFailedError`; memory that ran short, a `DeviceMemoryError`, is answered as itself); a
scorer that could score all but some rows (a sequence that does not fit in device memory even alone:
`RowsFailedError`) fails only those rows' requests, with no re-run. A request whose items failed is marked
`failed`, so its other items are skipped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np

from openrerank.core.work import Task
from openrerank.engine.admission import AdmissionQueue
from openrerank.engine.errors import BatchFailedError, DeviceMemoryError
from openrerank.engine.pending import PendingRequest, post
from openrerank.engine.scheduler_metrics import SchedulerMetrics
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import Computed, RowsFailedError, tally_computed

log = logging.getLogger(__name__)

#: One batch's work: (request, index of the item in that request).
Batch = list[tuple[PendingRequest, int]]


class BusyClock:
    """The model's busy time as the lanes make it together: the seconds during which at least one lane ran a
    batch, handed out as batches end (each gets the time since the previous one ended, or since the model
    became busy), so what the batches are given adds up to the time the model was busy, however many lanes
    ran at once. (Each batch's seconds divided by the lane count undercounted it whenever fewer lanes than
    that were busy, a lone request's tail, and the rate came out up to `lanes` times too high.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._mark = 0.0

    def started(self, at: float) -> None:
        with self._lock:
            if self._running == 0:
                self._mark = at
            self._running += 1

    def ended(self, at: float) -> float:
        """A batch ended `at`: the busy seconds it adds (0 if one ending beside it took them)."""
        with self._lock:
            self._running -= 1
            busy, self._mark = max(0.0, at - self._mark), max(at, self._mark)
            return busy


class BatchRunner:
    def __init__(self, scorer: Scorer, name: str, metrics: SchedulerMetrics, admission: AdmissionQueue) -> None:
        self.scorer = scorer
        self.name = name
        self.metrics = metrics
        self.admission = admission
        self._lock = threading.Lock()  # requests' shared fields, when lanes run batches at once
        self.busy = BusyClock()

    def run(self, live: Batch, *, isolate: bool = True) -> None:
        """Score `live` (items of one task) and hand each request its rows; post a request once it is done."""
        reqs = list(dict.fromkeys(req for req, _ in live))
        items = [req.items[i] for req, i in live]
        task = reqs[0].task  # the planner never mixes tasks in a batch
        start = time.perf_counter()
        with self._lock:
            for req in reqs:
                req.batches += 1
                if req.first_start is None:
                    req.first_start = start
                    self.metrics.queue_time(task, start - req.submitted)
        failed: set[PendingRequest] = set()
        ran: Computed | None = None  # what the runtime computed, tallied only for the metrics
        self.busy.started(start)
        try:
            with tally_computed() if self.metrics.enabled else contextlib.nullcontext() as ran:
                rows = check_rows(self.scorer.compute(items), task, len(items))
        except RowsFailedError as exc:
            # Some items could not be computed even alone (e.g. out of device memory); the rest were.
            rows = check_rows(exc.outputs, task, len(items))
            failed = {live[i][0] for i in exc.failed}
            self.metrics.batch_failed(task)
            log.warning("%d of %d items failed on %s (%s); failing their %d request(s) only",
                        len(exc.failed), len(items), self.name, exc.cause, len(failed))
            with self._lock:
                for req in failed:
                    req.failed = True
                    post(req, exc.cause)
        except Exception as exc:
            self.metrics.batch_failed(task)
            if isolate and len(reqs) > 1:
                # Batches mix requests: find the one whose input fails instead of failing them all.
                log.warning("a batch of %d items from %d requests failed on %s (%s: %s); scoring each "
                            "request on its own", len(items), len(reqs), self.name, type(exc).__name__, exc)
                for req in reqs:
                    self.run([(r, i) for r, i in live if r is req], isolate=False)
                return
            if isinstance(exc, DeviceMemoryError):  # memory ran short, alone too: capacity (503), not the input
                log.warning("out of memory on %s for a request of %d items: %s", self.name, len(reqs[0].items), exc)
                failure: Exception = exc
            else:
                log.error("scoring failed on %s for a request of %d items (%s: %s)", self.name,
                          len(reqs[0].items), type(exc).__name__, exc, exc_info=True)
                failure = BatchFailedError(type(exc).__name__)
            with self._lock:
                for req in reqs:
                    req.failed = True  # its other items are skipped
                    post(req, failure)
            return
        finally:
            end = time.perf_counter()
            busy = self.busy.ended(end)
        # The knee's fit takes the batch's own seconds per lane (`lanes` batches at once); the rate, the model's
        # busy seconds (`BusyClock`).
        knee = self.admission.record_speed((end - start) / max(1, self.scorer.lanes), [it.length for it in items],
                                           busy=busy)
        if knee is not None:
            log.info("model %s: the served batches put its attention knee at ~%.0f tokens (its FLOPs: %.0f); "
                     "admission weighs long sequences by it", self.name, knee, self.admission.knee_fit.prior)
        self.metrics.batch(items, task, end - start, ran)
        with self._lock:
            for (req, i), row in zip(live, rows, strict=True):
                if req in failed:
                    continue
                if req.scores is None:
                    req.scores = np.empty((len(req.items), *rows.shape[1:]), dtype=rows.dtype)
                req.scores[i] = row
                req.remaining -= 1
                req.left_tokens -= req.items[i].length
            for req in reqs:
                if req in failed:
                    continue
                req.last_end = max(end, req.last_end or end)
                if req.remaining == 0:
                    post(req, None)


def check_rows(output: object, task: Task, n: int) -> np.ndarray:
    """A scorer's output as one row per item: a float32 score (rerank) or vector (embed), or a listwise
    block's float32 `(entries + 1, dim)` matrix (held in an object array: blocks differ in height)."""
    if task == "listwise":
        blocks = list(output)  # type: ignore[call-overload]
        rows = np.empty(len(blocks), dtype=object)
        for i, block in enumerate(blocks):
            rows[i] = np.asarray(block, dtype=np.float32)
            if rows[i].ndim != 2:
                raise RuntimeError(f"scorer returned a block of shape {rows[i].shape}")
        if len(rows) != n:
            raise RuntimeError(f"scorer returned {len(rows)} blocks for {n} listwise items")
        return rows
    rows = np.asarray(output, dtype=np.float32)
    if task == "rerank":
        rows = rows.reshape(-1)
    if rows.shape[0] != n or rows.ndim != (1 if task == "rerank" else 2):
        raise RuntimeError(f"scorer returned shape {rows.shape} for {n} {task} items")
    return rows
