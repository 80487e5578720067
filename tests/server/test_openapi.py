"""The served OpenAPI document (server/openapi.py): statuses every route answers, examples naming what is served."""

from __future__ import annotations

import orjson
from fastapi.testclient import TestClient

from openrerank.server import errors
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.http_answers import headers_too_large


def test_every_route_declares_the_431_in_the_shape_its_path_answers():
    """Headers over --max-header-bytes get a 431 on any path, in the error shape of the path's dialect (the
    connection's guard answers it); no route declared it."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    checked = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            declared = op["responses"].get("431")
            assert declared is not None, (method, path)
            assert "--max-header-bytes" in declared["description"]
            model = errors.dialect_for(path).error_model
            ref = declared["content"]["application/json"]["schema"]["$ref"]
            assert model is not None and ref == f"#/components/schemas/{model.__name__}", (path, ref)
            answer = headers_too_large(f"{method.upper()} {path} HTTP/1.1\r\n".encode(), 100)
            assert answer.startswith(b"HTTP/1.1 431 ")
            body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert set(body) <= set(schemas[model.__name__]["properties"]), (path, body)
            model.model_validate(body)
            checked += 1
    assert checked >= 15


def test_every_retryable_status_declares_its_retry_after_header():
    """Overload, loading and draining answers carry Retry-After; no response declared it for generated clients."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        doc = c.get("/openapi.json").json()
        loading = c.post("/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "p"}]})
    assert loading.status_code == 503 and int(loading.headers["retry-after"]) >= 1
    declared = [op["responses"][code] for item in doc["paths"].values() for op in item.values()
                for code in ("429", "503") if code in op["responses"]]
    assert len(declared) >= 10
    assert all(r["headers"]["Retry-After"]["schema"]["type"] == "integer" for r in declared)


def _examples(doc: dict, name: str) -> list[dict]:
    return doc["components"]["schemas"][name].get("examples", [])


def test_examples_name_a_model_this_server_serves_and_work_as_sent(tmp_path, tiny_model_dir):
    """The examples named all-MiniLM-L6-v2 (a ColBERT id for multi-vector) whatever was served, so "Try it
    out" in /docs answered 404. Each now names a served model that fits its route, and answers 200 as sent."""
    from tests.families.colbert_builders import build_pylate_colbert
    from tests.support import build_tiny_bi_encoder

    bi = build_tiny_bi_encoder(tmp_path / "bi")
    late = build_pylate_colbert(tmp_path / "late")
    config = ServerConfig(models=[f"tiny={tiny_model_dir}", f"bi={bi}", f"late={late}"], backend="torch", threads=1)
    with TestClient(create_app(config, wait_for_models=True)) as c:
        doc = c.get("/openapi.json").json()
        for name in ("NimRankingRequest", "CohereV1RerankRequest", "CohereV2RerankRequest", "ScoreRequest",
                     "CohereRerankResponse", "InfinityRerankResponse", "ScoreResponse"):
            assert {e.get("model", "tiny") for e in _examples(doc, name)} == {"tiny"}, name
        assert [e["model"] for e in _examples(doc, "EmbeddingsRequest")] == ["bi"]
        assert [e["model"] for e in _examples(doc, "MultiVectorRequest")] == ["late"]
        assert len(_examples(doc, "ScoreRequest")) == 2  # the one naming no model is kept as it was
        tried = 0
        for path, item in doc["paths"].items():
            body = item.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = body.get("schema", {}).get("$ref", "")
            for example in _examples(doc, ref.rsplit("/", 1)[-1]) if ref else []:
                r = c.post(path, json=example)
                assert r.status_code == 200, (path, example, r.text)
                tried += 1
        assert tried >= 8


def test_an_example_naming_a_model_is_left_out_where_none_fits(tiny_model_dir):
    """A reranker alone: no embedding or late-interaction model, so no example for those routes."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    with TestClient(create_app(config, wait_for_models=True)) as c:
        doc = c.get("/openapi.json").json()
    assert "examples" not in doc["components"]["schemas"]["EmbeddingsRequest"]
    assert "examples" not in doc["components"]["schemas"]["MultiVectorRequest"]
    assert [e["model"] for e in _examples(doc, "NimRankingRequest")] == ["tiny"]
    assert _examples(doc, "InfinityRerankRequest")  # names no model: kept


def test_models_and_metadata_answer_as_the_document_declares(tmp_path, tiny_model_dir):
    """/v1/models and /v1/metadata were free-form objects in /openapi.json. A reranker, a bi-encoder (embeds)
    and a ColBERT model (multi-vector), behind a score cache; then the same server while its models load."""
    from tests.families.colbert_builders import build_pylate_colbert
    from tests.support import build_tiny_bi_encoder, check_against_openapi

    bi = build_tiny_bi_encoder(tmp_path / "bi", prompts={"query": "query: "}, matryoshka=True)
    late = build_pylate_colbert(tmp_path / "late")
    config = ServerConfig(models=[f"tiny={tiny_model_dir}", f"bi={bi}", f"late={late}"], backend="torch", threads=1,
                          score_cache_mb=1)
    with TestClient(create_app(config, wait_for_models=True)) as c:
        ranked = c.post("/v1/ranking", json={"model": "tiny", "query": {"text": "q"},
                                             "passages": [{"text": f"p {i}"} for i in range(3)]})
        assert ranked.status_code == 200, ranked.text
        listed = check_against_openapi(c, "/v1/models")
        meta = check_against_openapi(c, "/v1/metadata")
    assert {m["id"]: m["tasks"] for m in listed["data"]} == {"tiny": ["rerank"], "bi": ["rerank", "embed"],
                                                              "late": ["rerank"]}
    models = {m["id"]: m for m in meta["models"]}
    assert models["bi"]["embedding_dim"] > 0 and models["late"]["multi_vector"] is True
    assert models["tiny"]["engine"]["measured"]
    # one cache for all models: every model showed its whole entries as its own (3 for each here)
    assert {m: models[m]["score_cache"] for m in models} == {
        "tiny": {"max_bytes": 2**20, "shared": True, "entries": 3},
        "bi": {"max_bytes": 2**20, "shared": True, "entries": 0},
        "late": {"max_bytes": 2**20, "shared": True, "entries": 0}}
    with TestClient(create_app(config, load_models=False)) as c:
        assert check_against_openapi(c, "/v1/models")["data"][0]["tasks"] == []
        assert check_against_openapi(c, "/v1/metadata")["models"] == []
