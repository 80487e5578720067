"""An exact, byte-bounded LRU of passages' token vectors for late-interaction models (`--token-cache-mb`).

Why: a ColBERT model encodes query and passage apart, so a passage seen again (the same retrieved top-k
re-ranked for a retry, another user, the next step of an agent, or indexed through the multi-vector
route first) needs no transformer pass at all: only the query is encoded and MaxSim runs on the stored
vectors. This is late interaction's advantage over a cross-encoder, whose every pair costs a pass.

Exact by construction, like the score cache (`engine/score_cache.py`): the key hashes the model's
content (a digest of its files), its family settings (markers, lengths, expansion, skiplist), its window
and its engine and precision (the namespace, made once per served model) with the passage's token ids
as the model reads them (marker and truncation included, so truncation and chunking settings are part
of the key without being named). A hit returns the very float32 vectors the model produced, so scores are
bit for bit those of the first request.

Memory is bounded in bytes: an entry costs its vectors' bytes plus `ENTRY_OVERHEAD` (measured in the
tests); least recently used entries are evicted past `max_bytes`, and an entry larger than the whole
budget is never stored. One cache serves every late-interaction model of a server (the key names the
model), as the score cache does.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

#: `--token-cache-mb` when not set: room for ~5,000 passages of 180 tokens x 128 dims (~92 KiB each).
DEFAULT_TOKEN_CACHE_MB = 512.0
#: Heap bytes an entry takes besides its vectors (16-byte key, ndarray header, OrderedDict node);
#: `tests/families/test_token_cache.py` measures the real figure with tracemalloc and checks it stays below.
ENTRY_OVERHEAD = 400
_DIGEST = 16


class TokenCache:
    """Thread-safe, shared by the late-interaction models of one server; each binds its namespace."""

    def __init__(self, max_bytes: int, registry: CollectorRegistry | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._metrics = _Metrics(registry, self.max_bytes) if registry is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes the held entries are accounted for (vectors + `ENTRY_OVERHEAD` each)."""
        return self._bytes

    @staticmethod
    def namespace(*parts: object) -> bytes:
        """A digest of whatever decides a passage's vectors besides its tokens (model content, settings)."""
        return hashlib.blake2b(repr(parts).encode(), digest_size=_DIGEST).digest()

    def bind(self, model: str, namespace: bytes) -> BoundTokenCache:
        return BoundTokenCache(self, model, namespace)

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        with self._lock:
            out = []
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                out.append(entry)
            return out

    def put(self, entries: Sequence[tuple[bytes, np.ndarray]]) -> None:
        with self._lock:
            for key, vectors in entries:
                cost = vectors.nbytes + ENTRY_OVERHEAD
                if cost > self.max_bytes or key in self._entries:
                    continue
                vectors.setflags(write=False)  # shared by every request that hits it
                self._entries[key] = vectors
                self._bytes += cost
            evicted = self._evict()
        self._count(evicted)

    def resize(self, max_bytes: int) -> None:
        """Hold at most `max_bytes` from now on, evicting the least recently used past it (the server lowers the
        budget to a memory limit once the models have loaded)."""
        with self._lock:
            self.max_bytes = int(max_bytes)
            evicted = self._evict()
        if self._metrics:
            self._metrics.capacity.set(self.max_bytes)
        self._count(evicted)

    def _evict(self) -> int:
        """Drop the least recently used entries past `max_bytes` (the lock held); how many."""
        evicted = 0
        while self._bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes + ENTRY_OVERHEAD
            evicted += 1
        return evicted

    def _count(self, evicted: int) -> None:
        if self._metrics:
            with self._lock:
                size, held = len(self._entries), self._bytes
            self._metrics.evictions.inc(evicted)
            self._metrics.entries.set(size)
            self._metrics.bytes.set(held)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        if self._metrics:
            self._metrics.entries.set(0)
            self._metrics.bytes.set(0)


class BoundTokenCache:
    """One model's view of the shared cache: its namespace in every key, its name on every count."""

    def __init__(self, cache: TokenCache, model: str, namespace: bytes) -> None:
        self.cache = cache
        self.model = model
        self.namespace = namespace

    def key(self, token_ids: Sequence[int]) -> bytes:
        h = hashlib.blake2b(self.namespace, digest_size=_DIGEST)
        h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
        return h.digest()

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        found = self.cache.get(keys)
        m = self.cache._metrics
        if m:
            hits = sum(v is not None for v in found)
            m.hits.labels(self.model).inc(hits)
            m.misses.labels(self.model).inc(len(found) - hits)
        return found

    def put(self, entries: Sequence[tuple[bytes, np.ndarray]]) -> None:
        self.cache.put(entries)

    def encoded(self, side: str, texts: int) -> None:
        """Count texts this model ran through its transformer (side: query | passage)."""
        m = self.cache._metrics
        if m and texts:
            m.encoded.labels(self.model, side).inc(texts)


class _Metrics:
    def __init__(self, registry: CollectorRegistry, max_bytes: int) -> None:
        r = registry
        self.hits = Counter("openrerank_token_cache_hits_total",
                            "Passages whose token vectors came from the token cache", ["model"], registry=r)
        self.misses = Counter("openrerank_token_cache_misses_total",
                              "Passages the token cache did not hold", ["model"], registry=r)
        self.encoded = Counter("openrerank_late_interaction_encoded_total",
                               "Texts a late-interaction model ran through its transformer (side: query | passage)",
                               ["model", "side"], registry=r)
        self.evictions = Counter("openrerank_token_cache_evictions_total",
                                 "Entries evicted to stay within --token-cache-mb", registry=r)
        self.entries = Gauge("openrerank_token_cache_entries", "Passages whose token vectors are held", registry=r)
        self.bytes = Gauge("openrerank_token_cache_bytes", "Memory the held entries are accounted for", registry=r)
        self.capacity = Gauge("openrerank_token_cache_capacity_bytes", "--token-cache-mb in bytes", registry=r)
        self.capacity.set(max_bytes)
