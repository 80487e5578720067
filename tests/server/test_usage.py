"""Token usage in every dialect that carries it: the same request reports the same count everywhere, and the
count is the tokens the model read (`[CLS] query [SEP] passage [SEP]` per pair for the tiny cross-encoder).

NIM `usage.{prompt,total}_tokens`; Cohere `meta.tokens.input_tokens` and `meta.billed_units.search_units`
(one search unit per 100 documents, each chunk of a long document counting as one), plus the `usage` Jina and
vLLM add; vLLM score `usage`; Infinity `usage`; TEI has no usage in its body and reports `x-compute-tokens`.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.support import nim_body

QUERY = "what is the capital of france"
DOCS = ["paris is the capital of france", "the banana is a yellow fruit", "a river flows to the sea"]


@pytest.fixture(scope="module")
def pair_tokens(tiny_model_dir) -> int:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return sum(len(tok(QUERY, d)["input_ids"]) for d in DOCS)


def test_every_dialect_reports_the_tokens_the_model_read(tiny_server, pair_tokens):
    with tiny_server.client() as c:
        nim = c.post("/v1/ranking", json=nim_body(QUERY, DOCS, model="tiny"))
        v1 = c.post("/v1/rerank", json={"model": "tiny", "query": QUERY, "documents": DOCS})
        v2 = c.post("/v2/rerank", json={"model": "tiny", "query": QUERY, "documents": DOCS})
        score = c.post("/v1/score", json={"model": "tiny", "text_1": QUERY, "text_2": DOCS})
        infinity = c.post("/rerank", json={"model": "tiny", "query": QUERY, "documents": DOCS})
        tei = c.post("/rerank", json={"model": "tiny", "query": QUERY, "texts": DOCS})
    for resp in (nim, v1, v2, score, infinity, tei):
        assert resp.status_code == 200, resp.text
    n = pair_tokens
    assert nim.json()["usage"] == {"prompt_tokens": n, "total_tokens": n}
    for cohere in (v1.json(), v2.json()):
        assert cohere["meta"]["billed_units"] == {"search_units": 1}
        assert cohere["meta"]["tokens"] == {"input_tokens": n, "output_tokens": 0}
        assert cohere["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert score.json()["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}
    assert infinity.json()["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert tei.headers["x-compute-tokens"] == str(n)


def test_cohere_search_units_count_each_chunk_as_a_document(tiny_server):
    """Eight documents of 16 windows each are 128 documents to Cohere's meter: two search units."""
    long_doc = "a." * 900  # one token per character, about 15 windows of the 128-token model
    docs = [long_doc] * 8
    with tiny_server.client() as c:
        capped = c.post("/v1/rerank", json={"model": "tiny", "query": "q", "documents": docs, "max_chunks_per_doc": 12})
        more = c.post("/v1/rerank", json={"model": "tiny", "query": "q", "documents": docs, "max_chunks_per_doc": 13})
        short = c.post("/v1/rerank", json={"model": "tiny", "query": "q", "documents": ["a"] * 8})
    for resp in (capped, more, short):
        assert resp.status_code == 200, resp.text
    assert capped.json()["meta"]["billed_units"] == {"search_units": 1}  # 8 x 12 = 96 windows
    assert more.json()["meta"]["billed_units"] == {"search_units": 2}  # 8 x 13 = 104 windows
    assert short.json()["meta"]["billed_units"] == {"search_units": 1}
    assert more.json()["meta"]["tokens"]["input_tokens"] > capped.json()["meta"]["tokens"]["input_tokens"]


def test_the_official_cohere_sdk_reads_the_usage(tiny_server, pair_tokens):
    cohere = pytest.importorskip("cohere")
    resp = cohere.ClientV2(base_url=tiny_server.url, api_key="unused").rerank(model="tiny", query=QUERY,
                                                                             documents=DOCS)
    assert resp.meta.billed_units.search_units == 1
    assert resp.meta.tokens.input_tokens == pair_tokens and resp.meta.tokens.output_tokens == 0


def test_a_query_encoded_apart_is_billed_once_a_request_however_many_slices_it_is_tokenized_in(tmp_path):
    """A bi-encoder and a ColBERT model read the query once a request (`families/query_memo.py`), but a request is
    tokenized 64 passages at a time and each slice counted the query: 65 passages billed it twice, 512 eight
    times. The 65th passage costs what any one passage costs (the 2nd of 2), in every dialect that bills."""
    import httpx

    from openrerank.engine.preparing import SLICE_TEXTS
    from openrerank.server.config import ServerConfig
    from tests.families.colbert_builders import build_pylate_colbert
    from tests.server.faults import InProcessServer
    from tests.support import build_tiny_bi_encoder

    bi, colbert = build_tiny_bi_encoder(tmp_path / "bi"), build_pylate_colbert(tmp_path / "colbert")
    config = ServerConfig(models=[f"bi={bi}", f"colbert={colbert}"], backend="torch", threads=1)
    with InProcessServer(config) as server:
        def billed(model: str, n: int) -> int:
            docs = ["paris is the capital of france"] * n
            nim = httpx.post(server.url + "/v1/ranking", json=nim_body(QUERY, docs, model=model), timeout=120)
            cohere = httpx.post(server.url + "/v1/rerank", json={"model": model, "query": QUERY, "documents": docs},
                                timeout=120)
            assert nim.status_code == cohere.status_code == 200, (nim.text, cohere.text)
            assert cohere.json()["meta"]["tokens"]["input_tokens"] == nim.json()["usage"]["prompt_tokens"]
            return nim.json()["usage"]["prompt_tokens"]

        for model in ("bi", "colbert"):
            one = billed(model, 2) - billed(model, 1)
            assert billed(model, SLICE_TEXTS + 1) - billed(model, SLICE_TEXTS) == one, model
            assert billed(model, 4 * SLICE_TEXTS) == billed(model, 1) + (4 * SLICE_TEXTS - 1) * one, model


def test_the_tokens_counter_adds_what_usage_bills_whichever_cache_answers(tiny_model_dir):
    """`openrerank_tokens_total` left out score-cache hits but counted token-cache and query-memo hits in full, so a
    repeated request added 0 or its whole usage depending on which cache answered it; it adds the usage now."""
    import httpx

    from openrerank.server.config import ServerConfig
    from tests.server.faults import InProcessServer

    def counted(url: str) -> float:
        line = next((m for m in httpx.get(url + "/v1/metrics").text.splitlines()
                     if m.startswith('openrerank_tokens_total{model="tiny",task="rerank"}')), None)
        return float(line.split()[-1]) if line else 0.0  # a labelled counter shows once it has counted

    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1, score_cache_mb=8)
    with InProcessServer(config) as server:
        for _ in range(2):  # a miss, then every passage a score-cache hit
            before = counted(server.url)
            answer = httpx.post(server.url + "/v1/ranking", json=nim_body(QUERY, DOCS, model="tiny"), timeout=60)
            assert answer.status_code == 200, answer.text
            assert counted(server.url) - before == answer.json()["usage"]["prompt_tokens"]
