"""The FastAPI app factory: dialect routers, middleware, error handlers, background model loading."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from openrerank import __version__
from openrerank.core.settings import Shown
from openrerank.engine.loading import ResolvedModel
from openrerank.engine.score_cache import ScoreCache
from openrerank.engine.served import load_served_model
from openrerank.engine.served_models import ServedModels
from openrerank.families.token_cache import TokenCache
from openrerank.observe.metrics import Metrics
from openrerank.server.body_budget import BodyBudget
from openrerank.server.body_guard import BodyGuardMiddleware
from openrerank.server.config import ServerConfig, ascii_host
from openrerank.server.dialects import cohere, embeddings, infinity, multi_vector, nim, score, tei
from openrerank.server.drain import Drain
from openrerank.server.engine_config import chunk_limits, image_limits, load_options, model_sources, scheduler_config
from openrerank.server.errors import (
    FAILURES,
    MODEL_FAULTS,
    ApiError,
    Dialect,
    Failure,
    Kind,
    dialect_for,
    failure_message,
)
from openrerank.server.host_limits import cap_to_memory_limit, hint_threads
from openrerank.server.middleware import (
    ApiKeyMiddleware,
    CatchAllMiddleware,
    HeadMiddleware,
    MetricsMiddleware,
    RequestLogMiddleware,
    request_id,
)
from openrerank.server.openapi import install_openapi
from openrerank.server.request_messages import body_parse_message, format_validation_errors
from openrerank.server.responses import OrjsonResponse

log = logging.getLogger(__name__)

#: Dialect routers, in the order their routes appear in the OpenAPI document.
ROUTERS = [nim.router, cohere.router, tei.router, infinity.router, score.router, embeddings.router,
           multi_vector.router]

#: Where the Swagger UI / ReDoc assets are served from (public, like /docs itself).
DOCS_ASSETS = "/docs-assets"
#: CORS (`--cors-allow-origin`): what a browser page may send, and which answer headers its script may read (the
#: request id to report, Retry-After to back off); browsers cache a preflight's answer for CORS_MAX_AGE_S.
CORS_METHODS = ["GET", "POST"]
CORS_EXPOSED = ["x-request-id", "retry-after"]
CORS_MAX_AGE_S = 600
#: The port a browser leaves out of `Origin` for each scheme.
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}

_HTTP_KINDS = {400: Kind.VALIDATION, 401: Kind.AUTH, 404: Kind.NOT_FOUND, 405: Kind.METHOD_NOT_ALLOWED,
               413: Kind.TOO_LARGE, 422: Kind.VALIDATION}


#: The most characters of a load failure's one line (its head and its tail are kept: the cause is often last).
LOAD_ERROR_CHARS = 600
# A line that only says where an exception passed (OpenVINO's "Exception from src/inference/src/cpp/core.cpp:132:").
_WHERE_ONLY = re.compile(r"Exception from \S+:\d+:")


def one_line(exc: BaseException) -> str:
    """`exc` as one log line: its lines joined, less those that only say where it passed, at most
    LOAD_ERROR_CHARS. An OpenVINO error's cause is on its last lines; its first only names a source file."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    meaningful = [line for line in lines if not _WHERE_ONLY.fullmatch(line)] or lines[:1]
    text = f"{type(exc).__name__}: {' | '.join(meaningful)}" if meaningful else type(exc).__name__
    if len(text) <= LOAD_ERROR_CHARS:
        return text
    head = LOAD_ERROR_CHARS // 3
    return f"{text[:head]} ... {text[len(text) - (LOAD_ERROR_CHARS - head - 5):]}"


async def load_all(app: FastAPI) -> None:
    """Load every model off the event loop so health/live answers during a long load.

    A model that cannot load is one error line in the log (the traceback at debug level). Unless
    `--allow-partial` lets the others serve, loading stops there: `load_error` is set and, when the
    CLI runs the server, `app.state.request_shutdown` ends it with a non-zero exit status -- a
    supervisor restarts it or shows the line, instead of a process that answers 503 forever. When every
    model is loaded and warmed, one "ready" line is logged.
    """
    config: ServerConfig = app.state.config
    reg: ServedModels = app.state.models
    resolved: dict[str, ResolvedModel] = app.state.resolved
    hint_threads(config, len(app.state.sources))
    started = time.perf_counter()
    for source in app.state.sources:
        try:
            served = await asyncio.to_thread(load_served_model, resolved.get(source.served_id, source),
                                             load_options(config),
                                             scheduler_config(config), app.state.metrics,
                                             limits=chunk_limits(config), score_cache=app.state.score_cache,
                                             token_cache=app.state.token_cache, images=image_limits(config))
            await served.scheduler.start()
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            raise
        except BaseException as exc:  # also a native library's panic (pyo3's PanicException: tokenizers, under
            # `ulimit -u 6`), which is no Exception: it ended this task unseen, and the server answered 503 for ever
            reason = one_line(exc)
            log.error("model %s (%s) could not be loaded: %s", source.served_id, source.spec, reason)
            log.debug("model loading traceback", exc_info=True)
            reg.failed[source.served_id] = reason
            if config.allow_partial:
                continue
            reg.load_error = f"model {source.served_id} could not be loaded: {reason}"
            break
        reg.add(served)
    if not reg.load_error and not reg.models():
        reg.load_error = "no model could be loaded"
    if reg.load_error:
        shutdown = getattr(app.state, "request_shutdown", None)
        if shutdown is not None:
            shutdown()
        return
    cap_to_memory_limit(app)
    reg.loaded = True
    where = f" on {app.state.public_url}" if app.state.public_url else ""
    access = "API key required" if config.api_key else "no API key: every route is open"
    log.info("ready: serving %s%s (loaded and warmed in %.1fs; %s)", ", ".join(reg.names), where,
             time.perf_counter() - started, access)


