"""Server settings: one dataclass, filled from CLI flags, each also settable as OPENRERANK_<FLAG>."""

from __future__ import annotations

from dataclasses import dataclass, field

from openrerank.engine.batching import MAX_PADDING


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
    # scheduler
    max_batch_tokens: int = 16384
    max_batch_size: int = 128
    batch_wait_ms: float = 1.0
    max_padding: float = MAX_PADDING
    max_queue: int = 1024
    request_timeout: float = 120.0
    # dialect behaviour
    tei_chunking: bool = False
    # logging and tracing
    log_level: str = "info"
    log_format: str = "text"
    otlp_endpoint: str | None = None
    graceful_timeout: float = 30.0
