"""Cohere/Jina dialect: the pure converters, then /v1/rerank and /v2/rerank over HTTP."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from openrerank.core.requests import RerankResult, ScoreKind, Truncate
from openrerank.server.dialects import cohere as dialect
from openrerank.server.errors import ApiError
from openrerank.wire.cohere import CohereV1RerankRequest, CohereV2RerankRequest
from tests.server.conftest import API_KEY, DEFAULT_ID

# -- converters ----------------------------------------------------------------------------------


def test_v1_to_internal_strings_objects_and_defaults():
    body = CohereV1RerankRequest(query="q", documents=["a", {"text": "b", "id": 7}], top_n=0)
    req = dialect.v1_to_internal(body)
    assert req.passages == ["a", "b"]
    assert req.truncate is Truncate.CHUNK  # chunked by default, as Cohere does
    assert req.max_chunks_per_passage is None and req.default_chunks_per_passage == 10  # under the server's cap
    assert req.max_tokens_per_passage is None
    assert req.top_n is None and req.model is None
    assert dialect.v1_to_internal(CohereV1RerankRequest(query="q", documents=["a"], max_chunks_per_doc=3,
                                                        top_n=2)).max_chunks_per_passage == 3


def test_v1_rank_fields():
    docs = [{"title": "Paris", "body": "capital of France", "text": "ignored"}]
    one = dialect.v1_to_internal(CohereV1RerankRequest(query="q", documents=docs, rank_fields=["title"]))
    assert one.passages == ["Paris"]
    two = dialect.v1_to_internal(CohereV1RerankRequest(query="q", documents=docs, rank_fields=["title", "body"]))
    assert two.passages == ["title: Paris\nbody: capital of France"]
    with pytest.raises(ApiError) as err:
        dialect.v1_to_internal(CohereV1RerankRequest(query="q", documents=[{"title": "x"}]))
    assert err.value.status == 400 and "documents[0]" in err.value.message and "'text'" in err.value.message
    with pytest.raises(ApiError):
        dialect.v1_to_internal(CohereV1RerankRequest(query="q", documents=[{"text": 5}]))


def test_v2_to_internal_bounds_tokens_not_chunks():
    req = dialect.v2_to_internal(CohereV2RerankRequest(model="m", query="q", documents=["a", "b"], top_n=1))
    assert req.model == "m" and req.top_n == 1 and req.truncate is Truncate.CHUNK
    assert req.max_tokens_per_passage == 4096 and req.max_chunks_per_passage is None
    req = dialect.v2_to_internal(CohereV2RerankRequest(model="m", query="q", documents=["a"], max_tokens_per_doc=7))
    assert req.max_tokens_per_passage == 7


@pytest.mark.parametrize("n", [0, -1, -5])
def test_vllm_top_n_of_zero_or_less_is_all(n):
    """vLLM's RerankRequest, which vLLM serves on these routes: top_n <= 0 is all (-1 was a 400)."""
    assert dialect.v1_to_internal(CohereV1RerankRequest(query="q", documents=["a"], top_n=n)).top_n is None
    assert dialect.v2_to_internal(CohereV2RerankRequest(model="m", query="q", documents=["a"], top_n=n)).top_n is None


def test_vllm_truncate_prompt_tokens_cuts_as_the_score_route_does():
    """It was ignored and the document chunked; now it cuts, as on /v1/score, and refuses Cohere's chunk bounds."""
    v1 = dialect.v1_to_internal(CohereV1RerankRequest(query="q", documents=["a"], truncate_prompt_tokens=-1))
    assert v1.truncate is Truncate.END and v1.max_tokens_per_passage is None and v1.default_chunks_per_passage is None
    v2 = dialect.v2_to_internal(CohereV2RerankRequest(model="m", query="q", documents=["a"], truncate_prompt_tokens=16))
    assert v2.truncate is Truncate.END and v2.max_tokens_per_passage == 16
    both = [(dialect.v1_to_internal, CohereV1RerankRequest(query="q", documents=["a"], truncate_prompt_tokens=-1,
                                                           max_chunks_per_doc=2), "max_chunks_per_doc"),
            (dialect.v2_to_internal, CohereV2RerankRequest(model="m", query="q", documents=["a"],
                                                           truncate_prompt_tokens=8, max_tokens_per_doc=8),
             "max_tokens_per_doc")]
    for convert, body, field in both:
        with pytest.raises(ApiError) as err:
            convert(body)
        assert err.value.status == 400
        assert f"truncate_prompt_tokens (cut each document) and {field}" in err.value.message


