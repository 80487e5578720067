"""Server settings -> the engine's own configuration objects (loading, scheduling, chunk and image limits).

The one place flags become engine objects; each knob then travels inside the object that owns it (the batch
policy inside `SchedulerConfig`, the runtime flags inside `LoadOptions`).
"""

from __future__ import annotations

from openrerank.core.images import ImageLimits
from openrerank.engine.admission import ChunkLimits, SchedulerConfig
from openrerank.engine.loading import LoadOptions
from openrerank.server.config import ServerConfig


def load_options(config: ServerConfig) -> LoadOptions:
    return LoadOptions(backend=config.backend, dtype=config.dtype, backend_choice=config.backend_choice,
                       device=config.device,
                       threads=config.threads, max_length=config.max_length,
                       allow_pickle=config.allow_pickle, revision=config.revision)


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    return SchedulerConfig(policy=config.batch_policy, batch_wait_ms=config.batch_wait_ms,
                           max_queue=config.max_queue, request_timeout=config.request_timeout,
                           max_request_tokens=config.max_request_tokens,
                           max_queue_tokens=config.max_queue_tokens)


def chunk_limits(config: ServerConfig) -> ChunkLimits:
    return ChunkLimits(config.max_chunks_per_passage, config.max_chunks_per_request)


def image_limits(config: ServerConfig) -> ImageLimits:
    return ImageLimits(max_image_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
