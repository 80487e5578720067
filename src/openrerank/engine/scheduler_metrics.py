"""The scheduler's Prometheus series for one model, labelled by task; each call is a no-op without metrics."""

from __future__ import annotations

from collections.abc import Sequence

from openrerank.core.work import Task, WorkItem
from openrerank.observe.metrics import Metrics


class SchedulerMetrics:
    def __init__(self, metrics: Metrics | None, name: str) -> None:
        self.metrics = metrics
        self.name = name

    def rejected(self, task: Task, reason: str) -> None:
        """A request refused: too_large, queue_full, deadline or shutdown."""
        if self.metrics:
            self.metrics.rejected.labels(self.name, task, reason).inc()

    def cancelled(self, task: Task) -> None:
        if self.metrics:
            self.metrics.cancelled.labels(self.name, task).inc()

    def depth(self, pending: int, pending_tokens: int) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(pending)
            self.metrics.queue_tokens.labels(self.name).set(pending_tokens)

    def queue_time(self, task: Task, seconds: float) -> None:
        if self.metrics:
            self.metrics.queue_time.labels(self.name, task).observe(seconds)

    def batch_failed(self, task: Task) -> None:
        if self.metrics:
            self.metrics.batch_failures.labels(self.name, task).inc()

    def batch(self, items: Sequence[WorkItem], task: Task, seconds: float) -> None:
        """One batch scored: its model time, size, padded tokens and share of padding."""
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
