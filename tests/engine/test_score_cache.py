"""The pair-score cache: exact hits that skip tokenization and inference, misses for anything that changes a
score, LRU eviction within the memory cap, and concurrent requests sharing entries."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import tracemalloc

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from openrerank.core.requests import RerankRequest, Truncate
from openrerank.engine.loading import LoadOptions
from openrerank.engine.scheduler import SchedulerConfig
from openrerank.engine.score_cache import ENTRY_BYTES, ScoreCache, Scored
from openrerank.engine.served import load_served_model
from openrerank.sources.source import ModelSource

QUERY = "what is the capital of france"
PASSAGES = ["paris is the capital of france", "bananas are yellow", "berlin is in germany",
            "the river flows to the sea " * 12, "who"]


class Spy:
    """Counts the calls and items that reach a real function."""

    def __init__(self, fn, count=len) -> None:
        self.fn, self.count, self.calls, self.items = fn, count, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.items += self.count(args[1] if len(args) > 1 else args[0])
        return self.fn(*args, **kwargs)


_served: list = []  # every model a test served here, stopped after it (`stop_served`)


@pytest.fixture(autouse=True)
def stop_served():
    """Ends each served model's scheduler worker and closes its runtime after the test: left running, they
    outlived the test session as daemon threads holding native runtimes into the interpreter's teardown."""
    yield
    while _served:
        served = _served.pop()
        asyncio.run(served.scheduler.stop())
        served.loaded.close()
        assert not served.scheduler.alive


def serve(model: str, cache: ScoreCache | None, name: str = "m"):
    served = load_served_model(ModelSource(name, model), LoadOptions(threads=1), SchedulerConfig(), None,
                               score_cache=cache)
    _served.append(served)
    prepare = Spy(served.loaded.encoder.prepare)  # counts passages tokenized
    score = Spy(served.scheduler.scorer.score, count=lambda items: len(items))  # counts items scored
    served.loaded.encoder.prepare = prepare
    served.scheduler.scorer.score = score
    return served, prepare, score


def rerank(served, passages=PASSAGES, query=QUERY, **kw):
    kw.setdefault("truncate", Truncate.END)
    return asyncio.run(served.rerank(RerankRequest(query=query, passages=list(passages), **kw)))


@pytest.fixture(scope="module")
def registry():
    return CollectorRegistry()


