"""Refuse pickle checkpoints unless asked: loading a .bin can run arbitrary code."""

from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatch
from pathlib import Path

#: A directory written by `openrerank export --out`: the ONNX graph, its export record and the tokenizer files.
ONNX_EXPORT_FILES = ("model.onnx", "export.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class UnsafeWeightsError(RuntimeError):
    pass


#: The safetensors files transformers' from_pretrained loads: one file, or an index naming its shards.
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The weight files from_pretrained reads from `path`, [] when it would read none. Any other *.safetensors
    (training_args.safetensors, an adapter) is not the model: counting it let pytorch_model.bin load unrefused."""
    path = Path(path)
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    index = path / SAFETENSORS_INDEX
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    shards = [path / name for name in sorted(set(map(str, weight_map.values())))]
    return shards if shards and all(f.is_file() for f in shards) else []


def has_safetensors(path: Path) -> bool:
    return bool(safetensors_files(path))


def weights_kwargs(path: Path) -> dict:
    """from_pretrained's keywords: safetensors only where the folder has them, so transformers never falls back
    to a pickle beside them; elsewhere the loader has refused pickle weights unless --allow-pickle was given."""
    return {"use_safetensors": True} if has_safetensors(path) else {}


def broken_links(path: Path) -> list[str]:
    """A folder's symbolic links whose target is missing (a hub-cache snapshot whose blob never arrived)."""
    return sorted(p.name for p in Path(path).iterdir() if p.is_symlink() and not p.exists())


def is_onnx_export(path: Path) -> bool:
    """True for a pre-exported ONNX model directory (served by ONNX Runtime without PyTorch)."""
    return all((Path(path) / name).is_file() for name in ONNX_EXPORT_FILES)


def check_weights(path: Path, *, allow_pickle: bool) -> str:
    """Return the weight format that will be loaded ("safetensors", "onnx" or "pickle"), or raise."""
    broken = broken_links(path)
    if broken:  # `ls` shows them, but every reader says "no such file"
        raise UnsafeWeightsError(
            f"{path}: {', '.join(broken)} {'is a link' if len(broken) == 1 else 'are links'} to a missing file "
            "(an incomplete hub download?); download the model again, or copy the missing files in")
    if has_safetensors(path):
        return "safetensors"
    if is_onnx_export(path):
        return "onnx"
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in path.glob(pat))
    if not pickles and any(path.glob("*.onnx")):
        raise UnsafeWeightsError(
            f"{path} holds an ONNX model not written by `openrerank export` (no {ONNX_EXPORT_FILES[1]}; e.g. "
            "optimum's layout), which openrerank does not serve: serve the original checkpoint, or export it "
            "with `openrerank export --model SOURCE --out DIR` and serve DIR")
    if not pickles:
        raise UnsafeWeightsError(f"{path} holds no model weights (*.safetensors or pytorch_model.bin)")
    if not allow_pickle:
        raise pickle_refusal(str(path), pickles)
    return "pickle"


def pickle_names(names: list[str]) -> list[str]:
    """The top-level pickle weight files among a folder's or a hub repo's file names."""
    return sorted(n for n in names if "/" not in n and any(fnmatch(n, pat) for pat in PICKLE_PATTERNS))


def pickle_refusal(where: str, pickles: list[str]) -> UnsafeWeightsError:
    """One wording for a local folder and a hub repo whose pickles the download left out."""
    return UnsafeWeightsError(
        f"{where} has only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
        "loaded; convert them to safetensors, or pass --allow-pickle (OPENRERANK_ALLOW_PICKLE=1) "
        "if you trust the source"
    )


def file_sha256(path: Path) -> str:
    """Content hash of a (possibly large) file; keys the ONNX and embedding caches."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
