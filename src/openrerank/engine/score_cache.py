"""An exact LRU cache of passage scores, consulted before tokenization (`serve --score-cache-mb`).

Why: RAG agents and chat front-ends re-ask the same question over the same retrieved top-k (retries,
multi-step plans, several users on one FAQ); every repeat costs a full cross-encoder pass. A hit here skips
tokenization and inference for that passage; only the misses of a request go to the scheduler.

Exact by construction: the key hashes everything that decides a passage's score — the served model, its
family and family options (instruction, pooling, labels), the window, the engine and precision, the
truncation mode and chunk bounds — with the query and the passage text (BLAKE2b, 128 bits). A hit returns
the float32 score the model produced, bit for bit, and the token count and number of windows (chunks) it was
billed, so a response is the same whether it was cached or not.

Memory is bounded: each entry costs at most `ENTRY_BYTES` of Python heap (measured in the tests), and the
least recently used entries are evicted beyond `max_bytes // ENTRY_BYTES` of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from openrerank.core.work import BiItem, WorkItem
from openrerank.text.prepare import Prepared

#: Heap bytes one entry may take (16-byte key, (score, tokens, shared, windows) tuple, the OrderedDict's share);
#: `tests/engine/test_score_cache.py` measures the real figure with tracemalloc and checks it stays below.
ENTRY_BYTES = 320
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
    scored_tokens: int  # tokens this request actually ran through the model
    tokenize_ms: float
    queue_ms: float  # includes waiting for a concurrent request that was scoring the same passages
    inference_ms: float
    windows: int = 0  # passages and chunks, as if every passage had been scored (Cohere's search units)


ScoreFn = Callable[[list[str]], Awaitable[Scored]]
_Entry = tuple[float, int, int, int]  # score, usage tokens of the passage, usage tokens shared, windows of it


class ScoreCache:
    """Thread-safe LRU of passage scores shared by every served model (the key names the model).

    Concurrent requests share work too: a passage another request is scoring right now is awaited, not
    scored twice (16 clients asking the same thing at once cost one pass).
    """

    def __init__(self, max_bytes: int, registry: CollectorRegistry | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.capacity = max(0, self.max_bytes // ENTRY_BYTES)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, Future] = {}  # key -> the entry a running request will deliver (or None)
        self._lock = threading.Lock()
        self._metrics = _CacheMetrics(registry, self.max_bytes) if registry is not None else None

    def __len__(self) -> int:
        return len(self._entries)

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
                    score: ScoreFn) -> CachedScores:
        """Scores of `passages`: from the cache, from concurrent requests, and from `score` for the rest."""
        t0 = time.perf_counter()
        keys = self.keys(namespace, query, passages)
        n = len(keys)
        logits = np.zeros(n, dtype=np.float32)
        tokens = np.zeros(n, dtype=np.int64)
        windows = np.ones(n, dtype=np.int64)
        shared_tokens: int | None = None
        own: dict[int, Future] = {}  # passages this request scores (and delivers to concurrent ones)
        waiting: dict[int, Future] = {}  # passages a concurrent request is scoring
        with self._lock:
            for i, key in enumerate(keys):
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    logits[i], tokens[i], shared_tokens, windows[i] = entry
                elif key in self._inflight:
                    waiting[i] = self._inflight[key]
                else:
                    own[i] = self._inflight[key] = Future()
        if self._metrics:
            self._metrics.hits.labels(model).inc(n - len(own) - len(waiting))
            self._metrics.shared.labels(model).inc(len(waiting))
            self._metrics.misses.labels(model).inc(len(own))
        result = CachedScores(logits, 0, 0, (time.perf_counter() - t0) * 1e3, 0.0, 0.0)
        try:
            if own:
                shared_tokens = await self._score_into(result, tokens, windows, list(own), keys, passages, score, own)
        finally:
            self._release(keys, own)
        if waiting:
            t_wait = time.perf_counter()
            done = await asyncio.gather(*(asyncio.shield(asyncio.wrap_future(f)) for f in waiting.values()))
            result.queue_ms += (time.perf_counter() - t_wait) * 1e3
            retry = []
            for i, entry in zip(waiting, done, strict=True):
                if entry is None:  # the other request failed or was abandoned: score it here
                    retry.append(i)
                else:
                    logits[i], tokens[i], shared_tokens, windows[i] = entry
            if retry:
                shared_tokens = await self._score_into(result, tokens, windows, retry, keys, passages, score, {})
        result.prompt_tokens = int(tokens.sum()) + (shared_tokens or 0)
        result.windows = int(windows.sum())
        return result

    async def _score_into(self, result: CachedScores, tokens: np.ndarray, windows: np.ndarray, todo: list[int],
                          keys: list[bytes], passages: Sequence[str], score: ScoreFn, deliver: dict[int, Future]
                          ) -> int:
        """Score passages `todo` with the model, fill them in, store them, hand them to waiting requests."""
        scored = await score([passages[i] for i in todo])
        per_passage = np.zeros(len(todo), dtype=np.int64)
        per_windows = np.ones(len(todo), dtype=np.int64)
        if scored.prep is not None:
            for item, owner in zip(scored.prep.items, scored.prep.owners, strict=True):
                per_passage[owner] += item_tokens(item)
            per_windows = np.bincount(np.asarray(scored.prep.owners, dtype=np.int64), minlength=len(todo))
        shared = int(scored.prompt_tokens - per_passage.sum())
        result.logits[todo] = scored.logits
        tokens[todo] = per_passage
        windows[todo] = per_windows
        result.scored_tokens += scored.prompt_tokens
        result.tokenize_ms += scored.tokenize_ms
        result.queue_ms += scored.queue_ms
        result.inference_ms += scored.inference_ms
        entries = [(keys[i], (float(v), int(t), shared, int(w)))
                   for i, v, t, w in zip(todo, scored.logits, per_passage, per_windows, strict=True)]
        self._store(entries)
        for i, (_, entry) in zip(todo, entries, strict=True):
            future = deliver.get(i)
            if future is not None and not future.done():
                future.set_result(entry)
        return shared

    def _release(self, keys: list[bytes], own: dict[int, Future]) -> None:
        """Stop advertising this request's passages; waiters of any it did not score will score them."""
        with self._lock:
            for i, future in own.items():
                if self._inflight.get(keys[i]) is future:
                    del self._inflight[keys[i]]
        for future in own.values():
            if not future.done():
                future.set_result(None)

    def _store(self, entries: list[tuple[bytes, _Entry]]) -> None:
        if self.capacity == 0:
            return
        evicted = 0
        with self._lock:
            for key, value in entries:
                self._entries[key] = value
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                evicted += 1
            size = len(self._entries)
        if self._metrics:
            self._metrics.evictions.inc(evicted)
            self._metrics.entries.set(size)
            self._metrics.bytes.set(size * ENTRY_BYTES)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
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
                              "Passages taken from a concurrent request that was scoring them", ["model"], registry=r)
        self.evictions = Counter("openrerank_score_cache_evictions_total",
                                 "Entries evicted to stay within --score-cache-mb", registry=r)
        self.entries = Gauge("openrerank_score_cache_entries", "Passage scores held", registry=r)
        self.bytes = Gauge("openrerank_score_cache_bytes", "Memory the held entries are accounted for",
                           registry=r)
        capacity = Gauge("openrerank_score_cache_capacity_bytes", "--score-cache-mb in bytes", registry=r)
        capacity.set(max_bytes)
