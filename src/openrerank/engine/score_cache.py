"""An exact LRU cache of passage scores, consulted before tokenization (`serve --score-cache-mb`).

Why: RAG agents and chat front-ends re-ask the same question over the same retrieved top-k (retries,
multi-step plans, several users on one FAQ); every repeat costs a full cross-encoder pass. A hit here skips
tokenization and inference for that passage; only the misses of a request go to the scheduler.

Exact by construction: the key hashes everything that decides a passage's score — the served model, its
family and family options (instruction, pooling, labels), the window, the engine and precision, the
truncation mode and chunk bounds — with the query and the passage text (BLAKE2b, 128 bits). A hit returns
the float32 score the model produced, bit for bit, and the token count it was billed, so a response is the
same whether it was cached or not.

Memory is bounded: each entry costs at most `ENTRY_BYTES` of Python heap (measured in the tests), and the
least recently used entries are evicted beyond `max_bytes // ENTRY_BYTES` of them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from openrerank.schemas.work import BiItem, WorkItem
from openrerank.text.prepare import Prepared

#: Heap bytes one entry may take (16-byte key, (score, tokens, shared) tuple, the OrderedDict's share);
#: `tests/engine/test_score_cache.py` measures the real figure with tracemalloc and checks it stays below.
ENTRY_BYTES = 320
_DIGEST = 16


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # JSON allows lone surrogates; they still hash


def item_tokens(item: WorkItem) -> int:
    """The tokens an item adds to a request's usage (a bi-encoder's query is counted once, apart)."""
    return len(item.passage_ids) if isinstance(item, BiItem) else len(item.input_ids)


@dataclass
class CacheLookup:
    """One request's passages: the scores found, and which passages still need the model."""

    keys: list[bytes]
    scores: np.ndarray  # float32 per passage; only the hits are filled
    tokens: np.ndarray  # int64 usage tokens per passage; only the hits are filled
    shared_tokens: int | None  # the request's tokens that belong to no passage (a bi-encoder's query)
    missing: list[int]  # passage indices to score

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def prompt_tokens(self) -> int:
        return int(self.tokens.sum()) + (self.shared_tokens or 0)


class ScoreCache:
    """Thread-safe LRU of passage scores shared by every served model (the key names the model)."""

    def __init__(self, max_bytes: int, registry: CollectorRegistry | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.capacity = max(0, self.max_bytes // ENTRY_BYTES)
        self._entries: OrderedDict[bytes, tuple[float, int, int]] = OrderedDict()
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

    def lookup(self, model: str, namespace: bytes, query: str, passages: Sequence[str]) -> CacheLookup:
        keys = self.keys(namespace, query, passages)
        scores = np.zeros(len(keys), dtype=np.float32)
        tokens = np.zeros(len(keys), dtype=np.int64)
        shared: int | None = None
        missing = []
        with self._lock:
            for i, key in enumerate(keys):
                entry = self._entries.get(key)
                if entry is None:
                    missing.append(i)
                    continue
                self._entries.move_to_end(key)
                scores[i], tokens[i], shared = entry
        if self._metrics:
            self._metrics.hits.labels(model).inc(len(keys) - len(missing))
            self._metrics.misses.labels(model).inc(len(missing))
        return CacheLookup(keys, scores, tokens, shared, missing)

    def complete(self, lookup: CacheLookup, prep: Prepared, scores: np.ndarray) -> None:
        """Fill the missing passages from their prepared items and folded scores, and remember them."""
        per_passage = np.zeros(len(lookup.missing), dtype=np.int64)
        for item, owner in zip(prep.items, prep.owners, strict=True):
            per_passage[owner] += item_tokens(item)
        shared = int(prep.prompt_tokens - per_passage.sum())
        lookup.scores[lookup.missing] = scores
        lookup.tokens[lookup.missing] = per_passage
        if lookup.shared_tokens is None:
            lookup.shared_tokens = shared
        entries = [(lookup.keys[i], (float(s), int(t), shared))
                   for i, s, t in zip(lookup.missing, scores, per_passage, strict=True)]
        self._store(entries)

    def _store(self, entries: list[tuple[bytes, tuple[float, int, int]]]) -> None:
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
        self.evictions = Counter("openrerank_score_cache_evictions_total",
                                 "Entries evicted to stay within --score-cache-mb", registry=r)
        self.entries = Gauge("openrerank_score_cache_entries", "Passage scores held", registry=r)
        self.bytes = Gauge("openrerank_score_cache_bytes", "Memory the held entries are accounted for",
                           registry=r)
        capacity = Gauge("openrerank_score_cache_capacity_bytes", "--score-cache-mb in bytes", registry=r)
        capacity.set(max_bytes)
