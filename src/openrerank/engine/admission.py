"""What the scheduler lets in: the per-model limits (`SchedulerConfig`, `ChunkLimits`) and the admission queue.

A request is one admission unit, whatever its size. It is refused at once when it alone holds more tokens
than one request may (`request_budget`), or when too much is pending already: `max_queue` requests, or
`queue_budget` tokens (a request arriving at an idle scheduler is always admitted if within its own budget).
Refusals carry a Retry-After: the pending tokens times the measured model time per token.

`AdmissionQueue` holds everything the event loop and the worker thread share, under one condition variable:
the requests accepted but not yet planned, the pending totals the limits bound, the scheduler's lifecycle
state (admission closes when it stops or its worker dies) and the speed estimate behind Retry-After.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from openrerank.engine.batching import CPU_POLICY, BatchPolicy
from openrerank.engine.errors import EngineStoppedError, QueueFullError, RequestTooLargeError, WorkerDiedError
from openrerank.engine.pending import PendingRequest

#: The default per-request token budget assumes at least one full batch every this many seconds of
#: `request_timeout`: work a slow CPU still finishes before the deadline.
SECONDS_PER_BUDGET_BATCH = 2.0
#: Default pending-token limit, in per-request budgets.
QUEUE_BUDGETS = 2

#: Lifecycle states: admits while NEW (the first submit starts the worker) or RUNNING.
NEW, RUNNING, STOPPING, STOPPED, FAILED = "new", "running", "stopping", "stopped", "failed"


@dataclass(frozen=True)
class SchedulerConfig:
    policy: BatchPolicy = CPU_POLICY  # how batches are cut (tokens, pairs, padding): `default_policy(device)`
    batch_wait_ms: float = 1.0  # how long the oldest queued request may wait for company
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
        self.state = NEW
        self.failure: str | None = None  # why the worker died (the exception's type)
        self.sec_per_token = 0.0  # moving average of model time per token, for Retry-After

    def too_large(self, req: PendingRequest) -> RequestTooLargeError | None:
        budget = self.config.request_budget
        if req.tokens > budget:
            return RequestTooLargeError("tokens", req.tokens, budget, "--max-request-tokens",
                                        "send fewer or shorter passages, or fewer chunks")
        return None

    def check_open_locked(self) -> None:
        if self.state == FAILED:
            raise WorkerDiedError()
        if self.state in (STOPPING, STOPPED):
            raise EngineStoppedError()

    def refusal_locked(self, tokens: int) -> QueueFullError | None:
        cfg = self.config
        if self.pending >= cfg.max_queue:
            return QueueFullError(f"{self.pending} requests", f"{cfg.max_queue}, --max-queue",
                                  self.retry_after_locked())
        if self.pending and self.pending_tokens + tokens > cfg.queue_budget:
            return QueueFullError(f"{self.pending_tokens} tokens", f"{cfg.queue_budget}, --max-queue-tokens",
                                  self.retry_after_locked())
        return None

    def retry_after_locked(self) -> float:
        return min(60.0, max(1.0, self.pending_tokens * self.sec_per_token))

    def accept_locked(self, req: PendingRequest) -> None:
        self.queue.append(req)
        self.queued_items += len(req.items)
        self.queued_tokens += req.tokens
        self.pending += 1
        self.pending_tokens += req.tokens
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
            self.pending -= 1
            self.pending_tokens -= req.tokens

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

    def record_speed(self, seconds: float, tokens: int) -> None:
        """One batch's model time, folded into the per-token estimate behind Retry-After."""
        with self.cv:
            per_token = seconds / max(1, tokens)
            s = self.sec_per_token
            self.sec_per_token = per_token if not s else 0.8 * s + 0.2 * per_token
