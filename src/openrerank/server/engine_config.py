"""Server settings -> the engine's own configuration objects (loading, scheduling, chunk and image limits)."""

from __future__ import annotations

from openrerank.core.images import ImageLimits
from openrerank.engine.loading import LoadOptions
from openrerank.engine.scheduler import SchedulerConfig
from openrerank.engine.served import ChunkLimits
from openrerank.server.config import ServerConfig


def load_options(config: ServerConfig) -> LoadOptions:
    return LoadOptions(backend=config.backend, dtype=config.dtype, device=config.device,
                       threads=config.threads, max_length=config.max_length,
                       allow_pickle=config.allow_pickle, revision=config.revision)


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    return SchedulerConfig(max_batch_tokens=config.max_batch_tokens, max_batch_size=config.max_batch_size,
                           batch_wait_ms=config.batch_wait_ms, max_queue=config.max_queue,
                           max_padding=config.max_padding, min_rows=config.min_batch_rows,
                           request_timeout=config.request_timeout,
                           max_request_tokens=config.max_request_tokens,
                           max_queue_tokens=config.max_queue_tokens)


def chunk_limits(config: ServerConfig) -> ChunkLimits:
    return ChunkLimits(config.max_chunks_per_passage, config.max_chunks_per_request)


def image_limits(config: ServerConfig) -> ImageLimits:
    return ImageLimits(max_image_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
