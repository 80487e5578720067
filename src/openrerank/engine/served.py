"""A served model (loaded model + its scheduler) and the set of them dialects look models up in."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from openrerank.engine.loading import LoadedModel, LoadOptions, load_model
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
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

    @property
    def max_length(self) -> int:
        return self.loaded.max_length

    def warmup(self) -> None:
        prep = self.loaded.encoder.prepare(_WARMUP_QUERY, _WARMUP_PASSAGES, Truncate.END)
        self.scheduler.warmup(prep.items)

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
            self.metrics.tokens.labels(self.name).inc(prep.prompt_tokens)
        timings = Timings(
            tokenize_ms=(t1 - t0) * 1e3,
            queue_ms=outcome.queue_ms,
            inference_ms=outcome.inference_ms,
            total_ms=(time.perf_counter() - t0) * 1e3,
        )
        return RerankResult(self.name, logits, prep.prompt_tokens, self.loaded.score_kind, timings)

    def metadata(self) -> dict:
        return {"id": self.name, **self.loaded.describe()}


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
                      metrics: Metrics | None) -> ServedModel:
    """Blocking: load weights, build the scheduler, run a warm-up pass."""
    loaded = load_model(source, options)
    scheduler = Scheduler(loaded.backend, sched, name=source.served_id, metrics=metrics)
    served = ServedModel(source.served_id, loaded, scheduler, metrics)
    served.warmup()
    log.info("model %s ready", source.served_id)
    return served
