"""A served model: a loaded model and its scheduler, the path every request to it takes.

A served model reranks, and (a bi-encoder) embeds, (a ColBERT model) hands out token vectors: all go through
its one scheduler. The set of served models the dialects look models up in is `engine/served_models.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from openrerank.core.images import ImageLimits
from openrerank.core.requests import (
    EmbedRequest,
    EmbedResult,
    MultiVectorResult,
    RerankRequest,
    RerankResult,
    ScoreKind,
    Timings,
    Truncate,
)
from openrerank.core.work import Task
from openrerank.engine.admission import ChunkLimits
from openrerank.engine.errors import (
    DeadlineExceededError,
    ImagesNotSupportedError,
    ModelOutputError,
    RequestTooLargeError,
    UnsupportedRequestError,
)
from openrerank.engine.image_queue import ImageQueue
from openrerank.engine.loading import LoadedModel, LoadOptions, ResolvedModel, load_model
from openrerank.engine.preparing import Preparing, text_slices, tiny
from openrerank.engine.rates import measure_rate, work_rate
from openrerank.engine.scheduler import Scheduler, SchedulerConfig, ScoreOutcome
from openrerank.engine.score_cache import ScoreCache, Scored
from openrerank.engine.speed_record import SpeedRecord
from openrerank.families.bi_scorer import normalize
from openrerank.families.late_scorer import LateInteractionScorer, unpack
from openrerank.families.token_cache import TokenCache
from openrerank.observe.metrics import Metrics
from openrerank.runtimes.artifact_cache import model_fingerprint
from openrerank.sources.source import ModelSource
from openrerank.text.prepare import InputTooLongError, InstructionError

#: Largest finite float32: what +-inf scores are reported as (JSON has no infinity).
_FLOAT32_MAX = float(np.finfo(np.float32).max)

log = logging.getLogger(__name__)

_WARMUP_QUERY = "what does a reranker do"
_WARMUP_PASSAGES = [
    "A reranker scores each query and passage pair and sorts the passages best-first.",
    "Bananas are yellow.",
]


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
    image_queue: ImageQueue = field(default_factory=ImageQueue)  # its image requests decode in turn

    @property
    def takes_images(self) -> bool:
        return self.loaded.takes_images

    @property
    def max_length(self) -> int:
        return self.loaded.max_length

    @property
    def dtype(self) -> str | None:
        """The precision it runs in (what `--dtype auto` resolved to); None when built by hand."""
        return self.loaded.runtime_choice.dtype if self.loaded.runtime_choice is not None else None

    @property
    def embeds(self) -> bool:
        return self.loaded.embeds

    @property
    def tasks(self) -> list[Task]:
        return self.loaded.tasks

    @property
    def rerank_task(self) -> Task:
        """The task its rerank work runs as in the scheduler and is counted under in metrics: a listwise
        model scores blocks (`listwise`), any other pairs (`rerank`)."""
        return "listwise" if self.loaded.family.listwise else "rerank"

    def warmup(self) -> None:
        """First calls (lazy init) before serving, and the model's speed for admission, unless it is known."""
        prep = self.loaded.encoder.prepare(_WARMUP_QUERY, _WARMUP_PASSAGES, Truncate.END)
        self.scheduler.warmup(prep.items)
        knee = self.scheduler.knee
        if self.scheduler.work_per_second is None and self.loaded.throughput is not None:
            # the runtime choice timed the serving runtime on this model's shapes already (runtimes/measure.py)
            timed = self.loaded.throughput
            self.scheduler.work_per_second = work_rate(timed.tokens_per_s, timed.shapes, knee)
        elif self.scheduler.work_per_second is None:
            # a passage of a typical length (~250 tokens, or the window), timed in batches of growing size
            long = self.loaded.encoder.prepare(_WARMUP_QUERY, [" ".join(_WARMUP_PASSAGES * 14)], Truncate.END)
            self.scheduler.work_per_second = measure_rate(self.loaded.scorer.compute, long.items[0],
                                                          self.scheduler.config.policy.max_tokens, knee)
        if self.scheduler.work_per_second:
            log.info("model %s scores ~%.0f tokens/s here on short sequences%s: one request may hold %d such "
                     "tokens", self.name, self.scheduler.work_per_second,
                     f" (a token of an L-token sequence costs 1 + L/{knee:.0f})" if knee else "",
                     self.scheduler.request_budget)
        if self.embeds:
            items = self.loaded.embedding_items(_WARMUP_PASSAGES)
            self.scheduler.warmup(items)
            self.embedding_dim = int(self.loaded.scorer.embed(items[:1]).shape[1])

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
        no concurrent request is scoring) are tokenized and scored. A listwise model never uses it: its passages'
        scores depend on each other, so a passage's score alone is not a cacheable fact."""
        t0 = time.perf_counter()
        if deadline is None:
            deadline = time.monotonic() + self.scheduler.config.request_timeout
        for r in reqs:
            self.check_instruction(r.instruction)
        chunk_caps = [self._chunk_cap(r) for r in reqs]
        if any(r.has_images for r in reqs) and not self.takes_images:
            raise ImagesNotSupportedError(self.name, self.loaded.family.id, None)
        # listwise: a passage's score depends on its neighbours; images: the keys are texts only
        if self.score_cache is not None and not self.loaded.family.listwise and not any(r.has_images for r in reqs):
            return await self._rerank_cached(reqs, chunk_caps, deadline, t0)
        scored = await self._score(reqs, [r.passages for r in reqs], chunk_caps, deadline)
        return [self._result(req, s.logits, s.prompt_tokens,
                             Timings(s.tokenize_ms, s.queue_ms, s.inference_ms), t0, s.windows)
                for req, s in zip(reqs, scored, strict=True)]

    def check_instruction(self, instruction: str | None) -> None:
        """A request's `instruction` must mean something to this model: 400 before any work, never ignored."""
        if instruction is None:
            return
        problem = self.loaded.family.instruction_problem(instruction)
        if problem is None:
            try:
                self.loaded.encoder.with_instruction(instruction)
            except InstructionError as exc:
                problem = str(exc)
        if problem:
            raise UnsupportedRequestError(f"instruction: {problem} (model '{self.name}', family "
                                          f"{self.loaded.family.id})")

    async def _rerank_cached(self, reqs: Sequence[RerankRequest], chunk_caps: list[int | None], deadline: float,
                             t0: float) -> list[RerankResult]:
        """Through the score cache: the passages no query of the request finds there (or can wait for) are
        scored in one submission, as without the cache."""
        assert self.score_cache is not None

        async def score_misses(parts: list[tuple[int, list[str]]]) -> list[Scored]:
            return await self._score([reqs[q] for q, _ in parts], [passages for _, passages in parts],
                                     [chunk_caps[q] for q, _ in parts], deadline)

        queries = [(self._cache_namespace(r, cap), r.query, r.passages)
                   for r, cap in zip(reqs, chunk_caps, strict=True)]
        try:
            cached = await self.score_cache.score_many(self.name, queries, score_misses, deadline)
        except TimeoutError:  # waiting for a concurrent request's passages outlasted this one's deadline
            self.scheduler.count_rejected(self.rerank_task, "deadline")
            raise DeadlineExceededError(self.scheduler.config.request_timeout) from None
        return [self._result(r, c.logits, c.prompt_tokens,
                             Timings(c.tokenize_ms, c.queue_ms, c.inference_ms), t0, c.windows)
                for r, c in zip(reqs, cached, strict=True)]

    async def _score(self, reqs: Sequence[RerankRequest], passages: Sequence[list[str]],
                     chunk_caps: list[int | None], deadline: float) -> list[Scored]:
        """Tokenize each request's `passages` off the loop (within the deadline) and score them all as one
        scheduler submission; one float32 per passage."""
        t0 = time.perf_counter()
        timeout = self.scheduler.config.request_timeout
        with self.scheduler.arriving(self.rerank_task):
            try:
                preparing = Preparing(self.loaded, self.scheduler, self.limits, self.image_limits,
                                      self.image_queue, deadline)
                preps = await asyncio.wait_for(preparing.requests(reqs, passages, chunk_caps),
                                               max(0.0, deadline - time.monotonic()))
            except TimeoutError:  # counted as the scheduler counts a deadline passed in its queue
                self.scheduler.count_rejected(self.rerank_task, "deadline")
                raise DeadlineExceededError(timeout) from None
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

    def _result(self, req: RerankRequest, logits: np.ndarray, prompt_tokens: int, timings: Timings, t0: float,
                windows: int) -> RerankResult:
        logits = _reportable(logits)
        if self.metrics:  # what the answer reports, whichever cache served it (the caches count their own hits)
            self.metrics.passages.labels(self.name).inc(len(req.passages))
            self.metrics.tokens.labels(self.name, self.rerank_task).inc(prompt_tokens)
        timings.total_ms = (time.perf_counter() - t0) * 1e3
        query_vectors = None
        if self.loaded.score_kind is ScoreKind.MAXSIM:  # the bound the unit-interval form divides by
            query_vectors = self.loaded.encoder.query_vectors(req.query)  # type: ignore[attr-defined]
        return RerankResult(self.name, logits, prompt_tokens, self.loaded.score_kind, timings, windows,
                            query_vectors=query_vectors)

    def _cache_namespace(self, req: RerankRequest, chunk_cap: int | None) -> bytes:
        """Everything besides the texts that decides a passage's score: model, family options, window,
        engine and precision, truncation and chunk bounds, and the request's own instruction."""
        loaded = self.loaded
        return ScoreCache.namespace(
            self.name, loaded.source.spec, loaded.family.id, sorted(loaded.spec.options.items()),
            loaded.max_length, loaded.scorer.description, req.truncate.value, chunk_cap,
            req.max_tokens_per_passage, req.instruction)

    def _chunk_cap(self, req: RerankRequest) -> int | None:
        """Most windows scored per passage: None unless chunking. A count over the server's maximum is refused
        whatever the truncation, as the served OpenAPI document declares that maximum."""
        asked = req.max_chunks_per_passage
        limit = self.limits.max_chunks_per_passage
        if asked is not None and asked > limit:
            raise RequestTooLargeError("chunks", asked, limit, "max-chunks-per-passage", per="passage")
        if req.truncate is not Truncate.CHUNK:
            return None
        return asked or min(req.default_chunks_per_passage or limit, limit)

    async def embed(self, req: EmbedRequest, *, deadline: float | None = None) -> EmbedResult:
        """Tokenize off the loop, embed through the same scheduler as reranking (one submission: one
        admission unit, one deadline covering tokenization too, one cancellation), shorten if asked."""
        self.check_dimensions(req.dimensions)
        t0 = time.perf_counter()
        items, outcome, tokenize_ms = await self._submit_texts(lambda: self._embedding_items(req), deadline)
        vectors = outcome.scores
        if not np.isfinite(vectors).all():
            bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise ModelOutputError(f"the model produced a non-finite embedding for input {bad}")
        if req.dimensions is not None and req.dimensions < vectors.shape[1]:
            vectors = vectors[:, : req.dimensions]
            if self.loaded.spec.options.get("normalize"):  # a shortened unit vector is unit again
                vectors = normalize(vectors).astype(np.float32)
        tokens, timings = self._embedded(items, outcome, tokenize_ms, t0)
        return EmbedResult(self.name, vectors, tokens, timings)

    async def embed_multi_vector(self, req: EmbedRequest, *, deadline: float | None = None) -> MultiVectorResult:
        """Per-token vectors of each text (late-interaction models), through the same scheduler as
        reranking; passages share the token cache with reranking."""
        if not self.loaded.multi_vector:
            raise UnsupportedRequestError(f"Model '{self.name}' ({self.loaded.family.id}) has no multi-vector "
                                          "embeddings; only late-interaction (ColBERT) models do")
        t0 = time.perf_counter()
        items, outcome, tokenize_ms = await self._submit_texts(lambda: asyncio.to_thread(
            self.loaded.token_items, req.texts, req.truncate, req.input_type or "passage"), deadline)
        vectors = [unpack(row) for row in outcome.scores]
        bad = next((i for i, v in enumerate(vectors) if not np.isfinite(v).all()), None)
        if bad is not None:
            raise ModelOutputError(f"the model produced a non-finite token vector for input {bad}")
        tokens, timings = self._embedded(items, outcome, tokenize_ms, t0)
        return MultiVectorResult(self.name, vectors, tokens, timings)

    async def _submit_texts(self, make_items: Callable[[], Awaitable[list]], deadline: float | None,
                            task: Task = "embed") -> tuple[list, ScoreOutcome, float]:
        """Tokenize (`make_items`, which works off the loop) within the deadline, then submit the items as one
        unit; the items, the outcome and the milliseconds tokenization took."""
        t0 = time.perf_counter()
        timeout = self.scheduler.config.request_timeout
        if deadline is None:
            deadline = time.monotonic() + timeout
        with self.scheduler.arriving(task):
            try:
                items = await asyncio.wait_for(make_items(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.scheduler.count_rejected(task, "deadline")
                raise DeadlineExceededError(timeout) from None
        tokenize_ms = (time.perf_counter() - t0) * 1e3
        return items, await self.scheduler.submit(items, timeout=timeout, deadline=deadline), tokenize_ms

    def _embedded(self, items: list, outcome: ScoreOutcome, tokenize_ms: float, t0: float) -> tuple[int, Timings]:
        """Count embedded texts and tokens; the usage tokens and the request's timings."""
        tokens = sum(it.length for it in items)
        if self.metrics:
            self.metrics.texts_embedded.labels(self.name).inc(len(items))
            self.metrics.tokens.labels(self.name, "embed").inc(tokens)
        return tokens, Timings(tokenize_ms=tokenize_ms, queue_ms=outcome.queue_ms, inference_ms=outcome.inference_ms,
                               total_ms=(time.perf_counter() - t0) * 1e3)

    async def _embedding_items(self, req: EmbedRequest) -> list:
        """The texts' work items, tokenized off the loop (a `tiny` slice on it) a slice at a time
        (engine/preparing.py)."""
        items: list = []
        for a, b in text_slices(req.texts):
            embedding_items = partial(self.loaded.embedding_items, req.texts[a:b], req.truncate, req.input_type)
            try:
                tokenize_here = tiny(req.texts[a:b], truncate=req.truncate)
                items += embedding_items() if tokenize_here else await asyncio.to_thread(embedding_items)
            except InputTooLongError as exc:
                exc.passage_index += a
                raise
        return items

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
        meta = {"id": self.name, **self.loaded.describe(), "max_request_tokens": self.scheduler.request_budget}
        if self.scheduler.work_per_second:  # on short sequences; a token of an L-token one costs 1 + L/knee
            meta["tokens_per_second"] = round(self.scheduler.work_per_second, 1)
            if self.scheduler.knee:  # as the served batches show it (engine/knee_fit.py), and from the FLOPs
                meta["attention_knee"] = round(self.scheduler.knee)
                meta["attention_knee_flops"] = round(self.loaded.knee or self.scheduler.knee)
        if self.embedding_dim is not None:
            meta["embedding_dim"] = self.embedding_dim
        if self.score_cache is not None and not self.loaded.family.listwise:  # a listwise model never uses it
            # one cache, one budget for every model: its size is the whole budget, its entries this model's own
            meta["score_cache"] = {"max_bytes": self.score_cache.max_bytes, "shared": True,
                                   "entries": self.score_cache.entries_of(self.name)}
        if self.loaded.multi_vector:
            meta["multi_vector"] = True
        if self.loaded.family.listwise:  # a passage's score depends on its list: clients must not split lists
            meta["listwise"] = True
        return meta


def token_namespace(loaded: LoadedModel) -> bytes:
    """What decides a passage's token vectors besides its token ids: the model's content (a digest of its
    files), family settings, window, engine and precision."""
    return TokenCache.namespace(model_fingerprint(loaded.spec.path), loaded.family.id,
                                sorted(loaded.spec.options.items()), loaded.max_length, loaded.scorer.description)


def _reportable(logits: np.ndarray) -> np.ndarray:
    """Scores every dialect can put in JSON: NaN is a model fault (never a silent `null`); +-inf, a
    legitimate extreme (e.g. fp16 overflow), is reported as the largest finite float32."""
    if np.isnan(logits).any():
        raise ModelOutputError(f"the model produced a NaN score for passage {int(np.flatnonzero(np.isnan(logits))[0])}")
    return np.clip(logits, -_FLOAT32_MAX, _FLOAT32_MAX)


def load_served_model(source: ResolvedModel | ModelSource, options: LoadOptions, sched: SchedulerConfig,
                      metrics: Metrics | None, *, limits: ChunkLimits | None = None,
                      score_cache: ScoreCache | None = None, token_cache: TokenCache | None = None,
                      images: ImageLimits | None = None) -> ServedModel:
    """Blocking: load weights (resolving the source first unless it is resolved), build the scheduler, run a
    warm-up pass; a late-interaction model gets its view of the token cache after the warm-up (which then
    holds only what clients sent)."""
    loaded = load_model(source, options)
    name = loaded.source.served_id
    scheduler = Scheduler(loaded.scorer, sched, name=name, metrics=metrics)
    scheduler.knee = loaded.knee  # admission weighs long sequences by it (engine/admission.py)
    record = SpeedRecord.of(loaded)
    if record is not None and (kept := scheduler.keep_speed(record)):
        log.info("model %s starts with the speed its served batches showed on an earlier start here: an attention "
                 "knee of ~%.0f tokens (its FLOPs: %.0f)%s", name, kept.knee, loaded.knee,
                 f", ~{kept.work_per_second:.0f} tokens/s on short sequences" if kept.work_per_second else "")
    served = ServedModel(name, loaded, scheduler, metrics, limits=limits or ChunkLimits(), score_cache=score_cache,
                         image_limits=images or ImageLimits())
    served.warmup()
    if token_cache is not None and isinstance(loaded.scorer, LateInteractionScorer):
        loaded.scorer.cache = token_cache.bind(name, token_namespace(loaded))
    log.info("model %s ready", name)
    return served
