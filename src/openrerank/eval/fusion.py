"""Hybrid first stage: fuse the sparse and dense candidate lists with `ranx.fuse`.

`rrf`: reciprocal rank fusion (constant `rrf_k`), scores ignored. `wsum`: per-query min-max normalized scores combined
as (1 - w) * sparse + w * dense; a document missing from one list gets 0 from it.
"""

from __future__ import annotations

from openrerank.eval.data import Run
from openrerank.eval.metrics import top_k

FUSIONS = ("rrf", "wsum")


def fuse(sparse: Run, dense: Run, *, method: str, k: int, rrf_k: int, dense_weight: float) -> Run:
    """Top-k of the fused list per query; a query found by only one retriever keeps that retriever's list.
    No defaults here: `EvalConfig` owns them (`fusion`, `top_k`, `rrf_k`, `dense_weight`)."""
    from ranx import Run as RRun
    from ranx import fuse as ranx_fuse

    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; choose one of {', '.join(FUSIONS)}")
    both = [q for q in sparse if sparse[q] and dense.get(q)]
    out: Run = {}
    if both:
        runs = [RRun({q: sparse[q] for q in both}), RRun({q: dense[q] for q in both})]
        if method == "rrf":
            fused = ranx_fuse(runs, norm=None, method="rrf", params={"k": rrf_k})
        else:
            fused = ranx_fuse(runs, norm="min-max", method="wsum",
                              params={"weights": [1.0 - dense_weight, dense_weight]})
        out = {q: {d: float(s) for d, s in docs.items()} for q, docs in fused.to_dict().items()}
    for q in set(sparse) | set(dense):
        if q not in out:
            out[q] = dict(sparse.get(q) or dense.get(q) or {})
    return top_k(out, k)
