"""What every dialect does the same way: look up the model, enforce limits, score, time it."""

from __future__ import annotations

from fastapi import Request, Response

from openrerank.api.errors import ApiError
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


def check_input_count(request: Request, count: int) -> None:
    limit = config(request).max_inputs
    if count > limit:
        raise ApiError(400, f"Number of inputs ({count}) exceeds the maximum of {limit} (--max-inputs)",
                       kind="too_many")


def timing_headers(timings: Timings) -> dict[str, str]:
    """Where a request's time went, in TEI's header names (milliseconds)."""
    t = timings
    return {"x-tokenize-time": f"{t.tokenize_ms:.2f}", "x-queue-time": f"{t.queue_ms:.2f}",
            "x-inference-time": f"{t.inference_ms:.2f}", "x-total-time": f"{t.total_ms:.2f}"}


async def rerank(request: Request, response: Response, req: RerankRequest) -> RerankResult:
    """Score `req` on the model it names; timing headers go on `response` (TEI's header names)."""
    check_ready(request)
    model = served_models(request).get(req.model)
    check_passage_count(request, len(req.passages))
    result = await model.rerank(req)
    response.headers.update(timing_headers(result.timings))
    return result
