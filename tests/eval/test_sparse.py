from __future__ import annotations

import math

import pytest

from openrerank.eval.sparse import BM25Config, BM25Index

DOCS = ["apple banana apple", "banana cherry", "cherry date elderberry fig", "grape"]
IDS = ["d0", "d1", "d2", "d3"]


def lucene_bm25(query: list[str], doc: list[str], corpus: list[list[str]], k1: float, b: float) -> float:
    n = len(corpus)
    avgdl = sum(len(d) for d in corpus) / n
    score = 0.0
    for term in set(query):
        df = sum(term in d for d in corpus)
        tf = doc.count(term)
        if not tf:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
    return score


def test_scores_match_lucene_formula() -> None:
    cfg = BM25Config(stemmer=None, stopwords=None)
    index = BM25Index(IDS, DOCS, cfg)
    run = index.search(["q"], ["apple cherry"], k=10)
    corpus = [d.split() for d in DOCS]
    expected = {i: lucene_bm25(["apple", "cherry"], corpus[n], corpus, 0.9, 0.4) for n, i in enumerate(IDS)}
    assert set(run["q"]) == {"d0", "d1", "d2"}  # d3 shares no term: not returned
    for doc, score in run["q"].items():
        assert score == pytest.approx(expected[doc], rel=1e-5)
    assert list(run["q"]) == sorted(run["q"], key=lambda d: -run["q"][d])


def test_stemming_and_stopwords() -> None:
    docs = ["the runners were running", "a quiet library", "the the the the"]
    stemmed = BM25Index(["a", "b", "c"], docs, BM25Config(stemmer="porter", stopwords="en"))
    assert list(stemmed.search(["q"], ["run"], k=3)["q"]) == ["a"]
    # "the" is a stopword: it matches nothing, so the query finds nothing
    assert stemmed.search(["q"], ["the"], k=3)["q"] == {}
    plain = BM25Index(["a", "b", "c"], docs, BM25Config(stemmer=None, stopwords=None))
    assert plain.search(["q"], ["run"], k=3)["q"] == {}


def test_k_caps_and_unknown_words() -> None:
    index = BM25Index(IDS, DOCS, BM25Config())
    assert len(index.search(["q"], ["banana cherry apple"], k=2)["q"]) == 2
    assert index.search(["q"], ["zzzz unknownword"], k=5)["q"] == {}
    assert len(index.search(["q"], ["grape"], k=100)["q"]) == 1
