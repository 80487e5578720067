"""Server settings -> the engine's own configuration objects (model sources, loading, scheduling, chunk and
image limits).

The one place flags become engine objects; each knob then travels inside the object that owns it (the batch
policy inside `SchedulerConfig`, the runtime flags inside `LoadOptions`, a model's family and instruction inside
its `ModelSource`).
"""

from __future__ import annotations

from dataclasses import replace

from openrerank.core.images import ImageLimits
from openrerank.core.settings import Shown, setting_item
from openrerank.engine.admission import ChunkLimits, SchedulerConfig
from openrerank.engine.loading import LoadOptions
from openrerank.server.config import ServerConfig
from openrerank.sources.source import ModelSource, parse_model_arg, per_model


def model_sources(config: ServerConfig, shown: Shown | None = None) -> list[ModelSource]:
    """The served models, in order: each `--model` with the `--model-family NAME=FAMILY`, `--instruction
    NAME=TEXT` and `--revision NAME=REV` it gets (NAME a served id, optional with one model; a revision without
    NAME pins every model no other names). Every caller reads this one parse. `shown`: how an error names the
    settings not typed as flags (core/settings.py)."""
    sources = [parse_model_arg(m) for m in config.models]
    ids = [s.served_id for s in sources]
    families = per_model(config.model_families, ids, "model-family", shown)
    instructions = per_model(config.instructions, ids, "instruction", shown, text=True)
    revisions = model_revisions(config.revisions, ids, shown)
    served = []
    for s in sources:
        revision, revision_named = revisions.get(s.served_id, (None, None))
        served.append(replace(s, family=families.get(s.served_id), instruction=instructions.get(s.served_id),
                              revision=revision, revision_named=revision_named))
    return served


def model_revisions(values: list[str], ids: list[str], shown: Shown | None = None) -> dict[str, tuple[str, str]]:
    """`--revision` items by served id: (revision, how an error names it). `NAME=REV` pins NAME; a bare `REV`
    every model no `NAME=REV` names (one revision for every model, as the flag was before it took NAME=). A
    second revision for a model is refused: which one served would depend on the order."""
    out: dict[str, tuple[str, str]] = {}
    every: str | None = None
    for item in values:
        name, sep, revision = item.partition("=")
        key = name.strip() if sep else None
        if key is not None and key not in ids:
            raise ValueError(f"{setting_item('revision', item, shown)}: use NAME=REV with NAME one of the served "
                             f"ids ({', '.join(ids)})")
        if key in out or (key is None and every is not None):
            raise ValueError(f"{setting_item('revision', item, shown)}: {key or 'every model'} is given a revision "
                             "already")
        if key is None:
            every = item
        else:
            out[key] = (revision.strip(), setting_item("revision", item, shown, quote=False))
    if every is not None:
        for name in ids:
            out.setdefault(name, (every.strip(), setting_item("revision", every, shown, quote=False)))
    return out


def load_options(config: ServerConfig) -> LoadOptions:
    return LoadOptions(backend=config.backend, dtype=config.dtype, backend_choice=config.backend_choice,
                       device=config.device,
                       threads=config.threads, max_length=config.max_length,
                       allow_pickle=config.allow_pickle)


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    return SchedulerConfig(policy=config.batch_policy, batch_wait_ms=config.batch_wait_ms,
                           max_queue=config.max_queue, request_timeout=config.request_timeout,
                           max_request_tokens=config.max_request_tokens,
                           max_queue_tokens=config.max_queue_tokens)


def chunk_limits(config: ServerConfig) -> ChunkLimits:
    return ChunkLimits(config.max_chunks_per_passage, config.max_chunks_per_request)


def image_limits(config: ServerConfig) -> ImageLimits:
    return ImageLimits(max_image_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
