"""`openrerank serve | eval | bench | export | cache`. Every serve flag is also an OPENRERANK_<FLAG> variable."""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from importlib.metadata import entry_points

from openrerank import __version__
from openrerank.cli import cache, export, families
from openrerank.cli import eval as eval_cli
from openrerank.cli.nim_env import NimEnv, check_ssl_mode, read_nim_env, serve_under_name
from openrerank.cli.options import Option, SuggestingParser, UsageError, add_options, fail, resolve_options, unknown_env
from openrerank.cli.scale_out import check_scale_out, replica_names, replica_options
from openrerank.cli.start_checks import bind_socket, grpc_server_class, preflight
from openrerank.core.settings import Shown, setting_name
from openrerank.engine.admission import QUEUE_BUDGETS, SECONDS_PER_BUDGET_BATCH
from openrerank.engine.batching import CPU_POLICY, CUDA_POLICY
from openrerank.engine.rates import BUDGET_SHARE
from openrerank.families.token_cache import DEFAULT_TOKEN_CACHE_MB
from openrerank.observe.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from openrerank.runtimes.selection import AUTO_MODES, BACKEND_CHOICES, DTYPES
from openrerank.runtimes.torch_gemm import bound_onednn_caches
from openrerank.server.config import BODIES_IN_FLIGHT, ServerConfig

#: Subcommands other distributions add (the repo's `benchmarks/` package adds `bench`): each entry point names an
#: object with `add_parser(subparsers)`. The serving package never imports them itself.
PLUGIN_GROUP = "openrerank.commands"

_GROUPS = {
    "network": "where the server listens and who may call it",
    "models": "what is served",
    "engine": "which runtime runs the models, and how the engine batches requests",
    "limits": "what one request may ask for, and how long it may wait",
    "logging": "logs and tracing",
    "scale-out": "replicas on Ray Serve, needs the ray extra (docs/scale-out.md)",
}

def _per_device(knob: str) -> str:
    """A batching flag's default as its help states it: the engine's CPU and CUDA policies, written there once."""
    return f"none: {getattr(CPU_POLICY, knob)} on CPU, {getattr(CUDA_POLICY, knob)} on CUDA"


