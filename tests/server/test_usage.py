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
