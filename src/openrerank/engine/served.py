"""A served model (loaded model + its scheduler) and the set of them dialects look models up in."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from openrerank.engine.loading import LoadedModel, LoadOptions, load_model
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from openrerank.engine.score_cache import ScoreCache, Scored
from openrerank.metrics import Metrics
from openrerank.models.source import ModelSource
from openrerank.schemas.internal import RerankRequest, RerankResult, Timings, Truncate

log = logging.getLogger(__name__)

_WARMUP_QUERY = "what does a reranker do"
_WARMUP_PASSAGES = [
    "A reranker scores each query and passage pair and sorts the passages best-first.",
    "Bananas are yellow.",
]


class UnknownModelError(LookupError):
    def __init__(self, name: str, served: list[str]) -> None:
        self.name = name
        self.served = served
        super().__init__(f"Model '{name}' is not served here; served models: {', '.join(served)}")


@dataclass
class ServedModel:
    name: str
    loaded: LoadedModel
    scheduler: Scheduler
    metrics: Metrics | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    score_cache: ScoreCache | None = None

    @property
    def max_length(self) -> int:
        return self.loaded.max_length

    def warmup(self) -> None:
        prep = self.loaded.encoder.prepare(_WARMUP_QUERY, _WARMUP_PASSAGES, Truncate.END)
        self.scheduler.warmup(prep.items)

    async def rerank(self, req: RerankRequest) -> RerankResult:
        """Prepare text off the loop, score through the scheduler, fold chunk scores to passages.

        With a score cache, only the passages it does not hold (and no concurrent request is scoring) are
        tokenized and scored."""
        t0 = time.perf_counter()
        if self.score_cache is None:
            scored = await self._score(req, req.passages)
            logits, prompt_tokens, scored_tokens = scored.logits, scored.prompt_tokens, scored.prompt_tokens
            timings = Timings(scored.tokenize_ms, scored.queue_ms, scored.inference_ms)
        else:
            cached = await self.score_cache.score(self.name, self._cache_namespace(req), req.query, req.passages,
                                                  lambda passages: self._score(req, passages))
            logits, prompt_tokens, scored_tokens = cached.logits, cached.prompt_tokens, cached.scored_tokens
            timings = Timings(cached.tokenize_ms, cached.queue_ms, cached.inference_ms)
        if self.metrics:
            self.metrics.passages.labels(self.name).inc(len(req.passages))
            self.metrics.tokens.labels(self.name).inc(scored_tokens)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        return RerankResult(self.name, logits, prompt_tokens, self.loaded.score_kind, timings)

    async def _score(self, req: RerankRequest, passages: list[str]) -> Scored:
        """Tokenize `passages` with the request's query and options, score them, one float32 per passage."""
        t0 = time.perf_counter()
        prep = await asyncio.to_thread(
            self.loaded.encoder.prepare, req.query, passages, req.truncate,
            max_chunks_per_passage=req.max_chunks_per_passage,
            max_tokens_per_passage=req.max_tokens_per_passage,
        )
        t1 = time.perf_counter()
        outcome = await self.scheduler.submit(prep.items)
        return Scored(prep.fold(outcome.scores, len(passages)), prep, (t1 - t0) * 1e3, outcome.queue_ms,
                      outcome.inference_ms)

    def _cache_namespace(self, req: RerankRequest) -> bytes:
        """Everything besides the texts that decides a passage's score: model, family options, window,
        engine and precision, truncation and chunk bounds."""
        loaded = self.loaded
        return ScoreCache.namespace(
            self.name, loaded.source.spec, loaded.family.id, sorted(loaded.spec.options.items()),
            loaded.max_length, loaded.backend.description, req.truncate.value, req.max_chunks_per_passage,
            req.max_tokens_per_passage)

    def metadata(self) -> dict:
        meta = {"id": self.name, **self.loaded.describe()}
        if self.score_cache is not None:
            meta["score_cache"] = {"max_bytes": self.score_cache.max_bytes, "entries": len(self.score_cache)}
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

    async def stop(self) -> None:
        for m in self._models.values():
            await m.scheduler.stop()
            m.loaded.close()


def load_served_model(source: ModelSource, options: LoadOptions, sched: SchedulerConfig,
                      metrics: Metrics | None, score_cache: ScoreCache | None = None) -> ServedModel:
    """Blocking: load weights, build the scheduler, run a warm-up pass."""
    loaded = load_model(source, options)
    scheduler = Scheduler(loaded.backend, sched, name=source.served_id, metrics=metrics)
    served = ServedModel(source.served_id, loaded, scheduler, metrics, score_cache=score_cache)
    served.warmup()
    log.info("model %s ready", source.served_id)
    return served
