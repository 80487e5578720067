"""The [0, 1] score form the Cohere/Jina, TEI and score dialects report, from the one internal score.

Internally every model yields one float32 score per passage (NIM reports it as `logit`), and the result
says which kind of score it is (`ScoreKind`): a relevance logit (cross-encoders, Llama-bidirectional, the
LLM rerankers' yes/no log-odds or answer logit), or a bi-encoder's cosine similarity in [-1, 1].

Dialects whose clients expect a relevance in [0, 1] get:

* logit: `sigmoid(logit)` -- what sentence-transformers' CrossEncoder, TEI, Cohere, Jina, Infinity and
  vLLM report for a one-label reranker (for Qwen3-Reranker it is the reference's P(yes));
* cosine (bi-encoders, the embedded default): `(cosine + 1) / 2`. A sigmoid of a cosine has no meaning and
  squeezes every score into [0.27, 0.73] with unrelated texts at 0.5; the linear map fills [0, 1]
  exactly, keeps the cosine readable (`cosine = 2 * score - 1`) and keeps the order.

Both maps are monotone, so every dialect orders passages identically. The raw internal score is
always available: NIM `logit`, TEI `raw_scores: true`, score `use_activation: false`.
"""

from __future__ import annotations

import numpy as np

from openrerank.core.requests import ScoreKind, sigmoid


def relevance(scores: np.ndarray, kind: ScoreKind) -> np.ndarray:
    """Internal scores -> [0, 1] relevance (float64), per the score kind (see module docstring)."""
    x = np.asarray(scores, dtype=np.float64)
    if kind is ScoreKind.COSINE:
        return np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    return sigmoid(x)


def internal_from_relevance(values: np.ndarray, kind: ScoreKind) -> np.ndarray:
    """Inverse of `relevance` (for clients comparing dialects): logit or cosine from [0, 1]."""
    p = np.asarray(values, dtype=np.float64)
    if kind is ScoreKind.COSINE:
        return 2.0 * p - 1.0
    p = np.clip(p, 1e-300, 1 - 1e-16)
    return np.log(p) - np.log1p(-p)
