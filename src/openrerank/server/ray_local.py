"""`openrerank serve --replicas N`: a one-machine Ray cluster with N openrerank replicas, in one command.

This process is the Ray driver: it starts a private local Ray instance (never joins one already running
on the machine), Serve's proxy on `--host`/`--port`, deploys `openrerank.server.ray_serve` and waits for
SIGINT/SIGTERM; then it drains the replicas and stops every Ray process it started. Ray's own
traffic stays on 127.0.0.1 (only Serve's HTTP proxy binds `--host`). For a real cluster use
`serve run`/`serve deploy` with `deploy/ray/serve.yaml`, or KubeRay (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from typing import Any

from pydantic import ValidationError

from openrerank.runtimes.base import default_threads
from openrerank.server.config import ServerConfig

log = logging.getLogger(__name__)

#: Ray settings this launcher uses unless the environment says otherwise.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's node address is 127.0.0.1 (single machine)
    # Serve's router gives a replica 0.1 s to answer a queue-length probe; one whose CPUs are busy scoring
    # missed it and bursts piled onto the other replica. (Keeping the router's cached counts longer than
    # Serve's 10 s was tried too, and left a replica avoided for a minute after a burst.)
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "0.5",
}
_OBJECT_STORE_BYTES = 128 * 2**20  # requests and answers travel over HTTP; the object store stays idle


def set_ray_env() -> None:
    """RAY_ENV_DEFAULTS where the environment does not say otherwise; before `import ray`, which reads them."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def run_local(config: ServerConfig, replica_args: dict[str, Any], *, metrics_port: int | None = None) -> int:
    """Serve `config` on replicas described by `replica_args` (`ReplicaOptions` fields) until a signal.

    `num_cpus` defaults to an equal share of this machine's CPUs for the most replicas there can be."""
    from openrerank.extras import MissingExtraError, require

    set_ray_env()
    try:
        require("ray.serve", "ray", "serve --replicas")
    except MissingExtraError as exc:
        print(f"openrerank serve: error: {exc}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from openrerank.server.ray_serve import APP_NAME, ReplicaOptions, bind, deployment_options

    cpus = default_threads()
    try:
        options = ReplicaOptions(**replica_args)
        deployment_options(config, options)  # the cross-field checks, before starting anything
        most = max(options.num_replicas, options.max_replicas or 0)
        if "num_cpus" not in replica_args:
            options.num_cpus = math.floor(cpus / most * 100) / 100
        if options.num_cpus * most > cpus + 1e-9:
            raise ValueError(f"{most} replicas x {options.num_cpus:g} CPUs exceed the {cpus} CPUs here; "
                             "lower --replica-cpus")
    except (ValidationError, ValueError) as exc:
        print(f"openrerank serve: error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=_OBJECT_STORE_BYTES,
             _metrics_export_port=metrics_port, logging_level=logging.WARNING)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        try:
            serve.run(bind(config, options), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica failed to start (e.g. a model that does not load)
            print(f"openrerank serve: error: the replicas did not start: {exc}", file=sys.stderr)
            return 1
        scaling = f", autoscaling up to {options.max_replicas}" if options.max_replicas else ""
        metrics = f"; every replica's metrics at http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""
        plural = "s" if options.num_replicas > 1 else ""
        print(f"openrerank: {options.num_replicas} replica{plural} x {options.num_cpus:g} CPU{scaling} ready on "
              f"http://{config.host}:{config.port} (Ray cluster {ray.get_runtime_context().gcs_address}"
              f"{metrics})", flush=True)
        stop.wait()
        print("openrerank: stopping (draining in-flight requests)", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            # Deleting the application first drains it: each replica finishes its requests in flight (up to
            # --graceful-timeout, the deployment's graceful_shutdown_timeout_s) while the proxy, still up,
            # delivers their answers. serve.shutdown() alone took the proxy down under them.
            serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            ray.shutdown()
