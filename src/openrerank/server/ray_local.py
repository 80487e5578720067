"""`openrerank serve --replicas N`: a one-machine Ray cluster with N openrerank replicas, in one command.

This process is the Ray driver: it starts a private local Ray instance (never joins one already running
on the machine), Serve's proxy on `--host`/`--port`, deploys `openrerank.server.ray_serve` and waits for
SIGINT/SIGTERM; then it drains the replicas as one server drains (`server/ray_drain.py`, `server/drain.py`)
and stops every Ray process it started. Ray's own traffic stays on 127.0.0.1 (only Serve's HTTP proxy binds
`--host`). For a real cluster use `serve run`/`serve deploy` with `deploy/ray/serve.yaml`, or KubeRay
(docs/scale-out.md).

Signals, as for one server (`server/http.py`): one before every replica started stops the start (no drain: no
replica answers yet) and exits 0; after it, the first begins the drain (requests in flight run on for
`--graceful-timeout`, then are answered the dialect's retryable 503; new ones get that 503 at once); a second
one ends the grace period now (what still runs is answered 503), and the clean-up still runs (exit 0); a signal
after the grace period ended exits at once, without the clean-up (status 128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from openrerank.core.settings import Shown, setting_name
from openrerank.runtimes.base import default_threads
from openrerank.server.config import ServerConfig
from openrerank.server.drain import UVICORN_MARGIN_S
from openrerank.server.http import exit_now
from openrerank.server.ray_drain import DRAIN, NOW, POLL_S, SETTLE_S, DrainFlag

log = logging.getLogger(__name__)

#: Ray settings this launcher uses unless the environment says otherwise.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's node address is 127.0.0.1 (single machine)
    # Serve's router gives a replica 0.1 s to answer a queue-length probe; one whose CPUs are busy scoring
    # missed it and bursts piled onto the other replica. (Keeping the router's cached counts longer than
    # Serve's 10 s was tried too, and left a replica avoided for a minute after a burst.)
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "0.5",
    # The driver folds forwarded lines that differ only in words with digits into one "[repeated 20x across
    # cluster]": the replicas' access lines (ids, timings) vanished from this process's output, which is what
    # `docker logs` and a container's log collector read.
    "RAY_DEDUP_LOGS": "0",
}
_OBJECT_STORE_BYTES = 128 * 2**20  # requests and answers travel over HTTP; the object store stays idle


def set_ray_env() -> None:
    """RAY_ENV_DEFAULTS where the environment does not say otherwise (a value the operator set wins); before
    `import ray`, which reads them."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


class ReplicaSetupError(ValueError):
    """The replicas cannot start as asked (Ray missing, an option Ray refuses): one line, before Ray starts."""


def options_error(exc: ValidationError | ValueError, names: Mapping[str, str]) -> str:
    """One line for options Ray refuses, each field named as the operator set it (`names`: field -> e.g.
    "--replicas 2", "OPENRERANK_REPLICA_CPUS='4'", "--replica-option foo=1"; a field not there as
    `field=value`). Pydantic's own text took several lines naming model fields, and its URL."""
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors():
            field = ".".join(map(str, error["loc"]))
            what = "not a replica option (openrerank.server.ray_serve.ReplicaOptions)" \
                if error["type"] == "extra_forbidden" else error["msg"]
            given = names.get(field) or f"{field}={error.get('input')!r}"
            parts.append(f"{given}: {what}")
        return "; ".join(parts)
    return re.sub(r"\b([a-z_]+)=(\S+)", lambda m: names.get(m[1], m[0]), str(exc))


