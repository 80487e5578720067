"""What every dialect does the same way: look up the model, enforce limits, score, time it."""

from __future__ import annotations

from fastapi import Request, Response

from openrerank.api.errors import ApiError
from openrerank.api.middleware import arrival
from openrerank.config import ServerConfig
from openrerank.engine.served import ServedModels
from openrerank.schemas.internal import RerankRequest, RerankResult


def served_models(request: Request) -> ServedModels:
    return request.app.state.models


def config(request: Request) -> ServerConfig:
    return request.app.state.config


def check_ready(request: Request) -> None:
    """503 until the models are loaded (a dead model worker answers 503 itself, per model)."""
    reg = served_models(request)
    if reg.load_error:
        raise ApiError(503, "model(s) failed to load; see the server log", kind="unavailable")
    if not reg.loaded:
        raise ApiError(503, "model(s) not loaded yet; retry shortly", kind="unavailable",
                       headers={"Retry-After": "5"})


def check_passage_count(request: Request, count: int, what: str = "passages") -> None:
    limit = config(request).max_passages
    if count > limit:
        raise ApiError(400, f"Number of {what} ({count}) exceeds the maximum of {limit} (--max-passages)",
                       kind="too_many")


def deadline(request: Request) -> float:
    """`time.monotonic()` instant by which the answer is due: arrival + --request-timeout."""
    return arrival(request.scope) + config(request).request_timeout


async def rerank(request: Request, response: Response, req: RerankRequest) -> RerankResult:
    """Score `req` on the model it names; timing headers go on `response` (TEI's header names)."""
    check_passage_count(request, len(req.passages))
    return (await rerank_many(request, response, [req]))[0]


async def rerank_many(request: Request, response: Response, reqs: list[RerankRequest]) -> list[RerankResult]:
    """Several queries of one client request, scored as one unit on the model the first one names."""
    check_ready(request)
    model = served_models(request).get(reqs[0].model)
    results = await model.rerank_many(reqs, deadline=deadline(request))
    t = results[0].timings
    response.headers["x-tokenize-time"] = f"{t.tokenize_ms:.2f}"
    response.headers["x-queue-time"] = f"{t.queue_ms:.2f}"
    response.headers["x-inference-time"] = f"{t.inference_ms:.2f}"
    response.headers["x-total-time"] = f"{t.total_ms:.2f}"
    return results
