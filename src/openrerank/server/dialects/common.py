"""What every dialect does the same way: look up the model, enforce limits, score, time it."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from openrerank.core.requests import RerankRequest, RerankResult, Timings
from openrerank.core.settings import Shown
from openrerank.engine.served_models import ServedModels
from openrerank.server.config import ServerConfig
from openrerank.server.dialects.list_bounds import PASSAGES, check_lists, off_loop
from openrerank.server.errors import ApiError, Kind
from openrerank.server.middleware import arrival, request_usage
from openrerank.server.middleware import request_id as scope_request_id
from openrerank.server.request_messages import format_validation_errors


def served_models(request: Request) -> ServedModels:
    return request.app.state.models


def config(request: Request) -> ServerConfig:
    return request.app.state.config


def shown(request: Request) -> Shown:
    """How a refusal names the settings not typed as flags (core/settings.py; `create_app(shown=...)`)."""
    return request.app.state.shown


def unready_reason(request: Request) -> str | None:
    """Why the readiness probes say 503 (None: ready): loading, a load error or a dead worker, or the server
    shutting down (under uvicorn no probe gets here then: the drain closes the listening socket and every idle
    connection; an ASGI host that still delivers one, such as Starlette's TestClient, must not see it ready)."""
    if request.app.state.drain.draining:
        return "Service is shutting down."
    reg = served_models(request)
    return None if reg.ready else reg.status()


def check_ready(request: Request) -> None:
    """503 until the models are loaded (a dead model worker answers 503 itself, per model)."""
    require_ready(served_models(request))


def require_ready(reg: ServedModels) -> None:
    """check_ready for any protocol (gRPC maps the ApiError's kind to its own status)."""
    if reg.load_error:
        raise ApiError(503, "model(s) failed to load; see the server log", kind=Kind.UNAVAILABLE)
    if not reg.loaded:
        raise ApiError(503, "model(s) not loaded yet; retry shortly", kind=Kind.UNAVAILABLE,
                       headers={"Retry-After": "5"})


def require_passage_count(config: ServerConfig, count: int, shown: Shown | None = None) -> None:
    """`--max-passages` for a request that is not JSON (gRPC); JSON bodies are counted as they are parsed
    (`list_bounds`). `shown`: how the refusal names the setting (core/settings.py)."""
    PASSAGES.require(config, count, shown)


def deadline(request: Request) -> float:
    """`time.monotonic()` instant by which the answer is due: arrival + --request-timeout."""
    return arrival(request.scope) + config(request).request_timeout


async def rerank(request: Request, response: Response, req: RerankRequest) -> RerankResult:
    """Score `req` on the model it names; timing headers go on `response` (TEI's header names). Its passages
    were counted as the body was parsed (`list_bounds`)."""
    return (await rerank_many(request, response, [req]))[0]


async def rerank_many(request: Request, response: Response, reqs: list[RerankRequest]) -> list[RerankResult]:
    """Several queries of one client request, scored as one unit on the model the first one names."""
    check_ready(request)
    model = served_models(request).get(reqs[0].model)
    if any(r.has_images for r in reqs):
        served_models(request).check_images(model)
    results = await model.rerank_many(reqs, deadline=deadline(request))
    record_usage(request, response, model=model.name, items=sum(len(r.passages) for r in reqs),
                 tokens=sum(r.prompt_tokens for r in results), timings=results[0].timings)
    return results


def request_id(request: Request) -> str:
    """The request's id (the caller's x-request-id, or one the server made); echoed in the response header."""
    return scope_request_id(request.scope)


def record_usage(request: Request, response: Response, *, model: str, items: int, tokens: int,
                 timings: Timings, item_kind: str = "passages") -> None:
    """What the access log line, the trace and the x-*-time headers (TEI's names) report for this request.

    Any route that runs a model calls this once (items: passages scored, or `item_kind="texts"` embedded)."""
    t = timings
    response.headers["x-tokenize-time"] = f"{t.tokenize_ms:.2f}"
    response.headers["x-queue-time"] = f"{t.queue_ms:.2f}"
    response.headers["x-inference-time"] = f"{t.inference_ms:.2f}"
    response.headers["x-total-time"] = f"{t.total_ms:.2f}"
    request_usage(request.scope).update({"model": model, item_kind: items, "tokens": tokens,
                                         "tokenize_ms": t.tokenize_ms, "queue_ms": t.queue_ms,
                                         "inference_ms": t.inference_ms})


async def parse_body(request: Request, model: type[BaseModel], payload: dict) -> Any:
    """A body the route parsed itself (a path shared by two forms), validated as `model`: 422 when it is not.
    A bounded list over its count is refused first, before any element is validated; a big body is validated
    off the event loop (`list_bounds.off_loop`)."""
    check_lists(config(request), model, payload, shown(request))
    try:
        return await off_loop(len(await request.body()), model.model_validate, payload)
    except ValidationError as exc:
        raise ApiError(422, format_validation_errors(list(exc.errors()), model)) from None
