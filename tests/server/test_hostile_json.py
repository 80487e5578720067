"""No 500 from any JSON: text that is not Unicode, values that cannot be echoed, absurd nesting.

Python's JSON parser accepts all of these; each must come back as a 4xx in the dialect's own error shape
(before this was fixed, each of them answered 500 or TEI's 424).
"""

from __future__ import annotations

import pytest

from openrerank.server.errors import NIM
from openrerank.server.responses import dumps

LONE = '"\\udc00 lone"'  # raw JSON text: a lone low surrogate escape
HUGE_INT = str(2**70)


def deep(n: int) -> str:
    return '{"a": ' * n + "1" + "}" * n


# (path, raw JSON body, expected status, how to recognise the dialect's error shape)
CASES = [
    ("/v1/ranking", f'{{"query": {{"text": {LONE}}}, "passages": [{{"text": "a"}}]}}', 400, "object"),
    ("/v1/ranking", f'{{"query": {{"text": "q"}}, "passages": [{{"text": {LONE}}}]}}', 400, "object"),
    ("/v1/ranking", f'{{"model": {LONE}, "query": {{"text": "q"}}, "passages": [{{"text": "a"}}]}}', 400, "object"),
    ("/v1/rerank", f'{{"query": "q", "documents": [{LONE}]}}', 400, "message"),
    ("/v1/rerank", f'{{"query": "q", "documents": [{{"text": {LONE}}}]}}', 400, "message"),
    ("/v1/rerank", f'{{"query": "q", "documents": [{{"text": "a", {LONE}: 1}}]}}', 400, "message"),
    ("/v1/rerank", f'{{"model": {LONE}, "query": "q", "documents": ["a"]}}', 400, "message"),
    ("/v1/rerank", f'{{"query": "q", "documents": [{{"text": "a", "id": {HUGE_INT}}}], "return_documents": true}}',
     400, "message"),
    ("/v1/rerank", f'{{"query": "q", "documents": [{{"text": "a", "id": {HUGE_INT}}}]}}', 400, "message"),
    ("/v1/rerank", f'{{"query": "q", "documents": [{{"text": "a", "x": {deep(300)}}}], "return_documents": true}}',
     400, "message"),
    ("/v1/rerank", '{"query": "q", "documents": [{"text": "a", "x": 1e400}], "return_documents": true}', 400,
     "message"),
    ("/v2/rerank", f'{{"model": "tiny", "query": {LONE}, "documents": ["a"]}}', 400, "message"),
    ("/rerank", f'{{"query": "q", "texts": [{LONE}]}}', 422, "error_type"),
    ("/rerank", f'{{"query": {LONE}, "texts": ["a"]}}', 422, "error_type"),
    ("/v1/score", f'{{"text_1": {LONE}, "text_2": ["a"]}}', 400, "code"),
    ("/v1/score", f'{{"text_1": ["q", "r"], "text_2": ["a", {LONE}]}}', 400, "code"),
    ("/v1/score", f'{{"model": {LONE}, "text_1": "q", "text_2": ["a"]}}', 400, "code"),
    # the model's name was looked up (404) where every other route refuses it as text
    ("/rerank", f'{{"model": {LONE}, "query": "q", "documents": ["a"]}}', 422, "error"),
    ("/embeddings", f'{{"model": {LONE}, "input": ["a"]}}', 422, "error"),
    ("/v1/embeddings/multi_vector", f'{{"model": {LONE}, "input": ["a"], "input_type": "query"}}', 400, "object"),
    # booleans are JSON booleans: 0, 1 or "yes" is not one (pydantic's lax mode took them)
    ("/v1/rerank", '{"query": "q", "documents": ["a"], "return_documents": 0}', 400, "message"),
    ("/v2/rerank", '{"model": "tiny", "query": "q", "documents": ["a"], "return_documents": "yes"}', 400, "message"),
    ("/rerank", '{"query": "q", "texts": ["a"], "raw_scores": 1}', 422, "error_type"),
    ("/rerank", '{"query": "q", "documents": ["a"], "return_documents": 0}', 422, "error"),
    ("/v1/score", '{"text_1": "q", "text_2": ["a"], "use_activation": 0}', 400, "code"),
    # nesting deeper than Python's parser can recurse, in an ignored field and as the whole body
    ("/v1/score", '{"text_1": "q", "text_2": ["a"], "x": ' + "[" * 5000 + "]" * 5000 + "}", 400, "code"),
    ("/v1/ranking", "[" * 6000 + "]" * 6000, 400, "object"),
]


