from __future__ import annotations

import pytest

from openrerank.eval.fusion import fuse

SPARSE = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"x": 4.0}}
DENSE = {"q1": {"c": 0.9, "a": 0.5, "e": 0.1}, "q2": {}}


def test_rrf_by_hand() -> None:
    out = fuse(SPARSE, DENSE, method="rrf", k=10, rrf_k=60, dense_weight=0.5)
    assert out["q1"]["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert out["q1"]["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert out["q1"]["b"] == pytest.approx(1 / 62)
    assert out["q1"]["e"] == pytest.approx(1 / 63)
    assert list(out["q1"]) == ["a", "c", "b", "e"]
    # a query only one retriever answered keeps that list
    assert out["q2"] == {"x": 4.0}


def test_minmax_wsum_by_hand_and_top_k() -> None:
    out = fuse(SPARSE, DENSE, method="wsum", k=3, rrf_k=60, dense_weight=0.5)
    # sparse min-max: a=1, b=.5, c=0; dense: c=1, a=.5, e=0
    assert out["q1"] == pytest.approx({"a": 0.75, "c": 0.5, "b": 0.25})
    heavy = fuse(SPARSE, DENSE, method="wsum", k=4, rrf_k=60, dense_weight=0.8)
    assert next(iter(heavy["q1"])) == "c"


def test_unknown_fusion() -> None:
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(SPARSE, DENSE, method="borda", k=10, rrf_k=60, dense_weight=0.5)
