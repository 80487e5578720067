"""TEI dialect: the pure converters, then /rerank, /health and /info over HTTP."""

from __future__ import annotations

import codecs
import json
import math

import httpx
import numpy as np
import pytest

from openrerank.core.requests import RerankResult, ScoreKind, Truncate
from openrerank.server.dialects import tei as dialect
from openrerank.server.errors import ApiError
from openrerank.wire.tei import TeiRerankRequest

# -- converters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "chunking", "expected"), [
    ({}, False, Truncate.END),  # absent = auto-truncate, as TEI
    ({"truncate": True}, False, Truncate.END),
    ({"truncate": True, "truncation_direction": "left"}, False, Truncate.START),
    ({"truncate": True, "truncation_direction": "Left"}, False, Truncate.START),
    ({"truncate": False}, False, Truncate.NONE),
    ({}, True, Truncate.CHUNK),
    ({"truncation_direction": "left"}, True, Truncate.CHUNK),
    ({"truncate": False}, True, Truncate.NONE),  # asked not to cut: over-long still fails
])
def test_to_internal_truncation(fields, chunking, expected):
    req = dialect.to_internal(TeiRerankRequest(query="q", texts=["a", "b"], **fields), chunking=chunking)
    assert req.truncate is expected and req.passages == ["a", "b"] and req.top_n is None


def test_to_internal_empty_texts_is_empty_error():
    with pytest.raises(ApiError) as err:
        dialect.to_internal(TeiRerankRequest(query="q", texts=[]))
    assert err.value.status == 400 and err.value.kind == "empty"


def test_result_to_wire_scores_and_text():
    result = RerankResult("m", np.asarray([0.5, 2.0, -1.0], dtype=np.float32), prompt_tokens=3,
                          score_kind=ScoreKind.LOGIT)
    body = TeiRerankRequest(query="q", texts=["a", "b", "c"], return_text=True)
    wire = dialect.result_to_wire(result, body)
    assert [r["index"] for r in wire] == [1, 0, 2]
    assert wire[0] == {"index": 1, "score": pytest.approx(1 / (1 + math.exp(-2.0))), "text": "b"}
    raw = dialect.result_to_wire(result, TeiRerankRequest(query="q", texts=["a", "b", "c"], raw_scores=True))
    assert raw == [{"index": 1, "score": 2.0}, {"index": 0, "score": 0.5}, {"index": 2, "score": -1.0}]


def test_error_body_shape():
    assert dialect.tei_error_body(429, "busy", "overloaded") == {"error": "busy", "error_type": "Overloaded"}
    assert dialect.tei_error_body(400, "empty", "empty")["error_type"] == "Empty"
    assert dialect.tei_error_body(422, "bad", "validation")["error_type"] == "Validation"
    assert dialect.TEI.status_for["overloaded"] == 429 and dialect.TEI.status_for["too_many"] == 422


# -- over HTTP (tiny cross-encoder, window 128, --max-passages 8) --------------------------------------

LONG = " ".join(["paris banana river mountain"] * 60)  # ~240 tokens > the tiny model's 128


