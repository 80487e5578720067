"""The scheduler's Prometheus series for one model, labelled by task; each call is a no-op without metrics.

A batch's padded tokens and padding share are what its runtime computed (`runtimes/base.Computed`): the rows and
width as they ran, OpenVINO's shape buckets and a bi-encoder's query runs included. Worked out from the items
(longest x count) they showed ~4% padding where the runtime computed ~20%.
"""

from __future__ import annotations

from collections.abc import Sequence

from openrerank.core.work import Task, WorkItem
from openrerank.observe.metrics import Metrics
from openrerank.runtimes.base import Computed


class SchedulerMetrics:
    def __init__(self, metrics: Metrics | None, name: str) -> None:
        self.metrics = metrics
        self.name = name

    @property
    def enabled(self) -> bool:
        """Whether the series are kept: the batch runner tallies what a batch computed only then."""
        return self.metrics is not None

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

    def batch(self, items: Sequence[WorkItem], task: Task, seconds: float, ran: Computed | None) -> None:
        """One batch scored: its model time, size, the tokens its runtime computed (`ran`: rows x width as run,
        its own padding included) and the share of those that was padding. A batch that computed nothing (its
        vectors all kept) records 0 tokens and no share."""
        if not self.metrics or ran is None:
            return
        m = self.metrics
        m.inference_time.labels(self.name, task).observe(seconds)
        m.batch_size.labels(self.name, task).observe(len(items))
        m.batch_tokens.labels(self.name, task).observe(ran.tokens)
        if ran.tokens:
            m.padding_ratio.labels(self.name, task).observe(1 - ran.real / ran.tokens)
