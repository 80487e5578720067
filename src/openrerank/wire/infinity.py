"""Infinity (michaelfeil/infinity) wire models: `POST /rerank` with `documents` (Cohere-shaped answer),
`POST /embeddings` (OpenAI's shape), `GET /models`, `GET /health`, all at the server's root as Infinity serves them.

TEI posts `texts` to the same /rerank path; the route tells the two apart by which field the body has.
Like Infinity (pydantic's default), unknown request fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from openrerank.wire.checks import Count, Flag, Text, integer
from openrerank.wire.embeddings import _INPUT_SCHEMA

#: Infinity's default `model` value; it means "the one served model".
INFINITY_UNSPECIFIED_MODEL = "default/not-specified"
#: Infinity's `dimensions`: 0 (its default) is the model's full size.
DimensionsOrZero = integer(0)


class InfinityRerankRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{
                "query": "Where is Munich?",
                "documents": ["Munich is in Germany.", "The sky is blue."],
                "return_documents": True,
                "top_n": 1,
            }]
        },
    )
    query: str
    documents: list[str] = Field(min_length=1, description="Documents to rank (at least one).")
    return_documents: Flag = Field(default=False, description="Include each document's text in the results.")
    raw_scores: Flag = Field(default=False, description="Raw model scores instead of [0, 1] relevance scores.")
    model: Text | None = Field(default=None, description="Served model id; absent (or Infinity's "
                              f"'{INFINITY_UNSPECIFIED_MODEL}') = the first served model.")
    top_n: Count | None = Field(default=None, description="Return only the best N (absent: all).")


class InfinityRerankResult(BaseModel):
    relevance_score: float
    index: int
    document: str | None = None


class InfinityUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class InfinityRerankResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "object": "rerank", "results": [{"relevance_score": 0.93, "index": 0, "document": "Munich is in Germany."}],
        "model": "sentence-transformers/all-MiniLM-L6-v2", "usage": {"prompt_tokens": 14, "total_tokens": 14},
        "id": "3f0c...", "created": 1767225600}]})
    object: Literal["rerank"] = "rerank"
    results: list[InfinityRerankResult]
    model: str
    usage: InfinityUsage
    id: str
    created: int


class InfinityErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class InfinityError(BaseModel):
    error: InfinityErrorDetail


class InfinityEmbeddingsRequest(BaseModel):
    """Infinity's `OpenAIEmbeddingInputText`: what infinity_client, LangChain's InfinityEmbeddings and LiteLLM's
    `infinity/` provider post (the client fills `model` and `dimensions` with its defaults)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "input": ["What is the capital of France?", "Paris is the capital of France."],
        "model": INFINITY_UNSPECIFIED_MODEL, "encoding_format": "float", "dimensions": 0}]})
    input: Annotated[Any, WithJsonSchema(_INPUT_SCHEMA)] = Field(...)
    model: Text | None = Field(default=INFINITY_UNSPECIFIED_MODEL, description="Served embedding model id; "
                              f"absent or '{INFINITY_UNSPECIFIED_MODEL}' = the first served embedding model.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: lists of numbers; base64: little-endian float32 bytes, base64.")
    dimensions: DimensionsOrZero = Field(
        default=0, description="Keep the leading N dimensions (Matryoshka models only); 0 = the model's full size.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    modality: Literal["text"] = Field(default="text", description="Only 'text' is served here.")


class InfinityModel(BaseModel):
    """One entry of Infinity's `GET /models`: infinity_client reads `id` and `stats`, and checks `object` and
    `owned_by` against its enums."""

    id: str
    object: Literal["model"] = "model"
    owned_by: Literal["infinity"] = "infinity"
    created: int
    backend: str
    capabilities: list[str] = Field(description="rerank, embed ([] while the model loads)")
    stats: dict[str, int | float] = Field(description="Its queue now: queue_fraction (pending / --max-queue), "
                                    "queue_absolute (not yet planned), results_pending, batch_size")


class InfinityModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InfinityModel]


class InfinityHealth(BaseModel):
    unix: float = Field(description="The server's clock (seconds since the epoch), as Infinity answers.")
