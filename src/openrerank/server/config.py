"""Server settings: one dataclass, filled from CLI flags, each also settable as OPENRERANK_<FLAG>.

`validate()` is called before the server binds its port, so a nonsensical value is one clear line at
startup instead of odd behaviour under load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openrerank.core.images import ImageLimits
from openrerank.engine.batching import default_policy

#: Scheduler settings whose default depends on the device (None: `default_policy(device)`'s value).
BATCHING_FIELDS = ("max_batch_tokens", "max_batch_size", "max_padding", "min_batch_rows")


@dataclass
class ServerConfig:
    models: list[str] = field(default_factory=lambda: ["default"])
    model_families: list[str] = field(default_factory=list)  # NAME=FAMILY (or FAMILY with one model)
    instructions: list[str] = field(default_factory=list)  # NAME=TEXT: an LLM reranker's prompt instruction
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # model loading
    backend: str = "auto"
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    max_length: int | None = None
    allow_pickle: bool = False
    revision: str | None = None
    # request limits
    max_passages: int = 512
    max_inputs: int = 2048  # texts in one /v1/embeddings request (OpenAI's limit)
    max_body_bytes: int = 8 * 1024 * 1024
    # scheduler; None: the device's default (engine/batching.py: 16384 / 128 / 0.02 on CPU, 32768 / 256 / 0.2
    # on CUDA, where a batch may also always reach 16 pairs whatever their padding)
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    batch_wait_ms: float = 1.0
    max_padding: float | None = None
    min_batch_rows: int | None = None
    max_queue: int = 1024
    request_timeout: float = 120.0
    score_cache_mb: float = 0.0  # exact LRU of passage scores shared by all models; 0: off
    # bounded work per request (docs/reliability.md)
    max_request_tokens: int | None = None  # None: max_batch_tokens x request_timeout / 2 s
    max_queue_tokens: int | None = None  # None: two request budgets
    max_chunks_per_passage: int = 16
    max_chunks_per_request: int = 2048
    max_image_bytes: int = ImageLimits.max_image_bytes
    max_image_pixels: int = ImageLimits.max_pixels
    # slow clients
    header_timeout: float = 10.0  # seconds to receive a request's headers
    body_timeout: float = 60.0  # seconds to receive a request's body
    # dialect behaviour
    tei_chunking: bool = False
    # logging and tracing
    log_level: str = "info"
    log_format: str = "text"
    otlp_endpoint: str | None = None
    graceful_timeout: float = 30.0
    allow_partial: bool = False  # several models: serve those that load, instead of exiting

    def __post_init__(self) -> None:
        policy = default_policy(self.device)
        if self.max_batch_tokens is None:
            self.max_batch_tokens = policy.max_tokens
        if self.max_batch_size is None:
            self.max_batch_size = policy.max_size
        if self.max_padding is None:
            self.max_padding = policy.max_padding
        if self.min_batch_rows is None:
            self.min_batch_rows = policy.min_rows

    def validate(self) -> None:
        """Raise ValueError naming every flag whose value cannot work."""
        problems: list[str] = []

        def need(ok: bool, flag: str, what: str) -> None:
            if not ok:
                problems.append(f"--{flag} {getattr(self, flag.replace('-', '_'))!r}: {what}")

        need(0 <= self.port <= 65535, "port", "must be 0-65535")
        for flag in ("max-passages", "max-body-bytes", "max-batch-tokens", "max-batch-size", "min-batch-rows",
                     "max-queue", "max-chunks-per-passage", "max-chunks-per-request", "max-image-bytes",
                     "max-image-pixels"):
            need(getattr(self, flag.replace("-", "_")) >= 1, flag, "must be at least 1")
        for flag in ("max-request-tokens", "max-queue-tokens", "threads", "max-length"):
            value = getattr(self, flag.replace("-", "_"))
            need(value is None or value >= 1, flag, "must be at least 1 (or left unset)")
        for flag in ("request-timeout", "header-timeout", "body-timeout"):
            need(getattr(self, flag.replace("-", "_")) > 0, flag, "must be more than 0 seconds")
        need(self.batch_wait_ms >= 0, "batch-wait-ms", "must not be negative")
        need(self.score_cache_mb >= 0, "score-cache-mb", "must be 0 (off) or more")
        need(self.graceful_timeout >= 0, "graceful-timeout", "must not be negative")
        need(0 <= self.max_padding < 1, "max-padding", "must be at least 0 and below 1")
        need(self.log_level.lower() in ("critical", "error", "warning", "info", "debug", "trace"), "log-level",
             "must be one of debug, info, warning, error, critical")
        if problems:
            raise ValueError("; ".join(problems))
