"""Refuse pickle checkpoints unless asked: loading a .bin can run arbitrary code."""

from __future__ import annotations

import hashlib
from pathlib import Path

SAFE_PATTERNS = ("*.safetensors",)
#: A directory written by `openrerank export --out`: the ONNX graph, its export record and the tokenizer files.
ONNX_EXPORT_FILES = ("model.onnx", "export.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class UnsafeWeightsError(RuntimeError):
    pass


def has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def is_onnx_export(path: Path) -> bool:
    """True for a pre-exported ONNX model directory (served by ONNX Runtime without PyTorch)."""
    return all((Path(path) / name).is_file() for name in ONNX_EXPORT_FILES)


def check_weights(path: Path, *, allow_pickle: bool) -> str:
    """Return the weight format that will be loaded ("safetensors", "onnx" or "pickle"), or raise."""
    if has_safetensors(path):
        return "safetensors"
    if is_onnx_export(path):
        return "onnx"
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in path.glob(pat))
    if not pickles:
        raise UnsafeWeightsError(f"{path} holds no model weights (*.safetensors or pytorch_model.bin)")
    if not allow_pickle:
        raise UnsafeWeightsError(
            f"{path} has only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
            "loaded; convert them to safetensors, or pass --allow-pickle (OPENRERANK_ALLOW_PICKLE=1) "
            "if you trust the source"
        )
    return "pickle"


def file_sha256(path: Path) -> str:
    """Content hash of a (possibly large) file; keys the ONNX and embedding caches."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
