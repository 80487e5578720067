"""Ray Serve adapter: N replicas of the openrerank app behind one endpoint (`pip install openrerank[ray]`).

Each replica builds the *whole* existing app (`create_app`) inside its own process: the app holds a live
scheduler thread and loaded runtimes, which must never be pickled from the driver, so the ingress is
late-bound (`__serve_build_asgi_app__`). Serve does the routing, health checks, replacement,
autoscaling and multi-node placement; this module deploys the app, and `ray_replica` adapts inside each
replica what breaks under replicas:

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
from dataclasses import asdict, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from openrerank.core.settings import Shown
from openrerank.server.config import ServerConfig
from openrerank.server.drain import UVICORN_MARGIN_S
from openrerank.server.ray_replica import (
    NON_SCORING_HEADROOM,
    admitted_requests,
    build_replica_app,
    replica_problems,
)
from openrerank.server.ray_router import LeastBusyRouter

log = logging.getLogger(__name__)

APP_NAME = "openrerank"
DEPLOYMENT_NAME = "RerankReplica"
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


#: The builder arguments of repeatable settings (ServerConfig's lists) -> the flag a `shown` mapping is keyed by.
_LIST_FLAGS = {"model": "model", "models": "model", "model_families": "model-family", "instructions": "instruction",
               "aliases": "alias", "cors_allow_origins": "cors-allow-origin", "revision": "revision",
               "revisions": "revision"}


def argument_names(args: dict[str, Any] | None) -> dict[str, str]:
    """How a refusal names each server setting given as a builder argument (core/settings.py's `shown`, keyed by
    flag): as written, `request_timeout='0.02'`, not a `--request-timeout` flag a Serve config never has."""
    settings = {f.name for f in fields(ServerConfig)} | set(_LIST_FLAGS)
    return {_LIST_FLAGS.get(key, key.replace("_", "-")): f"{key}={value!r}" for key, value in (args or {}).items()
            if key in settings}


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
    if "revision" in args:  # `revision=v2` (every model), as before the setting took one per model
        if "revisions" in args:
            raise ValueError("give either 'revision' or 'revisions', not both")
        value = args.pop("revision")
        if value is None:  # `revision: null`: no pin, as before
            value = []
        elif isinstance(value, str):  # `a=v1,b=v2` like OPENRERANK_REVISION, or one for every model
            value = [v.strip() for v in value.split(",") if v.strip()]
        args["revisions"] = value
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
    server.validate(argument_names(args))  # the CLI's checks (an empty api_key, ...), named as given
    if replicas.num_gpus > 0 and server.device == "cpu":
        raise ValueError("num_gpus reserves a GPU per replica: also pass device=cuda")
    return server, replicas


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
            raise ValueError(f"num_replicas={replicas.num_replicas} must lie within min_replicas={low} "
                             f"and max_replicas={replicas.max_replicas}")
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


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RerankReplica:
    """One replica: the openrerank app, built in the replica's own process; `shown`: how its refusals name the
    settings not typed as flags (the launcher's environment variables, the builder's arguments)."""

    def __init__(self, config: dict[str, Any], drain_dir: str | None = None, shown: Shown | None = None) -> None:
        self._config = config  # plain data: it is pickled to every replica
        self._drain_dir = drain_dir
        self._shown = dict(shown or {})
        self._fastapi_app: Any = None  # not `self.app`: Serve reserves that name
        self._drain_watch: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self) -> Any:
        self._fastapi_app = build_replica_app(ServerConfig(**self._config), self._drain_dir, self._shown)
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


def bind(server: ServerConfig, replicas: ReplicaOptions, drain_dir: str | None = None,
         shown: Shown | None = None) -> serve.Application:
    """The deployment of `server` on `replicas`; `shown`: how the replicas name the settings not typed as flags."""
    return RerankReplica.options(**deployment_options(server, replicas)).bind(asdict(server), drain_dir,
                                                                              dict(shown or {}))


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for `serve run openrerank.server.ray_serve:build_app key=value ...`, Serve config
    files (`import_path` + `args`) and KubeRay's `serveConfigV2`. Keys: `model` (comma-separated) or
    `models`, every `openrerank serve` setting (`max_queue`, `backend`, ...) and `ReplicaOptions`."""
    server, replicas = parse_args(args)
    return bind(server, replicas, shown=argument_names(args))
