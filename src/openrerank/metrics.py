"""Prometheus metrics, one registry per app so tests and several servers in a process don't collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # HTTP layer
        self.requests = Counter("openrerank_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.request_latency = Histogram("openrerank_request_duration_seconds", "HTTP request latency",
                                         ["route", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("openrerank_requests_in_flight", "HTTP requests being served", registry=r)
        self.disconnects = Counter("openrerank_client_disconnects_total",
                                   "Requests whose client went away before the answer (their work is cancelled)",
                                   registry=r)
        self.passages = Counter("openrerank_passages_total", "Passages scored", ["model"], registry=r)
        self.texts_embedded = Counter("openrerank_texts_embedded_total", "Texts embedded", ["model"], registry=r)
        self.tokens = Counter("openrerank_tokens_total", "Tokens run through the model (after truncation/chunking)",
                              ["model", "task"], registry=r)
        # engine: one queue per model (depth, tokens); the rest labelled by task (rerank | embed), which share it
        self.queue_depth = Gauge("openrerank_queue_depth", "Requests waiting or being scored", ["model"],
                                 registry=r)
        self.queue_tokens = Gauge("openrerank_queue_tokens", "Tokens of the requests waiting or being scored",
                                  ["model"], registry=r)
        self.batch_size = Histogram("openrerank_batch_size", "Items (pairs or texts) per model batch",
                                    ["model", "task"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("openrerank_batch_padded_tokens", "Padded tokens per model batch",
                                      ["model", "task"], buckets=_TOKEN_BUCKETS, registry=r)
        self.padding_ratio = Histogram("openrerank_batch_padding_ratio",
                                       "Share of padded tokens that are padding", ["model", "task"],
                                       buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r)
        self.queue_time = Histogram("openrerank_queue_seconds", "Time a request waited before its first batch",
                                    ["model", "task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram("openrerank_inference_seconds", "Model time per batch", ["model", "task"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("openrerank_rejected_total",
                                "Requests refused by back-pressure (queue_full), their size (too_large) or deadline",
                                ["model", "task", "reason"], registry=r)
        self.cancelled = Counter("openrerank_cancelled_total",
                                 "Requests abandoned by their client (disconnect) before their results were ready",
                                 ["model", "task"], registry=r)
        self.batch_failures = Counter("openrerank_batch_failures_total",
                                      "Model batches that raised (each request in it is then retried on its own)",
                                      ["model", "task"], registry=r)
