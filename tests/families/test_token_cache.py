"""The token-vector cache of late-interaction models: bounded in bytes (a flood of distinct passages never
grows it past its budget), LRU, exact (a key changes with the model's namespace or any token id), and what a
hit saves: the scorer encodes only the query."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from openrerank.core.requests import Truncate
from openrerank.engine.loading import LoadOptions, load_model
from openrerank.families.late_scorer import LateInteractionScorer
from openrerank.families.token_cache import ENTRY_OVERHEAD, TokenCache
from tests.families.colbert_builders import build_pylate_colbert


def _vectors(i: int, tokens: int = 40, dim: int = 16) -> np.ndarray:
    return np.full((tokens, dim), i, dtype=np.float32)


def test_bytes_stay_within_the_budget_least_recently_used_go_first():
    one = _vectors(0).nbytes + ENTRY_OVERHEAD
    cache = TokenCache(max_bytes=10 * one, registry=CollectorRegistry())
    view = cache.bind("m", TokenCache.namespace("m"))
    keys = [view.key([101, i, 102]) for i in range(50)]
    for i, k in enumerate(keys[:10]):
        view.put([(k, _vectors(i))])
    view.get(keys[:1])  # the oldest is used again: it survives the next insertion, the second oldest does not
    view.put([(keys[10], _vectors(10))])
    assert [v is not None for v in view.get(keys[:3])] == [True, False, True]
    for i, k in enumerate(keys[11:], start=11):
        view.put([(k, _vectors(i))])
    assert cache.bytes <= cache.max_bytes and len(cache) == 10
    assert all(v is not None and v[0, 0] == i for i, v in zip(range(40, 50), view.get(keys[40:]), strict=True))
    view.put([(view.key([1]), _vectors(0, tokens=10_000))])  # larger than the whole budget: never stored
    assert view.get([view.key([1])]) == [None] and cache.bytes <= cache.max_bytes


def test_keys_are_exact():
    a, b = (TokenCache(1 << 20).bind(m, TokenCache.namespace(m, "settings")) for m in ("model-a", "model-b"))
    assert a.key([101, 7, 8, 102]) == a.key([101, 7, 8, 102])
    assert a.key([101, 7, 8, 102]) != a.key([101, 8, 7, 102]) != a.key([101, 7, 8])
    assert a.key([101, 7, 8, 102]) != b.key([101, 7, 8, 102])


def test_stored_vectors_are_read_only():
    view = TokenCache(1 << 20).bind("m", b"ns")
    view.put([(b"k", _vectors(3))])
    (got,) = view.get([b"k"])
    with pytest.raises(ValueError):
        got[0, 0] = 1.0


def test_entry_overhead_is_measured():
    """ENTRY_OVERHEAD covers what an entry costs besides its vectors (key, array header, LRU node)."""
    n = 2000
    cache = TokenCache(1 << 30)
    view = cache.bind("m", TokenCache.namespace("m"))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    vectors = [_vectors(i % 7, tokens=20 + i % 50) for i in range(n)]
    view.put([(view.key([i]), v) for i, v in enumerate(vectors)])
    del vectors
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    overhead = (used - cache.bytes + n * ENTRY_OVERHEAD) / n
    assert len(cache) == n
    assert overhead <= ENTRY_OVERHEAD, f"{overhead:.0f} bytes per entry; ENTRY_OVERHEAD is {ENTRY_OVERHEAD}"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(build_pylate_colbert(tmp_path_factory.mktemp("colbert") / "m")),
                      LoadOptions(backend="torch", dtype="fp32"))


def test_a_flood_of_distinct_passages_stays_within_the_budget(loaded):
    """The held entries stay within the budget through a flood (what an entry really costs on the heap is
    `test_entry_overhead_is_measured`'s)."""
    scorer: LateInteractionScorer = loaded.scorer  # type: ignore[assignment]
    cache = TokenCache(max_bytes=64 * 1024, registry=CollectorRegistry())
    scorer.cache = cache.bind("m", b"ns")
    try:
        words = "paris france river sea banana yellow city capital model data".split()
        flood = [" ".join(words[(i + j) % 10] for j in range(5 + i % 20)) + f" {i}" for i in range(400)]
        sizes = []
        for start in range(0, len(flood), 50):
            loaded.score("paris", flood[start : start + 50], Truncate.END)
            assert cache.bytes <= cache.max_bytes
            sizes.append(len(cache))
        assert 10 < min(sizes[2:]) and max(sizes) < 60  # ~64 KiB of ~1.5-2 KiB entries, whatever the flood
        assert cache._metrics.evictions._value.get() >= len(flood) - max(sizes)
    finally:
        scorer.cache = None


def test_a_hit_encodes_only_the_query_and_scores_bit_for_bit(loaded):
    scorer: LateInteractionScorer = loaded.scorer  # type: ignore[assignment]
    registry = CollectorRegistry()
    scorer.cache = TokenCache(max_bytes=1 << 20, registry=registry).bind("m", b"ns")
    passages = ["paris, the capital of france!", "a river flows to the sea.", "berlin is in germany"]

    def encoded(side: str) -> float:
        return registry.get_sample_value("openrerank_late_interaction_encoded_total", {"model": "m", "side": side})

    try:
        first = loaded.score("what is the capital of france", passages, Truncate.END)
        assert (encoded("query"), encoded("passage")) == (1, 3)
        other = loaded.score("which fruit is yellow", passages[::-1], Truncate.END)
        assert (encoded("query"), encoded("passage")) == (2, 3)  # a new query, the same passages
        again = loaded.score("what is the capital of france", passages, Truncate.END)
        assert (encoded("query"), encoded("passage")) == (2, 3)  # the query is remembered as well
        assert again.tobytes() == first.tobytes()
        scorer.cache = None
        cold = loaded.score("which fruit is yellow", passages[::-1], Truncate.END)
        assert cold == pytest.approx(other, abs=1e-5)
    finally:
        scorer.cache = None


def test_a_lower_budget_evicts_the_least_recently_used_down_to_it_and_shows_the_new_capacity():
    """`resize` (a memory limit lowers the budget once the models have loaded): the entries past it go, oldest
    used first, and `/metrics` shows the new capacity."""
    registry = CollectorRegistry()
    one = _vectors(0).nbytes + ENTRY_OVERHEAD
    cache = TokenCache(max_bytes=10 * one, registry=registry)
    view = cache.bind("m", TokenCache.namespace("m"))
    keys = [view.key([101, i, 102]) for i in range(10)]
    for i, k in enumerate(keys):
        view.put([(k, _vectors(i))])
    view.get(keys[:1])  # used again: the most recent now
    cache.resize(3 * one)
    assert len(cache) == 3 and cache.bytes <= 3 * one
    assert [v is not None for v in view.get([keys[0], keys[1], keys[8], keys[9]])] == [True, False, True, True]
    assert registry.get_sample_value("openrerank_token_cache_capacity_bytes") == 3 * one
    assert registry.get_sample_value("openrerank_token_cache_entries") == 3
    assert registry.get_sample_value("openrerank_token_cache_evictions_total") == 7
    view.put([(view.key([7]), _vectors(7))])
    assert len(cache) == 3 and cache.bytes <= 3 * one