def metric(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("model", ["tiny_model_dir", "default"])
def test_hits_are_exact_and_skip_tokenization_and_inference(request, model):
    source = "default" if model == "default" else str(request.getfixturevalue(model))
    registry = CollectorRegistry()
    served, prepare, score = serve(source, ScoreCache(2**20, registry))
    plain, _, _ = serve(source, None)
    reference = rerank(plain, truncate=Truncate.END)
    first = rerank(served, truncate=Truncate.END)
    assert prepare.items == len(PASSAGES) and score.calls >= 1
    calls = score.calls
    second = rerank(served, truncate=Truncate.END)
    assert prepare.items == len(PASSAGES) and score.calls == calls  # nothing tokenized, nothing scored
    assert second.logits.dtype == np.float32
    assert second.logits.tobytes() == first.logits.tobytes() == reference.logits.tobytes()  # bit for bit
    assert second.prompt_tokens == first.prompt_tokens == reference.prompt_tokens  # same usage either way
    assert second.timings.inference_ms == 0.0
    assert metric(registry, "openrerank_score_cache_hits_total", model="m") == len(PASSAGES)
    assert metric(registry, "openrerank_score_cache_misses_total", model="m") == len(PASSAGES)
    assert metric(registry, "openrerank_score_cache_entries") == len(PASSAGES)


def test_partial_hits_score_only_the_new_passages(tiny_model_dir):
    served, prepare, score = serve(str(tiny_model_dir), ScoreCache(2**20))
    plain, _, _ = serve(str(tiny_model_dir), None)
    rerank(served, PASSAGES[:2])
    prepare.items = score.items = 0
    mixed = [PASSAGES[1], PASSAGES[2], PASSAGES[0], PASSAGES[3]]
    got = rerank(served, mixed)
    assert prepare.items == 2 and score.items == 2  # PASSAGES[2] and [3] only
    want = rerank(plain, mixed)
    assert got.logits.tobytes() == want.logits.tobytes() and got.prompt_tokens == want.prompt_tokens


def test_anything_that_changes_a_score_is_a_miss(tiny_model_dir, tiny_model_2label_dir):
    cache = ScoreCache(2**20)
    served, prepare, _ = serve(str(tiny_model_dir), cache, "a")
    other, other_prepare, _ = serve(str(tiny_model_2label_dir), cache, "b")
    long_passage = ["paris " * 300]
    rerank(served, long_passage, truncate=Truncate.END)
    for kw in ({"truncate": Truncate.START}, {"truncate": Truncate.CHUNK},
               {"truncate": Truncate.CHUNK, "max_chunks_per_passage": 1},
               {"truncate": Truncate.END, "max_tokens_per_passage": 10}):
        before = prepare.items
        rerank(served, long_passage, **kw)
        assert prepare.items == before + 1, kw
    before = prepare.items
    rerank(served, long_passage, query=QUERY + " ", truncate=Truncate.END)  # another query text
    assert prepare.items == before + 1
    rerank(other, long_passage, truncate=Truncate.END)  # another model, same cache
    assert other_prepare.items == 1
    assert len(cache) == 7


def test_keys_are_unambiguous():
    ns = ScoreCache.namespace("m", "fp32")
    assert ScoreCache.keys(ns, "ab", ["c"]) != ScoreCache.keys(ns, "a", ["bc"])
    assert ScoreCache.keys(ns, "q", ["p"]) != ScoreCache.keys(ScoreCache.namespace("m", "bf16"), "q", ["p"])
    assert ScoreCache.keys(ns, "q", ["p", "p"])[0] == ScoreCache.keys(ns, "q", ["p"])[0]
    assert len(ScoreCache.keys(ns, "\ud800 lone surrogate", ["x"])[0]) == 16


class CountingScorer:
    """A stand-in model for cache-only tests: a passage's score is its length; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, passages: list[str]) -> Scored:
        self.asked += passages
        await asyncio.sleep(0.01)  # long enough for concurrent requests to overlap
        return Scored(np.array([len(p) for p in passages], dtype=np.float32), None)


def test_eviction_keeps_the_most_recent_within_the_cap():
    registry = CollectorRegistry()
    cache = ScoreCache(10 * ENTRY_BYTES, registry)
    model = CountingScorer()
    assert cache.capacity == 10

    def ask(passages: list[str]) -> list[str]:
        before = len(model.asked)
        asyncio.run(cache.score("m", b"ns", "q", passages, model))
        return model.asked[before:]

    ask([f"p{i}" for i in range(8)])
    assert ask(["p0"]) == []  # a hit, and now the most recent entry
    ask([f"n{i}" for i in range(5)])  # 13 entries for 10 places: the 3 least recently used go
    assert len(cache) == 10
    assert ask(["p0"]) == []
    assert ask(["p1"]) == ["p1"]  # evicted
    assert metric(registry, "openrerank_score_cache_evictions_total") >= 3
    assert metric(registry, "openrerank_score_cache_bytes") <= 10 * ENTRY_BYTES
    assert ScoreCache(ENTRY_BYTES - 1).capacity == 0


def test_entries_are_counted_per_model_through_eviction_and_clear():
    """The cache is one budget for every model; /v1/metadata gave each model the whole cache's entry count as its
    own. Each model's count follows its stores, repeats and the evictions of its entries."""
    cache = ScoreCache(5 * ENTRY_BYTES)
    model = CountingScorer()
    asyncio.run(cache.score("a", b"ns-a", "q", ["p0", "p1", "p2"], model))
    asyncio.run(cache.score("b", b"ns-b", "q", ["p0"], model))
    asyncio.run(cache.score("a", b"ns-a", "q", ["p2", "p3"], model))  # a hit and one new entry
    assert (cache.entries_of("a"), cache.entries_of("b"), cache.entries_of("c"), len(cache)) == (4, 1, 0, 5)
    asyncio.run(cache.score("b", b"ns-b", "q", ["p1", "p2"], model))  # evicts a's two least recently used
    assert (cache.entries_of("a"), cache.entries_of("b"), len(cache)) == (2, 3, 5)
    cache.clear()
    assert (cache.entries_of("a"), cache.entries_of("b")) == (0, 0)


def test_concurrent_requests_for_the_same_passages_score_them_once():
    registry = CollectorRegistry()
    cache = ScoreCache(2**20, registry)
    model = CountingScorer()

    async def go():
        return await asyncio.gather(*(cache.score("m", b"ns", "q", ["a", "bb", f"own-{i}"], model) for i in range(16)))

    results = asyncio.run(go())
    assert sorted(model.asked) == sorted(["a", "bb", *[f"own-{i}" for i in range(16)]])  # each passage once
    assert all(list(r.logits) == [1.0, 2.0, float(len(f"own-{i}"))] for i, r in enumerate(results))
    assert metric(registry, "openrerank_score_cache_shared_total", model="m") == 30


def test_a_failed_request_does_not_fail_the_ones_waiting_for_its_passages():
    """The waiter scores what it waited for in vain itself, and counts it a miss: the shared counter was bumped
    when it began waiting, so such a passage was counted shared (work saved) and never a miss."""
    registry = CollectorRegistry()
    cache = ScoreCache(2**20, registry)
    good = CountingScorer()

    async def failing(passages):
        await asyncio.sleep(0.01)
        raise RuntimeError("the model broke on this batch")

    async def go():
        first = asyncio.create_task(cache.score("m", b"ns", "q", ["a", "b"], failing))
        await asyncio.sleep(0)  # the first request now owns "a" and "b"
        second = asyncio.create_task(cache.score("m", b"ns", "q", ["b", "c", "c"], good))
        # bounded: a waiter nobody wakes would otherwise hang the test until the suite's timeout
        return await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)

    first, second = asyncio.run(go())
    assert isinstance(first, RuntimeError)
    assert list(second.logits) == [1.0, 1.0, 1.0] and sorted(good.asked) == ["b", "c"]  # it scored "b" itself
    # first: a, b missed; second: c missed, its repeat shared, b waited for in vain and scored: a miss
    assert metric(registry, "openrerank_score_cache_misses_total", model="m") == 4
    assert metric(registry, "openrerank_score_cache_shared_total", model="m") == 1


