"""Server settings: one dataclass, filled from CLI flags, each also settable as OPENRERANK_<FLAG>."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    dtype: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    max_length: int | None = None
    allow_pickle: bool = False
    revision: str | None = None
    # request limits
    max_passages: int = 512
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
    # dialect behaviour
    tei_chunking: bool = False
    # logging and tracing
    log_level: str = "info"
    log_format: str = "text"
    otlp_endpoint: str | None = None
    graceful_timeout: float = 30.0

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
