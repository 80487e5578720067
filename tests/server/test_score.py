"""vLLM score dialect: the pure converters, then /v1/score and /score over HTTP."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from openrerank.core.requests import RerankResult, ScoreKind, Truncate
from openrerank.engine.errors import UnknownModelError
from openrerank.server import http_answers
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.dialects import score as dialect
from openrerank.server.errors import FAILURES, ApiError
from openrerank.wire.score import ScoreRequest

# -- converters ----------------------------------------------------------------------------------


def test_one_to_many():
    plan = dialect.to_internal(ScoreRequest(text_1="q", text_2=["a", "b", "c"]))
    assert len(plan.requests) == 1 and plan.requests[0].query == "q"
    assert plan.requests[0].passages == ["a", "b", "c"] and plan.requests[0].truncate is Truncate.NONE
    assert plan.pairs == [(0, 0), (0, 1), (0, 2)]


def test_pairwise_groups_by_distinct_text_1():
    plan = dialect.to_internal(ScoreRequest(text_1=["q1", "q2", "q1"], text_2=["a", "b", "c"], model="m"))
    assert [(r.query, r.passages, r.model) for r in plan.requests] == [("q1", ["a", "c"], "m"), ("q2", ["b"], "m")]
    assert plan.pairs == [(0, 0), (1, 0), (0, 1)]


def test_broadcast_and_one_to_one():
    assert dialect.to_internal(ScoreRequest(text_1=["q"], text_2=["a", "b"])).pairs == [(0, 0), (0, 1)]
    plan = dialect.to_internal(ScoreRequest(text_1="q", text_2="a"))
    assert plan.pairs == [(0, 0)] and plan.requests[0].passages == ["a"]


#: vLLM's other ScoreRequest forms (ScoreQueriesDocumentsRequest, ScoreQueriesItemsRequest, ScoreDataRequest).
VLLM_FORMS = [("queries", "documents"), ("queries", "items"), ("data_1", "data_2")]


@pytest.mark.parametrize(("first", "second"), VLLM_FORMS)
def test_vllm_forms_are_text_1_and_text_2(first, second):
    """vLLM takes these besides text_1/text_2 (each side a string or a list); they were a 400 'text_1 is required'."""
    plan = dialect.to_internal(ScoreRequest(**{first: "q", second: ["a", "b"]}))
    assert [(r.query, r.passages) for r in plan.requests] == [("q", ["a", "b"])] and plan.pairs == [(0, 0), (0, 1)]
    plan = dialect.to_internal(ScoreRequest.model_validate({first: ["q1", "q2"], second: ["a", "b"]}))
    assert [(r.query, r.passages) for r in plan.requests] == [("q1", ["a"]), ("q2", ["b"])]
    with pytest.raises(ApiError) as err:
        dialect.to_internal(ScoreRequest(**{first: "q", second: []}))
    assert f"{second}: at least one" in err.value.message


@pytest.mark.parametrize(("body", "fragment"), [
    ({"text_1": "q", "text_2": "a", "queries": "q", "documents": "a"}, "it sends text_1, text_2, queries, documents"),
    ({"queries": "q", "documents": "a", "items": "b"}, "it sends queries, documents, items"),
    ({"text_1": "q", "data_2": "a"}, "it sends text_1, data_2"),
    ({"queries": "q"}, "field 'documents' or 'items' is required with 'queries'"),
    ({"data_2": "a"}, "field 'data_1' is required with 'data_2'"),
    ({}, "field 'text_1' is required"),
])
def test_a_body_in_no_form_or_two_is_refused_naming_them(body, fragment):
    with pytest.raises(ValidationError) as err:
        ScoreRequest.model_validate(body)
    assert fragment in str(err.value)


@pytest.mark.parametrize(("t1", "t2", "fragment"), [
    (["a", "b", "c"], ["x", "y"], "1:1, 1:N or N:N"),
    (["a", "b"], "x", "1:1, 1:N or N:N"),
    ([], ["x"], "text_1"),
    ("q", [], "text_2"),
])
def test_invalid_shapes(t1, t2, fragment):
    with pytest.raises(ApiError) as err:
        dialect.to_internal(ScoreRequest(text_1=t1, text_2=t2))
    assert err.value.status == 400 and fragment in err.value.message


def test_truncate_prompt_tokens():
    assert dialect.to_internal(ScoreRequest(text_1="q", text_2="a", truncate_prompt_tokens=-1)).requests[0].truncate \
        is Truncate.END
    req = dialect.to_internal(ScoreRequest(text_1="q", text_2="a", truncate_prompt_tokens=16)).requests[0]
    assert req.truncate is Truncate.END and req.max_tokens_per_passage == 16


def test_result_to_wire_pair_order_and_activation():
    plan = dialect.to_internal(ScoreRequest(text_1=["q1", "q2", "q1"], text_2=["a", "b", "c"]))
    results = [RerankResult("m", np.asarray([1.0, -2.0], np.float32), 5, ScoreKind.LOGIT),
               RerankResult("m", np.asarray([0.0], np.float32), 3, ScoreKind.LOGIT)]
    wire = dialect.result_to_wire(plan, results, activation=True, model="m", request_id="score-1", created=7)
    assert wire["id"] == "score-1" and wire["object"] == "list" and wire["created"] == 7 and wire["model"] == "m"
    assert [d["index"] for d in wire["data"]] == [0, 1, 2]
    assert [d["score"] for d in wire["data"]] == pytest.approx([1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(2))])
    assert all(d["object"] == "score" for d in wire["data"])
    assert wire["usage"] == {"prompt_tokens": 8, "total_tokens": 8, "completion_tokens": 0}
    raw = dialect.result_to_wire(plan, results, activation=False, model="m")
    assert [d["score"] for d in raw["data"]] == [1.0, 0.0, -2.0]


def test_use_activation_and_legacy_aliases():
    """vLLM's get_use_activation: softmax, then activation, then use_activation (softmax was ignored)."""
    def wants(**flags: bool) -> bool:
        return ScoreRequest(text_1="q", text_2="a", **flags).wants_activation()
    assert wants() is True
    assert wants(use_activation=False) is False and wants(activation=False) is False
    assert wants(softmax=False) is False
    assert wants(softmax=True, activation=False, use_activation=False) is True
    assert wants(softmax=False, use_activation=True) is False
    assert wants(activation=True, use_activation=False) is True


