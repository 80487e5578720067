"""What the scheduler lets in: the per-model limits (`SchedulerConfig`, `ChunkLimits`) and the admission queue.

A request is one admission unit, whatever its size. It is refused at once when it alone holds more tokens
than one request may (`request_budget`), or when too much is pending already: `max_queue` requests, or
`queue_budget` tokens (a request arriving at an idle scheduler is always admitted if within its own budget).
Refusals carry a Retry-After: the pending work at the served rate (the time until the model is idle again).

`AdmissionQueue` holds everything the event loop and the worker thread share, under one condition variable:
the requests accepted but not yet planned, the pending totals the limits bound, the scheduler's lifecycle
state (admission closes when it stops or its worker dies) and the speed estimate behind Retry-After.

Admission by measured speed, and work rather than tokens: the arithmetic is `rates.py`'s (its docstring says
why); this queue holds the rate and the knee it uses and moves them as batches are served (`record_speed`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from openrerank.core.work import WorkItem
from openrerank.engine.batching import CPU_POLICY, BatchPolicy
from openrerank.engine.errors import (
    DeadlinePushedError,
    DeadlineUnreachableError,
    EngineStoppedError,
    QueueFullError,
    RequestTooLargeError,
    WorkerDiedError,
)
from openrerank.engine.knee_fit import FIT_BATCH_SHARE, KneeFit
from openrerank.engine.pending import PendingRequest
from openrerank.engine.rates import (
    DEADLINE_SHARE,
    ServedRate,
    budget_for,
    finish_estimate,
    pushed_past_deadline,
    work_of,
)
from openrerank.engine.speed_record import KeptSpeed, SpeedRecord

#: The default per-request token budget assumes at least one full batch every this many seconds of
#: `request_timeout`: work a slow CPU still finishes before the deadline.
SECONDS_PER_BUDGET_BATCH = 2.0
#: Default pending-token limit, in per-request budgets.
QUEUE_BUDGETS = 2

#: The fitted knee replaces the one in use when they differ by more than this share.
KNEE_MOVE = 0.1


#: Lifecycle states: admits while NEW (the first submit starts the worker) or RUNNING.
NEW, RUNNING, STOPPING, STOPPED, FAILED = "new", "running", "stopping", "stopped", "failed"


@dataclass(frozen=True)
class SchedulerConfig:
    policy: BatchPolicy = CPU_POLICY  # how batches are cut (tokens, pairs, padding): `default_policy(device)`
    #: How long the oldest queued request may wait for company, when company may come: another request
    #: queued, or one being tokenized (`worker.py`); a lone request is planned at once.
    batch_wait_ms: float = 1.0
    max_queue: int = 1024  # pending requests (queued or being scored) before QueueFullError
    request_timeout: float = 120.0  # seconds from arrival to result
    #: Tokens one request may hold (None: the policy's `max_tokens` x request_timeout / 2 s).
    max_request_tokens: int | None = None
    #: Tokens of all pending requests before QueueFullError (None: two request budgets). A request
    #: arriving at an idle scheduler is always admitted (if within its own budget).
    max_queue_tokens: int | None = None
    #: A window holds about this many batches' worth of work; bigger sorts better, smaller lets
    #: newly arrived requests in sooner.
    window_batches: int = 4

    @property
    def request_budget(self) -> int:
        if self.max_request_tokens:
            return self.max_request_tokens
        return self.policy.max_tokens * max(1, int(self.request_timeout / SECONDS_PER_BUDGET_BATCH))

    @property
    def queue_budget(self) -> int:
        return self.max_queue_tokens or QUEUE_BUDGETS * self.request_budget


@dataclass(frozen=True)
class ChunkLimits:
    """How much chunking one request may ask for (CHUNK only); the token budget is the scheduler's."""

    #: Windows per passage when the request does not say (Cohere v1 says 10 itself); also the most it may ask.
    max_chunks_per_passage: int = 16
    #: Windows in one request, all passages together.
    max_chunks_per_request: int = 2048


