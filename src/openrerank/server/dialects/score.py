"""vLLM score dialect: `POST /v1/score` and `POST /score`.

The pair sides go by any of vLLM's names (`text_1`/`text_2`, `queries`/`documents`, `queries`/`items`,
`data_1`/`data_2`: `wire.score.SCORE_FORMS`); below, text_1 and text_2 stand for whichever the body used.
`text_1` str + `text_2` list: one query against many texts. Equal-length lists: pairwise
(`text_1[i]` with `text_2[i]`); a one-element `text_1` list is broadcast. Pairs are grouped by
their distinct `text_1` into one internal request each, and the groups go to the model's scheduler
as one submission (one admission unit, one deadline, one cancellation, whatever
the number of groups). `data` keeps pair order (not sorted), as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response

from openrerank.core.requests import RerankRequest, RerankResult, Truncate
from openrerank.server.dialects import common, list_bounds
from openrerank.server.dialects.score_form import result_relevance
from openrerank.server.errors import ApiError, Dialect, Kind, register_dialect
from openrerank.wire.score import SCORE_FORMS, ScoreError, ScoreRequest, ScoreResponse

#: vLLM's error `type` for the statuses that have their own (the OpenAI SDK's exception names); any other
#: status is typed by its class (`error_type`), so a client error is never an "InternalServerError".
_TYPES = {401: "AuthenticationError", 404: "NotFoundError", 408: "TimeoutError", 429: "RateLimitError",
          503: "ServiceUnavailableError", 504: "TimeoutError"}


def error_type(status: int) -> str:
    """vLLM's error type for a status: its own name, else BadRequestError for a 4xx (vLLM's default type for
    a client error: 405, 413, 415, 422, 431, ...), InternalServerError for the rest."""
    return _TYPES.get(status) or ("BadRequestError" if 400 <= status < 500 else "InternalServerError")


def score_error_body(status: int, message: str, kind: Kind) -> dict:
    """vLLM's (OpenAI-style) ErrorResponse."""
    return {"object": "error", "message": message, "type": error_type(status), "param": None, "code": status}


SCORE = register_dialect(Dialect(
    "score",
    ("/v1/score", "/score"),
    score_error_body,
    request_models={"/v1/score": ScoreRequest, "/score": ScoreRequest},
    error_model=ScoreError,
))
list_bounds.bound(ScoreRequest, **{f: list_bounds.PAIRS for form in SCORE_FORMS for f in form})

router = APIRouter(route_class=list_bounds.BoundedRoute)

_ERRORS = SCORE.responses(400, 401, 404, 408, 413, 415, 500, 503, 504)


@dataclass(frozen=True)
class ScorePlan:
    """Internal requests (one per distinct text_1) and, per pair, (request index, passage index)."""

    requests: list[RerankRequest]
    pairs: list[tuple[int, int]]


def to_internal(body: ScoreRequest) -> ScorePlan:
    """vLLM score request -> internal requests; 1:1, 1:N and N:N (vLLM's rule), else 400."""
    side_1, side_2 = body.sides()
    name_1, name_2 = body.form
    texts_1 = [side_1] if isinstance(side_1, str) else list(side_1)
    texts_2 = [side_2] if isinstance(side_2, str) else list(side_2)
    if not texts_1:
        raise ApiError(400, f"{name_1}: at least one text element must be given")
    if not texts_2:
        raise ApiError(400, f"{name_2}: at least one text element must be given")
    if len(texts_1) > 1 and len(texts_1) != len(texts_2):
        raise ApiError(400, f"Input lengths must be either 1:1, 1:N or N:N; got {len(texts_1)}:{len(texts_2)}")
    if len(texts_1) == 1:
        texts_1 = texts_1 * len(texts_2)
    truncate, cap = truncation(body.truncate_prompt_tokens) or (Truncate.NONE, None)
    groups: dict[str, int] = {}
    passages: list[list[str]] = []
    pairs: list[tuple[int, int]] = []
    for t1, t2 in zip(texts_1, texts_2, strict=True):
        g = groups.setdefault(t1, len(groups))
        if g == len(passages):
            passages.append([])
        pairs.append((g, len(passages[g])))
        passages[g].append(t2)
    requests = [
        RerankRequest(query=q, passages=passages[g], model=body.model, truncate=truncate,
                      max_tokens_per_passage=cap, instruction=body.instruction)
        for q, g in groups.items()
    ]
    return ScorePlan(requests, pairs)


def truncation(k: int | None) -> tuple[Truncate, int | None] | None:
    """vLLM's `truncate_prompt_tokens` (here and on the rerank routes) as (truncation, tokens kept of each
    passage): -1 cuts to the window, k > 0 also keeps each passage's first k tokens; None when not asked."""
    if k is None:
        return None
    return Truncate.END, (k if k > 0 else None)


def check_truncation(k: int | None, window: int) -> None:
    """vLLM refuses a `truncate_prompt_tokens` over the model's window (its max_model_len) with this 400."""
    if k is not None and k > window:
        raise ApiError(400, f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({window}). "
                       "Please, select a smaller truncation size.")


def result_to_wire(plan: ScorePlan, results: list[RerankResult], *, activation: bool,
                   model: str, request_id: str | None = None, created: int | None = None) -> dict:
    """Internal results -> vLLM ScoreResponse, one entry per pair in request order."""
    forms = [result_relevance(r) if activation else r.logits.astype(float) for r in results]
    tokens = sum(r.prompt_tokens for r in results)
    return {
        "id": request_id or f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "data": [{"index": n, "object": "score", "score": float(forms[g][p])}
                 for n, (g, p) in enumerate(plan.pairs)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }


@router.post("/v1/score", response_model=None, tags=["Score (vLLM)"],
             responses={200: {"model": ScoreResponse}, **_ERRORS},
             summary="Score text pairs (vLLM compatible)")
@router.post("/score", response_model=None, tags=["Score (vLLM)"], include_in_schema=True,
             responses={200: {"model": ScoreResponse}, **_ERRORS},
             summary="Score text pairs (vLLM compatible, unversioned path)")
async def score(body: ScoreRequest, request: Request, response: Response) -> dict:
    t0 = time.perf_counter()
    plan = to_internal(body)
    common.check_ready(request)
    model = common.served_models(request).get(body.model)  # unknown model: one 404 before any work
    check_truncation(body.truncate_prompt_tokens, model.max_length)
    outcomes = await common.rerank_many(request, response, plan.requests)
    response.headers["x-total-time"] = f"{(time.perf_counter() - t0) * 1e3:.2f}"
    return result_to_wire(plan, outcomes, activation=body.wants_activation(), model=model.name,
                          request_id=f"score-{common.request_id(request)}")