# Integers are JSON integers: pydantic's lax mode turned true into 1 and "2" into 2, so a request the OpenAPI
# document calls invalid was scored (schemathesis found top_n: false answered 200 with every result).
# (path, body, field, a value JSON does not call an integer, the integer meant, status, where the message is)
INTEGER_CASES = [
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a"}]}, "max_chunks_per_passage", "2", 2, 400,
     "message"),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}, "top_n", True, 1, 400, "message"),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}, "max_chunks_per_doc", False, 1, 400, "message"),
    ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"]}, "top_n", "1", 1, 400, "message"),
    ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"]}, "max_tokens_per_doc", "512", 512, 400,
     "message"),
    ("/rerank", {"query": "q", "documents": ["a"]}, "top_n", True, 1, 422, "error"),
    ("/v1/score", {"text_1": "q", "text_2": ["a"]}, "truncate_prompt_tokens", True, 1, 400, "message"),
    ("/score", {"text_1": "q", "text_2": ["a"]}, "truncate_prompt_tokens", "-1", -1, 400, "message"),
    ("/v1/embeddings", {"input": "q"}, "dimensions", True, 1, 400, "message"),
]


@pytest.mark.parametrize(("path", "body", "field", "bad", "good", "status", "where"), INTEGER_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in INTEGER_CASES])
def test_integer_fields_take_json_integers_only(tiny_server, path, body, field, bad, good, status, where):
    with tiny_server.client() as c:
        r = c.post(path, json={**body, field: bad})
        assert r.status_code == status, r.text
        message = r.json()["error"]["message"] if where == "error" else r.json()[where]
        assert field in message and "must be an integer" in message, message
        # the integer meant is taken (and scored; the tiny cross-encoder gives no embeddings, which is a 400)
        again = c.post(path, json={**body, field: good})
        assert "must be an integer" not in again.text, again.text
        assert again.status_code == 200 or path == "/v1/embeddings", again.text


def test_a_whole_number_written_with_a_point_is_an_integer(tiny_server):
    """JSON Schema calls 2.0 an integer; only a fractional part is refused."""
    with tiny_server.client() as c:
        ok = c.post("/v2/rerank", json={"model": "tiny", "query": "q", "documents": ["a", "b", "c"], "top_n": 2.0})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 2, ok.text
        half = c.post("/v2/rerank", json={"model": "tiny", "query": "q", "documents": ["a"], "top_n": 2.5})
        assert half.status_code == 400 and "top_n" in half.json()["message"], half.text


@pytest.mark.parametrize(("path", "body", "status", "shape"), CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_hostile_json_gets_a_4xx_in_the_dialect_shape(tiny_server, path, body, status, shape):
    with tiny_server.client() as c:
        r = c.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert shape in r.json()
    assert "internal" not in r.text


def test_an_ignored_huge_integer_is_harmless(tiny_server):
    body = f'{{"query": "q", "texts": ["a"], "extra": {HUGE_INT}}}'
    with tiny_server.client() as c:
        r = c.post("/rerank", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200


def test_error_bodies_always_render():
    # a message quoting client text with a lone surrogate (e.g. an unknown model's name) still renders
    resp = NIM.response(404, "Model '\udc00' is not served here", "model_not_found")
    assert resp.status_code == 404 and b"\\\\udc00" in resp.body
    # a value orjson refuses falls back to the standard encoder instead of failing the answer
    assert dumps({"n": 2**70}) == b'{"n": 1180591620717411303424}'


def test_only_the_values_orjson_refuses_fall_back():
    """Any other object orjson cannot encode is a bug that must surface (a logged 500), not a body quietly written
    by the standard encoder (whose `default` renders anything with a `tolist`: arrays, tensors)."""
    import array

    with pytest.raises(TypeError):  # orjson.JSONEncodeError is a TypeError
        dumps({"leaked": array.array("f", [0.5])})



# The hostile matrix: every field of a valid request of every dialect replaced by each hostile value.
VALID = {
    "/v1/ranking": {"model": "tiny", "query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "END"},
    "/v1/rerank": {"model": "tiny", "query": "q", "documents": ["a", {"text": "b"}], "top_n": 1,
                   "return_documents": True, "max_chunks_per_doc": 2},
    "/v2/rerank": {"model": "tiny", "query": "q", "documents": ["a"], "top_n": 1, "max_tokens_per_doc": 10},
    "/rerank": {"query": "q", "texts": ["a"], "truncate": True, "raw_scores": False, "return_text": True},
    "/v1/score": {"model": "tiny", "text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": -1},
    "/v1/embeddings": {"model": "tiny", "input": ["a"], "encoding_format": "float", "dimensions": 8},
}
HOSTILE = [None, 0, -1, 2**70, 1.5, "", "\udc00", "x" * 3000, [], [None], {}, {"text": 1}, True, [[[[]]]]]
MATRIX = [(path, field, value) for path, body in VALID.items() for field in body for value in HOSTILE]


def test_the_hostile_matrix_gets_no_5xx_and_every_answer_in_its_dialect_shape(tiny_server):
    """What the issue's probe sent (441 requests, one of them a 500) as a test: each request must get a JSON
    answer below 500. Encoded with the standard library, which writes lone surrogates as escapes."""
    import json

    failures = []
    with tiny_server.client() as c:
        for path, field, value in MATRIX:
            body = json.dumps({**VALID[path], field: value}).encode()
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            if r.status_code >= 500 or not r.headers.get("content-type", "").startswith("application/json"):
                failures.append((path, field, repr(value)[:40], r.status_code, r.text[:200]))
    assert not failures, failures
    assert len(MATRIX) > 300
