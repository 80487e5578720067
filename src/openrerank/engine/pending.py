"""One submitted request as the scheduler tracks it, and how its result gets back to the caller's event loop.

The worker thread owns a request's progress (`todo`, `scores`, `remaining`, timings); the event loop owns its
`future`. Results cross over with `post`, which never blocks the worker.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from openrerank.core.work import Task, WorkItem


@dataclass
class ScoreOutcome:
    scores: np.ndarray  # one row per submitted item: float32 scores (n,) or embeddings (n, dim); listwise: object (n,)
    queue_ms: float  # submit -> first batch holding one of its items starts
    inference_ms: float  # first batch start -> last batch end
    batches: int = 0  # how many model batches its items were spread over


class PendingRequest:
    """One submitted request. The worker owns `todo`/`scores`/`remaining`/timings; the loop owns `future`."""

    __slots__ = ("abandoned", "batches", "deadline", "failed", "first_start", "future", "items", "last_end",
                 "left_tokens", "loop", "remaining", "scores", "submitted", "task", "todo", "tokens", "work")

    def __init__(self, items: list[WorkItem], loop: asyncio.AbstractEventLoop) -> None:
        self.items = items
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.submitted = time.perf_counter()
        self.tokens = sum(it.length for it in items)
        self.work = float(self.tokens)  # what admission weighs it at (engine/rates.py), set on submit
        #: Its `time.monotonic()` deadline, set on submit: admission refuses a newcomer that would push it past.
        self.deadline = float("inf")
        self.todo = sorted(range(len(items)), key=lambda i: items[i].length)  # not yet planned
        self.task: Task = items[0].task  # one task per request
        self.scores: np.ndarray | None = None  # made by its first batch: (n,) scores or (n, dim) embeddings
        self.remaining = len(items)
        self.left_tokens = self.tokens  # of items not scored yet: admission's estimate of the work it has left
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.batches = 0
        self.abandoned = False  # deadline or cancellation: set by the loop under the admission lock
        self.failed = False  # its items failed in the model: set by the worker

    @property
    def work_left(self) -> float:
        """Its work in proportion to its unscored tokens: an estimate, read while batches run."""
        return self.work * max(0, self.left_tokens) / max(1, self.tokens)

    def outcome(self) -> ScoreOutcome:
        """What `submit` returns once every item is scored."""
        assert self.scores is not None and self.first_start is not None and self.last_end is not None
        return ScoreOutcome(self.scores, (self.first_start - self.submitted) * 1e3,
                            (self.last_end - self.first_start) * 1e3, self.batches)


def _settle(req: PendingRequest, exc: BaseException | None) -> None:
    if req.future.done():  # timed out or cancelled meanwhile
        return
    if exc is None:
        req.future.set_result(None)
    else:
        req.future.set_exception(exc)


def post(req: PendingRequest, exc: BaseException | None) -> None:
    """From the worker thread: finish the request's future (with `exc`, or done) on its own event loop."""
    try:
        req.loop.call_soon_threadsafe(_settle, req, exc)
    except RuntimeError:  # its event loop is closed: nobody is waiting any more
        pass
