"""A served model (loaded model + its scheduler) and the set of them dialects look models up in.

A served model reranks, and (a bi-encoder) embeds: both go through its one scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from openrerank.backends.bi_scorer import normalize
from openrerank.engine.errors import UnsupportedRequestError
from openrerank.engine.loading import LoadedModel, LoadOptions, load_model
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from openrerank.metrics import Metrics
from openrerank.models.source import ModelSource
from openrerank.schemas.internal import EmbedRequest, EmbedResult, RerankRequest, RerankResult, Timings, Truncate
from openrerank.schemas.work import Task

log = logging.getLogger(__name__)

_WARMUP_QUERY = "what does a reranker do"
_WARMUP_PASSAGES = [
    "A reranker scores each query and passage pair and sorts the passages best-first.",
    "Bananas are yellow.",
]


class UnknownModelError(LookupError):
    def __init__(self, name: str, served: list[str], what: str = "models") -> None:
        self.name = name
        self.served = served
        listed = f"served {what}: {', '.join(served)}" if served else f"no {what} are served here"
        super().__init__(f"Model '{name}' is not served here; {listed}")


class NotAnEmbeddingModelError(UnsupportedRequestError):
    """Embeddings asked of a reranker that has none (a cross-encoder or LLM reranker scores pairs only)."""

    def __init__(self, name: str | None, family: str | None, embedders: list[str]) -> None:
        self.embedders = embedders
        what = f"Model '{name}' ({family}) is a reranker only: it scores query-passage pairs, it has no embeddings"
        if name is None:
            what = "No model was named and the first served model produces no embeddings"
        where = (f"embedding models served here: {', '.join(embedders)}" if embedders else
                 "no embedding model is served here (serve a sentence-transformers bi-encoder, e.g. --model default)")
        super().__init__(f"{what}; {where}")


@dataclass
class ServedModel:
    name: str
    loaded: LoadedModel
    scheduler: Scheduler
    metrics: Metrics | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    embedding_dim: int | None = None  # length of its embeddings (embedding models), known after warm-up

    @property
    def max_length(self) -> int:
        return self.loaded.max_length

    @property
    def embeds(self) -> bool:
        return self.loaded.embeds

    @property
    def tasks(self) -> list[Task]:
        return self.loaded.tasks

    def warmup(self) -> None:
        prep = self.loaded.encoder.prepare(_WARMUP_QUERY, _WARMUP_PASSAGES, Truncate.END)
        self.scheduler.warmup(prep.items)
        if self.embeds:
            items = self.loaded.embedding_items(_WARMUP_PASSAGES)
            self.scheduler.warmup(items)
            self.embedding_dim = int(self.loaded.backend.embed(items[:1]).shape[1])

    async def rerank(self, req: RerankRequest) -> RerankResult:
        """Prepare text off the loop, score through the scheduler, fold chunk scores to passages."""
        t0 = time.perf_counter()
        prep = await asyncio.to_thread(
            self.loaded.encoder.prepare, req.query, req.passages, req.truncate,
            max_chunks_per_passage=req.max_chunks_per_passage,
            max_tokens_per_passage=req.max_tokens_per_passage,
        )
        t1 = time.perf_counter()
        outcome = await self.scheduler.submit(prep.items)
        logits = prep.fold(outcome.scores, len(req.passages))
        if self.metrics:
            self.metrics.passages.labels(self.name).inc(len(req.passages))
            self.metrics.tokens.labels(self.name, "rerank").inc(prep.prompt_tokens)
        timings = Timings(
            tokenize_ms=(t1 - t0) * 1e3,
            queue_ms=outcome.queue_ms,
            inference_ms=outcome.inference_ms,
            total_ms=(time.perf_counter() - t0) * 1e3,
        )
        return RerankResult(self.name, logits, prep.prompt_tokens, self.loaded.score_kind, timings)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        """Tokenize off the loop, embed through the same scheduler as reranking, shorten if asked."""
        self.check_dimensions(req.dimensions)
        t0 = time.perf_counter()
        items = await asyncio.to_thread(self.loaded.embedding_items, req.texts, req.truncate, req.input_type)
        t1 = time.perf_counter()
        outcome = await self.scheduler.submit(items)
        vectors = outcome.scores
        if req.dimensions is not None and req.dimensions < vectors.shape[1]:
            vectors = vectors[:, : req.dimensions]
            if self.loaded.spec.options.get("normalize"):  # a shortened unit vector is unit again
                vectors = normalize(vectors).astype(np.float32)
        tokens = sum(it.length for it in items)
        if self.metrics:
            self.metrics.texts_embedded.labels(self.name).inc(len(items))
            self.metrics.tokens.labels(self.name, "embed").inc(tokens)
        timings = Timings(tokenize_ms=(t1 - t0) * 1e3, queue_ms=outcome.queue_ms,
                          inference_ms=outcome.inference_ms, total_ms=(time.perf_counter() - t0) * 1e3)
        return EmbedResult(self.name, vectors, tokens, timings)

    def check_dimensions(self, dimensions: int | None) -> None:
        """`dimensions` must be the model's own, or (Matryoshka models) any smaller positive size."""
        dim = self.embedding_dim
        if dimensions is None or dim is None or dimensions == dim:
            return
        if dimensions < 1 or dimensions > dim:
            raise UnsupportedRequestError(f"dimensions must be between 1 and {dim} for model '{self.name}' "
                                          f"(its embeddings have {dim} dimensions)")
        if not self.loaded.spec.options.get("matryoshka"):
            raise UnsupportedRequestError(
                f"Model '{self.name}' does not support shortened embeddings (dimensions={dimensions}): its "
                f"embeddings have {dim} dimensions and it is not a Matryoshka model; omit dimensions or "
                f"send {dim}")

    def metadata(self) -> dict:
        meta = {"id": self.name, **self.loaded.describe()}
        if self.embedding_dim is not None:
            meta["embedding_dim"] = self.embedding_dim
        return meta


