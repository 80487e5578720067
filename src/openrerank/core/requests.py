"""The request/result shapes all dialects convert to and from (rerank and embed).

Dialects (NIM, Cohere, TEI, score) only translate wire formats; everything below them
(text preparation, scheduler, backends) sees these types alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import numpy as np


class ScoreKind(str, Enum):
    """What a model's internal score is, so dialects can convert it without knowing the model.

    LOGIT: a relevance logit (log-odds); its unit-interval form is the sigmoid.
    COSINE: a cosine similarity in [-1, 1]; its unit-interval form is (cosine + 1) / 2.
    MAXSIM: late interaction (ColBERT): the sum, over the query's n token vectors, of each one's best cosine
    with the passage's token vectors, in [-n, n]; its unit-interval form is (score / n + 1) / 2 (the mean
    best cosine, mapped like COSINE). n travels with the result (`RerankResult.query_vectors`).
    """

    LOGIT = "logit"
    COSINE = "cosine"
    MAXSIM = "maxsim"


class Truncate(str, Enum):
    """What to do with a query+passage pair longer than the model's window."""

    NONE = "NONE"  # fail the whole request (NIM default)
    END = "END"  # keep the query, cut the passage's end
    START = "START"  # keep the query, cut the passage's start (TEI truncation_direction=left)
    CHUNK = "CHUNK"  # split the passage into overlapping windows; passage score = best window


@dataclass(frozen=True)
class RerankRequest:
    """A dialect-neutral rerank request."""

    query: str
    passages: list[str]
    model: str | None = None
    truncate: Truncate = Truncate.NONE
    top_n: int | None = None
    # Chunking bounds (CHUNK only): at most this many windows per passage, at most this many
    # passage tokens considered in total (Cohere's max_chunks_per_doc / max_tokens_per_doc).
    max_chunks_per_passage: int | None = None
    max_tokens_per_passage: int | None = None
    # The dialect's own default when the client did not ask (Cohere v1: 10), kept under the server's cap.
    default_chunks_per_passage: int | None = None
    # The request's own task instruction (instruction-aware families only); None: the model's (--instruction).
    instruction: str | None = None
    # Per passage, the client's image as sent (a data URL, `core/images.py` decodes it) or None; None for
    # the whole field: text only. An image-only passage has the empty string as its text.
    images: tuple[str | None, ...] | None = None

    @property
    def has_images(self) -> bool:
        return self.images is not None and any(i is not None for i in self.images)


#: NIM's `input_type`: which side of an asymmetric retrieval model a text is on (None: not said).
InputType = Literal["query", "passage"]


@dataclass(frozen=True)
class EmbedRequest:
    """A dialect-neutral embeddings request: texts embedded on their own, one vector each."""

    texts: list[str]
    model: str | None = None
    input_type: InputType | None = None  # selects the model's query/passage prompt, if it has one
    truncate: Truncate = Truncate.NONE  # NONE | START | END (CHUNK means nothing for one vector)
    dimensions: int | None = None  # keep the leading N dimensions (models that allow it)


@dataclass
class Timings:
    """Milliseconds spent in each stage; surfaced as x-*-time headers and metrics."""

    tokenize_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class RerankResult:
    """One float32 score per request passage, in request order (not sorted).

    `logits` holds the model's raw score (NIM's `logit`); `score_kind` says what it is, which is all a
    dialect needs to report it in the unit interval.
    """

    model: str
    logits: np.ndarray
    prompt_tokens: int
    score_kind: ScoreKind
    timings: Timings = field(default_factory=Timings)
    #: Model inputs the passages took, a passage cut into N chunks counting N (what Cohere bills search units
    #: by); None: one per passage.
    windows: int | None = None

    @property
    def scored_windows(self) -> int:
        return len(self.logits) if self.windows is None else self.windows
    #: MAXSIM only: how many query vectors the scores sum over (the bound of the score's magnitude).
    query_vectors: int | None = None

    def order(self) -> list[int]:
        """Passage indices best-first; ties keep request order (stable sort)."""
        return [int(i) for i in np.argsort(-self.logits, kind="stable")]

    def top(self, top_n: int | None = None) -> list[tuple[int, float]]:
        idx = self.order()
        if top_n is not None and top_n > 0:
            idx = idx[:top_n]
        return [(i, float(self.logits[i])) for i in idx]


@dataclass
class EmbedResult:
    """One float32 vector per request text, in request order: `embeddings` is `(texts, dim)`."""

    model: str
    embeddings: np.ndarray
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)


@dataclass
class MultiVectorResult:
    """Token vectors of each request text, in request order: `vectors[i]` is `(tokens_i, dim)` float32."""

    model: str
    vectors: list[np.ndarray]
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Numerically stable logistic function in float64, for dialects that report [0, 1] scores."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))
