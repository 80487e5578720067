"""Server settings -> the engine's own configuration objects (model sources, loading, scheduling, chunk and
image limits).

The one place flags become engine objects; each knob then travels inside the object that owns it (the batch
policy inside `SchedulerConfig`, the runtime flags inside `LoadOptions`, a model's family and instruction inside
its `ModelSource`).
"""

from __future__ import annotations

from dataclasses import replace

from openrerank.core.images import ImageLimits
from openrerank.core.settings import Shown
from openrerank.engine.admission import ChunkLimits, SchedulerConfig
from openrerank.engine.loading import LoadOptions
from openrerank.server.config import ServerConfig
from openrerank.sources.source import ModelSource, parse_model_arg, per_model


def model_sources(config: ServerConfig, shown: Shown | None = None) -> list[ModelSource]:
    """The served models, in order: each `--model` with the `--model-family NAME=FAMILY` and `--instruction
    NAME=TEXT` it gets (NAME a served id, optional with one model). Every caller reads this one parse. `shown`:
    how an error names the settings not typed as flags (core/settings.py)."""
    sources = [parse_model_arg(m) for m in config.models]
    ids = [s.served_id for s in sources]
    families = per_model(config.model_families, ids, "model-family", shown)
    instructions = per_model(config.instructions, ids, "instruction", shown, text=True)
    return [replace(s, family=families.get(s.served_id), instruction=instructions.get(s.served_id))
            for s in sources]


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
