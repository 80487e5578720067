"""NIM /v1/ranking and its companion endpoints, through a real server process over HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from tests.server.faults import until
from tests.server.test_shutdown import in_flight
from tests.support import nim_body, run_server

ALLOWED = "model, query, passages, truncate"


def assert_nim_error(resp: httpx.Response, status: int, *fragments: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["object"] == "error"
    assert isinstance(body["message"], str) and body["message"]
    for frag in fragments:
        assert frag in body["message"], body["message"]
    return body


def test_ranking_shape_and_order(tiny_server):
    with tiny_server.client() as c:
        r = c.post("/v1/ranking", json=nim_body("paris capital", ["banana fruit", "paris is the capital", "sea"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rankings", "usage"}
    ranks = body["rankings"]
    assert sorted(x["index"] for x in ranks) == [0, 1, 2]
    assert all(set(x) == {"index", "logit"} for x in ranks)
    logits = [x["logit"] for x in ranks]
    assert logits == sorted(logits, reverse=True)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    for h in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(r.headers[h]) >= 0


def test_model_field_named_or_omitted(tiny_server):
    with tiny_server.client() as c:
        named = c.post("/v1/ranking", json=nim_body("q", ["a", "b"], model="tiny"))
        omitted = c.post("/v1/ranking", json=nim_body("q", ["a", "b"]))
        wrong = c.post("/v1/ranking", json=nim_body("q", ["a", "b"], model="nvidia/nv-rerankqa-mistral-4b-v3"))
    assert named.status_code == omitted.status_code == 200
    assert named.json() == omitted.json()
    assert 400 <= wrong.status_code < 500
    assert_nim_error(wrong, wrong.status_code, "tiny")


def test_usage_counts_scored_tokens(tiny_server):
    with tiny_server.client() as c:
        one = c.post("/v1/ranking", json=nim_body("paris", ["banana"])).json()["usage"]["prompt_tokens"]
        two = c.post("/v1/ranking", json=nim_body("paris", ["banana", "banana"])).json()["usage"]["prompt_tokens"]
    assert one == 5  # [CLS] paris [SEP] banana [SEP]
    assert two == 2 * one


def test_truncate_none_rejects_overlong_pair_end_cuts(tiny_server):
    long_passage = " ".join(["river"] * 300)
    with tiny_server.client() as c:
        none = c.post("/v1/ranking", json=nim_body("paris", ["sea", long_passage], truncate="NONE"))
        default = c.post("/v1/ranking", json=nim_body("paris", ["sea", long_passage]))
        end = c.post("/v1/ranking", json=nim_body("paris", ["sea", long_passage], truncate="END"))
    # 422 since NIM 1.9.1 (400 before), with NIM's message
    body = assert_nim_error(none, 422, "Input length 304 exceeds maximum allowed token size 128")
    assert body["message"] == "Input length 304 exceeds maximum allowed token size 128"
    assert default.status_code == 422
    assert end.status_code == 200
    # END keeps the query and cuts the passage: the long pair is scored on exactly 128 tokens.
    assert end.json()["usage"]["prompt_tokens"] == 5 + 128


@pytest.mark.parametrize(
    ("payload", "fragments"),
    [
        ({"passages": [{"text": "a"}]}, ["query", "required"]),
        ({"query": {"text": "q"}}, ["passages", "required"]),
        ({"query": {"text": "q"}, "passages": []}, ["passages"]),
        ({"query": {"text": ""}, "passages": [{"text": "a"}]}, ["query.text"]),
        ({"query": {"text": "q"}, "passages": [{"text": ""}]}, ["passages.0.text"]),
        ({"query": {"text": 5}, "passages": [{"text": "a"}]}, ["query.text", "string"]),
        ({"query": "q", "passages": [{"text": "a"}]}, ["query"]),
        ({"query": {"text": "q"}, "passages": ["a"]}, ["passages.0"]),
        ({"query": {"text": "q"}, "passages": {"text": "a"}}, ["passages"]),
        ({"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "START"}, ["truncate"]),
        ({"query": {"text": "q"}, "passages": [{"text": "a"}], "top_n": 3}, ["'top_n'", ALLOWED]),
        ({"query": {"text": "q"}, "passages": [{"text": "a", "id": 1}]}, ["passages.0.id"]),
        ({"query": {"text": "q"}, "passages": [{"text": "a"}], "model": 3}, ["model"]),
        ([1, 2], ["valid"]),
    ],
)
def test_bad_input_is_400_in_nim_shape(tiny_server, payload, fragments):
    with tiny_server.client() as c:
        r = c.post("/v1/ranking", json=payload)
    assert_nim_error(r, 400, *fragments)


def test_malformed_and_non_utf8_bodies(tiny_server):
    with tiny_server.client() as c:
        assert_nim_error(c.post("/v1/ranking", content=b'{"query": '), 400, "not valid JSON")
        bad = '{"query": {"text": "caf\xe9"}, "passages": [{"text": "a"}]}'.encode("latin-1")
        assert_nim_error(c.post("/v1/ranking", content=bad), 400, "UTF-8")
        assert_nim_error(c.post("/v1/ranking", content=b""), 400)


def test_form_content_type_is_read_as_json(tiny_server):
    """`curl -d` sends application/x-www-form-urlencoded; the README's curl example must work."""
    body = json.dumps(nim_body("paris", ["a", "b"]))
    with tiny_server.client() as c:
        r = c.post("/v1/ranking", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


def test_limits_passages_and_body_size(tiny_server):
    with tiny_server.client() as c:
        too_many = c.post("/v1/ranking", json=nim_body("q", ["a"] * 9))
        at_limit = c.post("/v1/ranking", json=nim_body("q", ["a"] * 8))
        too_big = c.post("/v1/ranking", json=nim_body("q", ["x" * 30000]))
    assert_nim_error(too_many, 400, "9", "8")
    assert at_limit.status_code == 200
    assert_nim_error(too_big, 413, "20000")


def test_unknown_route_and_method(tiny_server):
    with tiny_server.client() as c:
        assert c.get("/v1/nothing").status_code == 404
        assert c.get("/v1/ranking").status_code == 405


def test_models_health_metadata_docs(tiny_server):
    with tiny_server.client() as c:
        models = c.get("/v1/models").json()
        live = c.get("/v1/health/live")
        ready = c.get("/v1/health/ready")
        meta = c.get("/v1/metadata").json()
        docs = c.get("/docs")
        spec = c.get("/openapi.json").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model"
    assert live.json() == {"object": "health.response", "message": "Service is live.", "status": "live"}
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert meta["models"][0]["family"] == "cross-encoder" and meta["models"][0]["score"] == "logit"
    assert meta["models"][0]["max_length"] == 128
    assert docs.status_code == 200
    assert "/v1/ranking" in spec["paths"]


def test_metrics_count_requests_passages_tokens(tiny_server):
    with tiny_server.client() as c:
        c.post("/v1/ranking", json=nim_body("paris", ["a", "b", "c"]))
        c.post("/v1/ranking", json={"bad": 1})
        text = c.get("/v1/metrics").text
    assert 'openrerank_requests_total{protocol="http",route="/v1/ranking",status="200"}' in text
    assert 'openrerank_requests_total{protocol="http",route="/v1/ranking",status="400"}' in text
    assert 'openrerank_passages_total{model="tiny"}' in text
    assert 'openrerank_tokens_total{model="tiny",task="rerank"}' in text
    assert "openrerank_request_duration_seconds_bucket" in text
    assert "openrerank_requests_in_flight" in text


def test_health_and_metrics_answer_while_scoring(tmp_path, tiny_model_dir):
    """Model work runs off the event loop: health and metrics answer while a big request is scored.

    One pair per batch on the torch engine makes the big request take seconds, whatever the machine."""
    passages = [" ".join(["river water sea"] * 40)] * 512
    args = ["--model", str(tiny_model_dir), "--backend", "torch", "--max-batch-size", "1"]
    with run_server(args, tmp_path) as server, server.client() as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            big = pool.submit(c.post, "/v1/ranking", json=nim_body("paris", passages, truncate="END"))
            probes: list[tuple[float, int]] = []
            while not big.done():
                h0 = time.perf_counter()
                status = httpx.get(f"{server.url}/v1/health/live", timeout=10).status_code
                metrics = httpx.get(f"{server.url}/v1/metrics", timeout=10).status_code
                probes.append((time.perf_counter() - h0, status + metrics))
            assert big.result().status_code == 200
        depth = c.get("/v1/metrics").text
    answered_during = probes[:-1]  # the last probe may have straddled the end of the big request
    assert len(answered_during) >= 3, f"only {len(probes)} probes while scoring"
    assert all(total == 400 for _, total in answered_during)
    assert max(t for t, _ in answered_during) < 2.0
    assert "openrerank_batch_size_count" in depth


def test_api_key(tmp_path, tiny_model_dir):
    with run_server(["--model", str(tiny_model_dir)], tmp_path, api_key="s3cret") as server:
        anon = httpx.Client(base_url=server.url, timeout=30)
        assert anon.get("/v1/health/live").status_code == 200
        assert anon.get("/v1/health/ready").status_code == 200
        assert_nim_error(anon.post("/v1/ranking", json=nim_body("q", ["a"])), 401, "API key")
        assert anon.get("/v1/models").status_code == 401
        wrong = anon.post("/v1/ranking", json=nim_body("q", ["a"]), headers={"Authorization": "Bearer nope"})
        assert_nim_error(wrong, 401)
        assert wrong.headers["www-authenticate"] == "Bearer"
        # RFC 7235: the scheme name is case-insensitive; the key itself is not, and another scheme is refused
        for header, status in (("bearer s3cret", 200), ("BEARER s3cret", 200), ("Bearer S3CRET", 401),
                               ("Basic s3cret", 401), ("s3cret", 401), ("Bearers3cret", 401)):
            r = anon.post("/v1/ranking", json=nim_body("q", ["a"]), headers={"Authorization": header})
            assert r.status_code == status, header
        with server.client() as c:
            assert c.post("/v1/ranking", json=nim_body("q", ["a"])).status_code == 200
            assert c.get("/v1/models").status_code == 200


def test_ready_is_503_until_loaded_and_graceful_shutdown(tmp_path, tiny_model_dir):
    """SIGINT lets the in-flight request finish before the process exits."""
    import signal

    passages = [f"{i} " + " ".join(["river water sea"] * 40) for i in range(256)]  # all scored: none the same
    with run_server(["--model", str(tiny_model_dir), "--max-batch-size", "2"], tmp_path) as server:
        with concurrent.futures.ThreadPoolExecutor(1) as pool, server.client() as c, server.client() as probe:
            fut = pool.submit(c.post, "/v1/ranking", json=nim_body("paris", passages, truncate="END"))
            # the request has arrived (it and this metrics request in flight): a fixed sleep raced it under load
            until(lambda: in_flight(probe) >= 2 or fut.done(), "the request to arrive")
            server.proc.send_signal(signal.SIGINT)
            resp = fut.result(timeout=120)
        assert resp.status_code == 200
        assert len(resp.json()["rankings"]) == 256
        server.proc.wait(timeout=60)
