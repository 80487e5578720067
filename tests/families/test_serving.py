"""What every family shares once served: batch-independent scores, NIM's raw logit against the other
dialects' unit-interval form, NIM's 400 for `truncate: NONE` over the window, and `/v1/metadata`."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.families.builders import PASSAGES, QUERIES
from tests.families.conftest import DECODERS, ENCODERS, QWEN3_INSTRUCTION, SERVER_DEVICE, TOL, served_logits
from tests.support import nim_body

LONG = " ".join(PASSAGES[-1].split() * 4)  # ~170 tokens
FAMILY_OF = {"qwen3": "qwen3-reranker", "qwen3-instr": "qwen3-reranker", "mxbai": "mxbai-rerank-v2",
             "gemma": "bge-reranker-gemma", "llama-bi": "llama-bidirectional", "mistral-bi": "llama-bidirectional",
             "xlmr": "cross-encoder", "modernbert": "cross-encoder", "deberta": "cross-encoder"}


def _batches(server, model: str) -> float:
    with server.client() as c:
        text = c.get("/metrics").text
    m = re.search(rf'^openrerank_batch_size_count\{{model="{re.escape(model)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("name", DECODERS)
def test_scores_do_not_depend_on_batch_composition(family_server, name):
    """A passage scored alone = scored in one request with longer and shorter ones = scored while other
    clients' requests of other lengths are queued with it (they share model batches: fewer batches than
    requests)."""
    target, query = PASSAGES[0], QUERIES[0]
    alone = served_logits(family_server, name, query, [target])[0]
    mixed = served_logits(family_server, name, query, [LONG, "france", target, PASSAGES[4]], truncate="END")[2]
    before = _batches(family_server, name)
    start = threading.Barrier(9)

    def request(q, passages):
        start.wait()
        return served_logits(family_server, name, q, passages, truncate="END")

    with ThreadPoolExecutor(9) as pool:
        busy = pool.submit(request, QUERIES[1], [LONG] * 64)  # keeps the model busy while the rest queue up
        jobs = [pool.submit(request, *args) for args in [
            (query, [target]), (QUERIES[2], ["sea"]), (query, [LONG, target]), (QUERIES[1], [LONG + LONG]),
            (query, ["a", target, PASSAGES[3]]), (QUERIES[2], [PASSAGES[5]]), (query, [target]),
            (QUERIES[0], [LONG[:40]])]]
        results = [j.result() for j in jobs]
        busy.result()
    concurrent = [results[0][0], results[2][1], results[4][1], results[6][0]]
    diffs = np.abs(np.array([mixed, *concurrent]) - alone)
    assert diffs.max() <= TOL, f"{name}: the same pair scored {alone} alone, {[mixed, *concurrent]} in company"
    assert _batches(family_server, name) - before < 9, "the concurrent requests never shared a batch"


@pytest.mark.parametrize("name", [*DECODERS, ENCODERS[0]])
def test_nim_gets_the_raw_logit_and_the_other_dialects_its_sigmoid(family_server, name):
    query = QUERIES[1]
    logits = served_logits(family_server, name, query, PASSAGES)
    unit = 1.0 / (1.0 + np.exp(-logits))
    assert np.abs(logits - unit).max() > 0.5  # raw and unit forms are told apart
    with family_server.client() as c:
        cohere = c.post("/v1/rerank", json={"model": name, "query": query, "documents": PASSAGES}).json()
        tei = c.post("/rerank", json={"model": name, "query": query, "texts": PASSAGES}).json()
        tei_raw = c.post("/rerank", json={"model": name, "query": query, "texts": PASSAGES, "raw_scores": True}).json()
        score = c.post("/v1/score", json={"model": name, "text_1": query, "text_2": PASSAGES}).json()
        score_raw = c.post("/v1/score", json={"model": name, "text_1": query, "text_2": PASSAGES,
                                              "use_activation": False}).json()

    def by_index(rows, key):
        out = np.zeros(len(PASSAGES))
        for r in rows:
            out[r["index"]] = r[key]
        return out

    np.testing.assert_allclose(by_index(cohere["results"], "relevance_score"), unit, atol=1e-6)
    np.testing.assert_allclose(by_index(tei, "score"), unit, atol=1e-6)
    np.testing.assert_allclose(by_index(score["data"], "score"), unit, atol=1e-6)
    np.testing.assert_allclose(by_index(tei_raw, "score"), logits, atol=1e-5)
    np.testing.assert_allclose(by_index(score_raw["data"], "score"), logits, atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_truncate_none_over_the_window_is_nims_400(family_server, name):
    huge = " ".join(["paris"] * 600)
    with family_server.client() as c:
        refused = c.post("/v1/ranking", json=nim_body(QUERIES[0], ["sea", huge], model=name, truncate="NONE"))
        fits = c.post("/v1/ranking", json=nim_body(QUERIES[0], ["sea", PASSAGES[0]], model=name, truncate="NONE"))
    assert refused.status_code == 422, refused.text  # NIM 1.9.1+
    body = refused.json()
    assert body["object"] == "error" and body["type"] == "too_long"
    m = re.fullmatch(r"Input length (\d+) exceeds maximum allowed token size 512", body["message"])
    assert m and int(m.group(1)) > 600, body
    assert fits.status_code == 200, fits.text


def test_metadata_reports_each_family(family_server):
    with family_server.client() as c:
        models = {m["id"]: m for m in c.get("/v1/metadata").json()["models"]}
    assert {k: v["family"] for k, v in models.items()} == FAMILY_OF
    for name in DECODERS:
        assert models[name]["backend"] == f"torch-fp32-{SERVER_DEVICE}" and models[name]["score"] == "logit"
        assert models[name]["max_length"] == 512
    assert models["qwen3-instr"]["instruction"] == QWEN3_INSTRUCTION
    assert models["qwen3"]["instruction"].startswith("Given a web search query")
    assert models["llama-bi"]["pooling"] == "avg" and models["llama-bi"]["temperature"] == 0.5
    assert models["mistral-bi"]["base"] == "mistral"
    assert all(not k.startswith("_") for m in models.values() for k in m)  # no raw config dumped
    assert {models[n]["architecture"] for n in ENCODERS} == {
        "XLMRobertaForSequenceClassification", "ModernBertForSequenceClassification",
        "DebertaV2ForSequenceClassification"}
