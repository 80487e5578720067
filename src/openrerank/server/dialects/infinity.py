"""Infinity's dialect, at the server's root as Infinity serves it: `POST /rerank` with `documents` (the TEI route
hands such bodies over), `POST /embeddings`, `GET /models`; `GET /health` is shared with TEI (`tei.py`).

Cohere-shaped rerank answer with `results`, OpenAI-shaped embeddings; errors in Infinity's OpenAI-style shape
`{"error": {"message", "type", "param", "code"}}`. Over-long texts are cut at the end, as Infinity does.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from openrerank.core.requests import RerankRequest, RerankResult, Truncate
from openrerank.server.dialects import common, embeddings, list_bounds
from openrerank.server.dialects.score_form import result_relevance
from openrerank.server.errors import Dialect, Kind, register_dialect
from openrerank.server.responses import OrjsonResponse
from openrerank.wire.infinity import (
    INFINITY_UNSPECIFIED_MODEL,
    InfinityEmbeddingsRequest,
    InfinityError,
    InfinityModelList,
    InfinityRerankRequest,
)


def infinity_error_body(status: int, message: str, kind: Kind) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


#: Infinity's paths. /rerank is TEI's too: its handler picks this dialect for `documents` bodies.
INFINITY = register_dialect(Dialect(
    "infinity", ("/embeddings", "/models"), infinity_error_body,
    status_for={Kind.VALIDATION: 422, Kind.TOO_MANY: 422, Kind.TOO_LONG: 422, Kind.TOO_MUCH_WORK: 422,
                Kind.MODEL_NOT_FOUND: 400, Kind.OVERLOADED: 429},
    request_models={"/rerank": InfinityRerankRequest, "/embeddings": InfinityEmbeddingsRequest},
    error_model=InfinityError,
))
list_bounds.bound(InfinityRerankRequest, documents=list_bounds.PASSAGES)
list_bounds.bound(InfinityEmbeddingsRequest, input=list_bounds.INPUTS)

router = APIRouter(route_class=list_bounds.BoundedRoute)

_ERRORS = INFINITY.responses(400, 401, 413, 415, 422, 429, 500, 503, 504, s400="Unknown model, a model without "
                             "embeddings, or a dimensions it cannot shorten to", s422="Validation error: wrong "
                             "types, empty or too many inputs")


def model_name(model: str | None) -> str | None:
    """A served id, or None for the first model: Infinity's clients send `default/not-specified` by default."""
    return None if model in (None, INFINITY_UNSPECIFIED_MODEL) else model


def infinity_to_internal(body: InfinityRerankRequest) -> RerankRequest:
    """Infinity request -> internal request; over-long documents are cut at the end, as Infinity does."""
    return RerankRequest(query=body.query, passages=list(body.documents), model=model_name(body.model),
                         truncate=Truncate.END,
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


@router.post("/embeddings", tags=["Infinity"], response_model=None, responses=_ERRORS,
             summary="Embed texts (Infinity: OpenAI's shape at the root, `dimensions: 0` = full size)")
async def embed(body: InfinityEmbeddingsRequest, request: Request) -> OrjsonResponse:
    """Infinity's /embeddings: the OpenAI/NIM route's engine call and input checks; over-long texts are cut at
    the end, as Infinity does."""
    common.check_ready(request)
    texts = embeddings.input_texts(body.input)
    result = await embeddings.embed_texts(request, texts, model_name(body.model), truncate=Truncate.END,
                                          dimensions=body.dimensions or None)
    content = {**embeddings.openai_list(result, body.encoding_format), "id": common.request_id(request),
               "created": int(time.time())}
    return embeddings.embed_response(request, content, result, texts)


@router.get("/models", tags=["Infinity"], response_model=InfinityModelList, responses=INFINITY.responses(401),
            summary="Served models, as Infinity lists them (OpenAI's /v1/models has openrerank's own entries)")
async def models(request: Request) -> dict:
    reg = common.served_models(request)
    config = common.config(request)
    served = {m.name: m for m in reg.models()}
    data = []
    for name in reg.names:
        m = served.get(name)
        sched = m.scheduler if m is not None else None
        data.append({
            "id": name, "object": "model", "owned_by": "infinity", "created": m.created if m else 0,
            "backend": m.loaded.scorer.description if m else "", "capabilities": list(m.tasks) if m else [],
            "stats": {"queue_fraction": sched.pending / config.max_queue if sched and config.max_queue else 0.0,
                      "queue_absolute": sched.queued if sched else 0,
                      "results_pending": sched.pending if sched else 0,
                      "batch_size": config.batch_policy.max_size}})
    return {"object": "list", "data": data}
