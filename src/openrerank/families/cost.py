"""What a sequence costs a transformer, from its config: the matrices cost the same per token at any length,
attention costs more per token the longer the sequence.

Per layer, on a sequence of n tokens (a multiply-add is 2 FLOPs; q and kv the widths of the query and of the
key/value projections, h the hidden size, f the feed-forward size):

    2n (h q + 2 h kv + q h + m h f)   the projections and the feed-forward (m = 3 for a gated one, else 2)
  + 4 n^2 q                           attention scores and their weighted sum

Embeddings, norms, softmax and the head are left out (< 1% for an encoder). For a BERT-style encoder that is
2n(4h^2 + 2hf) + 4n^2 h, the formula `openrerank bench` divides its roofline by. Per token, attention adds
n / knee to the matrices' cost, where knee = (h q + 2 h kv + q h + m h f) / (2 q): 6h for BERT (2,304 tokens
for MiniLM, 6,144 for an XLM-RoBERTa-large reranker), so a token of an 8,192-token passage costs about 2.3x
one of a 100-token passage. Admission weighs requests by this (`engine/rates.py`); sliding-window
attention (ModernBERT's local layers, Gemma 2's) is counted as full, which overstates, never understates.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from openrerank.families.base import _read_json

#: Model types whose feed-forward is gated (three matrices, not two): the LLM families and ModernBERT's GLU.
#: Others are gated when their activation is SiLU (LLaMA-style); the rest (BERT-style) are not.
_GATED_FEED_FORWARD = {"llama", "llama_bidirec", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl", "gemma",
                       "gemma2", "gemma3", "gemma3_text", "modernbert", "phi3"}
#: Where a multimodal or wrapped config keeps its language model's.
_NESTED = ("text_config", "llm_config", "language_config")


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The config that describes the transformer's layers (a VL model's language model), or None."""
    if "hidden_size" in config and "num_hidden_layers" in config:
        return config
    for key in _NESTED:
        nested = config.get(key)
        if isinstance(nested, Mapping) and "hidden_size" in nested:
            return text_config(nested)
    return None


def layer_costs(config: Mapping[str, Any]) -> tuple[float, float, int]:
    """(matrix multiply-adds per token per layer, attention multiply-adds per token per position, layers): the
    module docstring's formula, whose FLOPs on a sequence of n tokens are layers * 2n (matrices + attention n)."""
    h = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or h // heads)
    q = heads * head_dim
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    f = int(config.get("intermediate_size") or 4 * h)
    gated = 3 if config.get("model_type") in _GATED_FEED_FORWARD or config.get("hidden_act") == "silu" else 2
    return h * q + 2 * h * kv + q * h + gated * h * f, 2 * q, int(config["num_hidden_layers"])


def attention_knee(config: Mapping[str, Any]) -> float | None:
    """The length at which attention costs a token as much as the matrices do; None if the config does not
    say the layers' shape."""
    inner = text_config(config)
    if inner is None:
        return None
    try:
        matrices, attention, _ = layer_costs(inner)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return matrices / attention if matrices > 0 and attention > 0 else None


def knee_of(path: Path) -> float | None:
    """`attention_knee` of the model in `path` (its config.json), None without one."""
    config = _read_json(Path(path) / "config.json")
    return attention_knee(config) if isinstance(config, Mapping) else None


def token_activation_bytes(config: Mapping[str, Any], width: int) -> int | None:
    """Bytes one padded token of a batch of `width`-token sequences holds while a layer runs, fp32: attention's
    scores and probabilities (heads x width floats each), the feed-forward's inner activations (two of them
    where it is gated), and a few hidden-size buffers (the residual, q, k, v, the output). Runtimes in bf16 or
    int8 hold less, and fused attention none of the scores, so it overstates (MiniLM-L6, width 256: 40 KB per
    token; OpenVINO bf16 held ~25 KB). None if the config does not say the layers' shape."""
    inner = text_config(config)
    if inner is None:
        return None
    try:
        h = int(inner["hidden_size"])
        heads = int(inner.get("num_attention_heads") or 1)
        f = int(inner.get("intermediate_size") or 4 * h)
    except (KeyError, TypeError, ValueError):
        return None
    gated = inner.get("model_type") in _GATED_FEED_FORWARD or inner.get("hidden_act") == "silu"
    return 4 * (2 * heads * width + (2 if gated else 1) * f + 6 * h)


def activation_bytes_of(path: Path, width: int) -> int | None:
    """`token_activation_bytes` of the model in `path` (its config.json), None without one."""
    config = _read_json(Path(path) / "config.json")
    return token_activation_bytes(config, width) if isinstance(config, Mapping) else None
