"""A served model (loaded model + its scheduler) and the set of them dialects look models up in.

A served model reranks, and (a bi-encoder) embeds: both go through its one scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from openrerank.core.images import ImageLimits
from openrerank.core.requests import EmbedRequest, EmbedResult, RerankRequest, RerankResult, Timings, Truncate
from openrerank.core.work import Task
from openrerank.engine.errors import (
    DeadlineExceededError,
    ModelOutputError,
    RequestTooLargeError,
    UnsupportedRequestError,
)
from openrerank.engine.loading import LoadedModel, LoadOptions, load_model
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from openrerank.engine.score_cache import ScoreCache, Scored
from openrerank.families.bi_scorer import normalize
from openrerank.observe.metrics import Metrics
from openrerank.sources.source import ModelSource
from openrerank.text.prepare import Prepared

#: Largest finite float32: what +-inf scores are reported as (JSON has no infinity).
_FLOAT32_MAX = float(np.finfo(np.float32).max)

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


class ImagesNotSupportedError(UnsupportedRequestError):
    """A passage image sent to a model that reads text only."""

    def __init__(self, name: str, family: str, image_models: list[str] | None) -> None:
        where = ("" if image_models is None else
                 f"; models served here that take images: {', '.join(image_models)}" if image_models else
                 "; no model served here takes images (serve a vision-language reranker, e.g. "
                 "nvidia/llama-nemotron-rerank-vl-1b-v2)")
        super().__init__(f"Model '{name}' ({family}) reads text only: it cannot score a passage's image{where}")


@dataclass(frozen=True)
class ChunkLimits:
    """How much chunking one request may ask for (CHUNK only); the token budget is the scheduler's."""

    #: Windows per passage when the request does not say (Cohere v1 says 10 itself); also the most it may ask.
    max_chunks_per_passage: int = 16
    #: Windows in one request, all passages together.
    max_chunks_per_request: int = 2048


