from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest

from openrerank.eval.rerank import InProcessReranker, Reranker, RerankJob, ServerReranker

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


def _nim_handler(seen: list[dict], fail_first: int = 0):
    state = {"inflight": 0, "max_inflight": 0, "calls": 0}
    lock = threading.Lock()

    async def handler(request: httpx.Request) -> httpx.Response:
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


def test_server_reranker_splits_large_candidate_lists() -> None:
    seen: list[dict] = []
    handler, _ = _nim_handler(seen)
    passages = [f"w{i} cats" for i in range(5)]
    job = RerankJob("q", "cats w3", [f"d{i}" for i in range(5)], passages)
    r = ServerReranker("http://fake", max_passages=2, transport=httpx.MockTransport(handler))
    out = r.rerank([job])
    assert [len(b["passages"]) for b in seen] == [2, 2, 1]
    assert "model" not in seen[0]
    assert out["q"]["d3"] == 2.0 and out["q"]["d0"] == 1.0


def test_server_error_is_reported() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": "bad"})

    r = ServerReranker("http://fake", transport=httpx.MockTransport(handler))
    with pytest.raises(RuntimeError, match="422"):
        r.rerank(JOBS)


@pytest.fixture(scope="module")
def default_model():
    from openrerank.engine.loading import load_model

    model = load_model("default")
    yield model
    model.close()


def test_bi_encoder_embedding_path_equals_engine_score(default_model) -> None:
    """The shortcut for bi-encoder rerankers must give the engine's own numbers (long passages truncated)."""
    long = "cells divide " * 400  # far past the 256-token window: truncation END must match
    jobs = [RerankJob("q1", "how do cells divide", ["a", "b", "c"], ["mitosis splits a cell", long, "stock prices"]),
            RerankJob("q2", "stock market", ["c", "a"], ["stock prices", "mitosis splits a cell"])]
    engine = InProcessReranker(default_model, bi_encoder_via_embeddings=False).rerank(jobs)
    fast = InProcessReranker(default_model, bi_encoder_via_embeddings=True).rerank(jobs)
    for q in engine:
        assert list(engine[q]) == list(fast[q])
        np.testing.assert_allclose(list(fast[q].values()), list(engine[q].values()), atol=1e-5)
    assert engine["q1"]["a"] > engine["q1"]["c"]
