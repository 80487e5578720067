"""`POST /v1/embeddings` against real servers: OpenAI's shape, NIM's extensions, every error, parity with
sentence-transformers, and batching across concurrent requests through the model's one scheduler."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from tests.server.conftest import API_KEY, DEFAULT_ID
from tests.support import build_tiny_bi_encoder, run_server

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Bananas are a yellow fruit rich in potassium.",
    "The Pacific is the largest ocean on Earth, covering about a third of its surface.",
    "berlin",
    "Photosynthesis turns light into chemical energy; plants, algae and some bacteria do it. " * 3,
    "¿Dónde está la estación de tren? 駅はどこですか。",
]
LONG = " ".join(f"sentence {i} about rivers, mountains and the sea." for i in range(80))  # ~800 tokens
PROMPTS = {"query": "query: ", "passage": "passage: "}


def post(server, body: dict, **kw) -> httpx.Response:
    with server.client(**kw) as c:
        return c.post("/v1/embeddings", json=body)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    from openrerank.sources.source import default_model_dir

    return SentenceTransformer(str(default_model_dir()), device="cpu")


@pytest.fixture(scope="module")
def tiny_bi_dir(tmp_path_factory):
    """An embedding model with query/passage prompts, Matryoshka tags and no Normalize module."""
    return build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-bi") / "model", prompts=PROMPTS, matryoshka=True)


@pytest.fixture(scope="module")
def tiny_bi_server(tmp_path_factory, tiny_bi_dir):
    """Small --max-inputs and token budget; a batch waits 150 ms for company so concurrent requests meet."""
    args = ["--model", f"tiny-bi={tiny_bi_dir}", "--max-inputs", "4", "--batch-wait-ms", "150",
            "--max-request-tokens", "200"]
    with run_server(args, tmp_path_factory.mktemp("tiny-bi-server")) as server:
        yield server


# -- the default model ----------------------------------------------------------------------------


def test_openai_shape_usage_and_timing_headers(default_server):
    from transformers import AutoTokenizer

    from openrerank.sources.source import default_model_dir

    r = post(default_server, {"input": TEXTS[:3], "model": DEFAULT_ID})
    body = r.json()
    assert body["object"] == "list" and body["model"] == DEFAULT_ID
    assert [set(d) for d in body["data"]] == [{"object", "index", "embedding"}] * 3
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    tokens = sum(len(ids) for ids in tok(TEXTS[:3])["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert float(r.headers["x-inference-time"]) > 0 and "x-queue-time" in r.headers


def test_a_string_is_one_text_and_model_defaults_to_the_embedding_model(default_server):
    one = vectors(post(default_server, {"input": TEXTS[1]}))
    listed = vectors(post(default_server, {"input": TEXTS, "model": DEFAULT_ID}))
    assert one.shape == (1, 384)
    np.testing.assert_allclose(one[0], listed[1], atol=1e-6)  # batched with others or alone: same vector


def test_parity_with_sentence_transformers_encode(default_server, sentence_transformer):
    texts = [*TEXTS, LONG]
    ours = vectors(post(default_server, {"input": texts, "truncate": "END"}))
    ref = sentence_transformer.encode(texts, convert_to_numpy=True)
    assert cosines(ours, ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the model's Normalize module


def test_base64_decodes_to_the_same_floats(default_server):
    floats = vectors(post(default_server, {"input": TEXTS, "encoding_format": "float"}))
    r = post(default_server, {"input": TEXTS, "encoding_format": "base64"})
    encoded = [d["embedding"] for d in r.json()["data"]]
    assert all(isinstance(e, str) for e in encoded)
    decoded = np.stack([np.frombuffer(base64.b64decode(e), dtype="<f4") for e in encoded])
    np.testing.assert_array_equal(decoded, floats)


def test_truncate_none_refuses_an_over_long_text_as_nim_does(default_server, sentence_transformer):
    r = post(default_server, {"input": ["short", LONG]})
    assert r.status_code == 400
    body = r.json()
    assert body["object"] == "error"
    assert body["message"].startswith("Input length ") and "exceeds maximum allowed token size 256" in body["message"]
    end = vectors(post(default_server, {"input": [LONG], "truncate": "END"}))
    start = vectors(post(default_server, {"input": [LONG], "truncate": "START"}))
    assert cosines(end, sentence_transformer.encode([LONG])).min() >= 0.9999  # ST keeps the first 256 tokens
    assert cosines(end, start)[0] < 0.999  # START kept the other end


def test_input_type_is_a_no_op_for_a_model_without_prompts(default_server):
    plain = vectors(post(default_server, {"input": TEXTS[:2]}))
    for extra in ({"input_type": "query"}, {"input_type": "passage"}, {"model": f"{DEFAULT_ID}-query"},
                  {"user": "someone", "modality": "text", "embedding_type": "float"}):
        np.testing.assert_allclose(vectors(post(default_server, {"input": TEXTS[:2], **extra})), plain, atol=1e-6)


def test_dimensions_of_the_model_itself_are_accepted(default_server):
    assert vectors(post(default_server, {"input": "x", "dimensions": 384})).shape == (1, 384)


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"input": []}, 400, "input is empty"),
    ({"input": ""}, 400, "input[0] is an empty string"),
    ({"input": ["a", ""]}, 400, "input[1] is an empty string"),
    ({"input": [101, 2003, 102]}, 400, "token ids is not supported"),
    ({"input": [[101, 102], [101, 2003, 102]]}, 400, "token ids is not supported"),
    ({"input": {"text": "x"}}, 400, "must be a string or a list of strings, not an object"),
    ({"input": ["a", 3]}, 400, "input[1] must be a string, not a number"),
    ({"model": DEFAULT_ID}, 400, "field 'input' is required"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "truncate": "CHUNK"}, 400, "truncate"),
    ({"input": "x", "input_type": "document"}, 400, "input_type"),
    ({"input": "x", "modality": "image"}, 400, "modality"),
    ({"input": "x", "top_n": 3}, 400, "Unknown field(s) 'top_n'; allowed fields are: input, model"),
    ({"input": "x", "dimensions": 100}, 400, "not a Matryoshka model; omit dimensions or send 384"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "model": "nope"}, 404, f"Model 'nope' is not served here; served embedding models: {DEFAULT_ID}"),
    ({"input": "x", "model": f"{DEFAULT_ID}-query", "input_type": "passage"}, 400, "means input_type 'query'"),
])
def test_errors_in_nim_shape(default_server, body, status, needle):
    r = post(default_server, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"object", "message", "type"} and err["object"] == "error"
    assert needle in err["message"]


def test_invalid_json_gets_the_same_error_shape(default_server):
    with default_server.client() as c:
        r = c.post("/v1/embeddings", content=b'{"input": ["x"', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["object"] == "error" and "JSON" in r.json()["message"]


# -- several models: which one embeds -------------------------------------------------------------


def test_a_reranker_asked_for_embeddings_names_the_embedding_models(multi_server):
    r = post(multi_server, {"input": "x", "model": "tiny"})  # the fixture's client sends the API key
    assert r.status_code == 400
    msg = r.json()["message"]
    assert "'tiny' (cross-encoder) is a reranker only" in msg and f"embedding models served here: {DEFAULT_ID}" in msg
    assert vectors(post(multi_server, {"input": "x"})).shape == (1, 384)  # no model: the embedding model
    unauthorized = httpx.post(f"{multi_server.url}/v1/embeddings", json={"input": "x"},
                              headers={"Authorization": f"Bearer not-{API_KEY}"})
    assert unauthorized.status_code == 401 and unauthorized.json()["object"] == "error"
    with multi_server.client() as c:
        listed = {m["id"]: m["tasks"] for m in c.get("/v1/models").json()["data"]}
        meta = {m["id"]: m for m in c.get("/v1/metadata").json()["models"]}
    assert listed == {DEFAULT_ID: ["rerank", "embed"], "tiny": ["rerank"]}
    assert meta[DEFAULT_ID]["embedding_dim"] == 384 and "embedding_dim" not in meta["tiny"]


# -- a model with prompts, Matryoshka dimensions and no normalization ------------------------------


def test_input_type_applies_the_models_prompts(tiny_bi_server, tiny_bi_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_bi_dir), device="cpu")
    texts = TEXTS[:3]
    for input_type in ("query", "passage"):
        ours = vectors(post(tiny_bi_server, {"input": texts, "input_type": input_type}))
        ref = st.encode(texts, prompt_name=input_type)
        assert cosines(ours, ref).min() >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)
        suffixed = vectors(post(tiny_bi_server, {"input": texts, "model": f"tiny-bi-{input_type}"}))
        np.testing.assert_allclose(suffixed, ours, atol=1e-5)
    bare = vectors(post(tiny_bi_server, {"input": texts}))
    assert cosines(bare, st.encode(texts)).min() >= 0.9999  # no input_type, no default prompt: no prompt
    assert cosines(bare, vectors(post(tiny_bi_server, {"input": texts, "input_type": "query"}))).max() < 0.999


def test_an_alias_takes_nims_query_and_passage_suffixes_on_both_routes(tmp_path, tiny_bi_dir):
    """docs/api.md: an alias works wherever an id does. `<alias>-query` answered 404 on /v1/embeddings and
    /v1/embeddings/multi_vector: the suffix was read off served ids only."""
    from fastapi.testclient import TestClient

    from openrerank.server.app import create_app
    from openrerank.server.config import ServerConfig
    from tests.families.colbert_builders import build_pylate_colbert

    colbert = build_pylate_colbert(tmp_path / "colbert")
    config = ServerConfig(models=[f"tiny-bi={tiny_bi_dir}", f"late={colbert}"], aliases=["bi=tiny-bi", "lc=late"],
                          backend="torch", threads=1)
    texts = TEXTS[:2]
    with TestClient(create_app(config, wait_for_models=True)) as c:
        for kind in ("query", "passage"):
            typed = c.post("/v1/embeddings", json={"input": texts, "model": "tiny-bi", "input_type": kind})
            suffixed = c.post("/v1/embeddings", json={"input": texts, "model": f"bi-{kind}"})
            assert suffixed.status_code == 200, suffixed.text
            assert suffixed.json()["model"] == "tiny-bi"
            np.testing.assert_allclose(vectors(suffixed), vectors(typed), atol=1e-6)
            typed = c.post("/v1/embeddings/multi_vector", json={"input": texts, "model": "late", "input_type": kind})
            suffixed = c.post("/v1/embeddings/multi_vector", json={"input": texts, "model": f"lc-{kind}"})
            assert suffixed.status_code == 200, suffixed.text
            assert [d["embedding"] for d in suffixed.json()["data"]] == [d["embedding"] for d in typed.json()["data"]]
        clash = c.post("/v1/embeddings", json={"input": texts, "model": "bi-query", "input_type": "passage"})
        assert clash.status_code == 400 and "means input_type 'query'" in clash.json()["message"]


def test_matryoshka_dimensions_keep_the_leading_ones(tiny_bi_server):
    full = vectors(post(tiny_bi_server, {"input": TEXTS[:2]}))
    short = vectors(post(tiny_bi_server, {"input": TEXTS[:2], "dimensions": 8}))
    np.testing.assert_allclose(short, full[:, :8], atol=1e-5)  # no Normalize module: not rescaled
    r = post(tiny_bi_server, {"input": "x", "dimensions": 33})
    assert r.status_code == 400 and "between 1 and 32" in r.json()["message"]


def test_max_inputs_and_the_schedulers_token_budget(tiny_bi_server):
    assert vectors(post(tiny_bi_server, {"input": TEXTS[:4]})).shape == (4, 32)
    r = post(tiny_bi_server, {"input": TEXTS[:5]})
    assert r.status_code == 400
    assert r.json()["message"] == "Number of inputs (5) exceeds the maximum of 4 (--max-inputs)"
    r = post(tiny_bi_server, {"input": [LONG] * 4, "truncate": "END"})  # 4 x 64 tokens, over 200
    assert r.status_code == 400 and r.json()["object"] == "error"
    assert "--max-request-tokens" in r.json()["message"]


def test_concurrent_requests_are_batched_together(tiny_bi_server):
    def embed_batches() -> tuple[float, float]:
        with tiny_bi_server.client() as c:
            text = c.get("/v1/metrics").text
        lab = '{model="tiny-bi",task="embed"}'
        get = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if lab in line}
        return get.get(f"openrerank_batch_size_count{lab}", 0.0), get.get(f"openrerank_batch_size_sum{lab}", 0.0)

    before = embed_batches()
    requests = 8

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tiny_bi_server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": ["paris river", "sea"]})
                                          for _ in range(requests)))

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    first = vectors(responses[0])
    for r in responses[1:]:
        np.testing.assert_allclose(vectors(r), first, atol=1e-6)
    after = embed_batches()
    assert after[1] - before[1] == 2 * requests  # every text ran once
    assert after[0] - before[0] <= requests / 2  # in far fewer batches than requests


@pytest.mark.parametrize("raw", ['{"input": ["a\\ud800b"]}', '{"input": "a\\ud800b"}',
                                 '{"input": ["ok", "\\udc00"], "model": "tiny-bi"}'])
def test_lone_surrogate_is_a_400_not_a_500(tiny_bi_server, raw):
    """Python's JSON parser accepts a lone surrogate; it is not Unicode, so it must be refused before the
    tokenizer sees it (it used to reach the tokenizer and answer 500)."""
    with tiny_bi_server.client() as c:
        r = c.post("/v1/embeddings", content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["object"] == "error" and "surrogate" in body["message"] and "input[" in body["message"]


# -- a Pooling that leaves the prompt out (include_prompt: false) ---------------------------------


def test_a_prompt_left_out_of_the_pooling_on_both_routes(tmp_path):
    """`/v1/embeddings` per input_type = `encode(prompt_name=...)`; `/v1/ranking`'s cosine = the cosine of those
    embeddings, asked twice (the second from the score cache)."""
    from sentence_transformers import SentenceTransformer

    from tests.support import nim_body

    path = build_tiny_bi_encoder(tmp_path / "model", prompts={"query": "represent the question: ", "passage": "p: "},
                                 include_prompt=False, pooling=("cls", "mean"), seed=8)
    st = SentenceTransformer(str(path), device="cpu")
    texts = [*TEXTS[:3], TEXTS[4]]  # within the tiny window: NIM does not truncate
    with run_server(["--model", f"tiny-bi={path}", "--backend", "torch", "--dtype", "fp32"],
                    tmp_path) as server:
        for input_type in ("query", "passage"):
            np.testing.assert_allclose(vectors(post(server, {"input": texts, "input_type": input_type})),
                                       st.encode(texts, prompt_name=input_type), atol=1e-4, rtol=0)
        q = st.encode([texts[0]], prompt_name="query")[0]
        p = st.encode(texts[1:], prompt_name="passage")
        expected = p @ q / np.linalg.norm(p, axis=1) / np.linalg.norm(q)
        for _ in range(2):
            with server.client() as c:
                r = c.post("/v1/ranking", json=nim_body(texts[0], texts[1:]))
            assert r.status_code == 200, r.text
            got = np.zeros(len(expected), np.float32)
            for x in r.json()["rankings"]:
                got[x["index"]] = x["logit"]
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
