"""The openrerank app as one Ray Serve replica runs it (`server/ray_serve.py` deploys it): what breaks under
replicas and how it is adapted inside the replica's process (threads, metrics, back-pressure in the dialect's
shape, Serve's headers, the launcher's drain flag; see `ray_serve`'s docstring for the list).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import metrics as serve_metrics

from openrerank.core.settings import Shown
from openrerank.engine.served_models import ServedModels
from openrerank.observe.logs import configure_logging
from openrerank.observe.metrics import Metrics
from openrerank.runtimes.base import default_threads
from openrerank.runtimes.onnx_runtime import SPIN_ENV
from openrerank.server.app import create_app
from openrerank.server.config import API_KEY_ENV, ServerConfig
from openrerank.server.drain import CLOSED_MESSAGE
from openrerank.server.errors import Kind, dialect_for
from openrerank.server.http_answers import coding_message
from openrerank.server.http_edges import unsupported_coding
from openrerank.server.middleware import (
    REQUEST_ID_HEADER,
    is_health,
    request_id,
    request_state,
    shutting_down_response,
)
from openrerank.server.ray_drain import ReplicaDrain

log = logging.getLogger(__name__)

#: Response header naming the replica that answered (Serve's replica tag, as in Ray's logs and metrics).
REPLICA_HEADER = "x-openrerank-replica"
#: Serve lets this many requests more into a replica than it admits for scoring, so health, models and
#: metrics requests pass and over-limit scoring requests reach the replica to be refused in dialect shape.
NON_SCORING_HEADROOM = 32


def admitted_requests(server: ServerConfig) -> int:
    """Scoring requests one replica takes in at once: `max_queue` per model, counted from arrival."""
    return server.max_queue * max(1, len(server.models))


def assigned_cpus() -> float:
    """The CPUs Ray reserved for this replica (`num_cpus`; 0 where none)."""
    import ray

    return ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)


def assigned_threads() -> int:
    """Intra-op threads for this replica: the whole CPUs Ray assigned it, at least 1 (never every core)."""
    return max(1, int(assigned_cpus()))


def memory_share(assigned_cpus: float, cpus: int) -> float:
    """A replica's share of the memory limit its machine (container, pod) gives every replica on it: its CPUs'
    share, as Ray reserves them (`num_cpus`); the whole where it reserved none. Each replica reads the room
    left once its own models have loaded (`server/host_limits.py`), so the shares do not add up past it."""
    return min(1.0, assigned_cpus / cpus) if assigned_cpus > 0 and cpus > 0 else 1.0


def replica_problems(served: ServedModels) -> list[str]:
    """Why this replica cannot serve (empty when it can): what `check_health` reports to Serve."""
    problems = []
    if served.load_error:
        problems.append(f"model loading failed: {served.load_error}")
    problems += [f"the scheduler worker of model {m.name} is not running" for m in served.models()
                 if not m.scheduler.alive]
    return problems


class _RayMetric:
    def __init__(self, metric: Any, method: str) -> None:
        self._record = getattr(metric, method)
        self._counter = method == "inc"

    def record(self, value: float, tags: dict[str, str]) -> None:
        if self._counter and value <= 0:
            return  # Ray counters refuse non-positive increments
        self._record(value, tags=tags)


class RayMetricsMirror:
    """The Ray sink of the metrics facade: `ray.serve.metrics` adds the deployment/replica/application tags."""

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> _RayMetric:
        return _RayMetric(serve_metrics.Counter(name, description=doc, tag_keys=labels), "inc")

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> _RayMetric:
        return _RayMetric(serve_metrics.Gauge(name, description=doc, tag_keys=labels), "set")

    def histogram(self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> _RayMetric:
        bounds = [b for b in buckets if b > 0]  # Ray wants positive boundaries
        return _RayMetric(serve_metrics.Histogram(name, description=doc, boundaries=bounds, tag_keys=labels),
                          "observe")


class ReplicaMiddleware:
    """Admits at most `limit` scoring requests (POSTs) at once, counted from arrival, so a burst is refused
    before it is tokenized, in the dialect's shape; and takes a cancellation for what it is under Serve: its
    proxy cancels a request whose client went away (it delivers no `http.disconnect`), so the request is
    marked as the client's (499, a disconnect), as a single server marks it, not answered as a shutdown.

    Once the app's drain has begun (`server/ray_drain.py`) a new request is answered the dialect's retryable
    503 (a single server no longer accepts its connection); the health probes still reach the app (readiness
    says 503). `replica.running` counts the requests the app runs, so the launcher knows when it is idle.

    A transfer coding other than chunked gets one server's 501: Serve's uvicorn de-chunked the body and handed
    it on still in the other coding (`gzip, chunked`: a 400 "not valid UTF-8", or a plain body served as if
    the coding were not there)."""

    def __init__(self, app: Any, *, limit: int, served: ServedModels, metrics: Metrics,
                 replica: ReplicaDrain) -> None:
        self.app = app
        self.limit = limit
        self.served = served
        self.metrics = metrics
        self.replica = replica
        self.inside = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.replica.drain.draining and not is_health(scope["method"], scope["path"]):
            log.info("refusing %s %s: this replica is shutting down (request id %s)", scope["method"],
                     scope["path"], request_id(scope))
            await shutting_down_response(scope, self.replica.drain, CLOSED_MESSAGE)(scope, receive, send)
            return
        coding = unsupported_coding(scope["headers"])
        if coding is not None:  # one server's connection guard refuses it before the app (server/http_guard.py)
            log.info("refusing %s %s: Transfer-Encoding %r not supported (request id %s)", scope["method"],
                     scope["path"], coding, request_id(scope))
            response = dialect_for(scope["path"]).response(501, coding_message(coding), Kind.NOT_IMPLEMENTED)
            await response(scope, receive, send)
            return
        self.replica.running += 1
        try:
            await self._admit(scope, receive, send)
        except asyncio.CancelledError:
            request_state(scope)["disconnected"] = True
            self.metrics.disconnects.inc()
            log.info("client disconnected from %s %s before its answer; its work was cancelled (request id %s)",
                     scope["method"], scope["path"], request_id(scope))
            raise
        finally:
            self.replica.running -= 1

    async def _admit(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.inside >= self.limit:
            retry = max((m.scheduler.retry_after for m in self.served.models()), default=1.0)
            task = "embed" if scope["path"] == "/v1/embeddings" else "rerank"
            self.metrics.rejected.labels("", task, "replica_full").inc()
            message = (f"server overloaded: {self.inside} requests in this replica (limit {self.limit}); "
                       "retry later")
            response = dialect_for(scope["path"]).response(503, message, Kind.OVERLOADED,
                                                           {"Retry-After": str(max(1, round(retry)))})
            await response(scope, receive, send)
            return
        self.inside += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inside -= 1


class BehindServeMiddleware:
    """Names the replica on every answer (`x-openrerank-replica`; outermost, so a 401 and a CORS preflight
    carry it too), and leaves to Serve's HTTP server the response headers that are its to set: `Connection`
    and `x-request-id`.

    Under Serve the client's connection belongs to Serve's uvicorn (the proxy's, or the replica's own with
    direct ingress), not to the app. `Connection` is hop-by-hop (RFC 9110 7.6.1), and that uvicorn honours an
    app's `Connection: close` by closing as soon as the answer is out, with the rest of the body unread,
    which resets the connection: a client that sends its whole body before reading (the async httpx under
    the OpenAI, Cohere and LangChain clients) lost the 413 for a body over `--max-body-bytes`. Without it
    the server keeps the connection and reads the rest of the body past, as uvicorn does after any answer
    given before the body was read (a replica's overload 503). A 408 keeps its `Connection: close`: that
    client sends too slowly to be worth reading past, and Serve's uvicorn would read it for as long as it
    trickles (it has no body timeout of its own). Serve's request-id middleware puts an
    `x-request-id` on every request that lacks one and the request's on its answer, so the app's made it twice
    (`headers.get` read "id, id", or "new-id, caller's id" when the app found the caller's unfit and chose its
    own): the app's copy is always dropped."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.replica = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        def serves(status: int, name: bytes) -> bool:
            return (name == b"connection" and status != 408) or name == REQUEST_ID_HEADER

        async def hop(message: dict) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if not serves(status, k.lower())]
                message = {**message, "headers": [*headers, self.replica]}
            await send(message)

        await self.app(scope, receive, hop)


