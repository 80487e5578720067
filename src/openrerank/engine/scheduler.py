"""Per-model scheduler: the only path from requests to the backend.

This first version scores each request's items in order on one dedicated worker thread, in
batches bounded by pair count and padded tokens, with back-pressure and deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from openrerank.backends.base import Backend, WorkItem
from openrerank.engine.errors import DeadlineExceededError, EngineStoppedError, QueueFullError
from openrerank.metrics import Metrics


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 16384
    max_batch_size: int = 128
    batch_wait_ms: float = 1.0
    max_queue: int = 1024
    request_timeout: float = 120.0


@dataclass
class ScoreOutcome:
    scores: np.ndarray  # float32, aligned with the submitted items
    queue_ms: float
    inference_ms: float


def split_batches(items: Sequence[WorkItem], max_tokens: int, max_size: int) -> list[list[int]]:
    """Index groups whose padded size (count x longest) stays within the token budget."""
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = items[i].length
        if cur and (len(cur) >= max_size or max(longest, n) * (len(cur) + 1) > max_tokens):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


class Scheduler:
    def __init__(self, backend: Backend, config: SchedulerConfig, *, name: str,
                 metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.config = config
        self.name = name
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._lock = asyncio.Lock()
        self._pending = 0
        self._stopped = False

    @property
    def pending(self) -> int:
        return self._pending

    async def start(self) -> None:
        self._stopped = False

    async def stop(self) -> None:
        self._stopped = True
        self._executor.shutdown(wait=True)

    def warmup(self, items: Sequence[WorkItem]) -> None:
        """Run one batch synchronously (before serving) so first requests don't pay lazy init."""
        self.backend.score(list(items))

    async def submit(self, items: Sequence[WorkItem]) -> ScoreOutcome:
        if self._stopped:
            raise EngineStoppedError()
        if self._pending >= self.config.max_queue:
            if self.metrics:
                self.metrics.rejected.labels(self.name, "queue_full").inc()
            raise QueueFullError(self._pending, self.config.max_queue)
        self._pending += 1
        self._set_depth()
        enqueued = time.perf_counter()
        try:
            try:
                await asyncio.wait_for(self._lock.acquire(), timeout=self.config.request_timeout)
            except TimeoutError:
                if self.metrics:
                    self.metrics.rejected.labels(self.name, "deadline").inc()
                raise DeadlineExceededError(self.config.request_timeout) from None
            try:
                started = time.perf_counter()
                loop = asyncio.get_running_loop()
                scores = await loop.run_in_executor(self._executor, self._score_all, list(items))
                done = time.perf_counter()
            finally:
                self._lock.release()
        finally:
            self._pending -= 1
            self._set_depth()
        if self.metrics:
            self.metrics.queue_time.labels(self.name).observe(started - enqueued)
        return ScoreOutcome(scores, (started - enqueued) * 1e3, (done - started) * 1e3)

    def _score_all(self, items: list[WorkItem]) -> np.ndarray:
        out = np.empty(len(items), dtype=np.float32)
        for idx in split_batches(items, self.config.max_batch_tokens, self.config.max_batch_size):
            batch = [items[i] for i in idx]
            t0 = time.perf_counter()
            out[idx] = self.backend.score(batch)
            if self.metrics:
                longest = max(it.length for it in batch)
                real = sum(it.length for it in batch)
                m = self.metrics
                m.inference_time.labels(self.name).observe(time.perf_counter() - t0)
                m.batch_size.labels(self.name).observe(len(batch))
                m.batch_tokens.labels(self.name).observe(longest * len(batch))
                m.padding_ratio.labels(self.name).observe(1 - real / (longest * len(batch)))
        return out

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self._pending)
