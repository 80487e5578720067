"""Ray Serve adapter: N replicas of the openrerank app behind one endpoint (`pip install openrerank[ray]`).

Each replica builds the *whole* existing app (`create_app`) inside its own process: the app holds a live
scheduler thread and loaded runtimes, which must never be pickled from the driver, so the ingress is
late-bound (`__serve_build_asgi_app__`). Serve does the routing, health checks, replacement,
autoscaling and multi-node placement; this module only adapts what breaks under replicas:

- threads: a replica uses the CPUs Ray assigned it (ONNX Runtime would otherwise take every core);
- readiness: the replica's startup waits for its models to load and warm up; a load error fails it;
- health: `check_health` fails when a model failed to load or its scheduler worker is gone;
- metrics: every series is also written through `ray.serve.metrics`, so Ray exports per-replica
  series that sum across replicas and nodes (`/v1/metrics` through the proxy shows one replica only);
- headers: `Connection` and a second `x-request-id` are Serve's HTTP server's to set (`BehindServeMiddleware`);
- back-pressure: a replica refuses scoring requests past its limit in the dialect's own error shape
  with `Retry-After`, before Serve's queue would answer with its bare error.

Entry points: `build_app` (for `serve run openrerank.server.ray_serve:build_app model=default num_replicas=2`,
Serve config files and KubeRay), and `openrerank serve --replicas N` (`openrerank.server.ray_local`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from openrerank.engine.served_models import ServedModels
from openrerank.observe.logs import configure_logging
from openrerank.observe.metrics import Metrics
from openrerank.runtimes.onnx_runtime import SPIN_ENV
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.drain import CLOSED_MESSAGE, UVICORN_MARGIN_S
from openrerank.server.errors import dialect_for
from openrerank.server.middleware import (
    HEALTH_PATHS,
    REQUEST_ID_HEADER,
    request_id,
    request_state,
    shutting_down_response,
)
from openrerank.server.ray_drain import ReplicaDrain
from openrerank.server.ray_router import LeastBusyRouter

log = logging.getLogger(__name__)

APP_NAME = "openrerank"
DEPLOYMENT_NAME = "RerankReplica"
#: Response header naming the replica that answered (Serve's replica tag, as in Ray's logs and metrics).
REPLICA_HEADER = "x-openrerank-replica"
#: Serve lets this many requests more into a replica than it admits for scoring, so health, models and
#: metrics requests pass and over-limit scoring requests reach the replica to be refused in dialect shape.
NON_SCORING_HEADROOM = 32
#: Server settings that Serve owns under Ray (its `http_options`), refused in the app's arguments.
_SERVE_OWNED = ("host", "port")


class ReplicaOptions(BaseModel):
    """How many replicas, how big, and when to scale: the Serve deployment options openrerank sets."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="replicas (autoscaling: the initial count)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling floor (default: 1)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling ceiling; setting it turns autoscaling on")
    target_ongoing_requests: float = Field(4.0, gt=0, description="requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=10, description="must exceed Serve's 10 s metrics interval")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica; also its intra-op threads")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share one); needs device=cuda")
    memory: int | None = Field(None, ge=0, description="bytes of memory reserved per replica (scheduling only)")
    max_replicas_per_node: int | None = Field(None, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: admitted scoring requests + 32")
    max_queued_requests: int = Field(-1, ge=-1, description="requests waiting in Serve's queue; -1: no limit")
    router: Literal["least-busy", "power-of-two"] = Field(
        "least-busy", description="least-busy: fewest requests in flight, asked fresh when all look busy; "
        "power-of-two: Serve's default (two random replicas, cached queue lengths)")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    max_constructor_retry_count: int | None = Field(None, ge=1, description="replica start attempts before the "
                                                    "deployment fails (Serve's default: 20)")


def parse_args(args: dict[str, Any] | None) -> tuple[ServerConfig, ReplicaOptions]:
    """Split builder arguments into server settings (same names as `openrerank serve` flags, with `_`)
    and replica options. Values may be strings, as `serve run ... key=value` passes them."""
    args = dict(args or {})
    if "model" in args:  # `model=a,b` on the `serve run` command line, like OPENRERANK_MODEL
        if "models" in args:
            raise ValueError("give either 'model' or 'models', not both")
        args["models"] = args.pop("model")
    if isinstance(args.get("models"), str):
        args["models"] = [m.strip() for m in args["models"].split(",") if m.strip()]
    owned = [k for k in _SERVE_OWNED if k in args]
    if owned:
        raise ValueError(f"{', '.join(owned)}: under Ray Serve the address is Serve's http_options, "
                         "not an application argument")
    server_keys = {f.name for f in fields(ServerConfig)} - set(_SERVE_OWNED)
    replica_keys = set(ReplicaOptions.model_fields)
    unknown = sorted(set(args) - server_keys - replica_keys)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; allowed: model, "
                         f"{', '.join(sorted(server_keys | replica_keys))}")
    try:
        server = TypeAdapter(ServerConfig).validate_python({k: v for k, v in args.items() if k in server_keys})
        replicas = ReplicaOptions(**{k: v for k, v in args.items() if k in replica_keys})
    except ValidationError as exc:
        raise ValueError(f"invalid openrerank application arguments: {exc}") from None
    if not server.models:
        server.models = ["default"]
    if replicas.num_gpus > 0 and server.device == "cpu":
        raise ValueError("num_gpus reserves a GPU per replica: also pass device=cuda")
    return server, replicas


def admitted_requests(server: ServerConfig) -> int:
    """Scoring requests one replica takes in at once: `max_queue` per model, counted from arrival."""
    return server.max_queue * max(1, len(server.models))


def deployment_options(server: ServerConfig, replicas: ReplicaOptions) -> dict[str, Any]:
    """Serve `.options(...)` for the deployment; a Serve config's `deployments:` entry can override each."""
    actor: dict[str, Any] = {"num_cpus": replicas.num_cpus}
    if replicas.num_gpus:
        actor["num_gpus"] = replicas.num_gpus
    if replicas.memory:
        actor["memory"] = replicas.memory
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": replicas.max_ongoing_requests or admitted_requests(server) + NON_SCORING_HEADROOM,
        "max_queued_requests": replicas.max_queued_requests,
        "health_check_period_s": replicas.health_check_period_s,
        "health_check_timeout_s": replicas.health_check_timeout_s,
        # the app answers what still runs when its grace period ends (server/ray_drain.py): Serve must not kill
        # the replica before (its proxy's plain-text 500)
        "graceful_shutdown_timeout_s": server.graceful_timeout + UVICORN_MARGIN_S,
    }
    if replicas.router == "least-busy":
        options["request_router_config"] = RequestRouterConfig(request_router_class=LeastBusyRouter)
    if replicas.max_replicas_per_node:
        options["max_replicas_per_node"] = replicas.max_replicas_per_node
    if replicas.max_constructor_retry_count:
        options["max_constructor_retry_count"] = replicas.max_constructor_retry_count
    if replicas.max_queued_requests >= 0:  # Serve's own refusal (plain text): at least say when to retry
        options["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=1)
    if replicas.max_replicas is None:
        options["num_replicas"] = replicas.num_replicas
    else:
        low = 1 if replicas.min_replicas is None else replicas.min_replicas
        if not low <= replicas.num_replicas <= replicas.max_replicas:
            raise ValueError(f"num_replicas {replicas.num_replicas} must lie within min_replicas {low} "
                             f"and max_replicas {replicas.max_replicas}")
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": replicas.num_replicas,
            "max_replicas": replicas.max_replicas,
            "target_ongoing_requests": replicas.target_ongoing_requests,
            "upscale_delay_s": replicas.upscale_delay_s,
            "downscale_delay_s": replicas.downscale_delay_s,
            "look_back_period_s": replicas.look_back_period_s,
        }
    return options


