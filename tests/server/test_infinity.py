"""Infinity's `POST /rerank` (`documents`, Cohere-shaped answer) beside TEI's (`texts`, bare array) on one route,
each form answering its errors in its own shape."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig


def _assert_infinity_error(resp, status: int, *needles: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    for needle in needles:
        assert needle in err["message"], err


def _assert_tei_error(resp, status: int, *needles: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "error_type"}
    for needle in needles:
        assert needle in body["error"], body


def test_documents_form_answers_like_infinity_and_agrees_with_tei(tiny_server):
    docs = ["paris is the capital of france", "bananas are yellow", "berlin is in germany"]
    with tiny_server.client() as c:
        inf = c.post("/rerank", json={"query": "capital of france", "documents": docs, "return_documents": True})
        tei = c.post("/rerank", json={"query": "capital of france", "texts": docs, "raw_scores": True})
        top = c.post("/rerank", json={"query": "capital of france", "documents": docs, "top_n": 1,
                                      "raw_scores": True, "model": "default/not-specified"})
    assert inf.status_code == 200, inf.text
    body = inf.json()
    assert body["object"] == "rerank" and body["model"] == "tiny"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert body["id"] == inf.headers["x-request-id"] and isinstance(body["created"], int)
    results = body["results"]
    assert [set(r) for r in results] == [{"relevance_score", "index", "document"}] * 3
    assert all(r["document"] == docs[r["index"]] for r in results)
    assert all(0.0 <= r["relevance_score"] <= 1.0 for r in results)
    # same order and, undoing the sigmoid, the same scores as the TEI form's raw scores
    tei_ranks = tei.json()
    assert [r["index"] for r in results] == [r["index"] for r in tei_ranks]
    for r, t in zip(results, tei_ranks, strict=True):
        assert r["relevance_score"] == pytest.approx(1 / (1 + math.exp(-t["score"])), abs=1e-6)
    one = top.json()["results"]
    assert len(one) == 1 and one[0]["index"] == tei_ranks[0]["index"] and "document" not in one[0]
    assert one[0]["relevance_score"] == pytest.approx(tei_ranks[0]["score"], abs=1e-5)


def test_each_form_has_its_own_errors(tiny_server):
    with tiny_server.client() as c:
        # Infinity form: OpenAI-style errors
        _assert_infinity_error(c.post("/rerank", json={"query": "q", "documents": []}), 422, "documents")
        _assert_infinity_error(c.post("/rerank", json={"query": "q", "documents": ["a"], "model": "nope"}), 400,
                               "nope", "tiny")
        _assert_infinity_error(c.post("/rerank", json={"documents": ["a"]}), 422, "'query' is required")
        _assert_infinity_error(c.post("/rerank", json={"query": "q", "documents": ["a"], "top_n": 0}), 422,
                               "top_n")
        _assert_infinity_error(c.post("/rerank", json={"query": "q", "documents": ["a"] * 9}), 422, "9", "8")
        # TEI form: TEI's errors, as before
        _assert_tei_error(c.post("/rerank", json={"query": "q", "texts": []}), 400, "empty")
        _assert_tei_error(c.post("/rerank", json={"query": "q", "texts": ["a"], "documents": ["b"]}), 422,
                          "not both")
        _assert_tei_error(c.post("/rerank", json={"query": "q"}), 422, "'texts' is required", "'documents'")
        _assert_tei_error(c.post("/rerank", content=b"[1, 2]"), 422, "JSON object")
        _assert_tei_error(c.post("/rerank", content=b"{nope"), 422, "not valid JSON")


def test_a_null_form_field_counts_as_absent(tiny_model_dir):
    """`"texts": null` beside `documents` (a client that fills every optional field) was refused as "not both"."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    with TestClient(create_app(config, wait_for_models=True)) as c:
        inf = c.post("/rerank", json={"query": "q", "documents": ["a", "b"], "texts": None})
        tei = c.post("/rerank", json={"query": "q", "texts": ["a", "b"], "documents": None})
        neither = c.post("/rerank", json={"query": "q", "texts": None, "documents": None})
    assert inf.status_code == 200 and len(inf.json()["results"]) == 2, inf.text
    assert tei.status_code == 200 and len(tei.json()) == 2, tei.text
    _assert_tei_error(neither, 422, "'texts' is required", "'documents'")


