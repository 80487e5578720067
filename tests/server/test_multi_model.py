"""Several models behind one server: choose by `model`, list them, refuse unknown names, ready when all load."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from openrerank_bench.serve_process import free_port

from tests.server.conftest import DEFAULT_ID
from tests.support import build_tiny_model

PASSAGES = ["paris is the capital of france", "bananas are yellow", "the sea is deep"]


def test_models_lists_both_in_order(multi_server):
    with multi_server.client() as c:
        data = c.get("/v1/models").json()["data"]
        meta = c.get("/v1/metadata").json()
    assert [m["id"] for m in data] == [DEFAULT_ID, "tiny"]
    assert {m["id"] for m in meta["models"]} == {DEFAULT_ID, "tiny"}


def _nim(c, model):
    body = {"query": {"text": "capital of france"}, "passages": [{"text": p} for p in PASSAGES]}
    if model:
        body["model"] = model
    return c.post("/v1/ranking", json=body).json()["rankings"]


def test_each_dialect_routes_by_model(multi_server):
    with multi_server.client() as c:
        default = {r["index"]: r["logit"] for r in _nim(c, DEFAULT_ID)}
        tiny = {r["index"]: r["logit"] for r in _nim(c, "tiny")}
        assert {r["index"]: r["logit"] for r in _nim(c, None)} == default  # omitted: the first model
        assert default != pytest.approx(tiny, abs=1e-3)
        for model, expected in ((DEFAULT_ID, default), ("tiny", tiny)):
            co = c.post("/v2/rerank", json={"model": model, "query": "capital of france", "documents": PASSAGES})
            assert co.json()["model"] == model
            tei = c.post("/rerank", json={"model": model, "query": "capital of france", "texts": PASSAGES,
                                          "raw_scores": True}).json()
            assert {r["index"]: r["score"] for r in tei} == pytest.approx(expected, abs=1e-4)
            sc = c.post("/v1/score", json={"model": model, "text_1": "capital of france", "text_2": PASSAGES,
                                           "use_activation": False}).json()
            assert sc["model"] == model
            assert [d["score"] for d in sc["data"]] == pytest.approx([expected[i] for i in range(3)], abs=1e-4)


@pytest.mark.parametrize(("path", "body", "status", "shape"), [
    ("/v1/ranking", {"model": "nope", "query": {"text": "q"}, "passages": [{"text": "a"}]}, 404, "message"),
    ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "message"),
    ("/v2/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "message"),
    ("/rerank", {"model": "nope", "query": "q", "texts": ["a"]}, 422, "error"),
    ("/v1/score", {"model": "nope", "text_1": "q", "text_2": ["a"]}, 404, "message"),
])
def test_unknown_model_lists_served_ids_in_dialect_shape(multi_server, path, body, status, shape):
    with multi_server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    message = r.json()[shape]
    assert "'nope'" in message and DEFAULT_ID in message and "tiny" in message


@pytest.mark.parametrize(("path", "body", "shape"), [
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "a"}]}, {"object", "message", "type"}),
    ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"]}, {"message"}),
    ("/rerank", {"query": "q", "texts": ["a"]}, {"error", "error_type"}),
    ("/v1/score", {"text_1": "q", "text_2": ["a"]}, {"object", "message", "type", "param", "code"}),
])
def test_api_key_required_in_dialect_shape(multi_server, path, body, shape):
    r = httpx.post(multi_server.url + path, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and set(r.json()) == shape
    assert httpx.get(multi_server.url + "/health").status_code == 200  # health stays public


def test_a_second_model_that_cannot_load_stops_the_server(tmp_path, tiny_model_dir):
    """No zombie that answers 503 forever: the server exits non-zero with one clear line, so a supervisor
    restarts it or shows why (`--allow-partial` serves the models that load: tests/server/test_limits.py)."""
    broken = build_tiny_model(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # passes preflight, fails to load
    args = ["--model", f"tiny={tiny_model_dir}", "--model", f"broken={broken}"]
    done = subprocess.run([sys.executable, "-m", "openrerank", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1].startswith("openrerank: error: model broken could not be loaded")
