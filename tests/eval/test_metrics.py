from __future__ import annotations

import math

import pytest

from openrerank.eval.metrics import drop_self_hits, evaluate, ranked, ranx_metric, top_k

QRELS = {"q1": {"a": 3, "b": 1, "c": 2, "z": 0}, "q2": {"x": 1}}
RUN = {
    "q1": {"b": 0.9, "n1": 0.8, "a": 0.7, "n2": 0.6, "n3": 0.5, "c": 0.4},
    "q2": {"n4": 0.9, "n5": 0.8, "x": 0.1},
}


def _dcg(gains: list[int]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_graded_ndcg_and_binary_threshold_by_hand() -> None:
    got = evaluate(QRELS, RUN, ["ndcg@10", "recall@5", "mrr@10", "recall@100"], rel_threshold=2)
    # nDCG uses the grades (trec_eval: gain = grade), whatever the binary threshold
    ndcg_q1 = _dcg([1, 0, 3, 0, 0, 2]) / _dcg([3, 2, 1])
    ndcg_q2 = _dcg([0, 0, 1]) / _dcg([1])
    assert got["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-9)
    # threshold 2: q1 relevant = {a, c}; top-5 holds a only -> 1/2; first relevant at rank 3 -> 1/3
    # q2's only judgment has grade 1 < 2 -> 0 for binary metrics
    assert got["recall@5"] == pytest.approx((0.5 + 0.0) / 2)
    assert got["mrr@10"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert got["recall@100"] == pytest.approx((1.0 + 0.0) / 2)


def test_threshold_one_counts_every_positive_grade() -> None:
    got = evaluate(QRELS, RUN, ["recall@5", "mrr@10"], rel_threshold=1)
    assert got["recall@5"] == pytest.approx((2 / 3 + 1.0) / 2)  # q1: b, a in top 5 of {a,b,c}; q2: x at 3
    assert got["mrr@10"] == pytest.approx((1.0 + 1 / 3) / 2)


def test_query_missing_from_run_scores_zero() -> None:
    got = evaluate(QRELS, {"q1": RUN["q1"]}, ["recall@100"], rel_threshold=1)
    assert got["recall@100"] == pytest.approx(0.5)
    assert evaluate(QRELS, {}, ["ndcg@10"]) == {"ndcg@10": 0.0}


def test_ties_break_by_doc_id_descending_like_trec_eval() -> None:
    assert [d for d, _ in ranked({"a": 1.0, "c": 1.0, "b": 2.0})] == ["b", "c", "a"]
    # relevant "a" ties with "c": trec_eval puts "c" first, so MRR is 1/2, not 1
    got = evaluate({"q": {"a": 1}}, {"q": {"a": 1.0, "c": 1.0}}, ["mrr@10"])
    assert got["mrr@10"] == pytest.approx(0.5)


def test_drop_self_hits_and_top_k() -> None:
    run = {"q2": {"q2": 9.0, "d2": 5.0}, "q1": {"d1": 1.0}}
    assert drop_self_hits(run) == {"q2": {"d2": 5.0}, "q1": {"d1": 1.0}}
    assert top_k({"q": {"a": 1.0, "b": 3.0, "c": 2.0}}, 2) == {"q": {"b": 3.0, "c": 2.0}}


def test_ranx_metric_names() -> None:
    assert ranx_metric("recall@5", 2) == "recall@5-l2"
    assert ranx_metric("ndcg@10", 2) == "ndcg@10"
    assert ranx_metric("mrr@10", 1) == "mrr@10"


def test_a_recall_cut_deeper_than_the_runs_is_named_by_their_depth() -> None:
    """recall@100 over runs of 10 candidates was shown as recall@100: it is recall@10 (the same value)."""
    from openrerank.eval.metrics import DEFAULT_METRICS, measured

    assert measured(DEFAULT_METRICS, 100) == DEFAULT_METRICS
    assert measured(DEFAULT_METRICS, 10) == ("recall@5", "ndcg@10", "mrr@10", "recall@10")
    assert measured(DEFAULT_METRICS, 3) == ("recall@3", "ndcg@10", "mrr@10")  # one column, not two
    cut = top_k(RUN, 3)
    assert evaluate(QRELS, cut, ["recall@100"])["recall@100"] == evaluate(QRELS, cut, ["recall@3"])["recall@3"] > 0