@dataclass
class ServedModel:
    name: str
    loaded: LoadedModel
    scheduler: Scheduler
    metrics: Metrics | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    limits: ChunkLimits = field(default_factory=ChunkLimits)
    embedding_dim: int | None = None  # length of its embeddings (embedding models), known after warm-up
    score_cache: ScoreCache | None = None
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    @property
    def takes_images(self) -> bool:
        return self.loaded.takes_images

    @property
    def max_length(self) -> int:
        return self.loaded.max_length

    @property
    def dtype(self) -> str | None:
        """The precision it runs in (what `--dtype auto` resolved to); None when built by hand."""
        return self.loaded.engine.dtype if self.loaded.engine is not None else None

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

    async def rerank(self, req: RerankRequest, *, deadline: float | None = None) -> RerankResult:
        """Prepare text off the loop, score through the scheduler, fold chunk scores to passages.

        `deadline` (a `time.monotonic()` instant; default now + the request timeout) covers text
        preparation as well as queueing and scoring."""
        return (await self.rerank_many([req], deadline=deadline))[0]

    async def rerank_many(self, reqs: Sequence[RerankRequest], *, deadline: float | None = None
                          ) -> list[RerankResult]:
        """Several queries of one client request (vLLM score's distinct text_1) as one scheduler
        submission: one admission unit, one deadline, one cancellation.

        With a score cache, each query consults it on its own and only the passages it does not hold (and
        no concurrent request is scoring) are tokenized and scored."""
        t0 = time.perf_counter()
        if deadline is None:
            deadline = time.monotonic() + self.scheduler.config.request_timeout
        chunk_caps = [self._chunk_cap(r) for r in reqs]
        if any(r.has_images for r in reqs) and not self.takes_images:
            raise ImagesNotSupportedError(self.name, self.loaded.family.id, None)
        if self.score_cache is not None and not any(r.has_images for r in reqs):  # keys are texts only
            return list(await asyncio.gather(*(self._rerank_cached(r, cap, deadline, t0)
                                               for r, cap in zip(reqs, chunk_caps, strict=True))))
        scored = await self._score(reqs, [r.passages for r in reqs], chunk_caps, deadline)
        return [self._result(req, s.logits, s.prompt_tokens, s.prompt_tokens,
                             Timings(s.tokenize_ms, s.queue_ms, s.inference_ms), t0)
                for req, s in zip(reqs, scored, strict=True)]

    async def _rerank_cached(self, req: RerankRequest, chunk_cap: int | None, deadline: float, t0: float
                             ) -> RerankResult:
        assert self.score_cache is not None

        async def score_misses(passages: list[str]) -> Scored:
            return (await self._score([req], [passages], [chunk_cap], deadline))[0]

        cached = await self.score_cache.score(self.name, self._cache_namespace(req, chunk_cap), req.query,
                                              req.passages, score_misses)
        return self._result(req, cached.logits, cached.prompt_tokens, cached.scored_tokens,
                            Timings(cached.tokenize_ms, cached.queue_ms, cached.inference_ms), t0)

    async def _score(self, reqs: Sequence[RerankRequest], passages: Sequence[list[str]],
                     chunk_caps: list[int | None], deadline: float) -> list[Scored]:
        """Tokenize each request's `passages` off the loop (within the deadline) and score them all as one
        scheduler submission; one float32 per passage."""
        t0 = time.perf_counter()
        timeout = self.scheduler.config.request_timeout
        try:
            preps = await asyncio.wait_for(asyncio.to_thread(self._prepare_all, reqs, passages, chunk_caps),
                                           max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceededError(timeout) from None
        chunked = sum(len(p.items) for p, r in zip(preps, reqs, strict=True) if r.truncate is Truncate.CHUNK)
        if chunked > self.limits.max_chunks_per_request:
            raise RequestTooLargeError("chunks", chunked, self.limits.max_chunks_per_request,
                                       "--max-chunks-per-request", "send fewer or shorter passages, or ask for "
                                       "fewer chunks per passage")
        t1 = time.perf_counter()
        outcome = await self.scheduler.submit([it for p in preps for it in p.items], timeout=timeout,
                                              deadline=deadline)
        out = []
        offset = 0
        for texts, prep in zip(passages, preps, strict=True):
            scores = outcome.scores[offset : offset + len(prep.items)]
            offset += len(prep.items)
            out.append(Scored(prep.fold(scores, len(texts)), prep, (t1 - t0) * 1e3, outcome.queue_ms,
                              outcome.inference_ms))
        return out

    def _result(self, req: RerankRequest, logits: np.ndarray, prompt_tokens: int, scored_tokens: int,
                timings: Timings, t0: float) -> RerankResult:
        logits = _reportable(logits)
        if self.metrics:
            self.metrics.passages.labels(self.name).inc(len(req.passages))
            self.metrics.tokens.labels(self.name, "rerank").inc(scored_tokens)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        return RerankResult(self.name, logits, prompt_tokens, self.loaded.score_kind, timings)

    def _cache_namespace(self, req: RerankRequest, chunk_cap: int | None) -> bytes:
        """Everything besides the texts that decides a passage's score: model, family options, window,
        engine and precision, truncation and chunk bounds."""
        loaded = self.loaded
        return ScoreCache.namespace(
            self.name, loaded.source.spec, loaded.family.id, sorted(loaded.spec.options.items()),
            loaded.max_length, loaded.backend.description, req.truncate.value, chunk_cap,
            req.max_tokens_per_passage)

    def _chunk_cap(self, req: RerankRequest) -> int | None:
        if req.truncate is not Truncate.CHUNK:
            return req.max_chunks_per_passage
        asked = req.max_chunks_per_passage
        limit = self.limits.max_chunks_per_passage
        if asked is not None and asked > limit:
            raise RequestTooLargeError("chunks per passage", asked, limit, "--max-chunks-per-passage")
        return asked or min(req.default_chunks_per_passage or limit, limit)

    def _prepare_all(self, reqs: Sequence[RerankRequest], passages: Sequence[list[str]],
                     chunk_caps: list[int | None]) -> list[Prepared]:
        return [self._prepare_images(r, texts, cap) if r.has_images else
                self.loaded.encoder.prepare(r.query, texts, r.truncate, max_chunks_per_passage=cap,
                                            max_tokens_per_passage=r.max_tokens_per_passage)
                for r, texts, cap in zip(reqs, passages, chunk_caps, strict=True)]

    def _prepare_images(self, req: RerankRequest, texts: list[str], chunk_cap: int | None) -> Prepared:
        """Image passages, off the event loop, priced against the per-request token budget before decoding."""
        assert req.images is not None
        return self.loaded.prepare_images(req.query, texts, req.images, req.truncate, limits=self.image_limits,
                                          budget=self.scheduler.config.request_budget, max_chunks_per_passage=chunk_cap,
                                          max_tokens_per_passage=req.max_tokens_per_passage)

    async def embed(self, req: EmbedRequest, *, deadline: float | None = None) -> EmbedResult:
        """Tokenize off the loop, embed through the same scheduler as reranking (one submission: one
        admission unit, one deadline covering tokenization too, one cancellation), shorten if asked."""
        self.check_dimensions(req.dimensions)
        t0 = time.perf_counter()
        timeout = self.scheduler.config.request_timeout
        if deadline is None:
            deadline = time.monotonic() + timeout
        try:
            items = await asyncio.wait_for(
                asyncio.to_thread(self.loaded.embedding_items, req.texts, req.truncate, req.input_type),
                max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceededError(timeout) from None
        t1 = time.perf_counter()
        outcome = await self.scheduler.submit(items, timeout=timeout, deadline=deadline)
        vectors = outcome.scores
        if not np.isfinite(vectors).all():
            bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise ModelOutputError(f"the model produced a non-finite embedding for input {bad}")
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
        if self.score_cache is not None:
            meta["score_cache"] = {"max_bytes": self.score_cache.max_bytes, "entries": len(self.score_cache)}
        return meta


def _reportable(logits: np.ndarray) -> np.ndarray:
    """Scores every dialect can put in JSON: NaN is a model fault (never a silent `null`); +-inf, a
    legitimate extreme (e.g. fp16 overflow), is reported as the largest finite float32."""
    if np.isnan(logits).any():
        raise ModelOutputError(f"the model produced a NaN score for passage {int(np.flatnonzero(np.isnan(logits))[0])}")
    return np.clip(logits, -_FLOAT32_MAX, _FLOAT32_MAX)


class ServedModels:
    """All models of one server.

    Health, as the probes report it: `ready` once every model (or, with `--allow-partial`, every model
    that could load) is loaded and warmed up, and while every scheduler worker is alive; `live` unless
    a worker died (then the process must be restarted). Messages stay short; details go to the log."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self.expected: list[str] = []
        self.loaded = False  # the loader finished (some models may have failed: `failed`)
        self.load_error: str | None = None  # the loader gave up: nothing is served
        self.failed: dict[str, str] = {}  # served id -> short reason, models skipped by --allow-partial

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    @property
    def ready(self) -> bool:
        return self.loaded and bool(self._models) and self.live

    @property
    def live(self) -> bool:
        return not self.dead_workers()

    def dead_workers(self) -> list[str]:
        """Models whose scheduler worker is gone although it was never asked to stop."""
        return [m.name for m in self._models.values() if m.scheduler.failure is not None]

    def status(self) -> str:
        """One short line for health bodies (no exception text: that is in the log)."""
        if self.load_error:
            return "Model failed to load; see the server log."
        dead = self.dead_workers()
        if dead:
            return f"Model worker stopped ({', '.join(dead)}); restart the server."
        if not self.loaded:
            return "Model is loading."
        if self.failed:
            return f"Service is ready; {len(self.failed)} model(s) failed to load (see the server log)."
        return "Service is ready."

    @property
    def names(self) -> list[str]:
        return list(self._models) or [n for n in self.expected if n not in self.failed]

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
    def image_models(self) -> list[str]:
        """Ids of the served models whose passages may carry images."""
        return [m.name for m in self._models.values() if m.takes_images]

    def check_images(self, model: ServedModel) -> None:
        """Refuse an image for a text-only model, naming the served models that take one."""
        if not model.takes_images:
            raise ImagesNotSupportedError(model.name, model.loaded.family.id, self.image_models)

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
                      metrics: Metrics | None, *, limits: ChunkLimits | None = None,
                      score_cache: ScoreCache | None = None, images: ImageLimits | None = None) -> ServedModel:
    """Blocking: load weights, build the scheduler, run a warm-up pass."""
    loaded = load_model(source, options)
    scheduler = Scheduler(loaded.backend, sched, name=source.served_id, metrics=metrics)
    served = ServedModel(source.served_id, loaded, scheduler, metrics, limits=limits or ChunkLimits(),
                         score_cache=score_cache, image_limits=images or ImageLimits())
    served.warmup()
    log.info("model %s ready", source.served_id)
    return served