def _result(logits: list[float], kind: ScoreKind = ScoreKind.LOGIT) -> RerankResult:
    return RerankResult("m", np.asarray(logits, dtype=np.float32), prompt_tokens=11, score_kind=kind)


def test_result_to_wire_sorted_cut_sigmoid_and_documents():
    body = CohereV1RerankRequest(query="q", documents=["a", {"text": "b", "id": 7}, "c"], top_n=2)
    req = dialect.v1_to_internal(body)
    wire = dialect.result_to_wire(_result([0.5, 2.0, -1.0]), req, version="1", documents=body.documents,
                                  request_id="rid")
    assert wire["id"] == "rid" and wire["model"] == "m" and wire["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert wire["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 1},
                            "tokens": {"input_tokens": 11, "output_tokens": 0}}
    assert [r["index"] for r in wire["results"]] == [1, 0]
    assert wire["results"][0]["relevance_score"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert wire["results"][0]["document"] == {"text": "b", "id": 7}
    assert wire["results"][1]["document"] == {"text": "a"}
    bare = dialect.result_to_wire(_result([0.5, 2.0, -1.0]), req, version="2")
    assert all("document" not in r for r in bare["results"])
    raw = dialect.result_to_wire(_result([0.5, 2.0, -1.0]), req, version="1", activation=False)
    assert [(r["index"], r["relevance_score"]) for r in raw["results"]] == [(1, 2.0), (0, 0.5)]


@pytest.mark.parametrize(("passages", "windows", "units"), [
    (3, None, 1), (100, None, 1), (101, None, 2), (3, 100, 1), (3, 101, 2), (250, 250, 3), (1, 1000, 10)])
def test_search_units_count_chunks_as_documents(passages, windows, units):
    """Cohere: one search unit is one query with up to 100 documents; each chunk of a long one counts."""
    result = RerankResult("m", np.zeros(passages, dtype=np.float32), 5, ScoreKind.LOGIT, windows=windows)
    assert dialect.search_units(result) == units


def test_result_to_wire_bi_encoder_maps_cosine_linearly():
    req = dialect.v2_to_internal(CohereV2RerankRequest(model="m", query="q", documents=["a", "b", "c"]))
    wire = dialect.result_to_wire(_result([0.8, -1.0, 0.0], ScoreKind.COSINE), req, version="2")
    assert [(r["index"], round(r["relevance_score"], 6)) for r in wire["results"]] == [(0, 0.9), (2, 0.5), (1, 0.0)]


# -- over HTTP (tiny cross-encoder: --max-passages 8, --max-body-bytes 20000) -------------------------


def assert_cohere_error(resp: httpx.Response, status: int, *fragments: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    # /v1/rerank is Jina's route too: Jina's clients read `detail` (KeyError without it); /v2 is Cohere's alone
    assert body == ({"message": body["message"], "detail": body["message"]} if resp.url.path == "/v1/rerank"
                    else {"message": body["message"]}), body
    for frag in fragments:
        assert frag in body["message"], body["message"]
    return body["message"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_shape_order_and_top_n(tiny_server, path):
    docs = ["banana fruit", "paris is the capital of france", "the sea", "a car engine"]
    with tiny_server.client() as c:
        full = c.post(path, json={"model": "tiny", "query": "paris capital", "documents": docs})
        top = c.post(path, json={"model": "tiny", "query": "paris capital", "documents": docs, "top_n": 2})
        zero = c.post(path, json={"model": "tiny", "query": "paris capital", "documents": docs, "top_n": 0})
        big = c.post(path, json={"model": "tiny", "query": "paris capital", "documents": docs, "top_n": 99})
    assert full.status_code == 200, full.text
    body = full.json()
    assert set(body) == {"id", "results", "meta", "model", "usage"}
    assert body["model"] == "tiny" and body["usage"]["total_tokens"] > 0
    assert body["meta"]["api_version"]["version"] == path[2]
    assert body["meta"]["billed_units"] == {"search_units": 1}
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert all(set(r) == {"index", "relevance_score"} for r in results)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert top.json()["results"] == results[:2]
    assert zero.json()["results"] == results == big.json()["results"]
    assert full.json()["id"] != top.json()["id"]


def test_return_documents(tiny_server):
    docs = ["banana fruit", {"text": "paris is the capital", "url": "https://x", "n": 1}]
    with tiny_server.client() as c:
        v1 = c.post("/v1/rerank", json={"query": "paris", "documents": docs, "return_documents": True}).json()
        v2 = c.post("/v2/rerank", json={"model": "tiny", "query": "paris", "documents": ["a b", "c"],
                                        "return_documents": True}).json()
    by_index = {r["index"]: r["document"] for r in v1["results"]}
    assert by_index == {0: {"text": "banana fruit"}, 1: docs[1]}
    assert {r["index"]: r["document"] for r in v2["results"]} == {0: {"text": "a b"}, 1: {"text": "c"}}


def test_relevance_is_sigmoid_of_nim_logit(tiny_server):
    docs = ["banana fruit", "paris is the capital", "the sea"]
    with tiny_server.client() as c:
        nim = c.post("/v1/ranking", json={"query": {"text": "paris"}, "passages": [{"text": d} for d in docs]})
        co = c.post("/v2/rerank", json={"model": "tiny", "query": "paris", "documents": docs})
    logits = {r["index"]: r["logit"] for r in nim.json()["rankings"]}
    for r in co.json()["results"]:
        assert r["relevance_score"] == pytest.approx(1 / (1 + math.exp(-logits[r["index"]])), abs=1e-6)


def test_unknown_fields_ignored_like_cohere_compatible_servers(tiny_server):
    with tiny_server.client() as c:
        r = c.post("/v2/rerank", json={"model": "tiny", "query": "q", "documents": ["a"], "priority": 0,
                                       "relevant_spans": {"mode": "disabled"}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [
    ("/v2/rerank", {"query": "q", "documents": ["a"]}, 400, "model"),
    ("/v2/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "tiny"),
    ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "served models: tiny"),
    ("/v1/rerank", {"query": "q", "documents": []}, 400, "documents"),
    ("/v2/rerank", {"model": "tiny", "query": "", "documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"query": "q", "documents": "abc"}, 400, "documents"),
    ("/v2/rerank", {"model": "tiny", "query": "q", "documents": [1, 2]}, 400, "documents"),
    ("/v2/rerank", {"model": "tiny", "query": 5, "documents": ["a"]}, 400, "query"),
    ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "truncate_prompt_tokens": -1,
                    "max_tokens_per_doc": 8}, 400, "do not go together"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "x"}, 400, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "no text"}]}, 400, "'text'"),
    # a Jina image document: "no field 'text'" did not say where images go
    ("/v1/rerank", {"query": "q", "documents": [{"image": "data:image/png;base64,iVBORw0KGgo="}]}, 400,
     "send image passages to POST /v1/ranking"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 9}, 400, "exceeds the maximum of 8"),
    ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, 400,
     "max_tokens_per_doc"),
])
def test_bad_input_in_cohere_shape(tiny_server, path, body, status, fragment):
    with tiny_server.client() as c:
        assert_cohere_error(c.post(path, json=body), status, fragment)


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_vllm_rerank_request_fields_are_honoured(tiny_server, path):
    """vLLM serves its RerankRequest on both routes: use_activation (and its legacy names) gave the [0, 1]
    score, top_n -1 was a 400, truncate_prompt_tokens was ignored (the document chunked, any value taken)."""
    docs = ["banana fruit", "paris is the capital", "the sea"]
    long = " ".join(["paris banana"] * 100)
    base = {"model": "tiny", "query": "paris"}
    with tiny_server.client() as c:
        nim = c.post("/v1/ranking", json={"query": {"text": "paris"}, "passages": [{"text": d} for d in docs]})
        default = c.post(path, json={**base, "documents": docs})
        raw = [c.post(path, json={**base, "documents": docs, flag: False})
               for flag in ("use_activation", "activation", "softmax")]
        overruled = c.post(path, json={**base, "documents": docs, "softmax": True, "use_activation": False})
        every = c.post(path, json={**base, "documents": docs, "top_n": -1})
        cut = c.post(path, json={**base, "documents": [long, "sea"], "truncate_prompt_tokens": -1,
                                 "use_activation": False})
        score = c.post("/v1/score", json={"text_1": "paris", "text_2": [long, "sea"], "truncate_prompt_tokens": -1,
                                          "use_activation": False})
        wide = c.post(path, json={**base, "documents": docs, "truncate_prompt_tokens": 129})
    logits = {r["index"]: r["logit"] for r in nim.json()["rankings"]}
    for r in raw:
        assert r.status_code == 200, r.text
        assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(logits, abs=1e-5)
    assert overruled.json()["results"] == default.json()["results"]  # softmax wins, as in vLLM
    assert every.status_code == 200 and every.json()["results"] == default.json()["results"]
    assert cut.status_code == 200, cut.text
    cut_scores = {x["index"]: x["relevance_score"] for x in cut.json()["results"]}
    assert [cut_scores[0], cut_scores[1]] == pytest.approx([d["score"] for d in score.json()["data"]], abs=1e-5)
    assert_cohere_error(wide, 400, "truncate_prompt_tokens value (129) is greater than max_model_len (128)")