def assert_tei_error(resp: httpx.Response, status: int, error_type: str, *fragments: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    for frag in fragments:
        assert frag in body["error"], body["error"]


def by_index(ranks: list[dict]) -> dict[int, float]:
    return {r["index"]: r["score"] for r in ranks}


def test_bare_array_sorted_with_text_and_raw_scores(tiny_server):
    texts = ["banana fruit", "paris is the capital", "the sea"]
    with tiny_server.client() as c:
        plain = c.post("/rerank", json={"query": "paris", "texts": texts})
        with_text = c.post("/rerank", json={"query": "paris", "texts": texts, "return_text": True})
        raw = c.post("/rerank", json={"query": "paris", "texts": texts, "raw_scores": True})
        nim = c.post("/v1/ranking", json={"query": {"text": "paris"}, "passages": [{"text": t} for t in texts]})
    assert plain.status_code == 200, plain.text
    ranks = plain.json()
    assert isinstance(ranks, list) and all(set(r) == {"index", "score"} for r in ranks)
    assert sorted(r["index"] for r in ranks) == [0, 1, 2]
    assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    assert all(0 <= r["score"] <= 1 for r in ranks)
    assert all(r["text"] == texts[r["index"]] for r in with_text.json())
    logits = {r["index"]: r["logit"] for r in nim.json()["rankings"]}
    assert {r["index"]: r["score"] for r in raw.json()} == pytest.approx(logits, abs=1e-5)
    for r in ranks:
        assert r["score"] == pytest.approx(1 / (1 + math.exp(-logits[r["index"]])), abs=1e-6)
    assert int(plain.headers["x-compute-tokens"]) > 0 and float(plain.headers["x-total-time"]) >= 0


def test_truncation_default_direction_and_refusal(tiny_server):
    with tiny_server.client() as c:
        auto = c.post("/rerank", json={"query": "paris", "texts": [LONG, "sea"], "raw_scores": True})
        right = c.post("/rerank", json={"query": "paris", "texts": [LONG + " sea", "sea"], "raw_scores": True,
                                        "truncate": True, "truncation_direction": "right"})
        left = c.post("/rerank", json={"query": "paris", "texts": [LONG + " sea", "sea"], "raw_scores": True,
                                       "truncate": True, "truncation_direction": "left"})
        refused = c.post("/rerank", json={"query": "paris", "texts": [LONG, "sea"], "truncate": False})
    assert auto.status_code == right.status_code == left.status_code == 200
    r_right = {r["index"]: r["score"] for r in right.json()}
    r_left = {r["index"]: r["score"] for r in left.json()}
    assert r_right[1] == pytest.approx(r_left[1], abs=1e-6)  # short text: both directions equal
    assert r_right[0] != r_left[0]  # the long text was cut at different ends
    assert_tei_error(refused, 422, "Validation", "exceeds maximum allowed token size 128")


@pytest.mark.parametrize(("body", "status", "error_type", "fragment"), [
    ({"query": "q", "texts": []}, 400, "Empty", "`texts` cannot be empty"),
    ({"query": "q", "texts": ["a"] * 9}, 422, "Validation", "exceeds the maximum of 8"),
    ({"query": "q", "texts": "abc"}, 422, "Validation", "texts"),
    ({"query": "q", "texts": [1]}, 422, "Validation", "texts"),
    ({"texts": ["a"]}, 422, "Validation", "query"),
    ({"query": "q", "texts": ["a"], "raw_scores": "maybe"}, 422, "Validation", "raw_scores"),
    ({"query": "q", "texts": ["a"], "truncation_direction": "up"}, 422, "Validation", "truncation_direction"),
    ({"query": "q", "texts": ["a"], "model": "nope"}, 422, "Validation", "served models: tiny"),
])
def test_bad_input_in_tei_shape(tiny_server, body, status, error_type, fragment):
    with tiny_server.client() as c:
        assert_tei_error(c.post("/rerank", json=body), status, error_type, fragment)


def test_malformed_json_and_oversize(tiny_server):
    with tiny_server.client() as c:
        bad = c.post("/rerank", content=b"{not json", headers={"content-type": "application/json"})
        big = c.post("/rerank", json={"query": "q", "texts": ["x" * 30000]})
    assert_tei_error(bad, 422, "Validation", "JSON")
    assert big.status_code == 413 and set(big.json()) == {"error", "error_type"}


@pytest.mark.parametrize(("path", "body"), [
    ("/rerank", {"query": "paris", "texts": ["banana", "paris is the capital"]}),
    ("/rerank", {"query": "paris", "documents": ["banana", "paris is the capital"]}),  # Infinity's form
    ("/", {"query": "paris", "texts": ["banana", "paris is the capital"]}),
    ("/invocations", {"query": "paris", "texts": ["banana", "paris is the capital"]}),
    ("/v1/ranking", {"query": {"text": "paris"}, "passages": [{"text": "banana"}, {"text": "paris"}]}),
])
def test_a_leading_byte_order_mark_is_skipped_on_every_route(tiny_server, path, body):
    """The standard library's parse (every other route) skips a UTF-8 BOM; orjson's (these routes) refused it
    with a 422, so TEI's own /embed took a body that its /rerank refused."""
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    with tiny_server.client() as c:
        plain = c.post(path, content=raw, headers=headers)
        marked = c.post(path, content=codecs.BOM_UTF8 + raw, headers=headers)
    def answer(r: httpx.Response) -> object:  # less what differs per request (Infinity's id and time)
        said = r.json()
        return {k: v for k, v in said.items() if k not in ("id", "created")} if isinstance(said, dict) else said

    assert plain.status_code == 200, plain.text
    assert marked.status_code == 200 and answer(marked) == answer(plain), marked.text


def test_health_and_info(tiny_server, tiny_model_dir):
    with tiny_server.client() as c:
        health = c.get("/health")
        info = c.get("/info").json()
        engine = c.get("/v1/metadata").json()["models"][0]["engine"]
    # TEI's clients read only the status; Infinity's (the same /health) parse `{"unix": <time>}`
    assert health.status_code == 200 and set(health.json()) == {"unix"} and health.json()["unix"] > 1.7e9
    # TEI's model_id is what the model is (a local folder by its name); served_model_name what requests name it by
    assert info["model_id"] == tiny_model_dir.name and info["served_model_name"] == "tiny"
    assert info["max_input_length"] == 128
    assert info["max_client_batch_size"] == 8 and info["auto_truncate"] is True
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    assert info["model_dtype"] == {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}[engine["dtype"]]
    for key in ("max_concurrent_requests", "max_batch_tokens", "version", "tokenization_workers"):
        assert key in info


def test_openapi_lists_every_dialect_route_with_examples(tiny_server):
    with tiny_server.client() as c:
        doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/ranking", "/v1/rerank", "/v2/rerank", "/rerank", "/health", "/info", "/v1/score", "/score"):
        assert path in paths, path
    schemas = doc["components"]["schemas"]
    for name in ("CohereV1RerankRequest", "CohereV2RerankRequest", "TeiRerankRequest", "ScoreRequest"):
        assert schemas[name].get("examples"), name
    for path in ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/score"):
        assert "200" in paths[path]["post"]["responses"]


# -- POST /embed and POST / (TEI's embeddings; huggingface_hub's feature_extraction posts to the root) --------------
# The bodies are those LlamaIndex's TextEmbeddingsInference and huggingface_hub's InferenceClient post.


def test_embed_and_root_answer_tei_vectors_equal_to_v1_embeddings(default_server):
    texts = ["What is the capital of France?", "Paris is the capital of France."]
    with default_server.client() as c:
        ref = np.asarray([d["embedding"] for d in c.post("/v1/embeddings", json={"input": texts}).json()["data"]])
        embed = c.post("/embed", json={"inputs": texts, "truncate": True})  # LlamaIndex's body
        root = c.post("/", json={"inputs": texts})  # huggingface_hub's feature_extraction body
        one = c.post("/", json={"inputs": texts[1], "normalize": True, "truncate": True})
        raw = c.post("/embed", json={"inputs": texts, "normalize": False, "truncation_direction": "Left"})
    for r in (embed, root, raw):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()), ref, atol=1e-6)  # the default model ends with Normalize
    assert np.asarray(one.json()).shape == (1, 384)
    assert float(embed.headers["x-inference-time"]) >= 0


