from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest

from openrerank.client import RerankError
from openrerank.eval.rerank import InProcessReranker, Reranker, RerankJob, ServerReranker
from openrerank.wire.nim import DEFAULT_MAX_PASSAGES

JOBS = [
    RerankJob("q1", "why do cats purr", ["d1", "d2", "d3"], ["cats purr when happy", "dogs bark", "stocks fell"]),
    RerankJob("q2", "dogs", ["d2", "d1"], ["dogs bark", "cats purr when happy"]),
]


class CountingReranker(Reranker):
    """Score = -len(passage); records the pairs it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, str]] = []

    def _score_jobs(self, jobs, advance):
        out = []
        for job in jobs:
            self.asked.extend((job.qid, d) for d in job.doc_ids)
            out.append(np.array([-len(p) for p in job.passages], dtype=np.float32))
            advance(1)
        return out


def test_memo_scores_each_pair_once_and_reset_forgets() -> None:
    r = CountingReranker()
    first = r.rerank(JOBS)
    assert first["q1"] == {"d1": -20.0, "d2": -9.0, "d3": -11.0}
    overlap = [RerankJob("q1", "why do cats purr", ["d3", "d4"], ["stocks fell", "kittens"])]
    second = r.rerank(overlap)
    assert second == {"q1": {"d3": -11.0, "d4": -7.0}}
    assert r.asked.count(("q1", "d3")) == 1 and r.pairs_scored == 6
    r.reset()
    r.rerank(overlap)
    assert r.asked.count(("q1", "d3")) == 2


class ListwiseCounting(CountingReranker):
    """A listwise stand-in: a passage's score is its length minus the list's mean, so it depends on the list."""

    listwise = True

    def _score_jobs(self, jobs, advance):
        out = []
        for job in jobs:
            self.asked.extend((job.qid, d) for d in job.doc_ids)
            lengths = np.array([len(p) for p in job.passages], dtype=np.float32)
            out.append(lengths - lengths.mean())
            advance(1)
        return out


def test_a_listwise_model_scores_each_list_whole_and_never_mixes_lists() -> None:
    """Before, the (query, doc) memo sent a listwise model only the passages of a later list not seen in an
    earlier one (as a list of their own) and mixed in the earlier list's scores: `eval --runs A B` and `--runs B A`
    gave different rows."""
    r = ListwiseCounting()
    a = RerankJob("q", "x", ["d1", "d2"], ["aaaa", "bb"])
    b = RerankJob("q", "x", ["d1", "d3", "d4"], ["aaaa", "c", "ddddddd"])
    r.rerank([a])
    after_a = r.rerank([b])
    assert after_a == ListwiseCounting().rerank([b]) == {"q": {"d1": 0.0, "d3": -3.0, "d4": 3.0}}
    assert r.asked.count(("q", "d1")) == 2  # in both lists, scored in each
    r.rerank([b, b])
    assert r.asked.count(("q", "d1")) == 2 and r.pairs_scored == 5  # a list already scored is not scored again


def _nim_handler(seen: list[dict], fail_first: int = 0, max_passages: int = 512):
    state = {"inflight": 0, "max_inflight": 0, "calls": 0}
    lock = threading.Lock()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/metadata":
            return httpx.Response(200, json={"limits": {"max_passages": max_passages}})
        assert request.url.path == "/v1/ranking"
        body = json.loads(request.content)
        with lock:
            state["calls"] += 1
            if state["calls"] <= fail_first:
                return httpx.Response(503, json={"detail": "busy"})
            state["inflight"] += 1
            state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        seen.append(body)
        await asyncio.sleep(0.02)
        with lock:
            state["inflight"] -= 1
        # logit = number of shared words; return sorted best-first like the real API
        q = set(body["query"]["text"].split())
        scored = [(i, float(len(q & set(p["text"].split())))) for i, p in enumerate(body["passages"])]
        scored.sort(key=lambda x: -x[1])
        return httpx.Response(200, json={"rankings": [{"index": i, "logit": s} for i, s in scored]})

    return handler, state


def test_server_reranker_speaks_nim_with_requests_in_flight() -> None:
    seen: list[dict] = []
    handler, state = _nim_handler(seen, fail_first=1)
    jobs = [RerankJob(f"q{i}", "cats purr", ["a", "b"], ["cats purr loudly", "dogs"]) for i in range(12)]
    r = ServerReranker("http://fake:8000/", model="m1", concurrency=4, transport=httpx.MockTransport(handler))
    ticks: list[int] = []
    out = r.rerank(jobs, ticks.append)
    assert out["q3"] == {"a": 2.0, "b": 0.0}  # scores mapped back by index, not by response order
    assert seen[0] == {"model": "m1", "query": {"text": "cats purr"},
                       "passages": [{"text": "cats purr loudly"}, {"text": "dogs"}], "truncate": "END"}
    assert 1 < state["max_inflight"] <= 4
    assert sum(ticks) == 12 and len(seen) == 12  # the 503 was retried


@pytest.mark.parametrize("given", [2, None], ids=["max_passages", "server-limit"])
def test_server_reranker_splits_large_candidate_lists(given) -> None:
    """Split by the server's own --max-passages (/v1/metadata limits.max_passages) unless told: before, 512 was
    hard-coded and a server started with --max-passages 50 refused every 100-candidate request (400)."""
    seen: list[dict] = []
    handler, _ = _nim_handler(seen, max_passages=2)
    passages = [f"w{i} cats" for i in range(5)]
    job = RerankJob("q", "cats w3", [f"d{i}" for i in range(5)], passages)
    r = ServerReranker("http://fake", concurrency=2, max_passages=given, transport=httpx.MockTransport(handler))
    out = r.rerank([job])
    assert [len(b["passages"]) for b in seen] == [2, 2, 1]
    assert "model" not in seen[0]
    assert out["q"]["d3"] == 2.0 and out["q"]["d0"] == 1.0


def test_server_reranker_sends_a_listwise_models_lists_whole_and_refuses_to_split_one() -> None:
    seen: list[dict] = []
    inner, _ = _nim_handler(seen, max_passages=3)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/metadata":  # /v1/metadata marks the model listwise
            return httpx.Response(200, json={"limits": {"max_passages": 3},
                                             "models": [{"id": "other"}, {"id": "jina", "listwise": True}]})
        return await inner(request)

    r = ServerReranker("http://fake", concurrency=2, model="jina", transport=httpx.MockTransport(handler))
    r.rerank([RerankJob("q", "cats", ["d1", "d2"], ["cats", "dogs"])])
    r.rerank([RerankJob("q", "cats", ["d1", "d3"], ["cats", "birds"])])
    assert [[p["text"] for p in b["passages"]] for b in seen] == [["cats", "dogs"], ["cats", "birds"]]
    with pytest.raises(RerankError, match=r"listwise .* 4-candidate list is more than its max_passages 3"):
        r.rerank([RerankJob("q2", "cats", ["a", "b", "c", "d"], ["1", "2", "3", "4"])])
    other = ServerReranker("http://fake", concurrency=2, model="other", transport=httpx.MockTransport(handler))
    other.rerank([RerankJob("q2", "cats", ["a", "b", "c", "d"], ["1", "2", "3", "4"])])  # not listwise: split


def test_server_reranker_without_metadata_sends_the_default_count() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/metadata":  # a NIM without the route
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"rankings": [{"index": i, "logit": 0.0}
                                                      for i in range(len(body["passages"]))]})

    job = RerankJob("q", "x", [f"d{i}" for i in range(600)], ["p"] * 600)
    ServerReranker("http://fake", concurrency=2, transport=httpx.MockTransport(handler)).rerank([job])
    assert [len(b["passages"]) for b in seen] == [DEFAULT_MAX_PASSAGES, 600 - DEFAULT_MAX_PASSAGES]


def test_server_reranker_waits_as_long_as_retry_after_says_and_sends_the_key(monkeypatch) -> None:
    """Before, the eval's own retry loop waited a fixed 0.5 s whatever the server's Retry-After, and sent no key."""
    import openrerank.client as client_module

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(client_module.asyncio, "sleep", sleep)
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path == "/v1/metadata":
            return httpx.Response(200, json={"limits": {"max_passages": 8}})
        if len(calls) == 2:
            return httpx.Response(503, json={"object": "error", "message": "busy"}, headers={"Retry-After": "4"})
        return httpx.Response(200, json={"rankings": [{"index": 0, "logit": 1.0}]})

    r = ServerReranker("http://fake", concurrency=2, api_key="s3cret", transport=httpx.MockTransport(handler))
    assert r.rerank([RerankJob("q", "query", ["d"], ["p"])]) == {"q": {"d": 1.0}}
    assert waits and waits[0] >= 4.0
    assert all(c.headers["authorization"] == "Bearer s3cret" for c in calls)


def test_server_error_is_reported() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": "bad"})

    r = ServerReranker("http://fake", concurrency=2, max_passages=8, transport=httpx.MockTransport(handler))
    with pytest.raises(RerankError, match="422: bad"):  # the server's own message, not a traceback of ours
        r.rerank(JOBS)


@pytest.fixture(scope="module")
def default_model():
    from openrerank.engine.loading import load_model

    model = load_model("default")
    yield model
    model.close()


def test_bi_encoder_rerank_progress_moves_while_passages_are_embedded(monkeypatch) -> None:
    """Before, every passage of the step was embedded before the first job was counted: the DL19 eval showed
    `1/43 (2%), ETA 13771s` and then nothing for five minutes."""
    import types

    import openrerank.eval.rerank as rerank_module

    monkeypatch.setattr(rerank_module, "EMBED_GROUP", 4)
    events: list[str] = []

    def embed(texts):
        events.append(f"embed {len(texts)}")
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    model = types.SimpleNamespace(embeds=True, family=types.SimpleNamespace(listwise=False), embed=embed)
    jobs = [RerankJob(f"q{i}", "qq", [f"d{i}{j}" for j in range(3)], ["a" * (j + 1) for j in range(3)])
            for i in range(4)]
    out = InProcessReranker(model).rerank(jobs, lambda n: events.append(f"advance {n}"))
    assert events.index("advance 2") < max(i for i, e in enumerate(events) if e.startswith("embed"))
    assert sum(int(e.split()[1]) for e in events if e.startswith("advance")) == 4
    assert out["q3"] == {"d30": 3.0, "d31": 5.0, "d32": 7.0}  # (len, 1) . (2, 1)


@pytest.mark.parametrize("group", [1, 1024])
def test_bi_encoder_embedding_path_equals_engine_score(default_model, group, monkeypatch) -> None:
    """The shortcut for bi-encoder rerankers must give the engine's own numbers (long passages truncated), one
    job's passages at a time or all at once."""
    import openrerank.eval.rerank as rerank_module

    monkeypatch.setattr(rerank_module, "EMBED_GROUP", group)
    long = "cells divide " * 400  # far past the 256-token window: truncation END must match
    jobs = [RerankJob("q1", "how do cells divide", ["a", "b", "c"], ["mitosis splits a cell", long, "stock prices"]),
            RerankJob("q2", "stock market", ["c", "a"], ["stock prices", "mitosis splits a cell"])]
    engine = InProcessReranker(default_model, bi_encoder_via_embeddings=False).rerank(jobs)
    fast = InProcessReranker(default_model, bi_encoder_via_embeddings=True).rerank(jobs)
    for q in engine:
        assert list(engine[q]) == list(fast[q])
        np.testing.assert_allclose(list(fast[q].values()), list(engine[q].values()), atol=1e-5)
    assert engine["q1"]["a"] > engine["q1"]["c"]