#: Every `serve` flag, one line each; defaults come from ServerConfig, each is also OPENRERANK_<FLAG>.
SERVE_OPTIONS: tuple[Option, ...] = (
    Option("host", "network", "bind address (0.0.0.0 for every interface)"),
    Option("port", "network", "TCP port; checked before any model loads", int),
    Option("api-key", "network", "require 'Authorization: Bearer KEY' on every route but health and the docs"),
    Option("grpc-port", "network", "also serve KServe V2 gRPC (NIM's gRPC API, docs/api.md) on this port (none: off)",
           int),
    Option("grpc-host", "network", "gRPC bind address (none: the HTTP bind address)"),
    Option("ssl-certfile", "network", "TLS certificate chain (PEM) for HTTP and gRPC", metavar="PEM"),
    Option("ssl-keyfile", "network", "TLS private key (PEM, unencrypted) for HTTP and gRPC", metavar="PEM"),
    Option("ssl-ca-certs", "network", "mutual TLS: CA certificates (PEM); HTTP and gRPC clients must present a "
           "certificate one of them signed (none: no client certificates asked)", metavar="PEM"),
    Option("grpc-max-message-bytes", "network", "largest gRPC request message (RESOURCE_EXHAUSTED above it; none: "
           "the HTTP body limit)", int),
    Option("metrics-public", "network", "with an API key set, leave /v1/metrics (and /metrics) open to a "
           "Prometheus that scrapes without the key; keep them off the public network (docs/deploy.md)",
           switch=True),
    Option("cors-allow-origin", "network", "a web origin (scheme://host[:port]) whose pages may call the API from "
           "a browser (CORS), '*' for any; repeat for several (none: no CORS headers, browsers keep other "
           "origins out)", repeatable=True, dest="cors_allow_origins", metavar="ORIGIN"),
    Option("model", "models", "model to serve: 'default' (embedded all-MiniLM-L6-v2), a local directory or a "
           "Hugging Face hub id; NAME=SOURCE serves it as NAME. Repeat to serve several",
           repeatable=True, dest="models", metavar="[NAME=]SOURCE"),
    Option("model-family", "models", "the family of model NAME (a served id; may be left out when one model is "
           "served) instead of detecting it: needed for an LLM reranker whose files do not say which one it is; "
           "`openrerank families` lists them", repeatable=True, dest="model_families", metavar="[NAME=]FAMILY"),
    Option("instruction", "models", "the prompt instruction of an LLM reranker that takes one (qwen3-reranker, "
           "mxbai-rerank-v2); NAME is a served id, optional with one model", repeatable=True, split_env=False,
           dest="instructions", metavar="[NAME=]TEXT"),
    Option("alias", "models", "another id that requests may name model SERVED by (NIM's old model ids already "
           "resolve to their new names)", repeatable=True, dest="aliases", metavar="NAME=SERVED"),
    Option("revision", "models", "hub revision (branch, tag or commit) of model NAME, a served id; without NAME=, of "
           "every model no NAME=REV names", repeatable=True, dest="revisions", metavar="[NAME=]REV"),
    export.ALLOW_PICKLE,
    Option("allow-partial", "models", "with several models: serve those that load instead of exiting when one "
           "fails", switch=True),
    Option("max-length", "models", "cap on the tokens of one query+passage pair (none: the model's window)", int),
    Option("backend", "engine", "the runtime that runs the models: auto (the fastest faithful runtime measured on "
           "this machine; PyTorch on CUDA), openvino, onnx, torch", choices=BACKEND_CHOICES),
    Option("backend-choice", "engine", "how auto picks: measure (time each faithful runtime on the model's shapes "
           "for about a second at first start, cached per machine) or rules (a fixed order from the CPU's "
           "flags, nothing timed; reproducible)", choices=AUTO_MODES),
    Option("dtype", "engine", "auto (what the runtime choice picks; on CUDA fp16 or bf16 by the GPU, docs/gpu.md); "
           "fp32 (exact); bf16 (openvino/torch: AVX512-BF16 CPU, or GPU); fp16 (GPU); int8 (openvino via NNCF, or "
           "onnx)", choices=DTYPES),
    Option("device", "engine", "cpu or cuda[:N] (torch runtime; fails at startup without a usable GPU)"),
    Option("threads", "engine", "intra-op threads (none: the cores available)", int),
    Option("max-batch-tokens", "engine", f"padded tokens per model batch ({_per_device('max_tokens')}; under a "
           "container memory limit, capped to half the memory the models leave)", int),
    Option("max-batch-size", "engine", f"pairs per model batch ({_per_device('max_size')})", int),
    Option("max-padding", "engine", f"largest share of padding in a model batch ({_per_device('max_padding')})",
           float),
    Option("min-batch-rows", "engine", "pairs a batch may always reach whatever their padding "
           f"({_per_device('min_rows')})", int),
    Option("batch-wait-ms", "engine", "how long a batch waits for concurrent requests", float),
    Option("score-cache-mb", "engine", "memory for an exact LRU cache of passage scores (repeated query+passage "
           "pairs skip tokenization and the model); 0 turns it off", float),
    Option("token-cache-mb", "engine", "memory for an exact LRU cache of passages' token vectors (late-interaction "
           "models: a passage seen again costs only the query); 0 turns it off (none: "
           f"{DEFAULT_TOKEN_CACHE_MB:g}, under a container memory "
           "limit at most a quarter of the memory the models leave)", float),
    Option("max-passages", "limits", "most passages in one request", int),
    Option("max-inputs", "limits", "most texts in one /v1/embeddings request", int),
    Option("max-body-bytes", "limits", "largest request body accepted (413 above)", int),
    Option("max-body-bytes-in-flight", "limits", "bytes of the request bodies being received or waiting for their "
           f"parse, all requests together, before answering 429/503 with Retry-After (none: {BODIES_IN_FLIGHT} x "
           "max-body-bytes; under a container memory limit at most an eighth of the memory the models leave)", int),
    Option("max-queue", "limits", "pending requests before answering 429/503 with Retry-After", int),
    Option("max-queue-tokens", "limits", "pending tokens (all requests) before answering 429/503 "
           f"(none: {QUEUE_BUDGETS} x the per-request token budget, max-request-tokens)", int),
    Option("request-timeout", "limits", "seconds from a request's arrival to its answer (504 after)", float),
    Option("max-request-tokens", "limits", "tokens one request may hold after tokenization and chunking "
           f"(none: what the model scores in {BUDGET_SHARE:.0%} of request-timeout at its measured speed; "
           f"max-batch-tokens x request-timeout / {SECONDS_PER_BUDGET_BATCH:g} s where no speed is measured)", int),
    Option("max-chunks-per-passage", "limits", "CHUNK: windows scored per passage (the default, and the most "
           "a request may ask for)", int),
    Option("max-chunks-per-request", "limits", "CHUNK: windows scored per request", int),
    Option("max-image-bytes", "limits", "bytes of one passage image, as decoded from its base64 data URL (413 "
           "above)", int),
    Option("max-image-pixels", "limits", "pixels (width x height) of one passage image, checked before decoding "
           "(413 above)", int),
    Option("header-timeout", "limits", "seconds a client may take to send its request headers (408)", float),
    Option("max-header-bytes", "limits", "bytes of a request's line and headers together (431)", int),
    Option("body-timeout", "limits", "seconds a client may take to send its request body (408)", float),
    Option("graceful-timeout", "limits", "seconds to finish in-flight requests on shutdown; the rest get a "
           "retryable 503 (at once on a second SIGTERM/SIGINT)", float),
    Option("tei-chunking", "limits", "score over-long TEI /rerank texts by their best chunk instead of truncating",
           switch=True),
    Option("log-level", "logging", "debug, info (one access line per request), warning, error, critical",
           choices=LOG_LEVELS),
    Option("log-format", "logging", "text (human) or json (one object per line)", choices=LOG_FORMATS),
    Option("otlp-endpoint", "logging", "send OpenTelemetry traces (OTLP/HTTP) to this URL, e.g. "
           "http://localhost:4318; needs the otel extra", metavar="URL"),
    Option("replicas", "scale-out", "serve N replicas behind one endpoint on a local Ray cluster (none: one "
           "process, no Ray)", int),
    Option("max-replicas", "scale-out", "autoscale on queue depth, up to this many replicas", int),
    Option("replica-cpus", "scale-out", "CPUs per replica, also its threads (none: the cores / the most replicas)",
           float),
    Option("ray-metrics-port", "scale-out", "port of Ray's Prometheus endpoint with every replica's series", int),
    Option("replica-option", "scale-out", "any other openrerank.server.ray_serve.ReplicaOptions field, e.g. "
           "target_ongoing_requests=8", repeatable=True, dest="replica_options", metavar="KEY=VALUE"),
)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP server",
                       description="Serve reranking models over HTTP (NIM, Cohere/Jina, TEI/Infinity, score APIs; "
                       "OpenAI/NIM embeddings from bi-encoders). "
                       "Every flag can also be set as OPENRERANK_<FLAG>, e.g. OPENRERANK_PORT=9000; flags win.")
    add_options(p, SERVE_OPTIONS, ServerConfig(), _GROUPS)
    p.set_defaults(func=run_serve, options=SERVE_OPTIONS)


