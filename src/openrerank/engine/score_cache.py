"""An exact LRU cache of passage scores, consulted before tokenization (`serve --score-cache-mb`).

Why: RAG agents and chat front-ends re-ask the same question over the same retrieved top-k (retries,
multi-step plans, several users on one FAQ); every repeat costs a full cross-encoder pass. A hit here skips
tokenization and inference for that passage; only the misses of a request go to the scheduler.

Exact by construction: the key hashes everything that decides a passage's score — the served model, its
family and family options (instruction, pooling, labels), the window, the engine and precision, the
truncation mode and chunk bounds — with the query and the passage text (BLAKE2b, 128 bits). A hit returns
the float32 score the model produced, bit for bit, and the token count and number of windows (chunks) it was
billed: the score an earlier request got, which a fresh batch matches within fp32 rounding on fp32 engines and
within ~1e-3 on bf16 ones (their kernels add up by the batch's shape; docs/api.md says what was measured).

Memory is bounded: each entry costs at most `ENTRY_BYTES` of Python heap, also once entries are evicted
(measured in the tests), and the least recently used entries are evicted beyond `max_bytes // ENTRY_BYTES`.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from openrerank.core.work import BiItem, WorkItem
from openrerank.text.prepare import Prepared

#: Heap bytes one entry may take (16-byte key, (score, tokens, shared, windows) tuple, the OrderedDict's share,
#: including the deleted slots its hash table holds until it resizes once the cache evicts): 283 on CPython 3.11
#: while it fills, up to 426 under eviction churn (320 was the filling figure alone: a 64 MiB cache grew to 87 MiB
#: RSS). `tests/engine/test_score_cache.py` measures both with tracemalloc and checks they stay below.
ENTRY_BYTES = 448
_DIGEST = 16


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # JSON allows lone surrogates; they still hash


def item_tokens(item: WorkItem) -> int:
    """The tokens an item adds to a request's usage (a bi-encoder's query is counted once, apart)."""
    return len(item.passage_ids) if isinstance(item, BiItem) else len(item.input_ids)


@dataclass
class Scored:
    """Scores the model produced for some passages of a request (what a cache miss costs)."""

    logits: np.ndarray  # float32, one per passage
    prep: Prepared | None  # the prepared items behind them (usage tokens); None when nothing was scored
    tokenize_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return self.prep.prompt_tokens if self.prep is not None else 0

    @property
    def windows(self) -> int:
        return self.prep.windows if self.prep is not None else 0


@dataclass
class CachedScores:
    """A request's scores assembled from cache hits, passages shared with concurrent requests, and its own."""

    logits: np.ndarray
    prompt_tokens: int  # usage as if every passage had been scored (identical with or without the cache)
    tokenize_ms: float
    queue_ms: float  # includes waiting for a concurrent request that was scoring the same passages
    inference_ms: float
    windows: int = 0  # passages and chunks, as if every passage had been scored (Cohere's search units)


ScoreFn = Callable[[list[str]], Awaitable[Scored]]
#: Scores several queries' passages at once (one scheduler submission): (query's index, its passages) each.
ScoreManyFn = Callable[[list[tuple[int, list[str]]]], Awaitable[list[Scored]]]
_Entry = tuple[float, int, int, int]  # score, usage tokens of the passage, usage tokens shared, windows of it
#: What the cache holds: an entry and the served model it was scored by (one shared reference: 8 bytes an entry),
#: so that entries are counted per model (`entries_of`) and an eviction takes its count off the right model.
_Held = tuple[float, int, int, int, str]


@dataclass
class _Lookup:
    """One query's passages as the cache found them."""

    keys: list[bytes]
    result: CachedScores
    tokens: np.ndarray
    windows: np.ndarray
    shared_tokens: int | None = None
    own: dict[int, Future] = field(default_factory=dict)  # passages it scores and delivers to concurrent ones
    also: list[int] = field(default_factory=list)  # passages a larger concurrent request is scoring: scored too
    waiting: dict[int, Future] = field(default_factory=dict)  # passages a concurrent request is scoring
    #: passage -> (query, passage) of the request itself that scores the same pair: filled from it, once scored
    copies: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def todo(self) -> list[int]:
        return [*self.own, *self.also]


