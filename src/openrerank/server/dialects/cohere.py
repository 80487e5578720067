"""Cohere / Jina dialect: `POST /v1/rerank` and `POST /v2/rerank`.

Chunking is on by default, as Cohere does: a document longer than the model's window is scored
by its best overlapping window (v1: at most `max_chunks_per_doc` windows, default 10; v2: only the
first `max_tokens_per_doc` tokens, default 4096). `relevance_score` is in [0, 1]; see
`openrerank.server.dialects.score_form` for how it is derived from the model's score.

vLLM serves its RerankRequest on these routes: its `truncate_prompt_tokens` cuts instead of chunking (as on
/v1/score), its `use_activation: false` (or legacy `activation`, `softmax`) returns the raw score, and a
`top_n` of 0 or less is all.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response

from openrerank.core.requests import RerankRequest, RerankResult, Truncate
from openrerank.server.dialects import common, list_bounds
from openrerank.server.dialects.score import check_truncation, truncation
from openrerank.server.dialects.score_form import result_relevance
from openrerank.server.errors import ApiError, Dialect, Kind, register_dialect
from openrerank.wire.cohere import (
    CohereError,
    CohereRerankResponse,
    CohereV1Error,
    CohereV1RerankRequest,
    CohereV2RerankRequest,
)
from openrerank.wire.score import VllmScoringOptions

#: Cohere's documented defaults.
V1_MAX_CHUNKS_PER_DOC = 10
#: Documents (or chunks of them) one search unit covers.
SEARCH_UNIT_DOCUMENTS = 100
V2_MAX_TOKENS_PER_DOC = 4096


def cohere_error_body(status: int, message: str, kind: Kind) -> dict:
    return {"message": message}


def jina_error_body(status: int, message: str, kind: Kind) -> dict:
    """Cohere's body plus Jina's `detail` (Jina's clients raise KeyError without it; Cohere's SDK ignores it)."""
    return {"message": message, "detail": message}


#: Cohere answers 429 when it is overloaded (a model it does not know is 404, as everywhere).
_STATUS_FOR = {Kind.OVERLOADED: 429}
#: /v2/rerank: Cohere's alone, its error body exactly Cohere's.
COHERE = register_dialect(Dialect(
    "cohere", ("/v2/rerank",), cohere_error_body, status_for=_STATUS_FOR,
    request_models={"/v2/rerank": CohereV2RerankRequest}, error_model=CohereError,
))
#: /v1/rerank: Cohere's v1 and Jina's API, the error body readable by both.
COHERE_V1 = register_dialect(Dialect(
    "cohere-v1", ("/v1/rerank",), jina_error_body, status_for=_STATUS_FOR,
    request_models={"/v1/rerank": CohereV1RerankRequest}, error_model=CohereV1Error,
))
list_bounds.bound(CohereV1RerankRequest, documents=list_bounds.PASSAGES)
list_bounds.bound(CohereV2RerankRequest, documents=list_bounds.PASSAGES)

router = APIRouter(route_class=list_bounds.BoundedRoute)

_CODES = (400, 401, 404, 408, 413, 415, 429, 500, 503, 504)
_V1_ERRORS = COHERE_V1.responses(*_CODES)
_V2_ERRORS = COHERE.responses(*_CODES)


def document_text(doc: str | dict[str, Any], index: int, rank_fields: list[str] | None) -> str:
    """The text a v1 document is ranked on: the string, its `text`, or its `rank_fields`."""
    if isinstance(doc, str):
        return doc
    fields = rank_fields or ["text"]
    missing = [f for f in fields if f not in doc]
    if missing and "image" in doc:  # a Jina image document: this route ranks text
        raise ApiError(400, f"documents[{index}] is an image document, and this route ranks text: send image "
                       "passages to POST /v1/ranking ({\"image\": \"data:image/png;base64,...\"}), for a model "
                       "that reads images")
    if missing:
        raise ApiError(400, f"documents[{index}] has no field {', '.join(repr(m) for m in missing)} "
                       f"(documents must be strings or objects with {' and '.join(repr(f) for f in fields)})")
    if len(fields) == 1:
        value = doc[fields[0]]
        if not isinstance(value, str):
            raise ApiError(400, f"documents[{index}].{fields[0]} must be a string")
        return value
    return "\n".join(f"{f}: {doc[f] if isinstance(doc[f], str) else _plain(doc[f])}" for f in fields)


def _plain(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def v1_to_internal(body: CohereV1RerankRequest) -> RerankRequest:
    """Cohere v1 request -> internal request (chunked, at most `max_chunks_per_doc` windows; vLLM's
    `truncate_prompt_tokens`: cut instead, as /v1/score cuts)."""
    texts = [document_text(d, i, body.rank_fields) for i, d in enumerate(body.documents)]
    if (cut := _vllm_cut(body, "max_chunks_per_doc", body.max_chunks_per_doc)) is not None:
        return RerankRequest(query=body.query, passages=texts, model=body.model, truncate=cut[0],
                             top_n=top_n(body.top_n), max_tokens_per_passage=cut[1], instruction=body.instruction)
    return RerankRequest(
        query=body.query, passages=texts, model=body.model, truncate=Truncate.CHUNK,
        top_n=top_n(body.top_n),
        max_chunks_per_passage=body.max_chunks_per_doc, default_chunks_per_passage=V1_MAX_CHUNKS_PER_DOC,
        instruction=body.instruction,
    )


def v2_to_internal(body: CohereV2RerankRequest) -> RerankRequest:
    """Cohere v2 request -> internal request (first `max_tokens_per_doc` tokens, chunked; vLLM's
    `truncate_prompt_tokens`: cut instead, as /v1/score cuts)."""
    cut = _vllm_cut(body, "max_tokens_per_doc", body.max_tokens_per_doc)
    truncate, cap = cut or (Truncate.CHUNK, body.max_tokens_per_doc or V2_MAX_TOKENS_PER_DOC)
    return RerankRequest(
        query=body.query, passages=list(body.documents), model=body.model, truncate=truncate,
        top_n=top_n(body.top_n), max_tokens_per_passage=cap, instruction=body.instruction,
    )


def top_n(value: int | None) -> int | None:
    """The results kept: absent, 0 or less is all (vLLM's rule; Cohere refuses below 1, so its clients never
    send one)."""
    return value if value is not None and value > 0 else None


def _vllm_cut(body: VllmScoringOptions, chunk_field: str,
              chunk_value: int | None) -> tuple[Truncate, int | None] | None:
    """vLLM's `truncate_prompt_tokens` as the score route reads it; with Cohere's chunking bound it is a 400
    (cut, or chunk: not both)."""
    cut = truncation(body.truncate_prompt_tokens)
    if cut is not None and chunk_value is not None:
        raise ApiError(400, f"truncate_prompt_tokens (cut each document) and {chunk_field} (chunk it) "
                       "do not go together: send one")
    return cut


def check_window(request: Request, body: VllmScoringOptions, model: str | None) -> None:
    """A `truncate_prompt_tokens` over the model's window is a 400, as on /v1/score."""
    if body.truncate_prompt_tokens is not None:
        common.check_ready(request)
        check_truncation(body.truncate_prompt_tokens, common.served_models(request).get(model).max_length)


