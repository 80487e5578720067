"""Hugging Face text-embeddings-inference (TEI) wire models: `POST /rerank`, `POST /embed` (and the root routes),
`GET /info`.

Like TEI (serde's default), unknown request fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from openrerank.wire.checks import Count, Flag, Text
from openrerank.wire.embeddings import _INPUT_SCHEMA


class TeiRerankRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{
                "query": "What is Deep Learning?",
                "texts": ["Deep Learning is a branch of machine learning.", "Cheese is made from milk."],
                "truncate": True,
                "truncation_direction": "right",
                "raw_scores": False,
                "return_text": True,
            }]
        },
    )
    query: Text
    texts: list[Text] = Field(description="Texts to rank; an empty list is a 400.")
    truncate: Flag | None = Field(
        default=None,
        description="Cut over-long pairs to the model window (absent = the server's auto-truncate, on). "
        "false: an over-long pair fails the request (422). With `serve --tei-chunking`, over-long texts are "
        "scored by their best overlapping chunk instead of being cut.",
    )
    truncation_direction: Literal["right", "left", "Right", "Left"] = Field(
        default="right", description="right: cut the text's end; left: cut its start."
    )
    raw_scores: Flag = Field(default=False, description="Raw model scores instead of [0, 1] scores.")
    return_text: Flag = Field(default=False, description="Include each text in the response.")
    model: Text | None = Field(
        default=None, description="openrerank extension: served model id (TEI serves one model; absent = first)."
    )


class TeiEmbedRequest(BaseModel):
    """TEI's `EmbedRequest`, as huggingface_hub's `feature_extraction` and LlamaIndex's
    `TextEmbeddingsInference` post it."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "inputs": ["What is Deep Learning?", "Deep Learning is a branch of machine learning."],
        "truncate": True, "normalize": True, "model": "sentence-transformers/all-MiniLM-L6-v2"}]})
    inputs: Annotated[Any, WithJsonSchema(_INPUT_SCHEMA)] = Field(...)
    truncate: Flag | None = Field(
        default=None, description="Cut an over-long text to the model window (absent = the server's auto-truncate, "
        "on). false: an over-long text fails the request (422).")
    truncation_direction: Literal["right", "left", "Right", "Left"] = Field(
        default="right", description="right: cut the text's end; left: cut its start.")
    normalize: Flag = Field(default=True, description="L2-normalize each vector. false: the model's own output "
                            "(unit length all the same for a model that ends with a Normalize module).")
    prompt_name: Text | None = Field(
        default=None, description="A prompt of the model's sentence-transformers config, by a name of its query or "
        "passage prompt (query, search_query, document, passage, ...); a no-op for a model without prompts.")
    dimensions: Count | None = Field(
        default=None, description="Keep the leading N dimensions (Matryoshka models only).")
    model: Text | None = Field(
        default=None, description="openrerank extension: served embedding model id (absent = the first one).")


class TeiRank(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"index": 0, "score": 0.93, "text": "Deep Learning is a branch of ..."}]}
    )
    index: int
    score: float
    text: str | None = None


class TeiError(BaseModel):
    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


class TeiClassifierModel(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TeiEmbeddingModel(BaseModel):
    pooling: str = Field(description="How token vectors become one: TEI's names (cls, mean, last_token), else "
                         "sentence-transformers' (max, weightedmean, ...; several joined with '+').")


class TeiReranker(BaseModel):
    """TEI's `model_type` of a model that scores pairs (a one-label classifier in TEI)."""

    reranker: TeiClassifierModel


class TeiEmbedding(BaseModel):
    """TEI's `model_type` of an embedding model: its root route embeds."""

    embedding: TeiEmbeddingModel


class TeiInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_id: str = Field(description="What the model is: its hub id, or a local folder by its name.")
    model_sha: str | None = None
    model_dtype: str
    served_model_name: str = Field(description="The id requests name it by (`NAME=` of `--model`, else as model_id).")
    model_type: TeiReranker | TeiEmbedding
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None = None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    #: openrerank's addition: which engine serves and why, with every candidate's measured rate
    #: (the `engine` object of /v1/metadata); TEI clients ignore it.
    engine: dict | None = None
