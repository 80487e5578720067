"""Prometheus metrics, one registry per app so tests and several servers in a process don't collide.

One facade, two sinks. Every series always lands in the app's own `prometheus_client` registry (what
`/v1/metrics` shows: this process). Under Ray Serve a `mirror` (see `openrerank.server.ray_serve`) writes the
same series through `ray.serve.metrics` as well: each node's Ray metrics agent then exports them, tagged
per replica and prefixed `ray_`, so Prometheus can sum them across replicas and nodes. Call sites
use the `prometheus_client` API (`labels(...)`, `inc`, `dec`, `set`, `observe`) either way.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = tuple(2**k for k in (6, 8, 10, 11, 12, 13, 14, 15, 16))  # 64 to 65,536 tokens
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class MirrorMetric(Protocol):
    def record(self, value: float, tags: dict[str, str]) -> None: ...


class MetricsMirror(Protocol):
    """A second sink: makes one metric per series; `record` means add (counter), set (gauge), observe."""

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> MirrorMetric: ...

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> MirrorMetric: ...

    def histogram(self, name: str, doc: str, labels: tuple[str, ...],
                  buckets: tuple[float, ...]) -> MirrorMetric: ...


class _Mirrored:
    """A prometheus_client metric (or one labelled child of it) that also writes to a mirror metric."""

    def __init__(self, prom: Any, mirror: MirrorMetric, kind: str, labels: tuple[str, ...],
                 tags: dict[str, str] | None = None) -> None:
        self._prom = prom
        self._mirror = mirror
        self._kind = kind
        self._labels = labels
        self._tags = tags or {}
        self._children: dict[tuple[str, ...], _Mirrored] = {}
        self._lock = threading.Lock()
        self._value = 0.0  # gauges: the mirror is told absolute values

    def labels(self, *values: Any) -> _Mirrored:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = _Mirrored(self._prom.labels(*key), self._mirror, self._kind, (),
                                      dict(zip(self._labels, key, strict=True)))
                    self._children[key] = child
        return child

    def inc(self, amount: float = 1) -> None:
        self._prom.inc(amount)
        if self._kind == "gauge":
            self._set_mirror(amount, relative=True)
        else:
            self._mirror.record(amount, self._tags)

    def dec(self, amount: float = 1) -> None:
        self._prom.dec(amount)
        self._set_mirror(-amount, relative=True)

    def set(self, value: float) -> None:
        self._prom.set(value)
        self._set_mirror(value, relative=False)

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        self._mirror.record(value, self._tags)

    def _set_mirror(self, value: float, *, relative: bool) -> None:
        with self._lock:
            self._value = self._value + value if relative else value
            current = self._value
        self._mirror.record(current, self._tags)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, mirror: MetricsMirror | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._mirror = mirror
        # HTTP layer
        # route: an HTTP path or a gRPC method (/inference.GRPCInferenceService/ModelInfer); status: an HTTP
        # status or a gRPC status code name (OK, INVALID_ARGUMENT, ...); protocol: http or grpc
        self.requests = self._counter("openrerank_requests_total", "Requests by route, status and protocol",
                                      ("route", "status", "protocol"))
        self.request_latency = self._histogram("openrerank_request_duration_seconds", "Request latency",
                                               ("route", "status", "protocol"), _LATENCY_BUCKETS)
        self.in_flight = self._gauge("openrerank_requests_in_flight", "Requests being served (HTTP and gRPC)", ())
        self.disconnects = self._counter("openrerank_client_disconnects_total",
                                         "Requests whose client went away before the answer (their work is "
                                         "cancelled)", ())
        self.passages = self._counter("openrerank_passages_total", "Passages answered (cache hits included)",
                                      ("model",))
        self.texts_embedded = self._counter("openrerank_texts_embedded_total", "Texts embedded", ("model",))
        self.tokens = self._counter("openrerank_tokens_total", "Tokens billed: what the answers' usage reports "
                                    "(after truncation/chunking; cache hits included)", ("model", "task"))
        # engine: one queue per model (depth, tokens); the rest by task (rerank | listwise | embed), which share it
        self.queue_depth = self._gauge("openrerank_queue_depth", "Requests waiting or being scored", ("model",))
        self.queue_tokens = self._gauge("openrerank_queue_tokens", "Tokens of the requests waiting or being scored",
                                        ("model",))
        self.batch_size = self._histogram("openrerank_batch_size", "Items (pairs or texts) per model batch",
                                          ("model", "task"), _BATCH_BUCKETS)
        self.batch_tokens = self._histogram("openrerank_batch_padded_tokens", "Tokens the runtime computed per model "
                                            "batch (rows x width as it ran them, its shape buckets included)",
                                            ("model", "task"), _TOKEN_BUCKETS)
        self.padding_ratio = self._histogram("openrerank_batch_padding_ratio",
                                             "Share of the tokens computed per batch that were padding",
                                             ("model", "task"), _RATIO_BUCKETS)
        self.queue_time = self._histogram("openrerank_queue_seconds", "Time a request waited before its first batch",
                                          ("model", "task"), _LATENCY_BUCKETS)
        self.inference_time = self._histogram("openrerank_inference_seconds", "Model time per batch",
                                              ("model", "task"), _LATENCY_BUCKETS)
        self.rejected = self._counter("openrerank_rejected_total", "Requests refused by back-pressure (queue_full), "
                                      "their size (too_large), deadline, or as unfinishable in a shutdown (shutdown)",
                                      ("model", "task", "reason"))
        self.cancelled = self._counter("openrerank_cancelled_total", "Requests abandoned by their client "
                                       "(disconnect) before their results were ready", ("model", "task"))
        self.batch_failures = self._counter("openrerank_batch_failures_total", "Model batches that raised (each "
                                            "request in it is then retried on its own)", ("model", "task"))

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Any:
        prom = Counter(name, doc, labels, registry=self.registry)
        if self._mirror is None:
            return prom
        # prometheus_client adds `_total` on export; so does Ray.
        return _Mirrored(prom, self._mirror.counter(name.removesuffix("_total"), doc, labels), "counter", labels)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Any:
        prom = Gauge(name, doc, labels, registry=self.registry)
        if self._mirror is None:
            return prom
        return _Mirrored(prom, self._mirror.gauge(name, doc, labels), "gauge", labels)

    def _histogram(self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Any:
        prom = Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        if self._mirror is None:
            return prom
        return _Mirrored(prom, self._mirror.histogram(name, doc, labels, buckets), "histogram", labels)
