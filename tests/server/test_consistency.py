"""Every route gives the same order and the same internal scores for the same query and passages.

Each dialect's score form is undone (`internal_from_relevance`) and compared with NIM's raw logit,
for a cross-encoder (sigmoid) and for the bi-encoder default ((cosine + 1) / 2).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from openrerank.core.requests import ScoreKind
from openrerank.server.dialects.score_form import relevance
from tests.server.conftest import DEFAULT_ID

QUERY = "what is the capital of france"
PASSAGES = [
    "Bananas are a yellow fruit.",
    "Paris is the capital and largest city of France.",
    "The river Seine flows through Paris.",
    "Berlin is the capital of Germany.",
    "A car engine burns fuel.",
]
TOL = 1e-4


def internal_from_relevance(values, kind: ScoreKind) -> np.ndarray:
    """Inverse of `relevance` for a logit or a cosine: the internal score a [0, 1] relevance came from."""
    p = np.asarray(values, dtype=np.float64)
    if kind is ScoreKind.COSINE:
        return 2.0 * p - 1.0
    p = np.clip(p, 1e-300, 1 - 1e-16)
    return np.log(p) - np.log1p(-p)


@pytest.mark.parametrize("kind", [ScoreKind.LOGIT, ScoreKind.COSINE])
def test_relevance_round_trip(kind):
    x = np.array([-0.99, -0.3, 0.0, 0.42, 0.99] if kind is ScoreKind.COSINE else [-12.0, -1.5, 0.0, 2.5, 9.0])
    assert internal_from_relevance(relevance(x, kind), kind) == pytest.approx(x, abs=1e-9)
    assert np.all(np.diff(relevance(x, kind)) > 0)  # monotone: the order never changes


def _routes(c, model: str) -> dict[str, list[tuple[int, float]]]:
    """(index, internal score) lists, in each route's own order."""
    out: dict[str, list[tuple[int, float]]] = {}
    nim = c.post("/v1/ranking", json={"model": model, "query": {"text": QUERY},
                                      "passages": [{"text": p} for p in PASSAGES]})
    assert nim.status_code == 200, nim.text
    out["nim"] = [(r["index"], r["logit"]) for r in nim.json()["rankings"]]
    kind = ScoreKind.COSINE if model == DEFAULT_ID else ScoreKind.LOGIT
    for path in ("/v1/rerank", "/v2/rerank"):
        r = c.post(path, json={"model": model, "query": QUERY, "documents": PASSAGES})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        back = internal_from_relevance([x["relevance_score"] for x in res], kind)
        out[path] = [(x["index"], float(v)) for x, v in zip(res, back, strict=True)]
    tei_raw = c.post("/rerank", json={"model": model, "query": QUERY, "texts": PASSAGES, "raw_scores": True}).json()
    out["tei raw"] = [(x["index"], x["score"]) for x in tei_raw]
    tei = c.post("/rerank", json={"model": model, "query": QUERY, "texts": PASSAGES}).json()
    out["tei"] = [(x["index"], float(v)) for x, v in
                  zip(tei, internal_from_relevance([x["score"] for x in tei], kind), strict=True)]
    for path in ("/v1/score", "/score"):
        raw = c.post(path, json={"model": model, "text_1": QUERY, "text_2": PASSAGES, "use_activation": False})
        act = c.post(path, json={"model": model, "text_1": QUERY, "text_2": PASSAGES})
        raw_scores = [d["score"] for d in raw.json()["data"]]
        act_scores = internal_from_relevance([d["score"] for d in act.json()["data"]], kind)
        for name, scores in ((f"{path} raw", raw_scores), (path, act_scores)):
            out[name] = sorted(enumerate(map(float, scores)), key=lambda t: -t[1])
    return out


@pytest.mark.parametrize("model", ["tiny", DEFAULT_ID])
def test_same_order_and_scores_on_every_route(multi_server, model):
    with multi_server.client() as c:
        routes = _routes(c, model)
    reference = dict(routes["nim"])
    assert len(routes) == 9
    for name, ranked in routes.items():
        assert sorted(i for i, _ in ranked) == list(range(len(PASSAGES))), name
        assert dict(ranked) == pytest.approx(reference, abs=TOL), name
        # Same order up to ties within the tolerance (a random tiny model has near-equal logits).
        for (a, _), (b, _) in itertools.pairwise(ranked):
            assert reference[a] >= reference[b] - TOL, (name, ranked)
    if model == DEFAULT_ID:  # a real model: a clear, identical order everywhere
        orders = {name: [i for i, _ in ranked] for name, ranked in routes.items()}
        assert all(o == orders["nim"] for o in orders.values()), orders
        assert orders["nim"][0] == 1