def test_openapi_documents_both_forms(tiny_server):
    with tiny_server.client() as c:
        doc = c.get("/openapi.json").json()
    body = doc["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {item["$ref"].rsplit("/", 1)[1] for item in body["oneOf"]}
    assert refs == {"TeiRerankRequest", "InfinityRerankRequest"}
    schemas = doc["components"]["schemas"]
    assert schemas["InfinityRerankRequest"]["examples"] and "InfinityRerankResponse" in schemas
    # a model fault: the Infinity form answers Infinity's 500 (tests/server/test_faults.py), the TEI form 424
    responses = doc["paths"]["/rerank"]["post"]["responses"]
    infinity_500 = responses["500"]["content"]["application/json"]["schema"]
    assert infinity_500["$ref"].endswith("/InfinityError") and "Infinity form" in responses["500"]["description"]
    assert "424" in responses


def test_a_request_over_the_token_budget_is_422_in_both_forms(tiny_model_dir):
    """Infinity answers a request it refuses as invalid with 422; the Infinity form answered 400 here, which
    it keeps for an unknown model (docs/api.md), while the TEI form said 422."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1, max_request_tokens=200)
    docs = ["river water sea mountain " * 4] * 40
    with TestClient(create_app(config, wait_for_models=True)) as c:
        _assert_infinity_error(c.post("/rerank", json={"query": "q", "documents": docs}), 422,
                               "--max-request-tokens")
        _assert_tei_error(c.post("/rerank", json={"query": "q", "texts": docs}), 422, "--max-request-tokens")


# -- POST /embeddings, GET /models, GET /health at the root, as Infinity serves them ----------------------------
# The bodies are those infinity_client (its defaults: `default/not-specified`, `dimensions: 0`), LangChain's
# InfinityEmbeddings and LiteLLM's `infinity/` provider post.


def test_embeddings_at_the_root_answer_like_infinity_and_equal_v1_embeddings(default_server):
    texts = ["What is the capital of France?", "Paris is the capital of France."]
    with default_server.client() as c:
        ref = c.post("/v1/embeddings", json={"input": texts}).json()
        client = c.post("/embeddings", json={"input": texts, "model": "default/not-specified",
                                             "dimensions": 0, "modality": "text"})
        named = c.post("/embeddings", json={"input": texts, "model": ref["model"]})  # LangChain, LiteLLM
        b64 = c.post("/embeddings", json={"input": texts[0], "encoding_format": "base64"})
    assert client.status_code == 200, client.text
    body = client.json()
    assert body["model"] == ref["model"] and body["usage"] == ref["usage"] and body["object"] == "list"
    assert body["id"] == client.headers["x-request-id"] and isinstance(body["created"], int)
    assert [d["embedding"] for d in body["data"]] == [d["embedding"] for d in ref["data"]]
    assert named.json()["data"] == body["data"] and isinstance(b64.json()["data"][0]["embedding"], str)


def test_embeddings_errors_in_infinity_shape(default_server, tiny_server):
    with default_server.client() as c:
        _assert_infinity_error(c.post("/embeddings", json={"input": "a", "model": "nope"}), 400, "nope")
        _assert_infinity_error(c.post("/embeddings", json={"input": "a", "dimensions": -1}), 422, "dimensions")
        _assert_infinity_error(c.post("/embeddings", json={"input": "a", "dimensions": 8}), 400, "dimensions")
        _assert_infinity_error(c.post("/embeddings", json={"input": []}), 422, "input is empty")
        _assert_infinity_error(c.post("/embeddings", json={}), 422, "input")
        # OpenAI refuses dimensions 0; /v1/embeddings keeps OpenAI's rule
        assert c.post("/v1/embeddings", json={"input": "a", "dimensions": 0}).status_code == 400
    with tiny_server.client() as c:
        _assert_infinity_error(c.post("/embeddings", json={"input": "a"}), 400, "embedding")


def test_models_and_health_as_infinity_client_reads_them(default_server):
    with default_server.client() as c:
        models = c.get("/models")
        health = c.get("/health")
    assert models.status_code == 200, models.text
    (entry,) = models.json()["data"]
    # infinity_client's ModelInfo.from_dict: `id` and `stats` required, `object`/`owned_by` from its enums
    assert entry["object"] == "model" and entry["owned_by"] == "infinity" and isinstance(entry["stats"], dict)
    assert entry["capabilities"] == ["rerank", "embed"] and entry["backend"]
    assert {"queue_fraction", "queue_absolute", "results_pending", "batch_size"} <= set(entry["stats"])
    assert health.status_code == 200 and isinstance(health.json()["unix"], float)