def test_malformed_and_oversize_bodies(tiny_server):
    with tiny_server.client() as c:
        bad = c.post("/v1/rerank", content=b'{"query": "q", "documents": [',
                     headers={"content-type": "application/json"})
        big = c.post("/v2/rerank", json={"model": "tiny", "query": "q", "documents": ["x" * 30000]})
    assert_cohere_error(bad, 400, "JSON")
    assert_cohere_error(big, 413, "exceeds the limit")


def test_official_cohere_sdk_v2_and_v1(multi_server):
    cohere = pytest.importorskip("cohere")
    docs = ["Carson City is the capital city of the American state of Nevada.",
            "Washington, D.C. is the capital of the United States.",
            "Capital punishment has existed in the United States since before it was a country."]
    v2 = cohere.ClientV2(base_url=multi_server.url, api_key=API_KEY)
    resp = v2.rerank(model=DEFAULT_ID, query="What is the capital of the United States?", documents=docs, top_n=2)
    assert resp.results[0].index == 1 and len(resp.results) == 2
    assert 0 <= resp.results[1].relevance_score <= resp.results[0].relevance_score <= 1
    v1 = cohere.Client(base_url=multi_server.url, api_key=API_KEY)
    resp1 = v1.rerank(query="What is the capital of the United States?", documents=docs, top_n=1,
                      return_documents=True)
    assert resp1.results[0].index == 1 and resp1.results[0].document.text == docs[1]
    with pytest.raises(cohere.errors.NotFoundError) as err:
        v2.rerank(model="rerank-v3.5", query="q", documents=["a"])
    assert DEFAULT_ID in err.value.body["message"]
    with pytest.raises(cohere.errors.NotFoundError) as err:  # v1's body also carries Jina's `detail`: still read
        v1.rerank(model="rerank-v3.5", query="q", documents=["a"])
    assert DEFAULT_ID in err.value.body["message"] and err.value.body["detail"] == err.value.body["message"]
    with pytest.raises(cohere.errors.UnauthorizedError):
        cohere.ClientV2(base_url=multi_server.url, api_key="wrong").rerank(model=DEFAULT_ID, query="q",
                                                                          documents=["a"])


def test_engine_errors_map_to_cohere_statuses():
    busy = dialect.COHERE.response(503, "server overloaded", "overloaded", {"Retry-After": "1"})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.body == b'{"message":"server overloaded"}'
    jina = dialect.COHERE_V1.response(503, "server overloaded", "overloaded")
    assert jina.status_code == 429 and jina.body == b'{"message":"server overloaded","detail":"server overloaded"}'
    assert dialect.COHERE.response(404, "x", "model_not_found").status_code == 404
    assert dialect.COHERE.response(503, "loading", "unavailable").status_code == 503
