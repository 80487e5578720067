"""Reduced precision is gated by ranking quality, not only logits: nDCG@10 on TREC DL19 (BM25 top-100).

What `--backend auto` picks must keep the default model's nDCG@10 within 0.002 of fp32 (the fidelity gate,
with the probe correlation of test_fidelity.py); int8 (OpenVINO, ONNX Runtime) and PyTorch bf16, which
users choose knowingly, may lose at most 0.005.
Every candidate passage is embedded once per engine (length-sorted batches), then ranked by cosine,
which is exactly what the bi-encoder backend scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.runtimes import selection

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "msmarco-trec-dl19-pooled"
MAX_DROP = 0.005
AUTO_TOLERANCE = 0.002

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "runs" / "bm25_top100.trec.gz").is_file(), reason=f"DL19 data absent at {DATA}"),
]


@pytest.fixture(scope="module")
def dl19():
    from openrerank.eval.data import load_dataset, read_trec_run

    ds = load_dataset(DATA, split="test_full")
    run = read_trec_run(DATA / "runs" / "bm25_top100.trec.gz")
    candidates = {q: [d for d in run[q] if d in ds.corpus] for q in ds.queries}
    assert len(candidates) == 43 and all(len(c) == 100 for c in candidates.values())
    return ds, candidates


def ndcg10(dl19, backend: str, dtype: str, expect: str | None = None) -> float:
    from openrerank.eval.metrics import evaluate

    ds, candidates = dl19
    loaded = load_model("default", LoadOptions(backend=backend, dtype=dtype))
    if expect:
        assert loaded.scorer.description == expect
    try:
        doc_ids = sorted({d for docs in candidates.values() for d in docs})
        qids = list(candidates)
        doc_emb = loaded.embed([ds.corpus[d].passage() for d in doc_ids], batch_size=64)
        q_emb = loaded.embed([ds.queries[q] for q in qids])
    finally:
        loaded.close()
    row = {d: i for i, d in enumerate(doc_ids)}
    run = {}
    for qi, q in enumerate(qids):
        idx = np.array([row[d] for d in candidates[q]])
        scores = doc_emb[idx] @ q_emb[qi]
        run[q] = {d: float(s) for d, s in zip(candidates[q], scores, strict=True)}
    return evaluate(ds.qrels, run, ["ndcg@10"])["ndcg@10"]


@pytest.fixture(scope="module")
def fp32_ndcg(dl19) -> float:
    value = ndcg10(dl19, "onnx", "fp32")
    # all-MiniLM-L6-v2 reranking BM25 top-100 on DL19: well above BM25's 0.506, far from random.
    assert 0.55 < value < 0.80, value
    return value


def test_what_auto_picks_keeps_ndcg(dl19, fp32_ndcg):
    engine = load_model("default").runtime_choice
    value = ndcg10(dl19, engine.runtime, engine.dtype)
    print(f"\nDL19 nDCG@10: fp32 {fp32_ndcg:.4f}, auto ({engine.label}) {value:.4f}")
    assert abs(value - fp32_ndcg) <= AUTO_TOLERANCE, f"{engine.label} nDCG@10 {value:.4f} vs fp32 {fp32_ndcg:.4f}"


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_int8_keeps_ndcg(dl19, fp32_ndcg, backend):
    value = ndcg10(dl19, backend, "int8", expect=f"{backend}-int8-cpu")
    print(f"\nDL19 nDCG@10: fp32 {fp32_ndcg:.4f}, {backend} int8 {value:.4f}")
    assert value >= fp32_ndcg - MAX_DROP, f"{backend} int8 nDCG@10 {value:.4f} vs fp32 {fp32_ndcg:.4f}"


@pytest.mark.skipif(not selection._bf16_units(selection.cpu_flags()), reason="CPU without bf16 units")
def test_torch_bf16_keeps_ndcg(dl19, fp32_ndcg):
    value = ndcg10(dl19, "torch", "bf16")
    assert value >= fp32_ndcg - MAX_DROP, f"bf16 nDCG@10 {value:.4f} vs fp32 {fp32_ndcg:.4f}"
