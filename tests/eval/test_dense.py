from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from openrerank.eval.dense import EmbeddingCache, encode, find_server_embedder, model_fingerprint, search
from openrerank.wire.nim import DEFAULT_MAX_INPUTS


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    docs = _unit(rng.normal(size=(500, 16)))
    queries = _unit(rng.normal(size=(7, 16)))
    ids = [f"d{i}" for i in range(500)]
    run = search(ids, docs, [f"q{i}" for i in range(7)], queries, k=10, block=3)
    for i in range(7):
        sims = docs @ queries[i]
        expected = [f"d{j}" for j in np.argsort(-sims)[:10]]
        assert list(run[f"q{i}"]) == expected
        assert run[f"q{i}"][expected[0]] == pytest.approx(float(sims.max()), abs=1e-6)
    # k larger than the corpus returns everything, best first
    small = search(ids[:3], docs[:3], ["q"], queries[:1], k=10)
    assert len(small["q"]) == 3


def test_encode_restores_input_order() -> None:
    texts = ["ccc", "a", "bbbbbb", "dd"] * 70  # more than one chunk
    calls: list[int] = []

    def fake_embed(chunk: list[str]) -> np.ndarray:
        calls.append(len(chunk))
        return np.array([[len(t), 0.0] for t in chunk], dtype=np.float32)

    seen = []
    out = encode(fake_embed, texts, seen.append)
    assert out[:, 0].tolist() == [len(t) for t in texts]
    assert sum(seen) == len(texts) and len(calls) > 1


def test_cache_roundtrip_and_invalidation(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert cache.load("ds", "h" * 64, "m1", ["a", "b", "c"]) is None
    cache.save("ds", "h" * 64, "m1", ["a", "b", "c"], emb)
    np.testing.assert_array_equal(cache.load("ds", "h" * 64, "m1", ["a", "b", "c"]), emb)
    assert cache.load("ds", "h" * 64, "m1", ["a", "c", "b"]) is None  # other doc order
    assert cache.load("ds", "g" * 64, "m1", ["a", "b", "c"]) is None  # other corpus content
    assert cache.load("ds", "h" * 64, "m2", ["a", "b", "c"]) is None  # other model
    assert EmbeddingCache(None).load("ds", "h" * 64, "m1", ["a"]) is None


def test_model_fingerprint_follows_content_and_options(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    base = model_fingerprint(tmp_path, backend="torch-fp32-cpu", dtype="fp32", max_length=256)
    assert base == model_fingerprint(tmp_path, backend="torch-fp32-cpu", dtype="fp32", max_length=256)
    assert base != model_fingerprint(tmp_path, backend="onnx-int8-cpu", dtype="int8", max_length=256)
    assert base != model_fingerprint(tmp_path, backend="torch-fp32-cpu", dtype="fp32", max_length=128)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert base != model_fingerprint(tmp_path, backend="torch-fp32-cpu", dtype="fp32", max_length=256)


def test_server_fingerprint_follows_server_model_and_its_description() -> None:
    from openrerank.eval.dense import server_fingerprint

    meta = {"source": "default", "backend": "onnx-fp32-cpu", "max_length": 256}
    base = server_fingerprint("http://h:8000", "m", meta)
    assert base.startswith("server-") and base == server_fingerprint("http://h:8000/", "m", dict(meta))
    assert base != server_fingerprint("http://h:9000", "m", meta)
    assert base != server_fingerprint("http://h:8000", "other", meta)
    assert base != server_fingerprint("http://h:8000", "m", {**meta, "backend": "onnx-int8-cpu"})


def test_server_fingerprint_ignores_what_serving_measures() -> None:
    """The served rate moves with every batch, and with it `tokens_per_second` and `max_request_tokens`: a key
    over them re-encoded the corpus on every run against the same server."""
    from openrerank.eval.dense import server_fingerprint

    engine = {"backend": "onnx", "dtype": "fp32", "reason": "fastest", "choice": "measure", "measured": [1]}
    meta = {"source": "default", "max_length": 256, "engine": engine, "tokens_per_second": 3000.0,
            "max_request_tokens": 180000, "attention_knee": 2304, "score_cache": {"entries": 3}}
    moved = {**meta, "tokens_per_second": 2100.5, "max_request_tokens": 126000, "attention_knee": 2100,
             "score_cache": {"entries": 40}, "engine": {**engine, "measured": [2]}}
    assert server_fingerprint("http://h:8000", "m", meta) == server_fingerprint("http://h:8000", "m", moved)
    other = {**meta, "engine": {**engine, "dtype": "int8"}}
    assert server_fingerprint("http://h:8000", "m", meta) != server_fingerprint("http://h:8000", "m", other)


@pytest.mark.parametrize(("limits", "expected"), [({"max_inputs": 16}, 16), ({}, DEFAULT_MAX_INPUTS)])
def test_the_servers_max_inputs_is_read_and_the_wire_default_assumed_when_unsaid(limits, expected) -> None:
    """A server's /v1/metadata `limits.max_inputs` caps the embedding chunks; a server that does not say it gets
    the default `serve` itself applies (wire/nim.py), not a number eval keeps of its own."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "ce", "tasks": ["rerank"]},
                                                      {"id": "bi", "tasks": ["rerank", "embed"]}]})
        return httpx.Response(200, json={"models": [{"id": "bi", "max_length": 128}], "limits": limits})

    model, entry, max_inputs = find_server_embedder("http://fake", transport=httpx.MockTransport(handler))
    assert (model, entry, max_inputs) == ("bi", {"id": "bi", "max_length": 128}, expected)
