"""The published reference numbers (issue 5), on the real data beside the repository.

The dense check encodes SciFact's 5,183 abstracts once (minutes on a small CPU) and caches the embeddings in
the eval cache (`$OPENRERANK_EVAL_CACHE` or ~/.cache/openrerank/eval); later runs only search.
"""

from __future__ import annotations

import pytest

from openrerank.eval.data import load_dataset, load_qrels, read_trec_run
from openrerank.eval.dense import default_cache_dir
from openrerank.eval.metrics import evaluate
from openrerank.eval.pipeline import DatasetRunner, EvalConfig, Models
from openrerank.eval.progress import Reporter


@pytest.mark.slow
def test_dl19_bm25_run_matches_anserini(shared_data) -> None:
    folder = shared_data("msmarco-trec-dl19-pooled")
    qrels = load_qrels(folder / "qrels" / "test_full.tsv")
    run = read_trec_run(folder / "runs" / "bm25_top100.trec.gz")
    got = evaluate(qrels, run, ["ndcg@10"], rel_threshold=2)
    assert got["ndcg@10"] == pytest.approx(0.5058, abs=0.0005)


def _first_stage(folder, stage: str) -> float:
    ds = load_dataset(folder, "test")
    cfg = EvalConfig(pipelines=[stage], cache_dir=default_cache_dir())
    reporter = Reporter(quiet=True)
    models = Models(cfg, reporter)
    try:
        run = DatasetRunner(ds, cfg, models, None, reporter).first_stage(stage)
    finally:
        models.close()
    assert len(ds.queries) == len(run) == 300 and max(len(docs) for docs in run.values()) == 100
    return evaluate(ds.qrels, run, ["ndcg@10"])["ndcg@10"]


@pytest.mark.slow
def test_scifact_own_bm25_near_beir(shared_data) -> None:
    assert _first_stage(shared_data("scifact"), "sparse") == pytest.approx(0.665, abs=0.015)


@pytest.mark.slow
def test_scifact_dense_minilm_near_mteb(shared_data) -> None:
    assert _first_stage(shared_data("scifact"), "dense") == pytest.approx(0.645, abs=0.01)