def test_a_waiter_whose_client_leaves_logs_no_asyncio_error(caplog):
    """A request cancelled (its client gone) while it waited for another request's passages left asyncio's
    "_GatheringFuture exception was never retrieved" ERROR in the log."""
    cache = ScoreCache(2**20)
    owner = HeldScorer()

    async def go():
        first = asyncio.create_task(cache.score("m", b"ns", "q", ["x"], owner))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(cache.score("m", b"ns", "q", ["x"], CountingScorer(),
                                                 deadline=time.monotonic() + 30))  # a request's: always set
        await asyncio.sleep(0.05)  # waiting for "x"
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gc.collect()
        owner.release.set()
        assert list((await first).logits) == [1.0]

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(go())
        gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


class HeldScorer(CountingScorer):
    """Scores only once `release` is set: a request that is still being scored."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, passages: list[str]) -> Scored:
        self.asked += passages
        await self.release.wait()
        return Scored(np.array([len(p) for p in passages], dtype=np.float32), None)


def test_a_small_request_does_not_wait_for_a_larger_one_scoring_its_passage():
    """Head-of-line blocking through the cache: a one-passage request whose passage a 300-passage request was
    scoring waited for all 300 (4.5 s against 1.0 s for a passage of its own). It scores the passage itself."""
    cache = ScoreCache(2**20)
    big, small = HeldScorer(), CountingScorer()

    async def go():
        first = asyncio.create_task(cache.score("m", b"ns", "q", ["x", *[f"p{i}" for i in range(9)]], big))
        await asyncio.sleep(0)  # the big request now owns "x"
        alone = await asyncio.wait_for(cache.score("m", b"ns", "q", ["x"], small), 5)
        assert not first.done()
        big.release.set()
        return alone, await first

    alone, first = asyncio.run(go())
    assert small.asked == ["x"] and list(alone.logits) == [1.0] and first.logits[0] == 1.0


def test_a_request_is_sized_by_its_whole_submission_and_by_what_it_would_score():
    """Two ways the rule let a small asker wait behind a large request: a 300-query vLLM score request (one
    passage a query) registered each passage as a 1-passage request; and an asker's cache hits counted as
    work it would do."""
    cache = ScoreCache(2**20)
    big = HeldScorer()

    async def score_big(parts):
        return [await big(passages) for _, passages in parts]

    async def go():
        queries = [(b"ns", f"q{i}", [f"p{i}"]) for i in range(300)]
        first = asyncio.create_task(cache.score_many("m", queries, score_big))
        await asyncio.sleep(0)
        small = CountingScorer()
        alone = await asyncio.wait_for(cache.score("m", b"ns", "q0", ["p0"], small), 5)
        assert small.asked == ["p0"] and not first.done()
        # 299 passages held by the cache and 1 that a 200-passage request is scoring: it scores that one
        await cache.score("m", b"ns", "held", [f"h{i}" for i in range(299)], CountingScorer())
        second = asyncio.create_task(cache.score("m", b"ns", "held", ["x", *[f"y{i}" for i in range(199)]], big))
        await asyncio.sleep(0)
        mostly_hits = CountingScorer()
        await asyncio.wait_for(cache.score("m", b"ns", "held", [*[f"h{i}" for i in range(299)], "x"], mostly_hits), 5)
        assert mostly_hits.asked == ["x"]
        big.release.set()
        await asyncio.gather(first, second)
        return alone

    assert list(asyncio.run(go()).logits) == [2.0]


def test_a_passage_given_twice_is_scored_once_and_never_waits_on_the_deadline():
    """The repeat waited, under the deadline, for the request's own resolved score: a request whose scoring
    ended at its deadline got a 504 with every score in hand."""
    cache = ScoreCache(2**20)
    model = CountingScorer()

    async def slow(passages):
        scored = await model(passages)
        await asyncio.sleep(0.1)  # past the deadline by the time the scores come back
        return scored

    got = asyncio.run(cache.score("m", b"ns", "q", ["a", "bb", "a"], slow, deadline=time.monotonic() + 0.05))
    assert list(got.logits) == [1.0, 2.0, 1.0] and model.asked == ["a", "bb"]


def test_waiting_for_a_concurrent_request_ends_at_the_deadline():
    cache = ScoreCache(2**20)
    owner = HeldScorer()

    async def go():
        first = asyncio.create_task(cache.score("m", b"ns", "q", ["x"], owner))
        await asyncio.sleep(0)
        started = time.monotonic()
        waiting = cache.score("m", b"ns", "q", ["x"], CountingScorer(), deadline=time.monotonic() + 0.1)
        with pytest.raises(TimeoutError) as ended:  # the same size: it waits, but not past its own deadline
            await asyncio.wait_for(waiting, 10)  # (10 s: the deadline ignored; that would hang without a bound)
        assert ended.value.__class__ is TimeoutError and time.monotonic() - started < 5
        owner.release.set()
        await first

    asyncio.run(go())


def test_several_queries_of_one_request_are_one_submission(tiny_model_dir):
    """vLLM score with several text_1 is one admission unit; through the cache each query was submitted on
    its own (with --max-queue 2, one request of 5 queries got 503 on an idle server)."""
    served, _, _ = serve(str(tiny_model_dir), ScoreCache(2**20))
    plain, _, _ = serve(str(tiny_model_dir), None)
    submits: list[int] = []
    submit = served.scheduler.submit

    async def counting(items, **kw):
        submits.append(len(items))
        return await submit(items, **kw)

    served.scheduler.submit = counting
    reqs = [RerankRequest(query=f"{QUERY} {i}", passages=PASSAGES, truncate=Truncate.END) for i in range(5)]
    got = asyncio.run(served.rerank_many(reqs))
    want = asyncio.run(plain.rerank_many(reqs))
    assert len(submits) == 1 and submits[0] == 5 * len(PASSAGES)
    for g, w in zip(got, want, strict=True):
        assert g.logits.tobytes() == w.logits.tobytes() and g.prompt_tokens == w.prompt_tokens


def _entries(keys: list[bytes], start: int = 0) -> list:
    """Entries shaped as the server stores them: (score, tokens, shared tokens, windows)."""
    return [(k, (float(np.float32(i) / 7), 100 + i % 400, 9 + i % 20, 1)) for i, k in enumerate(keys, start)]


def test_memory_per_entry_stays_within_the_accounted_bytes():
    n = 21_900  # just past a hash-table resize: the dearest point per entry while filling
    cache = ScoreCache(n * ENTRY_BYTES)
    ns = ScoreCache.namespace("m")
    keys = ScoreCache.keys(ns, "query", [f"passage number {i}" for i in range(n)])
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache._store("m", _entries(keys))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(cache) == n
    assert used / n <= ENTRY_BYTES, f"{used / n:.0f} bytes per entry; ENTRY_BYTES is {ENTRY_BYTES}"


def test_memory_per_entry_stays_within_the_accounted_bytes_while_evicting():
    """A full cache under churn holds its entries plus the deleted slots its hash table keeps until it
    resizes: measured after every store of 1,000 entries, over five refills. A reviewer saw a 64 MiB cache reach
    87 MiB of RSS this way while 320 bytes an entry were accounted (370-426 traced here)."""
    n = 21_900
    cache = ScoreCache(n * ENTRY_BYTES)
    ns = ScoreCache.namespace("m")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    most = 0
    try:
        for r in range(6):
            keys = ScoreCache.keys(ns, f"query {r}", [f"passage number {i}" for i in range(n)])
            for a in range(0, n, 1000):
                cache._store("m", _entries(keys[a : a + 1000], a))
                most = max(most, tracemalloc.get_traced_memory()[0] - before - sys.getsizeof(keys) -
                           sum(sys.getsizeof(k) for k in keys))  # the request's own keys are not the cache's
            del keys
    finally:
        tracemalloc.stop()
    assert len(cache) == n
    assert most / n <= ENTRY_BYTES, f"{most / n:.0f} bytes per entry under eviction; ENTRY_BYTES is {ENTRY_BYTES}"


def test_concurrent_requests_share_entries(tiny_model_dir):
    served, prepare, _ = serve(str(tiny_model_dir), ScoreCache(2**20))
    plain, _, _ = serve(str(tiny_model_dir), None)
    requests = [PASSAGES[i:] + PASSAGES[:i] for i in range(len(PASSAGES))] * 3  # 15 overlapping requests

    async def go(model):
        await model.scheduler.start()
        try:
            return await asyncio.gather(*(model.rerank(RerankRequest(query=QUERY, passages=p, truncate=Truncate.END))
                                          for p in requests))
        finally:
            await model.scheduler.stop()

    got = asyncio.run(go(served))
    want = asyncio.run(go(plain))
    for g, w in zip(got, want, strict=True):
        assert g.logits.tobytes() == w.logits.tobytes() and g.prompt_tokens == w.prompt_tokens
    first_round = prepare.items
    assert first_round < len(requests) * len(PASSAGES)  # later requests found earlier ones' entries
    again = asyncio.run(go(served))
    assert prepare.items == first_round  # every entry is shared now: nothing tokenized
    assert all(a.logits.tobytes() == w.logits.tobytes() for a, w in zip(again, want, strict=True))


def test_a_request_instruction_is_part_of_the_key(tmp_path):
    """The same query and passage with another instruction is another score (Qwen3-Reranker, mxbai-v2 and
    bge-gemma read it): answered from the cache, it was the first instruction's."""
    from tests.families import builders

    model = builders.build_qwen3_reranker(tmp_path / "Qwen3-Reranker-tiny")
    served, prepare, _ = serve(str(model), ScoreCache(2**20))
    plain = rerank(served, ["paris is the capital of france"])
    before = prepare.items
    asked = rerank(served, ["paris is the capital of france"], instruction="Judge whether the passage is in French")
    assert prepare.items == before + 1, "another instruction was answered from the cache"
    assert asked.logits[0] != plain.logits[0]