def search_units(result: RerankResult) -> int:
    """Cohere's billing unit: "one query with up to 100 documents to be ranked", where a document longer than
    the model's window is split into chunks that each count as a document (cohere.com/pricing)."""
    return max(1, math.ceil(result.scored_windows / SEARCH_UNIT_DOCUMENTS))


def result_to_wire(result: RerankResult, req: RerankRequest, *, version: str,
                   documents: list[Any] | None = None, request_id: str | None = None,
                   activation: bool = True) -> dict:
    """Internal result -> Cohere response: best first, cut to top_n, [0, 1] relevance scores (raw ones
    without `activation`: vLLM's use_activation false).

    `documents`: when given (return_documents), each result carries its document -- the original
    v1 object with all its fields, or `{"text": ...}` for a string.
    """
    scores = result_relevance(result) if activation else result.logits.astype(float)
    results = []
    for i, _ in result.top(req.top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if documents is not None:
            doc = documents[i]
            item["document"] = {"text": doc} if isinstance(doc, str) else doc
        results.append(item)
    return {
        "id": request_id or str(uuid.uuid4()),
        "results": results,
        "meta": {"api_version": {"version": version}, "billed_units": {"search_units": search_units(result)},
                 "tokens": {"input_tokens": result.prompt_tokens, "output_tokens": 0}},
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


@router.post("/v1/rerank", response_model=None, tags=["Cohere / Jina"],
             responses={200: {"model": CohereRerankResponse}, **_V1_ERRORS},
             summary="Rerank documents (Cohere v1 / Jina compatible)")
async def rerank_v1(body: CohereV1RerankRequest, request: Request, response: Response) -> dict:
    req = v1_to_internal(body)
    check_window(request, body, body.model)
    result = await common.rerank(request, response, req)
    docs = list(body.documents) if body.return_documents else None
    return result_to_wire(result, req, version="1", documents=docs,
                          request_id=common.request_id(request), activation=body.wants_activation())


@router.post("/v2/rerank", response_model=None, tags=["Cohere / Jina"],
             responses={200: {"model": CohereRerankResponse}, **_V2_ERRORS},
             summary="Rerank documents (Cohere v2 compatible)")
async def rerank_v2(body: CohereV2RerankRequest, request: Request, response: Response) -> dict:
    req = v2_to_internal(body)
    check_window(request, body, body.model)
    result = await common.rerank(request, response, req)
    docs = list(body.documents) if body.return_documents else None
    return result_to_wire(result, req, version="2", documents=docs,
                          request_id=common.request_id(request), activation=body.wants_activation())
