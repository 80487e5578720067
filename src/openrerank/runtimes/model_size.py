"""A model's size as the engine timing needs it, read from its folder without loading it.

`--backend auto` times its candidates on batches sized by the model (`timing_passes.timing_shapes`: fewer rows
for a bigger model) and decides from the weights' size whether the candidates fit in memory together
(`measure.measure_candidates`); the made-up token ids must stay within the vocabulary. Reading the files' sizes
and `config.json` answers both before anything is built.
"""

from __future__ import annotations

import json
from pathlib import Path


def approximate_params(model_dir: Path) -> float:
    """Parameters, from the weight files' sizes (4 bytes each where the config says float32 or names no dtype,
    else 2)."""
    model_dir = Path(model_dir)
    size = sum(p.stat().st_size for p in model_dir.iterdir()
               if p.is_file() and p.name.endswith((".safetensors", ".bin", ".onnx")))
    return size / (4 if weights_dtype(model_dir) in (None, "float32") else 2)


def weights_dtype(model_dir: Path) -> str | None:
    """The weights' dtype as the config names it: `dtype` (transformers >= 4.56 writes this) or `torch_dtype`
    (earlier ones), at the top or in `text_config` (a vision-language model's); None when it says neither."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for where in (config, text):
        for name in ("dtype", "torch_dtype"):
            if isinstance(where.get(name), str):
                return where[name]
    return None


def vocab_size_of(model_dir: Path) -> int:
    """The vocabulary size `config.json` gives (at the top or in `text_config`), 1000 when it says none: the
    timing's made-up token ids stay below it."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 1000
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return int(config.get("vocab_size") or text.get("vocab_size") or 1000)
