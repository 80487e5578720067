"""`openrerank export`: build (or find) the cached ONNX model or OpenVINO IR ahead of time, e.g. while
building an image."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def run_export(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from openrerank.backends.onnx_export import ExportError, ensure_onnx
    from openrerank.backends.openvino_convert import ConversionError, ensure_openvino
    from openrerank.backends.selection import BackendConfigError
    from openrerank.engine.loading import LoadOptions, model_sources, resolve_model
    from openrerank.families.base import ModelFormatError
    from openrerank.models.source import ModelSourceError

    try:
        source = model_sources([args.model], [args.model_family] if args.model_family else None)[0]
        # bf16 is chosen when OpenVINO compiles the model; its IR is the fp32 one.
        variant = "fp32" if args.backend == "openvino" and args.dtype == "bf16" else args.dtype
        if args.backend == "onnx" and args.dtype == "bf16":
            raise BackendConfigError("ONNX Runtime runs fp32 or int8 here; bf16 is an OpenVINO or PyTorch dtype")
        resolved = resolve_model(source, LoadOptions(backend=args.backend, dtype=variant,
                                                     allow_pickle=args.allow_pickle, revision=args.revision))
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.spec.path), local_files_only=True)
        network = resolved.family.network(resolved.spec, tokenizer)
        cache_dir = Path(args.cache_dir) if args.cache_dir else None
        if args.backend == "openvino":
            result = ensure_openvino(network, variant=variant, cache_dir=cache_dir / "openvino" if cache_dir else None)
        else:
            result = ensure_onnx(network, dtype=args.dtype, opset=args.opset, cache_dir=cache_dir)
    except (ModelSourceError, ModelFormatError, ExportError, ConversionError, BackendConfigError,
            ValueError) as exc:
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
    details = result.meta.get("fusions") if args.backend == "onnx" else result.meta.get("quantization", "fp32 IR")
    print(f"{state} ({args.backend} {args.dtype}: {details})", file=sys.stderr, flush=True)
    print(target)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from openrerank.backends.onnx_export import DEFAULT_OPSET, ONNX_DTYPES

    p = sub.add_parser("export", help="convert a model to ONNX or OpenVINO into the cache the server reads",
                       description="Export --model to ONNX with ONNX Runtime's transformer fusions (int8: dynamic "
                       "quantization), or with --backend openvino convert it to an OpenVINO IR (int8: NNCF int8 "
                       "weights; bf16 uses the fp32 IR), store it in the cache `serve` reads "
                       "(OPENRERANK_CACHE_DIR, default ~/.cache/openrerank/onnx; OpenVINO IRs in its openvino/ "
                       "folder) and print its path. Encoder families only (LLM rerankers run on PyTorch).")
    p.add_argument("--model", default="default", help="'default', a local directory or a hub id")
    p.add_argument("--model-family", help="the model's family when its files do not say (see `openrerank families`)")
    p.add_argument("--backend", default="onnx", choices=("onnx", "openvino"))
    p.add_argument("--dtype", default="fp32", choices=(*ONNX_DTYPES, "bf16"))
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--cache-dir", help="cache folder (default: $OPENRERANK_CACHE_DIR or ~/.cache/openrerank/onnx; "
                   "for openvino its openvino/ subfolder)")
    p.add_argument("--out", help="also copy the model files (model.onnx, or model.xml + model.bin) and their "
                   "metadata into this folder")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    p.add_argument("--revision", help="hub revision")
    p.set_defaults(func=run_export)