class ServedModels:
    """All models of one server; `ready` only once every model is loaded and warmed up."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self.expected: list[str] = []
        self.ready = False
        self.load_error: str | None = None

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    @property
    def names(self) -> list[str]:
        return list(self._models) or list(self.expected)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, name: str | None) -> ServedModel:
        """`None` (field omitted) picks the first model, as NIM does with its single model."""
        if name is None:
            if not self._models:
                raise UnknownModelError("<none>", self.names)
            return next(iter(self._models.values()))
        model = self._models.get(name)
        if model is None:
            raise UnknownModelError(name, self.names)
        return model

    @property
    def embedders(self) -> list[str]:
        """Ids of the served models that produce embeddings."""
        return [m.name for m in self._models.values() if m.embeds]

    def get_embedder(self, name: str | None) -> ServedModel:
        """The embedding model `name` (None: the first served embedding model, as NIM picks its one model)."""
        if name is None:
            embedders = self.embedders
            if not embedders:
                first = next(iter(self._models.values()), None)
                raise NotAnEmbeddingModelError(None, first.loaded.family.id if first else None, [])
            return self._models[embedders[0]]
        model = self._models.get(name)
        if model is None:
            raise UnknownModelError(name, self.embedders or self.names, "embedding models" if self.embedders
                                    else "models")
        if not model.embeds:
            raise NotAnEmbeddingModelError(name, model.loaded.family.id, self.embedders)
        return model

    async def stop(self) -> None:
        for m in self._models.values():
            await m.scheduler.stop()
            m.loaded.close()


def load_served_model(source: ModelSource, options: LoadOptions, sched: SchedulerConfig,
                      metrics: Metrics | None) -> ServedModel:
    """Blocking: load weights, build the scheduler, run a warm-up pass."""
    loaded = load_model(source, options)
    scheduler = Scheduler(loaded.backend, sched, name=source.served_id, metrics=metrics)
    served = ServedModel(source.served_id, loaded, scheduler, metrics)
    served.warmup()
    log.info("model %s ready", source.served_id)
    return served
