"""The FastAPI app factory: dialect routers, middleware, error handlers, background model loading."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from openrerank import __version__
from openrerank.api import cohere, nim, score, tei
from openrerank.api.errors import ApiError, Dialect, dialect_for, format_validation_errors
from openrerank.api.middleware import ApiKeyMiddleware, BodyGuardMiddleware, MetricsMiddleware, RequestLogMiddleware
from openrerank.api.responses import OrjsonResponse
from openrerank.config import ServerConfig
from openrerank.engine.errors import DeadlineExceededError, EngineStoppedError, QueueFullError
from openrerank.engine.loading import LoadOptions, model_sources
from openrerank.engine.scheduler import SchedulerConfig
from openrerank.engine.served import ServedModels, UnknownModelError, load_served_model
from openrerank.metrics import Metrics
from openrerank.text.prepare import InputTooLongError

log = logging.getLogger(__name__)

#: Dialect routers, in the order their routes appear in the OpenAPI document.
ROUTERS = [nim.router, cohere.router, tei.router, score.router]

#: Where the Swagger UI / ReDoc assets are served from (public, like /docs itself).
DOCS_ASSETS = "/docs-assets"

_HTTP_KINDS = {400: "validation", 401: "auth", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 422: "validation"}


def load_options(config: ServerConfig) -> LoadOptions:
    return LoadOptions(backend=config.backend, dtype=config.dtype, device=config.device,
                       threads=config.threads, max_length=config.max_length,
                       allow_pickle=config.allow_pickle, revision=config.revision)


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    return SchedulerConfig(max_batch_tokens=config.max_batch_tokens, max_batch_size=config.max_batch_size,
                           batch_wait_ms=config.batch_wait_ms, max_queue=config.max_queue,
                           max_padding=config.max_padding,
                           request_timeout=config.request_timeout)


async def load_all(app: FastAPI) -> None:
    """Load every model off the event loop so health/live answers during a long load.

    When every model is loaded and warmed, one "ready" line is logged. A model that fails to load is logged as
    one error line and, when the CLI started the server, stops it with exit status 3 (an orchestrator restarts
    it or shows the error) instead of leaving it up answering 503 forever.
    """
    config: ServerConfig = app.state.config
    reg: ServedModels = app.state.models
    started = time.perf_counter()
    loading = "?"
    try:
        for source in model_sources(config.models, config.model_families, config.instructions):
            loading = source.served_id
            served = await asyncio.to_thread(load_served_model, source, load_options(config),
                                             scheduler_config(config), app.state.metrics)
            await served.scheduler.start()
            reg.add(served)
        reg.ready = True
        where = f" on {app.state.public_url}" if app.state.public_url else ""
        log.info("ready: serving %s%s (loaded and warmed in %.1fs)", ", ".join(reg.names), where,
                 time.perf_counter() - started)
    except Exception as exc:  # surfaced through /v1/health/ready, the log and the exit status
        reg.load_error = f"{loading}: {type(exc).__name__}: {exc}"
        log.error("model loading failed: %s", reg.load_error)
        log.debug("model loading traceback", exc_info=True)
        shutdown = getattr(app.state, "request_shutdown", None)
        if shutdown is not None:
            shutdown()


def request_dialect(request: Request) -> Dialect:
    """The dialect a route chose for this request (one path, two forms: /rerank), else the path's owner."""
    return getattr(request.state, "dialect", None) or dialect_for(request.url.path)


def _error_response(request: Request, status: int, message: str, kind: str,
                    headers: dict[str, str] | None = None) -> OrjsonResponse:
    return request_dialect(request).response(status, message, kind, headers)


def install_openapi_models(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Add schemas that routes reference by hand (bodies they parse themselves) to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        _, defs = models_json_schema([(m, "validation") for m in models],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model_schema in defs.get("$defs", {}).items():
            components.setdefault(name, model_schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return _error_response(request, exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        dialect = request_dialect(request)
        model = dialect.request_models.get(request.url.path)
        return dialect.response(400, format_validation_errors(list(exc.errors()), model), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body is not valid JSON"
        return _error_response(request, exc.status_code, message, _HTTP_KINDS.get(exc.status_code, "http"),
                               dict(exc.headers or {}))

    @app.exception_handler(UnknownModelError)
    async def _model(request: Request, exc: UnknownModelError):
        return _error_response(request, 404, str(exc), "model_not_found")

    @app.exception_handler(InputTooLongError)
    async def _too_long(request: Request, exc: InputTooLongError):
        return _error_response(request, 400, str(exc), "too_long")

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError):
        return _error_response(request, 503, str(exc), "overloaded",
                               {"Retry-After": str(max(1, round(exc.retry_after)))})

    @app.exception_handler(DeadlineExceededError)
    async def _deadline(request: Request, exc: DeadlineExceededError):
        return _error_response(request, 504, str(exc), "timeout")

    @app.exception_handler(EngineStoppedError)
    async def _stopped(request: Request, exc: EngineStoppedError):
        return _error_response(request, 503, str(exc), "unavailable", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(request, 500, f"internal server error ({type(exc).__name__})", "internal")


def route_paths(app: FastAPI) -> set[str]:
    """Every route path, for bounded-cardinality metric labels (included routers are nested)."""
    paths: set[str] = set()
    stack = list(app.routes)
    while stack:
        route = stack.pop()
        if getattr(route, "path", None):
            paths.add(route.path)
        included = getattr(route, "original_router", None)
        if included is not None:
            stack.extend(included.routes)
    return paths


def create_app(config: ServerConfig | None = None, *, load_models: bool = True,
               public_url: str | None = None) -> FastAPI:
    """The app; `public_url` is only what the "ready" log line shows."""
    config = config or ServerConfig()
    tracer = None
    if config.otlp_endpoint:
        from openrerank.tracing import Tracer

        tracer = Tracer(config.otlp_endpoint)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(load_all(app)) if load_models else None
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            await app.state.models.stop()
            if tracer is not None:
                tracer.shutdown()

    # /docs and /redoc load Swagger UI and ReDoc from files the app serves itself (the fastapi-offline
    # package ships them), so the documentation works on a machine without internet access.
    app = FastAPIOffline(
        title="openrerank",
        version=__version__,
        description="Self-hosted reranking: NVIDIA NIM `/v1/ranking`, Cohere/Jina `/v1|v2/rerank`, "
        "TEI and Infinity `/rerank` and `/v1/score`.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
        static_url=DOCS_ASSETS,
    )
    app.state.config = config
    app.state.public_url = public_url
    app.state.metrics = Metrics()
    app.state.models = ServedModels()
    app.state.models.expected = [s.served_id for s in model_sources(config.models)]
    for router in ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    install_openapi_models(app, tei.OPENAPI_MODELS)
    routes = functools.cache(lambda: route_paths(app))
    # Last added runs first: the request log sees everything (and gives every answer its x-request-id),
    # metrics see everything, auth runs before the body is read.
    app.add_middleware(BodyGuardMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=routes)
    app.add_middleware(RequestLogMiddleware, routes=routes, tracer=tracer)
    return app
