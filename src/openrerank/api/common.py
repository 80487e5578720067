"""What every dialect does the same way: look up the model, enforce limits, score, time it."""

from __future__ import annotations

from fastapi import Request, Response

from openrerank.api.errors import ApiError
from openrerank.api.middleware import request_usage
from openrerank.config import ServerConfig
from openrerank.engine.served import ServedModels
from openrerank.schemas.internal import RerankRequest, RerankResult, Timings


def served_models(request: Request) -> ServedModels:
    return request.app.state.models


def config(request: Request) -> ServerConfig:
    return request.app.state.config


def check_ready(request: Request) -> None:
    reg = served_models(request)
    if not reg.ready:
        detail = f": {reg.load_error}" if reg.load_error else "; retry shortly"
        raise ApiError(503, f"model(s) not loaded yet{detail}", kind="unavailable",
                       headers={"Retry-After": "5"})


def check_passage_count(request: Request, count: int, what: str = "passages") -> None:
    limit = config(request).max_passages
    if count > limit:
        raise ApiError(400, f"Number of {what} ({count}) exceeds the maximum of {limit} (--max-passages)",
                       kind="too_many")


async def rerank(request: Request, response: Response, req: RerankRequest) -> RerankResult:
    """Score `req` on the model it names; timing headers go on `response` (TEI's header names)."""
    check_ready(request)
    model = served_models(request).get(req.model)
    check_passage_count(request, len(req.passages))
    result = await model.rerank(req)
    record_usage(request, response, model=model.name, items=len(req.passages), tokens=result.prompt_tokens,
                 timings=result.timings)
    return result


def request_id(request: Request) -> str | None:
    """The request's id (the caller's x-request-id, or one the server made); echoed in the response header."""
    return request.scope.get("state", {}).get("request_id")


def record_usage(request: Request, response: Response, *, model: str, items: int, tokens: int,
                 timings: Timings) -> None:
    """What the access log line, the trace and the x-*-time headers (TEI's names) report for this request.

    Any route that runs a model calls this once (items: passages, or texts embedded)."""
    t = timings
    response.headers["x-tokenize-time"] = f"{t.tokenize_ms:.2f}"
    response.headers["x-queue-time"] = f"{t.queue_ms:.2f}"
    response.headers["x-inference-time"] = f"{t.inference_ms:.2f}"
    response.headers["x-total-time"] = f"{t.total_ms:.2f}"
    request_usage(request.scope).update(model=model, passages=items, tokens=tokens, tokenize_ms=t.tokenize_ms,
                                        queue_ms=t.queue_ms, inference_ms=t.inference_ms)