def serve_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None
                   ) -> tuple[ServerConfig, NimEnv, Shown]:
    """The server's settings: flags, then OPENRERANK_* variables, then NIM_* ones (cli/nim_env.py), then
    ServerConfig's defaults; checked (ServerConfig.validate) before anything is logged. A bad value is a
    UsageError naming what the user set: the flag, or the variable and the value written there
    (NIM_HTTP_API_PORT='70000': ...). With them, what the NIM variables amounted to (its `report()`: once
    logging is set up), and how to name each setting taken from the environment (`resolve_options`), for the
    checks after it (`preflight`, `--replicas`)."""
    environ = os.environ if environ is None else environ
    given = {o.flag for o in SERVE_OPTIONS if hasattr(args, o.attr)}  # typed on the command line
    nim = read_nim_env(environ, given=given)
    shown = resolve_options(args, SERVE_OPTIONS, ServerConfig(), nim.environ(environ), named=nim.named)
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    config = ServerConfig(**values)
    config.models = serve_under_name(nim, config.models)
    check_ssl_mode(nim.ssl_mode, config.tls, config.ssl_ca_certs is not None)
    try:
        config.validate(shown)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_scale_out(args, shown, given)
    return config, nim, shown


def known_env() -> set[str]:
    """Every OPENRERANK_ variable openrerank reads: the serve flags', and those read directly, each named where
    it is owned (tests/test_cli.py greps src for any other)."""
    from openrerank.eval.dense import EVAL_CACHE_ENV
    from openrerank.runtimes.artifact_cache import CACHE_ENV
    from openrerank.runtimes.base import LANES_ENV
    from openrerank.runtimes.onnx_runtime import SPIN_ENV
    from openrerank.server.config import API_KEY_ENV

    return {o.env_name for o in SERVE_OPTIONS if o.env} | {EVAL_CACHE_ENV, CACHE_ENV, LANES_ENV, SPIN_ENV, API_KEY_ENV}