def take_secrets(config: ServerConfig, environ: Mapping[str, str]) -> None:
    """The API key from the replica's environment (`API_KEY_ENV`) when the application's arguments hold none:
    a Kubernetes Secret's value in the pod, not in the Serve config, which Serve shows as it is (before, the
    variable was ignored and the replicas served every route without a key)."""
    if config.api_key is None:
        config.api_key = environ.get(API_KEY_ENV, "").strip() or None


def build_replica_app(config: ServerConfig, drain_dir: str | None = None, shown: Shown | None = None) -> Any:
    """The openrerank app as one replica serves it (called inside the replica process); `drain_dir`: the
    launcher's directory whose flag starts the app's drain (`server/ray_drain.py`); `shown`: how its refusals
    name the settings not typed as flags (core/settings.py), as the launcher or the builder's arguments set them."""
    if not config.threads:
        config.threads = assigned_threads()
    take_secrets(config, os.environ)
    # Replicas share the node's cores: no spinning ORT threads, a tokenizer pool of the same size.
    os.environ.setdefault(SPIN_ENV, "0")
    os.environ.setdefault("RAYON_NUM_THREADS", str(config.threads))
    # A replica process has no logging set up: openrerank's own, in --log-format, with every line's fields
    # (Ray prefixes each line it forwards to the driver with the replica's name).
    configure_logging(config.log_level, config.log_format)
    metrics = Metrics(mirror=RayMetricsMirror())
    share = memory_share(assigned_cpus(), default_threads())
    return replica_app(create_app(config, wait_for_models=True, metrics=metrics, shown=shown, memory_share=share),
                       config, serve.get_replica_context().replica_tag, drain_dir)


def replica_app(app: Any, config: ServerConfig, replica: str, drain_dir: str | None = None) -> Any:
    """The app's middleware for a replica: the admission gate and disconnects inside the metrics and auth
    middleware (counted, authenticated first), before the body is read; Serve's headers outermost."""
    from starlette.middleware import Middleware

    from openrerank.server.body_guard import BodyGuardMiddleware

    app.state.replica_drain = ReplicaDrain(drain_dir, app.state.drain)
    gate = Middleware(ReplicaMiddleware, limit=admitted_requests(config), served=app.state.models,
                      metrics=app.state.metrics, replica=app.state.replica_drain)
    position = next(i for i, m in enumerate(app.user_middleware) if m.cls is BodyGuardMiddleware)
    app.user_middleware.insert(position, gate)
    app.add_middleware(BehindServeMiddleware, replica=replica)  # outermost: it sees every layer's headers
    return app
