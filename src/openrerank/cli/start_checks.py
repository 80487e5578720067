"""The checks `openrerank serve` makes before any model loads: flags no runtime could honour, models that cannot be
located, a busy port, a missing temporary folder, a gRPC server that cannot load. Each failure is one line and
exit 2 (`cli/main.py` prints it); none costs a model load."""

from __future__ import annotations

import logging
import socket

from openrerank.cli.options import UsageError
from openrerank.core.settings import Shown, setting_item
from openrerank.engine.loading import ResolvedModel
from openrerank.server.config import ServerConfig


def check_temp_dir() -> None:
    """A writable temporary folder where PyTorch is installed, or one line saying how to give one: importing
    PyTorch needs it, and without one (a read-only root with only the cache folder writable) the start failed on
    a later, unrelated error ("Artifact of type=precompile already registered"), the cause in earlier warnings
    only. The serving image has no PyTorch and needs none (`docker run --read-only` serves as it is)."""
    import importlib.util
    import tempfile

    try:
        if importlib.util.find_spec("torch") is None:
            return
    except (ImportError, ValueError):  # blocked or half-installed: not importable either way
        return
    try:
        tempfile.gettempdir()
    except OSError as exc:
        raise ValueError(f"no writable temporary folder ({exc}): PyTorch and the model conversions need one; set "
                         "TMPDIR to a writable folder, or mount one at /tmp (docker/podman `--tmpfs /tmp`, a "
                         "Kubernetes emptyDir)") from None


def preflight(config: ServerConfig, shown: Shown | None = None) -> list[ResolvedModel]:
    """Fail fast on bad --model/--backend/--device values before binding the port (weights load later).

    `config` is validated already (`serve_settings`); `shown` names the settings taken from the environment
    (`serve_settings`). Flags no runtime could honour fail before any model is located (a hub download can be
    long); then each model is resolved, its runtime plan computed, and handed to the app so loading does not do
    it again."""
    from openrerank.core.cpus import affinity_cpus, cpu_quota
    from openrerank.engine.loading import resolve_model
    from openrerank.runtimes.base import default_threads
    from openrerank.runtimes.devices import check_device
    from openrerank.runtimes.selection import check_runtime_options
    from openrerank.server.engine_config import load_options, model_sources

    check_temp_dir()
    if config.device == "cpu":
        from openrerank.runtimes.onnx_runtime import threads_spin

        threads_spin()  # a bad OPENRERANK_ORT_SPIN is one line now, not a model that fails to load
    sources = model_sources(config, shown)
    names = [s.served_id for s in sources]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"several models are served as {', '.join(sorted(dupes))}; use NAME=SOURCE aliases")
    for alias, target in config.alias_map().items():
        if target not in names or alias in names:
            given = setting_item("alias", f"{alias}={target}", shown, quote=False)
            raise ValueError(f"{given}: " + (f"{alias} is itself a served model" if alias in names
                             else f"no model is served as {target} (served: {', '.join(names)})"))
    if config.grpc_port is not None:
        from openrerank.server.grpc.ranking import name_clashes

        clashes = name_clashes({**{n: n for n in names}, **config.alias_map()})
        if clashes:
            raise ValueError(f"{'; '.join(clashes)}: a client could reach only one of them over gRPC; serve "
                             "one under another name (NAME=SOURCE, --alias)")
    check_runtime_options(config.backend, config.dtype, config.device, shown=shown)
    check_device(config.device, shown)
    cores = default_threads()
    if config.device == "cpu" and cores < affinity_cpus():
        logging.getLogger("openrerank").info(
            "a CPU quota of %.2f CPUs caps this process at %d of the %d cores it may run on: %d threads by default "
            "(docs/engine.md, Thread knobs)", cpu_quota(), cores, affinity_cpus(), cores)
    if config.threads and config.threads > cores and config.device == "cpu":
        logging.getLogger("openrerank").warning(
            "--threads %d is more than the %d CPUs this process may use: the threads will take turns on them "
            "and score slower than %d would (docs/engine.md, Thread knobs)",
            config.threads, cores, cores)
    if config.otlp_endpoint:
        from openrerank.observe.tracing import check_tracing_available

        check_tracing_available()
    resolved, unresolved = [], []
    for source in sources:
        try:
            resolved.append(resolve_model(source, load_options(config), shown))
        except Exception as exc:
            if not config.allow_partial or len(sources) == 1:
                raise
            unresolved.append((source, exc))
    if unresolved and not resolved:
        raise unresolved[0][1]
    for source, exc in unresolved:  # tried again at load, where it is counted as failed (`ServedModels.failed`)
        logging.getLogger("openrerank").warning("model %s (%s) cannot be located: %s; --allow-partial serves the "
                                                "others", source.served_id, source.spec, exc)
    return resolved


def bind_socket(host: str, port: int, flags: str = "--host/--port") -> socket.socket:
    """Take the port now, before any model loads, so a busy port fails in a second, not after the load.

    The socket listens at once: a bound socket that does not listen yet does not hold its port against another
    SO_REUSEADDR bind, so `--grpc-port` equal to `--port` passed the gRPC check and gRPC took the HTTP port.
    (uvicorn's `create_server(sock=...)` listens again with its own backlog; connections made before it starts
    wait in this backlog.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise UsageError(f"cannot listen on {host}:{port}: {reason.lower()} ({flags})") from None
    sock.set_inheritable(True)
    return sock


def grpc_server_class() -> type:
    """The gRPC server, its stubs loaded: an incompatible protobuf (a client's `tritonclient[grpc]` installed
    beside the server downgrades it) is one line at start, not a traceback once the app has started. (Not in
    `preflight`: a process that already holds the protocol's messages from another set of stubs, tritonclient's,
    cannot load ours, and preflight runs in such processes too.)"""
    try:
        from openrerank.server.grpc.server import GrpcServer
    except Exception as exc:
        raise ValueError(f"--grpc-port: the gRPC server cannot load ({type(exc).__name__}: {exc}); it needs the "
                         "protobuf and grpcio versions `pip install openrerank` installs") from None
    return GrpcServer
