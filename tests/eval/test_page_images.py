"""`openrerank eval` on a page-image corpus: BEIR rows that name PNG/JPEG files, reranked by a VL reranker
in-process or through a server (NIM image passages)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from openrerank.eval.data import DatasetError, load_dataset
from openrerank.eval.rerank import InProcessReranker, RerankJob, ServerReranker

CORPUS = [
    {"_id": "p1", "image": "pages/p1.png"},
    {"_id": "p2", "image": "pages/p2.jpg", "text": "a slide about river water"},
    {"_id": "t3", "title": "Cities", "text": "paris is the capital of france"},
    {"_id": "p4", "image": "pages/p4.png", "title": "", "text": ""},
]
QUERIES = [{"_id": "q1", "text": "what is the capital of france"}, {"_id": "q2", "text": "which river"}]
QRELS = [("q1", "p1", 1), ("q1", "t3", 1), ("q2", "p2", 1)]


def write_pages(folder: Path, corpus=CORPUS) -> Path:
    (folder / "pages").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, row in enumerate(corpus):
        if row.get("image"):
            img = Image.fromarray(rng.integers(0, 255, size=(40 + 10 * i, 50, 3), dtype=np.uint8), "RGB")
            img.save(folder / row["image"], format="JPEG" if row["image"].endswith(".jpg") else "PNG")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES), encoding="utf-8")
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                               "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS), encoding="utf-8")
    (folder / "run.trec").write_text("".join(f"{q['_id']} Q0 {r['_id']} {k + 1} {9 - k} first\n"
                                             for q in QUERIES for k, r in enumerate(corpus)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    from tests.families.builders import build_nemotron_vl

    from openrerank.engine.loading import LoadOptions, load_model

    return load_model(str(build_nemotron_vl(tmp_path_factory.mktemp("vl") / "tiny-nemotron-vl")),
                      LoadOptions(backend="torch", dtype="fp32"))


def jobs_of(folder: Path) -> list[RerankJob]:
    ds = load_dataset(folder)
    ids = list(ds.corpus)
    return [RerankJob(q, text, ids, [ds.corpus[d].passage() for d in ids], [ds.corpus[d].image_url() for d in ids])
            for q, text in ds.queries.items()]


def test_corpus_rows_name_their_page_images(tmp_path):
    ds = load_dataset(write_pages(tmp_path / "pages-ds"))
    assert ds.corpus["p1"].image == (tmp_path / "pages-ds" / "pages" / "p1.png").resolve()
    assert ds.corpus["t3"].image is None and ds.corpus["t3"].image_url() is None
    assert ds.corpus["p1"].image_url().startswith("data:image/png;base64,iVBOR")
    assert ds.corpus["p2"].image_url().startswith("data:image/jpeg;base64,/9j/")


@pytest.mark.parametrize("row,words", [
    ({"_id": "x", "image": "pages/missing.png"}, "does not exist"),
    ({"_id": "x", "image": "../outside.png"}, "outside the dataset folder"),
    ({"_id": "x", "image": "pages/p.gif"}, ".png, .jpg or .jpeg"),
    ({"_id": "x", "image": 7}, "file name"),
])
def test_bad_image_rows_are_dataset_errors(tmp_path, row, words):
    folder = write_pages(tmp_path / "bad")
    (folder / "pages" / "p.gif").write_bytes(b"GIF89a")
    (tmp_path / "outside.png").write_bytes(b"x")
    (folder / "corpus.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=words):
        load_dataset(folder)


def test_in_process_reranking_scores_the_images(tmp_path, vl_model):
    jobs = jobs_of(write_pages(tmp_path / "pages-ds"))
    run = InProcessReranker(vl_model).rerank(jobs)
    for job in jobs:
        expected = vl_model.score(job.query, job.passages, images=job.images)
        text_only = vl_model.score(job.query, job.passages)
        got = np.array([run[job.qid][d] for d in job.doc_ids])
        assert np.abs(got - expected).max() <= 1e-5
        assert np.abs(got - text_only).max() > 1e-2  # the pages were really read


def test_server_reranking_sends_image_passages(tmp_path):
    jobs = jobs_of(write_pages(tmp_path / "pages-ds"))
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/metadata":  # a server without it: the default passages per request
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"rankings": [{"index": i, "logit": float(i)}
                                                      for i in range(len(body["passages"]))]})

    ServerReranker("http://vl", concurrency=2, transport=httpx.MockTransport(handler)).rerank(jobs[:1])
    passages = seen[0]["passages"]
    assert passages[0].keys() == {"image"} and passages[0]["image"].startswith("data:image/png;base64,")
    assert passages[1]["text"] == "a slide about river water" and passages[1]["image"].startswith("data:image/jpeg")
    assert passages[2] == {"text": "Cities paris is the capital of france"}


def test_eval_cli_reranks_a_page_image_run(tmp_path, vl_model):
    from tests.support import run_eval as main

    folder = write_pages(tmp_path / "pages-ds")
    out = tmp_path / "table.json"
    argv = ["--dataset", str(folder), "--runs", str(folder / "run.trec"), "--pipelines", "sparse+rerank",
            "--rerank-model", str(vl_model.spec.path), "--backend", "torch", "--quiet", "--json", str(out),
            "--no-cache"]
    assert main(argv) == 0
    rows = {r["pipeline"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"run:run", "run:run+rerank"} <= set(rows)
    assert all(0.0 <= v <= 1.0 for v in rows["run:run+rerank"]["metrics"].values())
