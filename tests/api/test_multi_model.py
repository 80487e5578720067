"""Several models behind one server: choose by `model`, list them, refuse unknown names, ready when all load."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from openrerank.serve_process import free_port
from tests.api.conftest import DEFAULT_ID
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


def test_ready_only_when_every_model_loaded(tmp_path, tiny_model_dir):
    """A second model that cannot load is never half-served: /v1/health/ready stays 503 until the failure,
    then the whole server stops with exit status 3 and one error line naming the model (an orchestrator
    restarts it; a server stuck at 503 forever helps nobody)."""
    broken = build_tiny_model(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # passes preflight, fails to load
    args = ["--model", f"tiny={tiny_model_dir}", "--model", f"broken={broken}"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openrerank", "serve", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    ready_codes: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None:
            try:
                ready_codes.add(httpx.get(url + "/v1/health/ready", timeout=2).status_code)
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the broken model never stopped the server"
            time.sleep(0.1)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 3, stderr[-2000:]
    assert 200 not in ready_codes  # never ready with one model missing
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "model loading failed: broken:" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
