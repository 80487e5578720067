"""Multi-vector (per-token) embeddings wire models (`POST /v1/embeddings/multi_vector`).

The shape of `/v1/embeddings` (OpenAI's `input`, `model`, `encoding_format`; NIM's `input_type`,
`truncate`, the `<model>-query` / `<model>-passage` names), with one matrix per text instead of a vector:
what a late-interaction (ColBERT) index stores. `input_type` is required: a ColBERT model encodes the two
sides differently (marker token, query augmentation, document skiplist), so a wrong default would index
silently wrong vectors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from openrerank.wire.checks import Text
from openrerank.wire.embeddings import _INPUT_SCHEMA


class MultiVectorRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "model": "answerdotai/answerai-colbert-small-v1",
                "input": ["Paris is the capital of France.", "Berlin is the capital of Germany."],
                "input_type": "passage",
            }]
        },
    )
    input: Annotated[Any, WithJsonSchema(_INPUT_SCHEMA)] = Field(...)
    model: Text | None = Field(
        default=None,
        description="Served late-interaction model id; omit to use the first one served. '<id>-query' / "
        "'<id>-passage' set input_type.")
    input_type: Literal["query", "passage"] | None = Field(
        default=None,
        description="Required (or given by the model name): query (query marker, augmented with mask tokens to "
        "the model's query length) or passage (document marker, punctuation dropped).")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: a list of vectors per text; base64: its little-endian float32 "
        "bytes, row after row (tokens x dimensions).")
    truncate: Literal["NONE", "START", "END"] = Field(
        default="NONE",
        description="Passages: NONE refuses one over the model's document length (400); START keeps its end; "
        "END its start. Queries are always cut to the model's query length.")
    user: str | None = Field(default=None, description="Accepted and ignored (OpenAI compatibility).")


class MultiVectorObject(BaseModel):
    object: Literal["multi_vector_embedding"] = "multi_vector_embedding"
    index: int
    tokens: int = Field(description="How many vectors the text has (rows of `embedding`)")
    dimensions: int
    embedding: list[list[float]] | str = Field(
        description="One unit vector per kept token; base64 of the float32 matrix with encoding_format=base64")


class MultiVectorUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class MultiVectorResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[MultiVectorObject]
    model: str
    usage: MultiVectorUsage