class ScoreCache:
    """Thread-safe LRU of passage scores shared by every served model (the key names the model).

    Concurrent requests share work too: a passage another request is scoring right now is awaited, not
    scored twice (16 clients asking the same thing at once cost one pass), but only from a request that
    scores no more passages than the one asking would: a one-passage request does not wait for a 300-passage
    one to finish (head-of-line blocking); it scores its passage itself. A request's size is that of its whole
    submission (all its queries' passages the cache does not hold).
    """

    def __init__(self, max_bytes: int, registry: CollectorRegistry | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.capacity = max(0, self.max_bytes // ENTRY_BYTES)
        self._entries: OrderedDict[bytes, _Held] = OrderedDict()
        self._per_model: dict[str, int] = {}  # served id -> entries held for it
        #: key -> (the entry a running request will deliver (or None), how many passages that request scores)
        self._inflight: dict[bytes, tuple[Future, int]] = {}
        self._lock = threading.Lock()
        self._metrics = _CacheMetrics(registry, self.max_bytes) if registry is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    def entries_of(self, model: str) -> int:
        """Entries held for one served model (its aliases share them): the cache is one budget for all models, and
        /v1/metadata reports each model's share of it."""
        return self._per_model.get(model, 0)

    @staticmethod
    def namespace(*parts: object) -> bytes:
        """A digest of whatever decides a score besides the texts (model, options, truncation)."""
        return hashlib.blake2b(repr(parts).encode(), digest_size=_DIGEST).digest()

    @staticmethod
    def keys(namespace: bytes, query: str, passages: Sequence[str]) -> list[bytes]:
        q = _utf8(query)
        base = hashlib.blake2b(namespace, digest_size=_DIGEST)
        base.update(len(q).to_bytes(8, "little"))  # length-prefixed: (query, passage) splits are unambiguous
        base.update(q)
        out = []
        for passage in passages:
            h = base.copy()
            h.update(_utf8(passage))
            out.append(h.digest())
        return out

    async def score(self, model: str, namespace: bytes, query: str, passages: Sequence[str],
                    score: ScoreFn, deadline: float | None = None) -> CachedScores:
        """Scores of `passages`: from the cache, from concurrent requests, and from `score` for the rest."""

        async def one(parts: list[tuple[int, list[str]]]) -> list[Scored]:
            return [await score(parts[0][1])]

        return (await self.score_many(model, [(namespace, query, passages)], one, deadline))[0]

    async def score_many(self, model: str, queries: Sequence[tuple[bytes, str, Sequence[str]]],
                         score: ScoreManyFn, deadline: float | None = None) -> list[CachedScores]:
        """Each (namespace, query, passages)'s scores, the misses of all of them scored by one `score` call
        (one client request stays one admission unit). Waiting for a concurrent request's passages ends at
        `deadline` (a `time.monotonic()` instant): TimeoutError."""
        t0 = time.perf_counter()
        looks = self._lookup(queries)
        if self._metrics:  # what it waits for is counted once it is known whether it came (shared) or not (a miss)
            for look in looks:
                n, mine, shared = len(look.keys), len(look.todo), len(look.waiting) + len(look.copies)
                self._metrics.hits.labels(model).inc(n - mine - shared)
                self._metrics.misses.labels(model).inc(mine)
        for look in looks:
            look.result.tokenize_ms = (time.perf_counter() - t0) * 1e3
        try:
            await self._score_into(model, looks, [look.todo for look in looks], queries, score, deliver=True)
        finally:
            for look in looks:
                self._release(look.keys, look.own)
        futures = [f for look in looks for f in look.waiting.values()]
        pending = [f for f in futures if not f.done()]  # the deadline bounds waiting, not reading what is done
        if pending:
            t_wait = time.perf_counter()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # not wait_for(gather(shield...)): a waiter cancelled (its client gone) left the gather's
            # CancelledError unread, an asyncio ERROR in the log; asyncio.wait never cancels what it waits for
            # (cancelling a wrapped future would cancel the other request's concurrent one)
            _, late = await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=left)
            if late:
                raise TimeoutError
            for look in looks:
                look.result.queue_ms += (time.perf_counter() - t_wait) * 1e3
        retry: list[list[int]] = []
        for look in looks:
            retry.append([])
            for i, future in look.waiting.items():
                entry = future.result()
                if entry is None:  # the other request failed or was abandoned: score it here
                    retry[-1].append(i)
                else:
                    look.result.logits[i], look.tokens[i], look.shared_tokens, look.windows[i] = entry
        if self._metrics:
            for look, again in zip(looks, retry, strict=True):
                self._metrics.shared.labels(model).inc(len(look.waiting) + len(look.copies) - len(again))
                self._metrics.misses.labels(model).inc(len(again))
        await self._score_into(model, looks, retry, queries, score, deliver=False)
        for look in looks:
            for i, (q, j) in look.copies.items():
                src = looks[q]
                look.result.logits[i], look.tokens[i], look.windows[i] = (src.result.logits[j], src.tokens[j],
                                                                          src.windows[j])
            look.result.prompt_tokens = int(look.tokens.sum()) + (look.shared_tokens or 0)
            look.result.windows = int(look.windows.sum())
        return [look.result for look in looks]

    def _lookup(self, queries: Sequence[tuple[bytes, str, Sequence[str]]]) -> list[_Lookup]:
        """Each query's passages sorted into hits, passages this request scores (delivering them to concurrent
        requests), passages to wait for, and repeats of its own. A concurrent request's passage is waited for
        only if that request scores no more passages than this one would scoring all it does not hold."""
        looks = []
        fresh: dict[bytes, tuple[int, int]] = {}  # key -> (query, passage) that scores it, in this request
        inflight: list[tuple[int, int, Future, int]] = []  # (query, passage, future, its request's size)
        with self._lock:
            for q, (namespace, query, passages) in enumerate(queries):
                keys = self.keys(namespace, query, passages)
                n = len(keys)
                look = _Lookup(keys, CachedScores(np.zeros(n, dtype=np.float32), 0, 0.0, 0.0, 0.0),
                               np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64))
                looks.append(look)
                for i, key in enumerate(keys):
                    held = self._entries.get(key)
                    if held is not None:
                        self._entries.move_to_end(key)
                        look.result.logits[i], look.tokens[i], look.shared_tokens, look.windows[i], _ = held
                    elif key in fresh:
                        look.copies[i] = fresh[key]
                    elif key in self._inflight:
                        inflight.append((q, i, *self._inflight[key]))
                        fresh[key] = (q, i)  # a repeat follows this one, waited for or scored
                    else:
                        fresh[key] = (q, i)
                        look.own[i] = Future()
            would_score = sum(len(look.own) for look in looks) + len(inflight)
            for q, i, future, size in inflight:
                if size <= would_score:  # done no later than this request would be: wait for it
                    looks[q].waiting[i] = future
                else:
                    looks[q].also.append(i)
            size = sum(len(look.todo) for look in looks)
            for look in looks:
                for i, future in look.own.items():
                    self._inflight[look.keys[i]] = (future, size)
        return looks

    async def _score_into(self, model: str, looks: list[_Lookup], todo: list[list[int]],
                          queries: Sequence[tuple[bytes, str, Sequence[str]]], score: ScoreManyFn,
                          deliver: bool) -> None:
        """Score each query's passages `todo[q]` with the model in one call, fill them in, store them, and
        (`deliver`) hand them to the requests waiting for them."""
        parts = [(q, [queries[q][2][i] for i in idx]) for q, idx in enumerate(todo) if idx]
        if not parts:
            return
        for (q, _), scored in zip(parts, await score(parts), strict=True):
            look, idx = looks[q], todo[q]
            per_passage = np.zeros(len(idx), dtype=np.int64)
            per_windows = np.ones(len(idx), dtype=np.int64)
            if scored.prep is not None:
                for item, owner in zip(scored.prep.items, scored.prep.owners, strict=True):
                    per_passage[owner] += item_tokens(item)
                per_windows = scored.prep.windows_of(len(idx))
            look.shared_tokens = int(scored.prompt_tokens - per_passage.sum())
            result = look.result
            result.logits[idx] = scored.logits
            look.tokens[idx] = per_passage
            look.windows[idx] = per_windows
            result.tokenize_ms += scored.tokenize_ms
            result.queue_ms += scored.queue_ms
            result.inference_ms += scored.inference_ms
            entries = [(look.keys[i], (float(v), int(t), look.shared_tokens, int(w)))
                       for i, v, t, w in zip(idx, scored.logits, per_passage, per_windows, strict=True)]
            self._store(model, entries)
            for i, (_, entry) in zip(idx, entries, strict=True):
                future = look.own.get(i) if deliver else None
                if future is not None and not future.done():
                    future.set_result(entry)

    def _release(self, keys: list[bytes], own: dict[int, Future]) -> None:
        """Stop advertising this request's passages; waiters of any it did not score will score them."""
        with self._lock:
            for i, future in own.items():
                held = self._inflight.get(keys[i])
                if held is not None and held[0] is future:
                    del self._inflight[keys[i]]
        for future in own.values():
            if not future.done():
                future.set_result(None)

    def _store(self, model: str, entries: list[tuple[bytes, _Entry]]) -> None:
        """Hold `model`'s entries (a key names its model: one stored again is still that model's), evicting the
        least recently used of any model beyond the capacity."""
        if self.capacity == 0:
            return
        evicted = 0
        counts = self._per_model
        with self._lock:
            before = len(self._entries)
            for key, (score, tokens, shared, windows) in entries:
                self._entries[key] = (score, tokens, shared, windows, model)
                self._entries.move_to_end(key)
            counts[model] = counts.get(model, 0) + len(self._entries) - before
            while len(self._entries) > self.capacity:
                gone = self._entries.popitem(last=False)[1][4]
                counts[gone] -= 1
                evicted += 1
            size = len(self._entries)
        if self._metrics:
            self._metrics.evictions.inc(evicted)
            self._metrics.entries.set(size)
            self._metrics.bytes.set(size * ENTRY_BYTES)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._per_model.clear()
        if self._metrics:
            self._metrics.entries.set(0)
            self._metrics.bytes.set(0)


class _CacheMetrics:
    def __init__(self, registry: CollectorRegistry, max_bytes: int) -> None:
        r = registry
        self.hits = Counter("openrerank_score_cache_hits_total", "Passages answered from the score cache",
                            ["model"], registry=r)
        self.misses = Counter("openrerank_score_cache_misses_total", "Passages the score cache did not hold",
                              ["model"], registry=r)
        self.shared = Counter("openrerank_score_cache_shared_total",
                              "Passages not scored again: taken from a concurrent request that was scoring them, "
                              "or repeating one earlier in the same request", ["model"], registry=r)
        self.evictions = Counter("openrerank_score_cache_evictions_total",
                                 "Entries evicted to stay within --score-cache-mb", registry=r)
        self.entries = Gauge("openrerank_score_cache_entries", "Passage scores held", registry=r)
        self.bytes = Gauge("openrerank_score_cache_bytes", "Memory the held entries are accounted for",
                           registry=r)
        capacity = Gauge("openrerank_score_cache_capacity_bytes", "--score-cache-mb in bytes", registry=r)
        capacity.set(max_bytes)
