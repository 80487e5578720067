"""Infinity's rerank dialect: `POST /rerank` with `documents` (the TEI route hands such bodies over).

Cohere-shaped answer with `results`; errors in Infinity's OpenAI-style shape
`{"error": {"message", "type", "param", "code"}}`. Over-long documents are cut at the end, as Infinity does.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request, Response

from openrerank.core.requests import RerankRequest, RerankResult, Truncate
from openrerank.server.dialects import common, list_bounds
from openrerank.server.dialects.score_form import result_relevance
from openrerank.server.errors import Dialect
from openrerank.wire.infinity import INFINITY_UNSPECIFIED_MODEL, InfinityRerankRequest


def infinity_error_body(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


#: Infinity's form of /rerank. It owns no path of its own: the /rerank handler picks it for `documents` bodies.
INFINITY = Dialect(
    "infinity", (), infinity_error_body,
    status_for={"validation": 422, "too_many": 422, "too_long": 422, "too_much_work": 422, "model_not_found": 400,
                "overloaded": 429, "unavailable": 503, "timeout": 504},
    request_models={"/rerank": InfinityRerankRequest},
)
list_bounds.bound(InfinityRerankRequest, documents=list_bounds.PASSAGES)


def infinity_to_internal(body: InfinityRerankRequest) -> RerankRequest:
    """Infinity request -> internal request; over-long documents are cut at the end, as Infinity does."""
    model = None if body.model in (None, INFINITY_UNSPECIFIED_MODEL) else body.model
    return RerankRequest(query=body.query, passages=list(body.documents), model=model, truncate=Truncate.END,
                         top_n=body.top_n)


def infinity_result_to_wire(result: RerankResult, body: InfinityRerankRequest, request_id: str | None) -> dict:
    """Internal result -> Infinity's answer: best first, cut to top_n, [0, 1] scores unless raw_scores."""
    scores = result.logits.astype(float) if body.raw_scores else result_relevance(result)
    results = []
    for i, _ in result.top(body.top_n):
        item: dict[str, Any] = {"relevance_score": float(scores[i]), "index": i}
        if body.return_documents:
            item["document"] = body.documents[i]
        results.append(item)
    return {"object": "rerank", "results": results, "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            "id": request_id or "", "created": int(time.time())}


async def rerank(request: Request, response: Response, payload: dict) -> dict:
    """The Infinity form of /rerank: `payload` is the parsed JSON body, with `documents`."""
    request.state.dialect = INFINITY
    body = await common.parse_body(request, InfinityRerankRequest, payload)
    req = infinity_to_internal(body)
    result = await common.rerank(request, response, req)
    return infinity_result_to_wire(result, body, common.request_id(request))