def report_unknown_env(environ: Mapping[str, str]) -> None:
    """Warn about OPENRERANK_ variables nothing reads (as about unknown NIM ones), after logging is set up."""
    unknown = unknown_env(environ, known_env())
    if unknown:
        logging.getLogger("openrerank").warning("OPENRERANK_ variables ignored (no such setting): %s",
                                                ", ".join(unknown))


def run_serve(args: argparse.Namespace) -> int:
    from openrerank.server import http as http_server
    from openrerank.server.app import create_app

    prog = "openrerank serve"
    try:
        config, nim, shown = serve_settings(args)
    except UsageError as exc:
        return fail(prog, str(exc))
    replicated = bool(args.replicas or args.max_replicas)  # what replicas cannot serve is refused (check_scale_out)
    configure_logging(config.log_level, config.log_format)
    nim.report()
    report_unknown_env(os.environ)
    http_server.raise_open_files_limit()
    sock: socket.socket | None = None
    try:
        resolved = preflight(config, shown)
        if not replicated:
            sock = bind_socket(config.host, config.port, f"{setting_name('host', shown)}/{setting_name('port', shown)}")
            if config.grpc_port is not None:
                bind_socket(config.grpc_host or config.host, config.grpc_port,
                            f"{setting_name('grpc-host', shown)}/{setting_name('grpc-port', shown)}").close()
                grpc_server = grpc_server_class()
    except Exception as exc:  # every startup failure is one line, exit 2
        if sock is not None:
            sock.close()
        return fail(prog, str(exc), log_format=config.log_format)
    if replicated:
        return run_replicas(args, config, shown)
    assert sock is not None
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    scheme = "https" if config.tls else "http"
    app = create_app(config, public_url=f"{scheme}://{shown_host}:{port}", resolved=resolved, shown=shown)
    if config.grpc_port is not None:
        app.state.companions.append(grpc_server(app, config.grpc_host or config.host, config.grpc_port))
    logging.getLogger("openrerank").info(
        "openrerank %s listening on %s://%s:%d; loading %s (ready at /v1/health/ready)", __version__,
        scheme, shown_host, port, ", ".join(config.models))
    return http_server.run(app, config, sock)


def run_replicas(args: argparse.Namespace, config: ServerConfig, shown: Shown | None = None) -> int:
    """`serve --replicas N`: the same app on N replicas of a local Ray Serve cluster (openrerank.server.ray_local).
    The flags are checked already (`check_scale_out`); what Ray refuses is one line naming what was set."""
    from openrerank.server.ray_local import ReplicaSetupError, run_local

    try:
        return run_local(config, replica_options(args), metrics_port=args.ray_metrics_port,
                         names=replica_names(args, shown), shown=shown)
    except ReplicaSetupError as exc:
        return fail("openrerank serve", str(exc), log_format=config.log_format)


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="openrerank", description="Self-hosted text reranking service.")
    parser.add_argument("--version", action="version", version=f"openrerank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_parser(sub)
    eval_cli.add_parser(sub)
    export.add_parser(sub)
    cache.add_parser(sub)
    families.add_parser(sub)
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        entry.load().add_parser(sub)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # name -> subparser, for flag errors
    return parser


def quiet_idle_threads() -> None:
    """Let PyTorch's OpenMP workers sleep, not spin, between parallel regions (unless the user chose).

    Spinning workers burn the cores the event loop, the tokenizer threads and any neighbour need, and a
    worker descheduled mid-region stalls its peers: on this project's shared 2-core VM (load average ~15)
    two spinning threads ran a Qwen3-0.6B-shaped forward 2-3x slower than one thread, and passive waiting
    brought two threads back to one thread's time or better. Must happen before torch loads libgomp. Also caps
    oneDNN's caches of prepared products (`torch_gemm.bound_onednn_caches`).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bound_onednn_caches()  # likewise read once, at the process's first oneDNN product


def escape_what_the_terminal_cannot_show() -> None:
    """Write characters stdout's encoding cannot encode as escapes (`\\u65e5`), as stderr (and so the log) already
    does, instead of failing: under a non-UTF-8 locale (PYTHONIOENCODING=latin-1, an ASCII terminal) `export`
    finished its work, then died on printing a path with 日本 in it (exit 1), and `cache ls` on its table."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # not a replacement without `reconfigure` (a test's capture)
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    escape_what_the_terminal_cannot_show()
    quiet_idle_threads()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]  # `openrerank` alone (or with serve flags) serves the embedded default
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bars from weight loading in our output
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = parser.commands.get(getattr(args, "command", None) or "")
        (command or parser).unknown_flags(extras)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C in eval, export, bench (serve drains on its own): a line, not a traceback
        print(f"openrerank {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
