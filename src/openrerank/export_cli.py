"""`openrerank export`: build (or find) the cached ONNX model ahead of time, e.g. while building an image."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# Weights and other runtimes' copies stay behind: the ONNX graph replaces them.
_NOT_COPIED = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.ot")
_NOT_COPIED_DIRS = ("onnx", "openvino", ".cache", ".git")


def write_servable_dir(model_dir: Path, onnx_file: Path, out: Path) -> Path:
    """`out` = model.onnx + export.json + the model's config, tokenizer and sentence-transformers files:
    a directory `serve --model` runs with ONNX Runtime alone (no PyTorch), e.g. in a container image."""
    out.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns(*_NOT_COPIED, *_NOT_COPIED_DIRS)
    shutil.copytree(model_dir, out, ignore=ignore, dirs_exist_ok=True)
    for f in onnx_file.parent.iterdir():
        shutil.copy2(f, out / f.name)
    return out / onnx_file.name


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
        target = write_servable_dir(resolved.spec.path, result.path, Path(args.out))
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
    p.add_argument("--model", default="default", metavar="SOURCE",
                   help="'default' (the embedded all-MiniLM-L6-v2), a local model directory or a Hugging Face hub id "
                   "(default: default)")
    p.add_argument("--model-family", metavar="FAMILY",
                   help="the model's family when its files do not say (`openrerank families` lists them) "
                   "(default: detected)")
    p.add_argument("--dtype", default="fp32", choices=ONNX_DTYPES,
                   help="fp32 (fused graph) or int8 (dynamic quantization of it) (default: fp32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset, 17 or newer (default: {DEFAULT_OPSET})")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="export cache that `serve` reads "
                   "(default: $OPENRERANK_CACHE_DIR, else ~/.cache/openrerank/onnx)")
    p.add_argument("--out", metavar="DIR",
                   help="also write a servable copy into DIR: model.onnx, export.json and the tokenizer/config files; "
                   "`serve --model DIR` runs it without PyTorch (default: none)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle (.bin) weights, which can run code when loaded (default: off)")
    p.add_argument("--revision", metavar="REV", help="hub revision: branch, tag or commit (default: the main branch)")
    p.set_defaults(func=run_export)
