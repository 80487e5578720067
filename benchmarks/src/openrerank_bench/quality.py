"""How faithful each engine is: its scores against the fp32 baseline's, and the default model's DL19 nDCG@10.

These are the two halves of the fidelity gate `--backend auto` relies on (runtimes/selection.py): probe
scores correlating >= 0.9999 with fp32, and the default model's DL19 nDCG@10 within 0.002 of fp32.
"""

from __future__ import annotations

import numpy as np

from openrerank_bench.workload import Workload

CORRELATION_GATE = 0.9999
NDCG_TOLERANCE = 0.002


def score_agreement(scores: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Pearson correlation and absolute differences of an engine's scores against the baseline's."""
    a, b = np.concatenate(scores).astype(np.float64), np.concatenate(reference).astype(np.float64)
    diff = np.abs(a - b)
    return {"correlation": float(np.corrcoef(a, b)[0, 1]), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean())}


def ndcg10(wl: Workload, scores: list[np.ndarray]) -> float:
    """nDCG@10 of reranking each query's candidates by `scores` (the workload's qrels, graded)."""
    import warnings

    from openrerank.eval.metrics import evaluate

    run = {qid: {d: float(s) for d, s in zip(docs, sc, strict=True)}
           for qid, docs, sc in zip(wl.query_ids, wl.doc_ids, scores, strict=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranx/numba chatter
        return evaluate(wl.qrels, run, ["ndcg@10"])["ndcg@10"]


def default_model_ndcg(wl: Workload, backend: str, dtype: str, threads: int | None) -> dict:
    """The embedded default model (all-MiniLM-L6-v2) reranking the workload on one engine."""
    from openrerank.core.requests import Truncate
    from openrerank.engine.loading import LoadOptions, load_model

    loaded = load_model("default", LoadOptions(backend=backend, dtype=dtype, threads=threads))
    try:
        scores = [loaded.score(q, ps, Truncate.END) for q, ps in zip(wl.queries, wl.passages, strict=True)]
    finally:
        loaded.close()
    return {"ndcg@10": ndcg10(wl, scores), "runtime": loaded.scorer.description, "scores": scores}


def faithful(row: dict, reference_ndcg: float | None) -> bool | None:
    """Whether an engine passes the gate (None when a half of it was not measured)."""
    agreement = row.get("agreement", {}).get("correlation")
    ndcg = row.get("default_ndcg@10")
    if agreement is None or ndcg is None or reference_ndcg is None:
        return None
    return agreement >= CORRELATION_GATE and abs(ndcg - reference_ndcg) <= NDCG_TOLERANCE
