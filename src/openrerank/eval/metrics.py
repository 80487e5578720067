"""Run handling and IR metrics through `ranx` (trec_eval parity).

Graded qrels: nDCG uses the grades (gain = grade, trec_eval's formula); binary metrics (recall, MRR) count a
document as relevant when its grade >= `rel_threshold` (TREC DL uses 2), via ranx's `metric-l<level>` syntax.
"""

from __future__ import annotations

import numpy as np

from openrerank.eval.data import Qrels, Run

DEFAULT_METRICS = ("recall@5", "ndcg@10", "mrr@10", "recall@100")
#: The grade binary metrics count as relevant unless told otherwise: any positive one (TREC DL uses 2).
DEFAULT_REL_THRESHOLD = 1
_GRADED = ("ndcg", "dcg", "ndcg_burges", "dcg_burges")


def drop_self_hits(run: Run) -> Run:
    """Remove candidates whose id equals the query id (BEIR: some sets put every query in the corpus)."""
    return {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}


def ranked(docs: dict[str, float]) -> list[tuple[str, float]]:
    """Best first, ties broken by doc id descending (what trec_eval does), so results are deterministic."""
    return sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)


def top_k(run: Run, k: int) -> Run:
    return {q: dict(ranked(docs)[:k]) for q, docs in run.items()}


def measured(metrics: tuple[str, ...] | list[str], depth: int) -> tuple[str, ...]:
    """`metrics` named by what they measure on runs of at most `depth` candidates: a recall cut deeper than the
    runs is the recall of the whole candidate set, so recall@100 over `depth` 10 is named recall@10 (its value),
    not read as the usual recall@100 of 100 candidates. Other cuts keep their names: nDCG@10 of 3 candidates is
    still nDCG@10 (its ideal ranking is 10 deep). Two that come to one name are one column."""
    out: list[str] = []
    for name in metrics:
        base, _, cut = name.partition("@")
        if base == "recall" and cut.isdigit() and int(cut) > depth:
            name = f"recall@{depth}"
        if name not in out:
            out.append(name)
    return tuple(out)


def ranx_metric(name: str, rel_threshold: int) -> str:
    """Our metric name -> ranx's: binary metrics get the `-l<threshold>` relevance level."""
    base = name.split("@")[0]
    if base in _GRADED or rel_threshold == 1:
        return name
    return f"{name}-l{rel_threshold}"


def evaluate(qrels: Qrels, run: Run, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
             rel_threshold: int = DEFAULT_REL_THRESHOLD) -> dict[str, float]:
    """Mean of each metric over the qrels' queries; a query missing from the run scores 0 (trec_eval -c).

    Scores are replaced by strictly decreasing rank scores first, so ranx sees exactly the trec_eval order
    (ranx's own sort leaves ties in arbitrary order).
    """
    from ranx import Qrels as RQrels
    from ranx import Run as RRun
    from ranx import evaluate as ranx_evaluate

    rq = RQrels({q: dict(j) for q, j in qrels.items()})
    ordered: dict[str, dict[str, float]] = {}
    for q in qrels:
        docs = ranked(run.get(q, {}))
        ordered[q] = {d: float(len(docs) - i) for i, (d, _) in enumerate(docs)}
    nonempty = {q: docs for q, docs in ordered.items() if docs}
    if not nonempty:  # nothing retrieved at all: every metric is 0 (ranx cannot build an empty Run)
        return dict.fromkeys(metrics, 0.0)
    rr = RRun(nonempty)
    names = {m: ranx_metric(m, rel_threshold) for m in metrics}
    scores = ranx_evaluate(rq, rr, list(names.values()), make_comparable=True, save_results_in_run=False)
    if isinstance(scores, float | np.floating):
        scores = {next(iter(names.values())): scores}
    return {m: float(scores[names[m]]) for m in metrics}