def run_local(config: ServerConfig, replica_args: dict[str, Any], *, metrics_port: int | None = None,
              names: Mapping[str, str] | None = None, shown: Shown | None = None) -> int:
    """Serve `config` on replicas described by `replica_args` (`ReplicaOptions` fields) until a signal.

    `num_cpus` defaults to an equal share of this machine's CPUs for the most replicas there can be. Options
    that cannot work raise ReplicaSetupError naming each as `names` says (`options_error`). `shown`: how the
    launcher and the replicas name the server settings not typed as flags (core/settings.py)."""
    from openrerank.extras import MissingExtraError, require

    names = names or {}
    set_ray_env()
    try:
        require("ray.serve", "ray", "serve --replicas")
    except MissingExtraError as exc:
        raise ReplicaSetupError(str(exc)) from None
    import ray
    from ray import serve

    from openrerank.server.ray_serve import ReplicaOptions, bind, deployment_options

    cpus = default_threads()
    try:
        options = ReplicaOptions(**replica_args)
        deployment_options(config, options)  # the cross-field checks, before starting anything
        most = max(options.num_replicas, options.max_replicas or 0)
        if "num_cpus" not in replica_args:
            options.num_cpus = math.floor(cpus / most * 100) / 100
        if options.num_cpus * most > cpus + 1e-9:
            raise ValueError(f"num_cpus={options.num_cpus:g} per replica for {most} replicas exceeds the {cpus} "
                             "CPUs here")  # the field named as set (options_error)
    except (ValidationError, ValueError) as exc:
        raise ReplicaSetupError(options_error(exc, names)) from None

    signals = _Signals()
    flag = DrainFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):  # now: a signal while Ray or the replicas start stops the start
        signal.signal(sig, signals.handle)  # kept until the process ends: see _Signals
    try:
        # ray.init installs Ray's SIGTERM handler, which exits with the signal's number (SystemExit(15)); ours goes
        # back inside the same try: a SIGTERM after ray.init returned but before ours took over (signal.signal
        # runs a pending handler, Ray's, first) exited 15 outside it, where any other moment stops cleanly.
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     object_store_memory=_OBJECT_STORE_BYTES, _metrics_export_port=metrics_port,
                     logging_level=logging.WARNING)
            signal.signal(signal.SIGTERM, signals.handle)
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            signals.first.set()
            signal.signal(signal.SIGTERM, signals.handle)  # Ray's may still be in place
        if not signals.first.is_set():
            serve.start(http_options={"host": config.host, "port": config.port})
        if signals.first.is_set() or not start_replicas(serve, bind(config, options, str(flag.directory), shown),
                                                        signals):
            print("openrerank: stopping before every replica started: the replicas still loading are abandoned",
                  flush=True)
            return 0
        scaling = f", autoscaling up to {options.max_replicas}" if options.max_replicas else ""
        metrics = f"; every replica's metrics at http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""
        plural = "s" if options.num_replicas > 1 else ""
        print(f"openrerank: {options.num_replicas} replica{plural} x {options.num_cpus:g} CPU{scaling} ready on "
              f"http://{config.host}:{config.port} (Ray cluster {ray.get_runtime_context().gcs_address}"
              f"{metrics})", flush=True)
        signals.first.wait()
        held = flag.held()  # as the replicas reported it within the last POLL_S
        print(f"openrerank: stopping: draining the {held} request{'' if held == 1 else 's'} the replicas hold, "
              f"for up to {config.graceful_timeout:g} s ({setting_name('graceful-timeout', shown)})", flush=True)
        drain(flag, signals, config.graceful_timeout)
        return 0
    except ReplicaStartError as exc:  # a replica failed to start (e.g. a model that does not load)
        print(f"openrerank serve: error: the replicas did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        signals.grace_over = True  # a signal now exits at once, without the clean-up
        try:
            # The replicas are idle now (or their grace period is over and every request answered), so the proxy
            # can go with them: before the drain, serve.shutdown() took the proxy down under the requests in
            # flight. Not serve.delete() first: it took the route off the proxy for its seconds of stopping the
            # replicas, and the proxy answered its plain-text 404 meanwhile (a refused connection is what a
            # stopped server gives, and every client retries that).
            if ray.is_initialized():  # not when stopped inside ray.init: serve.shutdown() would start Ray
                serve.shutdown()
        finally:
            ray.shutdown()
            flag.remove()


class ReplicaStartError(RuntimeError):
    """The application failed to deploy (Serve's DEPLOY_FAILED: a replica that does not start, e.g. its model)."""


def start_replicas(serve: Any, app: Any, signals: _Signals) -> bool:
    """Deploy `app` on Serve's proxy and wait until every replica started (True), or a signal came first (False).

    Not `serve.run`: it waits for the replicas without looking at signals, so a Ctrl-C or SIGTERM during a model's
    load was taken only once every replica had loaded, and the launcher printed "ready" before it stopped."""
    from ray.serve.schema import ApplicationStatus

    from openrerank.server.ray_serve import APP_NAME

    serve._run(app, _blocking=False, name=APP_NAME, route_prefix="/")
    while not signals.first.wait(POLL_S):
        status = serve.status().applications.get(APP_NAME)
        if status is None:  # gone (a controller that restarted): a KeyError was a traceback at start
            raise ReplicaStartError(f"Ray Serve no longer has application {APP_NAME} (did its controller restart?)")
        if status.status == ApplicationStatus.RUNNING:
            return True
        if status.status == ApplicationStatus.DEPLOY_FAILED:
            raise ReplicaStartError(f"Deploying application {APP_NAME} failed: {status.message}")
    return False


class _Signals:
    """SIGINT/SIGTERM for the launcher: the first begins the drain, a second ends the grace period now, one
    after the grace period ended exits at once (status 128 + its number). Ray's and Python's own handlers
    ended the launcher with a KeyboardInterrupt in the middle of the drain, its requests cut."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.second = threading.Event()
        self.grace_over = False

    def handle(self, sig: int, _frame: object) -> None:
        if not self.first.is_set():
            self.first.set()
        elif self.grace_over:
            log.warning("%s after the grace period ended: exiting now, without the clean-up",
                        signal.Signals(sig).name)
            _kill_descendants()
            exit_now(128 + sig)
        else:
            self.second.set()


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, children first (Linux's /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_descendants() -> None:
    """SIGKILL every process under this one (Ray's, all started by `ray.init`): exiting at once without them
    left Ray's dashboard and runtime-env agents running (orphans of the raylet)."""
    for child in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def drain(flag: DrainFlag, signals: _Signals, grace: float) -> None:
    """Tell every replica to drain, then wait until each has been idle for `SETTLE_S`, or the grace period and the
    margin the replicas answer in (`UVICORN_MARGIN_S`) are over; a second signal tells them to end their grace
    period now."""
    flag.raise_flag(DRAIN)
    start = time.monotonic()
    idle_since: float | None = None
    told_now = False
    while True:
        now = time.monotonic()
        busy = flag.busy()
        idle_since = None if busy else now if idle_since is None else idle_since
        if idle_since is not None and now - idle_since >= SETTLE_S:
            return
        if now - start > grace:
            signals.grace_over = True
        if now - start > grace + UVICORN_MARGIN_S:
            if busy:
                log.warning("replicas %s still busy %g s after the grace period ended; stopping them",
                            ", ".join(busy), UVICORN_MARGIN_S)
            return
        if signals.second.is_set() and not told_now:
            flag.raise_flag(NOW)
            told_now = signals.grace_over = True
            start = min(start, now - grace)  # from now on, the margin only
        if told_now:
            time.sleep(POLL_S)
        else:
            signals.second.wait(POLL_S)