class AdmissionQueue:
    """The state the event loop and the worker share; methods named `*_locked` expect `cv` held."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.cv = threading.Condition()
        # Guarded by cv:
        self.queue: deque[PendingRequest] = deque()  # accepted, not yet seen by the worker
        self.queued_items = 0
        self.queued_tokens = 0
        self.pending = 0  # accepted and unfinished (queued, planned, or being scored)
        self.pending_tokens = 0
        self.pending_work = 0.0
        self.admitted: set[PendingRequest] = set()  # the pending requests, for their deadlines
        #: Requests past the first admission check and not yet submitted: being tokenized
        #: (`Scheduler.arriving`). The company a queued request may wait `batch_wait_ms` for (`worker.py`).
        self.arriving = 0
        self.state = NEW
        self.failure: str | None = None  # why the worker died (the exception's type)
        #: The model's speed (`work_per_second`): from its warm-up, then as the served batches show it.
        self.served = ServedRate()
        #: The rate it started from (warm-up, engine choice or kept record): the budget's floor (`budget_rate`).
        self.start_rate: float | None = None
        #: The model's attention knee (`families/cost.py`, then as the served batches show it: `set_knee`):
        #: None counts work as tokens.
        self.knee: float | None = None
        self.knee_fit: KneeFit | None = None
        #: Where the served batches' speed is kept for the next start (`speed_record.py`); None: not kept.
        self.speed_record: SpeedRecord | None = None
        self.rate_batches = 0  # big batches served in this process (`record_speed`): the rate is worth keeping
        #: The server is shutting down and answers what is unfinished at this `time.monotonic()` instant
        #: (`Scheduler.drain_by`); None: not shutting down.
        self.drain_ends: float | None = None
        #: The worker should hand back the window it runs and plan again (the drain began).
        self.replan = False

    @property
    def work_per_second(self) -> float | None:
        """Measured model speed in work per second (`measure_rate`, the runtime choice's timing or a kept
        record's, then the served batches': `rates.ServedRate`): sets the request budget and deadline
        admission. None: the static budget of `SchedulerConfig`."""
        return self.served.rate

    @work_per_second.setter
    def work_per_second(self, rate: float | None) -> None:
        """Start from `rate` (before the model serves): the served batches move it on."""
        self.served = ServedRate.starting(rate)
        self.start_rate = rate

    @property
    def budget_rate(self) -> float | None:
        """The rate behind the per-request budget: the served rate, but never below the one the model started
        from. A 400 says the request could not finish even alone, and alone it runs at the model's speed, not
        at what a moment of small batches on a loaded machine showed (the served rate fell to ~30 tokens/s on
        a tiny model while a 2-core machine ran other work, and a request that took 2 s was refused 400)."""
        rates = [r for r in (self.served.rate, self.start_rate) if r]
        return max(rates) if rates else None

    def set_knee(self, knee: float | None) -> None:
        """The knee from the model's FLOPs: weighs work until the served batches fit another (`knee_fit.py`)."""
        with self.cv:
            self.knee = knee
            self.knee_fit = KneeFit(knee) if knee else None

    def keep_speed(self, record: SpeedRecord) -> KeptSpeed | None:
        """Start with the knee and rate an earlier start's served batches showed here, if `record` holds them,
        and keep what this start's batches show in it (`speed_record.py`). Called before the model's rate is
        measured. Returns what it starts with, None when the FLOP knee and the timed rate stand."""
        kept = record.load()
        with self.cv:
            self.speed_record = record
            if kept is None or not self.knee:
                return None
            self.knee = kept.knee
            if kept.work_per_second:
                self.work_per_second = kept.work_per_second
        return kept

    def save_speed(self) -> None:
        """Keep the knee and rate the served batches moved to, if any moved them (the model stops)."""
        with self.cv:
            record, knee, rate = self.speed_record, self.knee, self.work_per_second
            batches = self.knee_fit.batches if self.knee_fit is not None else 0.0
            moved = self.rate_batches > 0
        if record is not None and knee and moved:
            record.save(knee, rate, batches)

    def weigh(self, items: Sequence[WorkItem]) -> float:
        return work_of([it.length for it in items], self.knee)

    @property
    def measured(self) -> bool:
        """Whether the budgets come from the measured rate (in work), not from tokens."""
        return bool(self.work_per_second) and not self.config.max_request_tokens

    @property
    def request_budget(self) -> int:
        """What one request may hold: `--max-request-tokens` if set, else the work the measured rate scores
        in part of the request timeout (tokens of short sequences), else the static default."""
        cfg = self.config
        if not self.measured:
            return cfg.request_budget
        return budget_for(self.budget_rate, cfg.request_timeout)

    def budget_reason(self, tokens: int, work: float) -> str:
        """Why the request budget is what it is, for the refusal of a request of `tokens` (`work`)."""
        if not self.measured:
            return "send fewer or shorter passages, or fewer chunks"
        rate = self.tokens_rate(tokens, work, self.budget_rate)
        return (f"this model scores ~{rate:,.0f} tokens/s here at these lengths "
                f"(measured), so more would not finish within the {self.config.request_timeout:g} s request "
                "timeout; send fewer or shorter passages, or fewer chunks")

    def tokens_rate(self, tokens: int, work: float, rate: float | None = None) -> float:
        """The measured rate (`rate`, else the served one) in tokens per second for sequences like these."""
        return (rate or self.work_per_second or 0.0) * tokens / max(work, 1e-9)

    def over_budget(self, tokens: int, work: float, *, partial: bool = False) -> RequestTooLargeError | None:
        """Why a request of `tokens` (`work`) is more than one request may hold, or None; the limit is said
        in tokens at the request's own lengths. `partial`: the counts are of the part tokenized so far."""
        budget = self.request_budget
        if not self.measured:
            if tokens > budget:
                return RequestTooLargeError("tokens", tokens, budget, "max-request-tokens",
                                            self.budget_reason(tokens, work), at_least=partial)
            return None
        if work > budget:
            limit = int(budget * tokens / work)
            return RequestTooLargeError("tokens", tokens, limit, "max-request-tokens",
                                        self.budget_reason(tokens, work), at_least=partial)
        return None

    def too_large(self, req: PendingRequest) -> RequestTooLargeError | None:
        return self.over_budget(req.tokens, req.work)

    def check_open_locked(self) -> None:
        if self.state == FAILED:
            raise WorkerDiedError()
        if self.state in (STOPPING, STOPPED):
            raise EngineStoppedError()

    def refusal_locked(self, tokens: int, work: float, deadline: float, now: float) -> QueueFullError | None:
        """Why a request of `tokens` (`work`) due by `deadline` cannot be accepted at `now` (`time.monotonic()`
        instants), or None."""
        cfg = self.config
        left = deadline - now
        if (full := self.queue_full_locked()) is not None:
            return full
        if self.pending:
            if cfg.max_queue_tokens or not self.measured:  # the flag's tokens, or the static budget's
                if self.pending_tokens + tokens > cfg.queue_budget:
                    return QueueFullError(f"{self.pending_tokens} tokens", f"{cfg.queue_budget}",
                                          self.retry_after_locked(), "max-queue-tokens")
            elif self.pending_work + work > QUEUE_BUDGETS * self.request_budget:
                return QueueFullError(f"{self.pending_tokens} tokens", f"{QUEUE_BUDGETS} request budgets",
                                      self.retry_after_locked(), "max-queue-tokens")
        rate = self.work_per_second
        if self.pending and rate and not cfg.max_request_tokens:
            estimate = finish_estimate(work, self.pending, self.pending_work, rate)
            if estimate > DEADLINE_SHARE * left:
                return DeadlineUnreachableError(estimate, left, self.tokens_rate(tokens, work),
                                                self.retry_after_locked())
            pushed = pushed_past_deadline(work, list(self.work_left_locked(now)), rate)
            if pushed is not None:
                return DeadlinePushedError(*pushed, self.retry_after_locked())
        return None

    def queue_full_locked(self) -> QueueFullError | None:
        """--max-queue requests are pending: a refusal that needs nothing of the newcomer, so it is made before
        its text is tokenized too (a 300-passage request was refused only after 1.8 s of tokenizing)."""
        if self.pending >= self.config.max_queue:
            return QueueFullError(f"{self.pending} requests", f"{self.config.max_queue}", self.retry_after_locked(),
                                  "max-queue")
        return None

    def work_left_locked(self, now: float) -> Iterable[tuple[float, float]]:
        """Each pending request as (work left: its work in proportion to its unscored tokens, an estimate read
        while batches run; seconds to its deadline at `now`)."""
        for req in self.admitted:
            if not (req.abandoned or req.failed):
                yield req.work_left, req.deadline - now

    def retry_after_locked(self) -> float:
        """Seconds until the pending work is done at the served rate (1 to 60; 1 before any rate is known).
        (It was a moving average of its own, of each batch's time per work: with several lanes, or small batches
        beside big ones, it said something other than the rate the refusal was made by.)"""
        rate = self.work_per_second
        return min(60.0, max(1.0, self.pending_work / rate if rate else 0.0))

    def accept_locked(self, req: PendingRequest) -> None:
        self.queue.append(req)
        self.admitted.add(req)
        self.queued_items += len(req.items)
        self.queued_tokens += req.tokens
        self.pending += 1
        self.pending_tokens += req.tokens
        self.pending_work += req.work
        self.cv.notify_all()

    def take_locked(self) -> list[PendingRequest]:
        """Everything queued, for the worker to plan; the queue is empty after."""
        taken = list(self.queue)
        self.queue.clear()
        self.queued_items = self.queued_tokens = 0
        return taken

    def release(self, req: PendingRequest) -> None:
        """The request is answered (scored, failed, timed out or cancelled): it is pending no more."""
        with self.cv:
            self.admitted.discard(req)
            self.pending -= 1
            self.pending_tokens -= req.tokens
            self.pending_work = max(0.0, self.pending_work - req.work) if self.pending else 0.0

    def abandon(self, req: PendingRequest) -> None:
        """Free a request's queued work; its items already planned are skipped, a running batch discarded."""
        with self.cv:
            req.abandoned = True
            try:
                self.queue.remove(req)
            except ValueError:
                return  # the worker has it: it drops the request at its next batch
            self.queued_items -= len(req.items)
            self.queued_tokens -= req.tokens

    def record_speed(self, seconds: float, lengths: Sequence[int], busy: float | None = None) -> float | None:
        """One batch's model time and its sequences' lengths, folded into the measured rate behind the budgets,
        the deadline checks and Retry-After (`rates.ServedRate`: every batch) and, for a big enough batch,
        into the knee's fit (`knee_fit.py`). `busy`: the model seconds the batch adds to the rate, when lanes
        run batches at once (`batch_runner.BusyClock`; default `seconds`). Returns the knee when the fit moved
        it, and keeps it with the rate in the model's record if it has one (`keep_speed`)."""
        tokens = sum(lengths)
        with self.cv:
            work = work_of(lengths, self.knee)
            self.served = self.served.after(work, seconds if busy is None else busy)
            if tokens < FIT_BATCH_SHARE * self.config.policy.max_tokens:
                return None
            # Only a big batch makes the rate worth keeping for the next start (`save_speed`): a small one's
            # speed is mostly overhead and the moment's load (a test's held batch kept ~30 tokens/s for a
            # tiny model, and the next server started with a budget of a few hundred tokens).
            self.rate_batches += 1
            if self.knee_fit is None:
                return None
            self.knee_fit.add(lengths, seconds)
            fitted = self.knee_fit.knee
            if not (fitted and self.knee and abs(fitted - self.knee) > KNEE_MOVE * self.knee):
                return None
            self._move_knee_locked(fitted, lengths)
            record, rate, batches = self.speed_record, self.work_per_second, self.knee_fit.batches
        if record is not None:  # outside the lock, so admitting a request never waits on the disk
            record.save(fitted, rate, batches)
        return fitted

    def _move_knee_locked(self, knee: float, lengths: Sequence[int]) -> None:
        """Weigh by `knee` from now on; the rates, in work, are converted at this batch's lengths. (Requests
        already pending keep the work they were admitted with until they are answered.)"""
        ratio = work_of(lengths, knee) / work_of(lengths, self.knee)
        self.served = self.served.reweighed(ratio)
        if self.start_rate:
            self.start_rate *= ratio
        self.knee = knee
