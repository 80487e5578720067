"""`openrerank serve | eval | bench | export`. Every serve flag is also an OPENRERANK_<FLAG> variable."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields

from openrerank import __version__
from openrerank.config import ServerConfig

ENV_PREFIX = "OPENRERANK_"
_TRUE = {"1", "true", "yes", "on"}

# Subcommands that live with their feature: module path -> exposes add_parser(subparsers) and run(args).
_FEATURE_COMMANDS = ("openrerank.eval.cli", "openrerank.bench", "openrerank.export_cli",
                     "openrerank.families.cli")


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))


def _env_default(flag: str, default, cast=str):
    raw = _env(flag)
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in _TRUE
    return cast(raw)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    d = ServerConfig()
    p = sub.add_parser("serve", help="run the HTTP server",
                       description="Serve reranking models over HTTP (NIM, Cohere/Jina, TEI, score APIs). "
                       "Every flag can also be set as OPENRERANK_<FLAG>, e.g. OPENRERANK_PORT=9000.")

    def opt(flag: str, default, cast=str, help: str = "", **kw) -> None:
        p.add_argument(f"--{flag}", default=_env_default(flag, default, cast), type=cast, help=help, **kw)

    def flag_(flag: str, help: str) -> None:
        p.add_argument(f"--{flag}", action="store_true", default=_env_default(flag, False, bool), help=help)

    env_models = _env("model")
    p.add_argument("--model", action="append", dest="models", metavar="[NAME=]SOURCE",
                   default=None if env_models is None else [m.strip() for m in env_models.split(",") if m.strip()],
                   help="model to serve: 'default' (embedded all-MiniLM-L6-v2), a local directory or a "
                   "Hugging Face hub id; NAME=SOURCE serves it as NAME. Repeat to serve several "
                   "(env: comma-separated).")
    env_families = _env("model-family")
    p.add_argument("--model-family", action="append", dest="model_families", metavar="[NAME=]FAMILY",
                   default=[] if env_families is None else [f.strip() for f in env_families.split(",") if f.strip()],
                   help="the family of model NAME (a served id; may be left out when one model is served), "
                   "instead of detecting it: needed for an LLM reranker whose files do not say which one it is. "
                   "`openrerank families` lists them. Repeatable (env: comma-separated).")
    env_instr = _env("instruction")
    p.add_argument("--instruction", action="append", dest="instructions", metavar="[NAME=]TEXT",
                   default=[] if env_instr is None else [env_instr],
                   help="the prompt instruction of an LLM reranker that takes one (qwen3-reranker, "
                   "mxbai-rerank-v2); NAME as for --model-family. Repeatable.")
    opt("host", d.host, help="bind address")
    opt("port", d.port, int, help="port")
    opt("api-key", d.api_key, help="require 'Authorization: Bearer KEY' on every route but health")
    opt("backend", d.backend, help="inference engine: auto (ONNX Runtime on CPU when available), onnx, torch")
    opt("dtype", d.dtype, help="fp32, bf16 (torch, AVX512-BF16 CPUs or GPU), fp16 (GPU), int8 (onnx)")
    opt("device", d.device, help="cpu or cuda[:N] (torch backend)")
    opt("threads", d.threads, int, help="intra-op threads (default: the cores available)")
    opt("max-length", d.max_length, int, help="cap on the tokens of one query+passage pair")
    flag_("allow-pickle", "allow loading pickle (.bin) weights; safetensors only otherwise")
    opt("revision", d.revision, help="hub revision (branch, tag or commit)")
    opt("max-passages", d.max_passages, int, help="most passages in one request")
    opt("max-inputs", d.max_inputs, int, help="most texts in one /v1/embeddings request")
    opt("max-body-bytes", d.max_body_bytes, int, help="largest request body accepted")
    opt("max-batch-tokens", d.max_batch_tokens, int, help="padded tokens per model batch")
    opt("max-batch-size", d.max_batch_size, int, help="pairs per model batch")
    opt("max-padding", d.max_padding, float, help="largest share of padding in a model batch (raise on GPU)")
    opt("batch-wait-ms", d.batch_wait_ms, float, help="how long a batch waits for concurrent requests")
    opt("max-queue", d.max_queue, int, help="pending requests before answering 503/429")
    opt("request-timeout", d.request_timeout, float, help="seconds a request may wait for the model")
    flag_("tei-chunking", "score over-long TEI /rerank texts by their best chunk instead of truncating")
    opt("log-level", d.log_level, help="debug, info, warning, error")
    opt("graceful-timeout", d.graceful_timeout, float, help="seconds to finish in-flight requests on shutdown")
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    if not values.get("models"):
        values["models"] = ["default"]
    return ServerConfig(**values)


def preflight(config: ServerConfig) -> None:
    """Fail fast on bad --model/--backend values before binding the port (weights load later)."""
    from openrerank.api.app import load_options
    from openrerank.backends.selection import check_backend_options
    from openrerank.engine.loading import model_sources, resolve_model

    sources = model_sources(config.models, config.model_families, config.instructions)
    names = [s.served_id for s in sources]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"several models are served as {', '.join(sorted(dupes))}; use NAME=SOURCE aliases")
    check_backend_options(config.backend, config.dtype, config.device)
    for source in sources:
        resolve_model(source, load_options(config))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from openrerank.api.app import create_app

    config = config_from_args(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        preflight(config)
    except Exception as exc:
        print(f"openrerank: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=config.graceful_timeout, access_log=config.log_level == "debug")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openrerank", description="Self-hosted text reranking service.")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["serve"]  # `openrerank` alone serves the embedded default
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