# -- inside a replica ----------------------------------------------------------------------------------


def assigned_threads() -> int:
    """Intra-op threads for this replica: the whole CPUs Ray assigned it, at least 1 (never every core)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return max(1, int(cpus))


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
    says 503). `replica.running` counts the requests the app runs, so the launcher knows when it is idle."""

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
        if self.replica.drain.draining and scope["path"] not in HEALTH_PATHS:
            log.info("refusing %s %s: this replica is shutting down (request id %s)", scope["method"],
                     scope["path"], request_id(scope))
            await shutting_down_response(scope, self.replica.drain, CLOSED_MESSAGE)(scope, receive, send)
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
            response = dialect_for(scope["path"]).response(503, message, "overloaded",
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


def build_replica_app(config: ServerConfig, drain_dir: str | None = None) -> Any:
    """The openrerank app as one replica serves it (called inside the replica process); `drain_dir`: the
    launcher's directory whose flag starts the app's drain (`server/ray_drain.py`)."""
    if not config.threads:
        config.threads = assigned_threads()
    # Replicas share the node's cores: no spinning ORT threads, a tokenizer pool of the same size.
    os.environ.setdefault(SPIN_ENV, "0")
    os.environ.setdefault("RAYON_NUM_THREADS", str(config.threads))
    # A replica process has no logging set up: openrerank's own, in --log-format, with every line's fields
    # (Ray prefixes each line it forwards to the driver with the replica's name).
    configure_logging(config.log_level, config.log_format)
    metrics = Metrics(mirror=RayMetricsMirror())
    return replica_app(create_app(config, wait_for_models=True, metrics=metrics), config,
                       serve.get_replica_context().replica_tag, drain_dir)


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


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RerankReplica:
    """One replica: the openrerank app, built in the replica's own process."""

    def __init__(self, config: dict[str, Any], drain_dir: str | None = None) -> None:
        self._config = config  # plain data: it is pickled to every replica
        self._drain_dir = drain_dir
        self._fastapi_app: Any = None  # not `self.app`: Serve reserves that name
        self._drain_watch: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self) -> Any:
        self._fastapi_app = build_replica_app(ServerConfig(**self._config), self._drain_dir)
        if self._drain_dir:  # on the loop that runs the app's requests (Serve's user-code loop)
            self._drain_watch = asyncio.get_running_loop().create_task(self._fastapi_app.state.replica_drain.watch())
        return self._fastapi_app  # Serve then runs its lifespan: load + warm up, or fail

    async def check_health(self) -> None:
        """Raising makes Serve replace this replica."""
        if self._fastapi_app is None:
            return
        problems = replica_problems(self._fastapi_app.state.models)
        if problems:
            log.error("replica unhealthy: %s", "; ".join(problems))
            raise RuntimeError("; ".join(problems))


def bind(server: ServerConfig, replicas: ReplicaOptions, drain_dir: str | None = None) -> serve.Application:
    return RerankReplica.options(**deployment_options(server, replicas)).bind(asdict(server), drain_dir)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for `serve run openrerank.server.ray_serve:build_app key=value ...`, Serve config
    files (`import_path` + `args`) and KubeRay's `serveConfigV2`. Keys: `model` (comma-separated) or
    `models`, every `openrerank serve` setting (`max_queue`, `backend`, ...) and `ReplicaOptions`."""
    server, replicas = parse_args(args)
    return bind(server, replicas)
