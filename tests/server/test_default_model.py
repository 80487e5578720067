"""The embedded default (all-MiniLM-L6-v2 as a bi-encoder reranker), started with no --model, via HTTP."""

from __future__ import annotations

import concurrent.futures
import gzip
import json

import numpy as np
import pytest

from tests.support import DL19, nim_body

CASES = [
    ("What is the capital of France?",
     ["Bananas are rich in potassium.", "Paris is the capital and largest city of France.",
      "The Great Wall of China is very long."], 1),
    ("how do plants make food",
     ["Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
      "The stock market fell sharply on Monday.", "Cats sleep for most of the day."], 0),
    ("symptoms of the flu",
     ["The Eiffel Tower was completed in 1889.", "Python is a programming language.",
      "Influenza causes fever, cough, sore throat, muscle aches and fatigue."], 2),
]


def test_default_served_under_its_hub_id(default_server):
    with default_server.client() as c:
        models = c.get("/v1/models").json()
        meta = c.get("/v1/metadata").json()["models"][0]
    assert [m["id"] for m in models["data"]] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert meta["family"] == "bi-encoder" and meta["score"] == "cosine"
    assert meta["pooling"] == "mean" and meta["weights_format"] == "safetensors"


@pytest.mark.parametrize(("query", "passages", "best"), CASES)
def test_default_ranks_relevant_first(default_server, query, passages, best):
    with default_server.client() as c:
        r = c.post("/v1/ranking", json=nim_body(query, passages))
    assert r.status_code == 200, r.text
    ranks = r.json()["rankings"]
    assert ranks[0]["index"] == best
    assert all(-1.0 - 1e-6 <= x["logit"] <= 1.0 + 1e-6 for x in ranks)  # cosine similarities


def test_default_scores_equal_sentence_transformers_cosine(default_server):
    st = pytest.importorskip("sentence_transformers")
    from openrerank.sources.source import default_model_dir

    query, passages, _ = CASES[0]
    model = st.SentenceTransformer(str(default_model_dir()), device="cpu")
    q = model.encode([query], normalize_embeddings=True)
    p = model.encode(passages, normalize_embeddings=True)
    expected = (p @ q[0]).astype(np.float32)
    with default_server.client() as c:
        ranks = c.post("/v1/ranking", json=nim_body(query, passages)).json()["rankings"]
        engine = c.get("/v1/metadata").json()["models"][0]["engine"]
    got = np.zeros(len(passages), np.float32)
    for x in ranks:
        got[x["index"]] = x["logit"]
    # fp32 engines are exact; bf16 (what auto serves on a CPU with bf16 units) is within its fidelity gate.
    np.testing.assert_allclose(got, expected, atol=1e-4 if engine["dtype"] == "fp32" else 3e-3)
    assert list(np.argsort(-got)) == list(np.argsort(-expected))


def _load_dl19():
    queries = {}
    for line in (DL19 / "queries.jsonl").read_text().splitlines():
        q = json.loads(line)
        queries[q["_id"]] = q["text"]
    corpus = {}
    with gzip.open(DL19 / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            corpus[d["_id"]] = (d.get("title", "") + " " + d["text"]).strip()
    run: dict[str, list[str]] = {}
    with gzip.open(DL19 / "runs" / "bm25_top100.trec.gz", "rt") as fh:
        for line in fh:
            qid, _, doc, _rank, _score, _tag = line.split()
            run.setdefault(qid, []).append(doc)
    return queries, corpus, run


@pytest.mark.slow
@pytest.mark.skipif(not DL19.is_dir(), reason=f"shared data not found at {DL19}")
def test_default_reranks_dl19_bm25_top100(default_server):
    """BM25 alone: nDCG@10 0.506; reranking its top-100 with the default must reach >= 0.60."""
    ranx = pytest.importorskip("ranx")
    queries, corpus, run = _load_dl19()
    qrels_dict: dict[str, dict[str, int]] = {}
    for line in (DL19 / "qrels" / "test_full.tsv").read_text().splitlines()[1:]:
        qid, doc, grade = line.split("\t")
        qrels_dict.setdefault(qid, {})[doc] = int(grade)

    def rerank(qid: str) -> tuple[str, dict[str, float]]:
        docs = run[qid]
        with default_server.client() as c:
            r = c.post("/v1/ranking", json=nim_body(queries[qid], [corpus[d] for d in docs], truncate="END"))
        assert r.status_code == 200, r.text
        return qid, {docs[x["index"]]: x["logit"] for x in r.json()["rankings"]}

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        reranked = dict(pool.map(rerank, sorted(run)))
    bm25 = {qid: {d: 100.0 - i for i, d in enumerate(docs)} for qid, docs in run.items()}
    q = ranx.Qrels(qrels_dict)
    base = ranx.evaluate(q, ranx.Run(bm25), "ndcg@10")
    ours = ranx.evaluate(q, ranx.Run(reranked), "ndcg@10")
    print(f"DL19 nDCG@10: BM25 {base:.4f} -> default reranker {ours:.4f}")
    assert base == pytest.approx(0.5058, abs=0.0005)
    assert ours >= 0.60