def test_huggingface_hub_feature_extraction_at_the_base_url(default_server, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    # the suite runs with HF_HUB_OFFLINE=1 (no hub in reach), which the client applies to any URL, this local
    # server's too
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    vectors = hub.InferenceClient(model=default_server.url).feature_extraction(["a river", "a mountain"])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_normalize_prompt_name_and_errors_in_tei_shape(default_server, tiny_server):
    with default_server.client() as c:
        assert_tei_error(c.post("/embed", json={"inputs": []}), 400, "Empty", "cannot be empty")
        assert_tei_error(c.post("/", json={"inputs": ""}), 400, "Empty", "cannot be empty")
        assert_tei_error(c.post("/embed", json={"inputs": [1, 2]}), 422, "Validation", "inputs as token ids")
        assert_tei_error(c.post("/embed", json={"texts": ["a"]}), 422, "Validation", "inputs")
        assert_tei_error(c.post("/embed", json={"inputs": "a", "model": "nope"}), 422, "Validation", "nope")
        assert_tei_error(c.post("/embed", json={"inputs": "a", "prompt_name": "nope"}), 422, "Validation",
                         "prompt_name 'nope'")
        assert_tei_error(c.post("/embed", json={"inputs": "a " * 600, "truncate": False}), 422, "Validation",
                         "exceeds")
        query = c.post("/embed", json={"inputs": "a", "prompt_name": "query"})  # a no-op: the model has no prompts
        plain = c.post("/embed", json={"inputs": "a"})
    assert query.json() == plain.json()


def test_embed_on_a_reranker_is_refused(tiny_server):
    with tiny_server.client() as c:
        assert_tei_error(c.post("/embed", json={"inputs": ["a"]}), 400, "Validation", "embedding")


# -- POST / and POST /invocations: the model's task (TEI routes a reranker's root to rerank) -------------------------


@pytest.mark.parametrize("path", ["/", "/invocations"])
def test_root_on_a_reranker_reranks_as_rerank_does(tiny_server, path):
    """TEI serves `rerank` at `/` and `/invocations` for a reranker (server.rs, `ModelType::Reranker`); the root
    was refused here as TEI's predict (400), so TEI clients and SageMaker's invocations failed on a reranker."""
    body = {"query": "paris", "texts": ["banana fruit", "paris is the capital", "the sea"], "raw_scores": True,
            "return_text": True}
    with tiny_server.client() as c:
        ref = c.post("/rerank", json=body)
        root = c.post(path, json=body)
        assert_tei_error(c.post(path, json={"query": "q", "texts": []}), 400, "Empty", "`texts` cannot be empty")
        assert_tei_error(c.post(path, json={"inputs": ["a"]}), 422, "Validation", "a reranker", "'texts'")
        assert_tei_error(c.post(path, json={"query": "q", "texts": ["a"] * 9}), 422, "Validation",
                         "exceeds the maximum of 8")
        assert_tei_error(c.post(path, content=b"[1]", headers={"content-type": "application/json"}), 422,
                         "Validation", "JSON object")
    assert root.status_code == 200, root.text
    assert by_index(root.json()) == pytest.approx(by_index(ref.json()), abs=1e-6)
    assert all(r["text"] == body["texts"][r["index"]] for r in root.json())
    assert root.headers["x-compute-tokens"] == ref.headers["x-compute-tokens"]


@pytest.fixture(scope="module")
def bi_then_tiny(tmp_path_factory, tiny_model_dir):
    """An embedding model first, then a cross-encoder, in process."""
    from fastapi.testclient import TestClient

    from openrerank.server.app import create_app
    from openrerank.server.config import ServerConfig
    from tests.support import build_tiny_bi_encoder

    bi = build_tiny_bi_encoder(tmp_path_factory.mktemp("tei-bi") / "bi")
    config = ServerConfig(models=[f"bi={bi}", f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    with TestClient(create_app(config, wait_for_models=True)) as c:
        yield c


@pytest.mark.parametrize("path", ["/embed", "/", "/invocations"])
def test_embed_sends_the_compute_headers_as_rerank_does(bi_then_tiny, path):
    """TEI sets x-compute-tokens and x-compute-time on /embed too: the tokens are /v1/embeddings' usage."""
    texts = ["paris is the capital", "the sea"]
    ref = bi_then_tiny.post("/v1/embeddings", json={"input": texts, "model": "bi"})
    r = bi_then_tiny.post(path, json={"inputs": texts, "model": "bi"})
    assert r.status_code == 200, r.text
    assert r.headers["x-compute-tokens"] == str(ref.json()["usage"]["prompt_tokens"])
    assert r.headers["x-compute-time"] == r.headers["x-total-time"]


@pytest.mark.parametrize("path", ["/", "/invocations"])
def test_root_serves_the_task_of_the_model_it_picks(bi_then_tiny, path):
    """"The" model of TEI's root is the one `model` names, else the first served, as /embed and /rerank pick."""
    c = bi_then_tiny
    texts = ["paris is the capital", "the sea"]
    embedded = c.post(path, json={"inputs": texts})
    assert embedded.status_code == 200, embedded.text
    np.testing.assert_allclose(embedded.json(), c.post("/embed", json={"inputs": texts, "model": "bi"}).json(),
                               atol=1e-6)
    ranked = c.post(path, json={"query": "paris", "texts": texts, "model": "tiny"})
    assert ranked.status_code == 200, ranked.text
    ref = c.post("/rerank", json={"query": "paris", "texts": texts, "model": "tiny"})
    assert by_index(ranked.json()) == pytest.approx(by_index(ref.json()), abs=1e-6)
    assert_tei_error(c.post(path, json={"inputs": texts, "model": "nope"}), 422, "Validation", "nope")
    assert_tei_error(c.post(path, json={"inputs": texts, "model": 5}), 422, "Validation", "model")


@pytest.mark.parametrize("path", ["/", "/invocations"])
def test_root_on_an_embedding_model_explains_a_rerank_body(bi_then_tiny, path):
    """A reranker client's `query` + `texts` sent to the root of an embedding model (the first served, or named)
    got a bare "field 'inputs' is required"; the reverse case said how the root routes. Now both do."""
    c = bi_then_tiny
    for body in ({"query": "paris", "texts": ["a", "b"]}, {"query": "paris", "texts": ["a"], "model": "bi"}):
        assert_tei_error(c.post(path, json=body), 422, "Validation", "model 'bi', an embedding model",
                         "send 'inputs'", "POST /rerank")
    assert_tei_error(c.post(path, json={"query": "paris"}), 422, "Validation", "inputs")  # neither task's body


@pytest.mark.parametrize("path", ["/embed", "/"])
def test_an_empty_string_among_inputs_is_tei_empty(bi_then_tiny, path):
    """TEI encodes each input alone and answers an empty one 400 `Empty` (`EncodingInput::is_empty`), as it answers
    empty `inputs`; here it was a 422 `Validation`. A wrong type among them is still the 422 TEI's parsing gives."""
    c = bi_then_tiny
    assert_tei_error(c.post(path, json={"inputs": ["a", ""]}), 400, "Empty", "cannot be empty", "inputs[1]")
    assert_tei_error(c.post(path, json={"inputs": [""]}), 400, "Empty", "cannot be empty")
    assert_tei_error(c.post(path, json={"inputs": ["", 5]}), 422, "Validation", "inputs")
    assert c.post(path, json={"inputs": ["a", " "]}).status_code == 200  # blank is not empty, in TEI either


def test_unit_vectors_normalizes_and_keeps_zero():
    out = dialect.unit_vectors(np.asarray([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32


# -- GET / and GET /ping: TEI's health aliases ----------------------------------------------------------------------


def test_get_root_and_ping_answer_as_health(bi_then_tiny):
    """TEI answers its health on `GET /` (the Inference API's probe) and `GET /ping` (SageMaker's) too; here they
    were a 405 and a 404, so such a probe never saw the server ready."""
    c = bi_then_tiny
    for path in ("/", "/ping"):
        got = c.get(path)
        assert got.status_code == 200 and set(got.json()) == {"unix"}, (path, got.text)
        assert c.head(path).status_code == 200, path


def test_health_aliases_are_open_and_the_root_task_is_not(tiny_model_dir):
    """With --api-key the health aliases stay open, as /health (TEI's public routes), while POST / (the model's task)
    needs the key, in the server and in the OpenAPI document."""
    from fastapi.testclient import TestClient

    from openrerank.server.app import create_app
    from openrerank.server.config import ServerConfig

    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], api_key="k")
    with TestClient(create_app(config, load_models=False)) as c:  # still loading: 503, as /health answers
        health = c.get("/health")
        for path in ("/", "/ping"):
            got = c.get(path)
            assert (got.status_code, got.json()) == (health.status_code, health.json()) == (
                503, {"error": "unhealthy: Model is loading.", "error_type": "Unhealthy"}), path
        for path in ("/", "/invocations", "/ping"):
            assert_tei_error(c.post(path, json={"inputs": "a"}), 401, "Validation", "API key")
        paths = c.get("/openapi.json").json()["paths"]
    assert "security" not in paths["/"]["get"] and "security" not in paths["/ping"]["get"]
    assert paths["/"]["post"]["security"] and paths["/invocations"]["post"]["security"]


# -- GET /info: what TEI says of its model ---------------------------------------------------------------------------


def test_info_of_an_embedding_model_says_embedding_and_its_served_name(bi_then_tiny):
    """/info said `reranker` of a bi-encoder whose root embeds, and had no `served_model_name` (TEI's `Info`)."""
    info = bi_then_tiny.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["served_model_name"] == "bi" and info["model_id"] == "bi"  # its folder's name


def test_info_while_loading_names_the_first_model_as_given():
    from fastapi.testclient import TestClient

    from openrerank.server.app import create_app
    from openrerank.server.config import ServerConfig

    with TestClient(create_app(ServerConfig(models=["mini=default"]), load_models=False)) as c:
        info = c.get("/info").json()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and info["served_model_name"] == "mini"


def test_model_type_names_pooling_as_tei_does():
    from types import SimpleNamespace

    def bi(pooling: str) -> SimpleNamespace:
        return SimpleNamespace(embeds=True, loaded=SimpleNamespace(spec=SimpleNamespace(options={"pooling": pooling})))

    assert dialect.model_type(bi("cls")) == {"embedding": {"pooling": "cls"}}
    assert dialect.model_type(bi("lasttoken")) == {"embedding": {"pooling": "last_token"}}
    assert dialect.model_type(bi("mean+max")) == {"embedding": {"pooling": "mean+max"}}
    assert set(dialect.model_type(SimpleNamespace(embeds=False))) == {"reranker"}
    assert set(dialect.model_type(None)) == {"reranker"}
