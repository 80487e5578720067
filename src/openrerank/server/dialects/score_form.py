"""The [0, 1] score form the Cohere/Jina, TEI and score dialects report, from the one internal score.

Internally every model yields one float32 score per passage (NIM reports it as `logit`), and the result
says which kind of score it is (`ScoreKind`): a relevance logit (cross-encoders, Llama-bidirectional, the
LLM rerankers' yes/no log-odds or answer logit), or a bi-encoder's cosine similarity in [-1, 1].

Dialects whose clients expect a relevance in [0, 1] get:

* logit: `sigmoid(logit)` -- what sentence-transformers' CrossEncoder, TEI, Cohere, Jina, Infinity and
  vLLM report for a one-label reranker (for Qwen3-Reranker it is the reference's P(yes));
* maxsim (late interaction, ColBERT): `(maxsim / n + 1) / 2` for a query of n token vectors: the mean over
  the query's vectors of their best cosine, mapped like a cosine (raw MaxSim grows with the query length,
  so neither a sigmoid nor a fixed scale would mean the same thing for two queries);
* cosine (bi-encoders, the embedded default): `(cosine + 1) / 2`. A sigmoid of a cosine has no meaning and
  squeezes every score into [0.27, 0.73] with unrelated texts at 0.5; the linear map fills [0, 1]
  exactly, keeps the cosine readable (`cosine = 2 * score - 1`) and keeps the order.

All maps are monotone (for one query), so every dialect orders passages identically. The raw internal score is
always available: NIM `logit`, TEI `raw_scores: true`, score `use_activation: false`.
"""

from __future__ import annotations

import numpy as np

from openrerank.core.requests import RerankResult, ScoreKind, sigmoid


def relevance(scores: np.ndarray, kind: ScoreKind, query_vectors: int | None = None) -> np.ndarray:
    """Internal scores -> [0, 1] relevance (float64), per the score kind (see module docstring);
    MAXSIM needs the query's vector count (`RerankResult.query_vectors`)."""
    x = np.asarray(scores, dtype=np.float64)
    if kind is ScoreKind.MAXSIM:
        if not query_vectors:
            raise ValueError("a MaxSim score needs the number of query vectors it sums over")
        x = x / query_vectors
    if kind in (ScoreKind.COSINE, ScoreKind.MAXSIM):
        return np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    return sigmoid(x)


def result_relevance(result: RerankResult) -> np.ndarray:
    """A result's scores in [0, 1] (what every dialect but NIM reports unless asked for raw scores)."""
    return relevance(result.logits, result.score_kind, result.query_vectors)
