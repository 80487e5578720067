"""`openrerank export`: build (or find) the cached ONNX model ahead of time, e.g. while building an image."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def run_export(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from openrerank.backends.onnx_export import ExportError, ensure_onnx
    from openrerank.backends.selection import BackendConfigError
    from openrerank.engine.loading import LoadOptions, model_sources, resolve_model
    from openrerank.families.base import ModelFormatError
    from openrerank.models.source import ModelSourceError

    try:
        source = model_sources([args.model], [args.model_family] if args.model_family else None)[0]
        resolved = resolve_model(source, LoadOptions(backend="onnx", dtype=args.dtype, allow_pickle=args.allow_pickle,
                                                     revision=args.revision))
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.spec.path), local_files_only=True)
        network = resolved.family.network(resolved.spec, tokenizer)
        result = ensure_onnx(network, dtype=args.dtype, opset=args.opset,
                             cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    except (ModelSourceError, ModelFormatError, ExportError, BackendConfigError, ValueError) as exc:
        print(f"openrerank export: error: {exc}", file=sys.stderr)
        return 2
    target = result.path
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in result.path.parent.iterdir():
            shutil.copy2(f, out / f.name)
        target = out / result.path.name
    state = "cached" if result.cached else "exported"
    print(f"{state} ({args.dtype}, fusions: {result.meta.get('fusions')})", file=sys.stderr, flush=True)
    print(target)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from openrerank.backends.onnx_export import DEFAULT_OPSET, ONNX_DTYPES

    p = sub.add_parser("export", help="export a model to (optimized, optionally int8) ONNX into the cache",
                       description="Export --model to ONNX with ONNX Runtime's transformer fusions (and int8 "
                       "quantization with --dtype int8), store it in the cache `serve --backend onnx` reads "
                       "(OPENRERANK_CACHE_DIR, default ~/.cache/openrerank/onnx) and print its path. Encoder "
                       "families only (LLM rerankers run on PyTorch).")
    p.add_argument("--model", default="default", help="'default', a local directory or a hub id")
    p.add_argument("--model-family", help="the model's family when its files do not say (see `openrerank families`)")
    p.add_argument("--dtype", default="fp32", choices=ONNX_DTYPES)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--cache-dir", help="cache folder (default: $OPENRERANK_CACHE_DIR or ~/.cache/openrerank/onnx)")
    p.add_argument("--out", help="also copy model.onnx and export.json into this folder")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    p.add_argument("--revision", help="hub revision")
    p.set_defaults(func=run_export)