def request_dialect(request: Request) -> Dialect:
    """The dialect a route chose for this request (one path, two forms: /rerank), else the path's owner."""
    return getattr(request.state, "dialect", None) or dialect_for(request.url.path)


def _error_response(request: Request, status: int, message: str, kind: Kind,
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


def allowed_methods(request: Request) -> str:
    """A 405's `Allow`: the methods of every route of the request's path. Starlette names those of the first route
    whose path matches, and TEI's `/` is two routes (GET: health, POST: the model's task)."""
    methods: set[str] = set()
    for route in all_routes(request.app):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes the dialect's error shape; CatchAllMiddleware covers the unexpected.

    Engine and text failures are answered from one table (`errors.FAILURES`); the rest need the request."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return _error_response(request, exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        dialect = request_dialect(request)
        if isinstance(exc.__cause__, json.JSONDecodeError):  # FastAPI's parse of the body: its error keeps no line
            return dialect.response(400, body_parse_message(exc.__cause__), Kind.VALIDATION)
        model = dialect.request_models.get(request.url.path)
        return dialect.response(400, format_validation_errors(list(exc.errors()), model), Kind.VALIDATION)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = body_parse_message(exc.__cause__)  # FastAPI's "error parsing the body": what it meant
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return _error_response(request, exc.status_code, message, _HTTP_KINDS.get(exc.status_code, Kind.HTTP),
                               headers)

    def answer(failure: Failure):
        async def handler(request: Request, exc: Exception):
            headers = failure.headers(exc) if failure.headers else None
            message = failure_message(exc, request.app.state.shown)
            return _error_response(request, failure.status, message, failure.kind, headers)
        return handler

    for exc_type, failure in FAILURES.items():  # Starlette picks the handler of the nearest class, as `failure_for`
        app.add_exception_handler(exc_type, answer(failure))

    async def _model_fault(request: Request, exc: Exception):
        rid = request_id(request.scope)
        log.error("%s on %s (request id %s): %s", type(exc).__name__, request.url.path, rid, exc)
        return _error_response(request, 500, f"{exc} (request id {rid})", Kind.INTERNAL, {"x-request-id": rid})

    for exc_type in MODEL_FAULTS:
        app.add_exception_handler(exc_type, _model_fault)


def all_routes(app: FastAPI) -> list[Any]:
    """Every route of the app, those of included routers too (FastAPI nests them)."""
    routes: list[Any] = []
    stack = list(app.routes)
    while stack:
        route = stack.pop()
        routes.append(route)
        included = getattr(route, "original_router", None)
        if included is not None:
            stack.extend(included.routes)
    return routes


def route_paths(app: FastAPI) -> set[str]:
    """Every route path, for bounded-cardinality metric labels."""
    return {route.path for route in all_routes(app) if getattr(route, "path", None)}


async def _tell_models_of_drain(app: FastAPI) -> None:
    """Once the drain begins, every model plans to finish what it can before the grace period ends."""
    await app.state.drain.wait_begun()
    app.state.models.drain_by(app.state.drain.ends_at)


def create_app(config: ServerConfig | None = None, *, load_models: bool = True, wait_for_models: bool = False,
               metrics: Metrics | None = None, public_url: str | None = None,
               resolved: Sequence[ResolvedModel] = (), shown: Shown | None = None,
               memory_share: float = 1.0) -> FastAPI:
    """The whole server as one ASGI app; `public_url` is only what the "ready" log line shows.

    `shown`: how to name the settings not given as flags (the CLI's `serve_settings`: an environment variable, a
    NIM one it was translated from), so a refusal that names a setting (`--request-timeout`, `--max-queue`)
    names what the operator set.

    `resolved`: models the caller already resolved with this config (the CLI's preflight), so each is
    located and its runtime plan computed once per start; the others are resolved when they load.

    `wait_for_models`: load and warm every model before the lifespan startup completes, and fail the
    startup on a load error (under Ray Serve a replica counts as ready when its startup completes).
    The default loads in the background so /v1/health/live answers during a long load.
    """
    config = config or ServerConfig()
    tracer = None
    if config.otlp_endpoint:
        from openrerank.observe.tracing import Tracer

        tracer = Tracer(config.otlp_endpoint)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        for companion in app.state.companions:
            await companion.start()
        if load_models and wait_for_models:
            await load_all(app)
            if app.state.models.load_error:
                await app.state.models.stop()
                raise RuntimeError(f"model loading failed: {app.state.models.load_error}")
        elif load_models:
            task = asyncio.create_task(load_all(app))
        drain_watch = asyncio.create_task(_tell_models_of_drain(app))
        try:
            yield
        finally:
            drain_watch.cancel()
            if task is not None and not task.done():  # stopped while loading: the load is not waited for
                task.cancel()
                loaded = {m.name for m in app.state.models.models()}
                log.info("stopping before every model was loaded (not loaded: %s); the load in progress is "
                         "abandoned", ", ".join(n for n in app.state.models.expected if n not in loaded))
            for companion in app.state.companions:
                await companion.stop()
            await app.state.models.stop()
            if tracer is not None:  # off the loop and bounded: a signal meanwhile is still heard
                await asyncio.to_thread(tracer.shutdown)

    # /docs and /redoc load Swagger UI and ReDoc from files the app serves itself (the fastapi-offline
    # package ships them), so the documentation works on a machine without internet access.
    app = FastAPIOffline(
        title="openrerank",
        version=__version__,
        description="Self-hosted reranking: NVIDIA NIM `/v1/ranking`, Cohere/Jina `/v1|v2/rerank`, "
        "TEI and Infinity `/rerank` and `/v1/score`; embeddings (OpenAI / NIM `/v1/embeddings`) from "
        "bi-encoder models.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
        static_url=DOCS_ASSETS,
    )
    app.state.config = config
    app.state.shown = shown or {}
    app.state.memory_share = memory_share  # of the room under a memory limit: a Ray replica's is its CPUs' share
    app.state.public_url = public_url
    app.state.metrics = metrics or Metrics()
    app.state.tracer = tracer  # the gRPC service's calls are spans too
    app.state.score_cache = (ScoreCache(int(config.score_cache_mb * 2**20), app.state.metrics.registry)
                             if config.score_cache_mb > 0 else None)
    # Always made (it costs nothing until a late-interaction model stores vectors): with 0 MiB it holds nothing
    # but still counts what those models encode.
    app.state.token_cache = TokenCache(config.token_cache_bytes, app.state.metrics.registry)
    app.state.models = ServedModels()
    app.state.body_budget = BodyBudget(config.body_bytes_in_flight)  # a memory limit may lower it (load_all)
    app.state.resolved = {r.source.served_id: r for r in resolved}
    app.state.drain = Drain(config.graceful_timeout, app.state.shown)
    # the served models, parsed once: loading and TEI's /info read it
    app.state.sources = model_sources(config, app.state.shown)
    app.state.models.expected = [s.served_id for s in app.state.sources]
    app.state.models.aliases = nim.model_aliases(app.state.models.expected, config.alias_map())
    #: Servers that run beside HTTP in the same event loop (the gRPC server): started before the models
    #: load, stopped before they stop; each has `async start()` and `async stop()`.
    app.state.companions = []
    for router in ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    install_openapi_models(app, tei.OPENAPI_MODELS)
    install_openapi(app, config, app.state.models)  # after: its limits cover the hand-referenced bodies too
    routes = functools.cache(lambda: route_paths(app))
    app.state.route_paths = routes  # for the requests the connection's guard answers (server/http.py)
    # Last added runs first: the request log sees every answer (and gives each its x-request-id), the
    # catch-all turns anything unexpected into a 500 in the dialect's shape, metrics see everything, auth
    # runs before the body is read; HEAD becomes GET innermost, so the log and metrics still say HEAD.
    app.add_middleware(HeadMiddleware)
    app.add_middleware(BodyGuardMiddleware, max_bytes=config.max_body_bytes, body_timeout=config.body_timeout,
                       metrics=app.state.metrics, drain=app.state.drain,
                       budget=app.state.body_budget, shown=app.state.shown)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, metrics_public=config.metrics_public)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=routes)
    app.add_middleware(CatchAllMiddleware, drain=app.state.drain)
    if config.cors_allow_origins:  # outside auth: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=browser_origins(config.cors_allow_origins),
                           allow_methods=CORS_METHODS, allow_headers=["*"], expose_headers=CORS_EXPOSED,
                           max_age=CORS_MAX_AGE_S)
    app.add_middleware(RequestLogMiddleware, routes=routes, tracer=tracer)
    return app


def browser_origins(origins: Sequence[str]) -> list[str]:
    """Each `--cors-allow-origin` as a browser writes it in `Origin` (lowercase scheme and host, an
    internationalised host in its ASCII form, no default port), since CORSMiddleware compares the strings:
    `https://App.Example.com`, `https://x.example.com:443` or `https://bücher.example` (sent as
    `https://xn--bcher-kva.example`) would otherwise never match, and every preflight from that page would get
    a 400. ServerConfig.validate has refused a host that has no ASCII form."""
    written = []
    for origin in origins:
        scheme, sep, host = origin.partition("://")
        scheme, host = scheme.lower(), ascii_host(host).lower()
        default = _DEFAULT_PORTS.get(scheme)
        if default and host.endswith(default):
            host = host[: -len(default)]
        written.append(f"{scheme}{sep}{host}")
    return list(dict.fromkeys(written))
