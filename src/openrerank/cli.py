"""`openrerank serve | eval | bench | export`. Every serve flag is also an OPENRERANK_<FLAG> variable."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import fields

from openrerank import __version__
from openrerank.backends.selection import BACKENDS, DTYPES
from openrerank.cli_support import Option, SuggestingParser, UsageError, add_options, fail, resolve_options
from openrerank.config import ServerConfig
from openrerank.logs import LOG_FORMATS, LOG_LEVELS, configure_logging

# Subcommands that live with their feature: module path -> exposes add_parser(subparsers) and run(args).
_FEATURE_COMMANDS = ("openrerank.eval.cli", "openrerank.bench", "openrerank.export_cli",
                     "openrerank.families.cli")

_GROUPS = {
    "network": "where the server listens and who may call it",
    "models": "what is served",
    "engine": "how models run and how requests are batched",
    "limits": "what one request may ask for, and how long it may wait",
    "logging": "logs and tracing",
}

#: Every `serve` flag, one line each; defaults come from ServerConfig, each is also OPENRERANK_<FLAG>.
SERVE_OPTIONS: tuple[Option, ...] = (
    Option("host", "network", "bind address (0.0.0.0 for every interface)"),
    Option("port", "network", "TCP port; checked before any model loads", int),
    Option("api-key", "network", "require 'Authorization: Bearer KEY' on every route but health"),
    Option("model", "models", "model to serve: 'default' (embedded all-MiniLM-L6-v2), a local directory or a "
           "Hugging Face hub id; NAME=SOURCE serves it as NAME. Repeat to serve several",
           repeatable=True, dest="models", metavar="[NAME=]SOURCE"),
    Option("model-family", "models", "the family of model NAME (a served id; may be left out when one model is "
           "served) instead of detecting it: needed for an LLM reranker whose files do not say which one it is; "
           "`openrerank families` lists them", repeatable=True, dest="model_families", metavar="[NAME=]FAMILY"),
    Option("instruction", "models", "the prompt instruction of an LLM reranker that takes one (qwen3-reranker, "
           "mxbai-rerank-v2); NAME is a served id, optional with one model", repeatable=True, split_env=False,
           dest="instructions", metavar="[NAME=]TEXT"),
    Option("revision", "models", "hub revision (branch, tag or commit)"),
    Option("allow-pickle", "models", "allow loading pickle (.bin) weights; safetensors only otherwise", switch=True),
    Option("max-length", "models", "cap on the tokens of one query+passage pair (none: the model's window)", int),
    Option("backend", "engine", "inference engine: auto (ONNX Runtime on CPU, PyTorch on CUDA)",
           choices=BACKENDS),
    Option("dtype", "engine", "fp32; bf16 (torch: AVX512-BF16 CPU or GPU); fp16 (GPU); int8 (onnx)", choices=DTYPES),
    Option("device", "engine", "cpu or cuda[:N] (torch backend; fails at startup without a usable GPU)"),
    Option("threads", "engine", "intra-op threads (none: the cores available)", int),
    Option("max-batch-tokens", "engine", "padded tokens per model batch", int),
    Option("max-batch-size", "engine", "pairs per model batch", int),
    Option("max-padding", "engine", "largest share of padding in a model batch (raise on GPU)", float),
    Option("batch-wait-ms", "engine", "how long a batch waits for concurrent requests", float),
    Option("max-passages", "limits", "most passages in one request", int),
    Option("max-body-bytes", "limits", "largest request body accepted (413 above)", int),
    Option("max-queue", "limits", "pending requests before answering 429/503 with Retry-After", int),
    Option("request-timeout", "limits", "seconds a request may wait for the model", float),
    Option("graceful-timeout", "limits", "seconds to finish in-flight requests on shutdown", float),
    Option("tei-chunking", "limits", "score over-long TEI /rerank texts by their best chunk instead of truncating",
           switch=True),
    Option("log-level", "logging", "debug, info (one access line per request), warning, error",
           choices=LOG_LEVELS),
    Option("log-format", "logging", "text (human) or json (one object per line)", choices=LOG_FORMATS),
    Option("otlp-endpoint", "logging", "send OpenTelemetry traces (OTLP/HTTP) to this URL, e.g. "
           "http://localhost:4318; needs the otel extra", metavar="URL"),
)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP server",
                       description="Serve reranking models over HTTP (NIM, Cohere/Jina, TEI/Infinity, score APIs). "
                       "Every flag can also be set as OPENRERANK_<FLAG>, e.g. OPENRERANK_PORT=9000; flags win.")
    add_options(p, SERVE_OPTIONS, ServerConfig(), _GROUPS)
    p.set_defaults(func=run_serve, options=SERVE_OPTIONS)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Flags, then OPENRERANK_* variables, then ServerConfig's defaults; UsageError names a bad variable."""
    resolve_options(args, SERVE_OPTIONS, ServerConfig())
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    if not values.get("models"):
        values["models"] = ["default"]
    return ServerConfig(**values)


def preflight(config: ServerConfig) -> None:
    """Fail fast on bad --model/--backend/--device values before binding the port (weights load later)."""
    from openrerank.api.app import load_options
    from openrerank.backends.devices import check_device
    from openrerank.backends.selection import check_backend_options
    from openrerank.engine.loading import model_sources, resolve_model

    sources = model_sources(config.models, config.model_families, config.instructions)
    names = [s.served_id for s in sources]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"several models are served as {', '.join(sorted(dupes))}; use NAME=SOURCE aliases")
    check_backend_options(config.backend, config.dtype, config.device)
    check_device(config.device)
    if config.otlp_endpoint:
        from openrerank.tracing import check_tracing_available

        check_tracing_available()
    for source in sources:
        resolve_model(source, load_options(config))


def bind_socket(host: str, port: int) -> socket.socket:
    """Take the port now, before any model loads, so a busy port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise UsageError(f"cannot listen on {host}:{port}: {reason.lower()} (--host/--port, OPENRERANK_PORT)"
                         ) from None
    sock.set_inheritable(True)
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from openrerank.api.app import create_app

    prog = "openrerank serve"
    try:
        config = config_from_args(args)
    except UsageError as exc:
        return fail(prog, str(exc))
    configure_logging(config.log_level, config.log_format)
    try:
        preflight(config)
        sock = bind_socket(config.host, config.port)
    except Exception as exc:  # every startup failure is one line, exit 2
        return fail(prog, str(exc))
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    app = create_app(config, public_url=f"http://{shown_host}:{port}")
    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, log_level=config.log_level, access_log=False,
        timeout_graceful_shutdown=config.graceful_timeout))
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    logging.getLogger("openrerank").info(
        "openrerank %s listening on http://%s:%d; loading %s (ready at /v1/health/ready)", __version__,
        shown_host, port, ", ".join(config.models))
    server.run(sockets=[sock])
    if app.state.models.load_error:
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="openrerank", description="Self-hosted text reranking service.")
    parser.add_argument("--version", action="version", version=f"openrerank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_parser(sub)
    for module_name in _FEATURE_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # feature not in this build
            raise
        module.add_parser(sub)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # name -> subparser, for flag errors
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