# -- over HTTP (tiny cross-encoder, window 128, --max-passages 8) ---------------------------------------


def assert_score_error(resp: httpx.Response, status: int, *fragments: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["object"] == "error" and body["code"] == status and body["type"], body
    for frag in fragments:
        assert frag in body["message"], body["message"]


@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_one_to_many_matches_nim(tiny_server, path):
    texts = ["banana fruit", "paris is the capital", "the sea"]
    with tiny_server.client() as c:
        r = c.post(path, json={"model": "tiny", "text_1": "paris", "text_2": texts})
        raw = c.post(path, json={"text_1": "paris", "text_2": texts, "use_activation": False})
        legacy = c.post(path, json={"text_1": "paris", "text_2": texts, "softmax": False})
        nim = c.post("/v1/ranking", json={"query": {"text": "paris"}, "passages": [{"text": t} for t in texts]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["model"] == "tiny" and body["id"].startswith("score-")
    assert [d["index"] for d in body["data"]] == [0, 1, 2]  # pair order, not sorted
    logits = {x["index"]: x["logit"] for x in nim.json()["rankings"]}
    assert [d["score"] for d in raw.json()["data"]] == pytest.approx([logits[i] for i in range(3)], abs=1e-5)
    assert [d["score"] for d in legacy.json()["data"]] == [d["score"] for d in raw.json()["data"]]
    assert [d["score"] for d in body["data"]] == pytest.approx(
        [1 / (1 + math.exp(-logits[i])) for i in range(3)], abs=1e-6)
    assert body["usage"]["prompt_tokens"] == nim.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("first", "second"), VLLM_FORMS)
def test_vllm_forms_over_http(tiny_server, first, second):
    texts = ["paris is the capital", "the sea"]
    with tiny_server.client() as c:
        ref = c.post("/v1/score", json={"text_1": "paris", "text_2": texts})
        r = c.post("/v1/score", json={first: "paris", second: texts})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == ref.json()["data"] and r.json()["usage"] == ref.json()["usage"]


def test_pairwise_equals_separate_requests(tiny_server):
    t1 = ["paris", "banana", "paris"]
    t2 = ["paris is the capital", "yellow fruit", "the sea"]
    with tiny_server.client() as c:
        pairwise = c.post("/v1/score", json={"text_1": t1, "text_2": t2, "use_activation": False}).json()
        single = [c.post("/v1/score", json={"text_1": a, "text_2": b, "use_activation": False}).json()
                  for a, b in zip(t1, t2, strict=True)]
    assert [d["score"] for d in pairwise["data"]] == pytest.approx([s["data"][0]["score"] for s in single], abs=1e-5)
    assert pairwise["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"text_1": ["a", "b", "c"], "text_2": ["x", "y"]}, 400, "1:1, 1:N or N:N"),
    ({"text_1": "q", "text_2": []}, 400, "text_2"),
    ({"text_1": 5, "text_2": ["a"]}, 400, "text_1"),
    ({"text_2": ["a"]}, 400, "text_1"),
    ({"text_1": "q", "text_2": [None]}, 400, "text_2"),
    ({"text_1": "q", "text_2": ["a"], "model": "nope"}, 404, "served models: tiny"),
    ({"text_1": "q", "text_2": ["a"] * 9}, 400, "exceeds the maximum of 8"),
    ({"text_1": "paris", "text_2": [" ".join(["paris banana"] * 100)]}, 400, "exceeds maximum allowed token size"),
    ({"text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
    ({"text_1": "q", "text_2": "a", "queries": "q", "documents": "a"}, 400, "mixes vLLM's score forms"),
    ({"queries": "q"}, 400, "'documents' or 'items' is required"),
    ({"queries": "q", "documents": ["a"] * 9}, 400, "exceeds the maximum of 8"),
    ({"data_1": "q", "data_2": [5]}, 400, "data_2"),
    ({"text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": 129}, 400,
     "truncate_prompt_tokens value (129) is greater than max_model_len (128)"),
])
def test_bad_input_in_vllm_shape(tiny_server, body, status, fragment):
    with tiny_server.client() as c:
        assert_score_error(c.post("/v1/score", json=body), status, fragment)


def test_truncate_prompt_tokens_over_http(tiny_server):
    long = " ".join(["paris banana"] * 100)
    with tiny_server.client() as c:
        r = c.post("/score", json={"text_1": "paris", "text_2": [long, "sea"], "truncate_prompt_tokens": -1})
        window = c.post("/score", json={"text_1": "paris", "text_2": [long], "truncate_prompt_tokens": 128})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert window.status_code == 200, window.text  # the window itself is not over it


def test_id_is_score_and_the_callers_request_id(tiny_server):
    """vLLM answers `score-{X-Request-Id}`; the id was a new uuid whatever the header said."""
    with tiny_server.client() as c:
        given = c.post("/v1/score", json={"text_1": "q", "text_2": "a"}, headers={"X-Request-Id": "myid123"})
        made = c.post("/score", json={"text_1": "q", "text_2": "a"})
    assert given.status_code == 200, given.text
    assert given.json()["id"] == "score-myid123" and given.headers["x-request-id"] == "myid123"
    assert made.json()["id"] == f"score-{made.headers['x-request-id']}"


@pytest.mark.parametrize(("body", "message"), [
    ({"text_1": 5, "text_2": ["x"]}, "text_1: must be a string or a list of strings"),
    ({"queries": {"a": 1}, "items": ["x"]}, "queries: must be a string or a list of strings"),
    ({"data_1": "q", "data_2": None, "items": 5}, "items: must be a string or a list of strings"),
    ({"text_1": ["a", 5], "text_2": ["x"]}, "text_1.1: Input should be a valid string"),
    ({"text_1": "q\ud800", "text_2": ["x"]},
     "text_1: text holds a lone UTF-16 surrogate (\\ud800 at character 1), which is not valid Unicode"),
])
@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_a_text_field_of_the_wrong_kind_is_named_with_what_it_takes(path, body, message):
    """pydantic names each branch of a union by its schema: the answer read `text_1.function-after[valid_text(),
    str]: Input should be a valid string; text_1.list[function-after[valid_text(), str]]: Input should be a valid
    list`. A value of a branch's kind (a list) is told only that branch's errors."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})  # \ud800 escaped
    assert r.status_code == 400 and r.json()["message"] == message, r.text


def test_malformed_json(tiny_server):
    with tiny_server.client() as c:
        r = c.post("/score", content=b'{"text_1": ', headers={"content-type": "application/json"})
    assert_score_error(r, 400, "JSON")


def test_engine_errors_map_to_vllm_shape():
    busy = dialect.SCORE.response(503, "server overloaded", "overloaded")
    assert busy.status_code == 503
    assert dialect.score_error_body(503, "server overloaded", "overloaded") == {
        "object": "error", "message": "server overloaded", "type": "ServiceUnavailableError", "param": None,
        "code": 503}
    unknown = FAILURES[UnknownModelError]  # the status an unknown model comes with, which vLLM's shape keeps
    assert dialect.SCORE.response(unknown.status, "x", unknown.kind).status_code == 404


def test_no_client_error_is_typed_as_a_server_error():
    """405 and 431 were typed InternalServerError (the table's fallback): every 4xx is a client error type."""
    for status in range(400, 500):
        assert dialect.error_type(status) != "InternalServerError", status
    assert dialect.error_type(400) == dialect.error_type(405) == dialect.error_type(431) == "BadRequestError"
    assert dialect.error_type(404) == "NotFoundError" and dialect.error_type(500) == "InternalServerError"
    head = http_answers.headers_too_large(b"POST /v1/score HTTP/1.1\r\nx-pad: aaaa", 8)
    assert b'"type":"BadRequestError"' in head and b'"code":431' in head


def test_a_wrong_method_is_a_client_error_in_vllm_shape():
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        for path in ("/v1/score", "/score"):
            r = c.put(path, json={})
            assert_score_error(r, 405)
            assert r.json()["type"] == "BadRequestError"
