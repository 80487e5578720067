"""`openrerank export`: build (or find) the cached ONNX model or OpenVINO IR ahead of time, e.g. while
building an image."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

from openrerank.cli.options import Option, UsageError, fail, option_help, parent_problem, resolve_options

PROG = "openrerank export"
# Weights and other runtimes' copies stay behind: the ONNX graph replaces them.
_NOT_COPIED = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.ot")
_NOT_COPIED_DIRS = ("onnx", "openvino", ".cache", ".git")
#: One setting for `serve` and `export` (both read OPENRERANK_ALLOW_PICKLE): the pickle refusal, which the two
#: share (sources/safety.py), names the variable, and export ignored it.
ALLOW_PICKLE = Option("allow-pickle", "models", "allow loading pickle (.bin) weights, which can run code when "
                      "loaded; safetensors only otherwise", switch=True)


def _copy_file(src: str | Path, dst: str | Path) -> None:
    """shutil.copy2 into exactly `dst`: given a folder there, copy2 would write inside it and report success."""
    if Path(dst).is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(dst))
    shutil.copy2(src, dst)


def write_servable_dir(model_dir: Path, onnx_file: Path, out: Path) -> Path:
    """`out` = model.onnx + export.json + the model's config, tokenizer and sentence-transformers files:
    a directory `serve --model` runs with ONNX Runtime alone (no PyTorch), e.g. in a container image."""
    out.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns(*_NOT_COPIED, *_NOT_COPIED_DIRS)
    shutil.copytree(model_dir, out, ignore=ignore, dirs_exist_ok=True, copy_function=_copy_file)
    for f in onnx_file.parent.iterdir():
        _copy_file(f, out / f.name)
    return out / onnx_file.name


def _not_a_directory(out: Path) -> str | None:
    """Why `out` cannot be (made) a directory: it, or the nearest of its parents that exists, is something
    else. Other failures (permissions, a full disk) show only when writing, after the export."""
    if out.exists() and not out.is_dir():
        return "exists and is not a directory"
    return parent_problem(out)


def run_export(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from openrerank.engine.loading import LoadOptions, resolve_model
    from openrerank.families.base import ModelFormatError
    from openrerank.runtimes.onnx_export import ExportError, ensure_onnx
    from openrerank.runtimes.openvino_convert import CACHE_FOLDER, ConversionError, ensure_openvino
    from openrerank.runtimes.selection import RUNTIME_DTYPES, RUNTIME_NAMES, RuntimeConfigError
    from openrerank.server.config import ServerConfig
    from openrerank.server.engine_config import model_sources
    from openrerank.sources.safety import UnsafeWeightsError
    from openrerank.sources.source import ModelSourceError

    try:
        resolve_options(args, (ALLOW_PICKLE,), ServerConfig())  # the flag, else OPENRERANK_ALLOW_PICKLE
    except UsageError as exc:
        return fail(PROG, str(exc))
    out = Path(args.out) if args.out else None
    if out is not None and (problem := _not_a_directory(out)):  # found before the export, not after it
        return fail(PROG, f"--out {out}: {problem}")
    try:
        families = [args.model_family] if args.model_family else []
        source = model_sources(ServerConfig(models=[args.model], model_families=families,
                                            revisions=[args.revision] if args.revision else []))[0]
        # bf16 is chosen when OpenVINO compiles the model; its IR is the fp32 one.
        variant = "fp32" if args.backend == "openvino" and args.dtype == "bf16" else args.dtype
        if args.dtype not in (runs := RUNTIME_DTYPES[args.backend]):
            elsewhere = " or ".join(RUNTIME_NAMES[r] for r, dtypes in RUNTIME_DTYPES.items() if args.dtype in dtypes)
            raise RuntimeConfigError(f"{RUNTIME_NAMES[args.backend]} runs {' or '.join(runs)} here; {args.dtype} "
                                     f"runs on {elsewhere}")
        resolved = resolve_model(source, LoadOptions(backend=args.backend, dtype=variant,
                                                     allow_pickle=args.allow_pickle))
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.spec.path), local_files_only=True)
        network = resolved.family.network(resolved.spec, tokenizer)
        cache_dir = Path(args.cache_dir) if args.cache_dir else None
        if args.backend == "openvino":
            ir_dir = cache_dir / CACHE_FOLDER if cache_dir else None
            result = ensure_openvino(network, variant=variant, cache_dir=ir_dir)
        else:
            result = ensure_onnx(network, dtype=args.dtype, opset=args.opset, cache_dir=cache_dir)
    except (ModelSourceError, ModelFormatError, UnsafeWeightsError, ExportError, ConversionError,
            RuntimeConfigError, ValueError) as exc:
        return fail(PROG, str(exc))
    except OSError as exc:  # e.g. the cache (--cache-dir): a file where its folder goes, read-only, full
        return fail(PROG, f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))
    target = result.path
    try:
        if out is not None and args.backend == "onnx":
            target = write_servable_dir(resolved.spec.path, result.path, out)
        elif out is not None:  # the IR and its record, as cached (serve reads IRs from the cache)
            out.mkdir(parents=True, exist_ok=True)
            for f in result.path.parent.iterdir():
                _copy_file(f, out / f.name)
            target = out / result.path.name
    except OSError as exc:
        return fail(PROG, f"cannot write --out {out}: {exc.strerror or exc}")
    state = "cached" if result.cached else "exported"
    details = result.meta.get("fusions") if args.backend == "onnx" else result.meta.get("quantization", "fp32 IR")
    print(f"{state} ({args.backend} {args.dtype}: {details})", file=sys.stderr, flush=True)
    print(target)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from openrerank.runtimes.onnx_export import DEFAULT_OPSET
    from openrerank.runtimes.openvino_convert import CACHE_FOLDER
    from openrerank.runtimes.selection import CONVERTED_RUNTIMES, RUNTIME_DTYPES, RUNTIME_NAMES

    p = sub.add_parser("export", help="convert a model to ONNX or OpenVINO into the cache the server reads",
                       description="Export --model to ONNX with ONNX Runtime's transformer fusions (int8: dynamic "
                       "quantization), or with --backend openvino convert it to an OpenVINO IR (int8: NNCF int8 "
                       "weights; bf16 uses the fp32 IR), store it in the cache `serve` reads "
                       f"(OPENRERANK_CACHE_DIR, default $XDG_CACHE_HOME/openrerank/onnx; OpenVINO IRs in its "
                       f"{CACHE_FOLDER}/ folder) and print its path. Encoder families only (LLM rerankers run on "
                       "PyTorch).")
    p.add_argument("--model", default="default", metavar="SOURCE",
                   help="'default' (the embedded all-MiniLM-L6-v2), a local model directory or a Hugging Face hub id "
                   "(default: default)")
    p.add_argument("--model-family", metavar="FAMILY",
                   help="the model's family when its files do not say (`openrerank families` lists them) "
                   "(default: detected)")
    p.add_argument("--backend", default=CONVERTED_RUNTIMES[0], choices=CONVERTED_RUNTIMES,
                   help="the runtime to convert for: "
                   + " or ".join(f"{r} ({RUNTIME_NAMES[r]})" for r in CONVERTED_RUNTIMES)
                   + f" (default: {CONVERTED_RUNTIMES[0]})")
    p.add_argument("--dtype", default="fp32",
                   choices=tuple(dict.fromkeys(d for r in CONVERTED_RUNTIMES for d in RUNTIME_DTYPES[r])),
                   help="fp32 (fused graph / IR), int8 (onnx: dynamic quantization; openvino: NNCF int8 weights) "
                   "or bf16 (openvino: the fp32 IR, run in bf16) (default: fp32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset, 17 or newer (default: {DEFAULT_OPSET})")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache that `serve` reads (default: $OPENRERANK_CACHE_DIR, else "
                   "$XDG_CACHE_HOME/openrerank/onnx; "
                   f"OpenVINO IRs in its {CACHE_FOLDER}/ folder)")
    p.add_argument("--out", metavar="DIR",
                   help="onnx: also write a servable copy into DIR (model.onnx, export.json and the tokenizer/config "
                   "files; `serve --model DIR` runs it without PyTorch); openvino: copy the IR files into DIR "
                   "(default: none)")
    p.add_argument("--allow-pickle", action="store_true", default=argparse.SUPPRESS,
                   help=option_help(ALLOW_PICKLE, False))
    p.add_argument("--revision", metavar="REV", help="hub revision: branch, tag or commit (default: the main branch)")
    p.set_defaults(func=run_export)
