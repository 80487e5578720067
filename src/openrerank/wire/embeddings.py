"""OpenAI / NVIDIA NIM embeddings wire models (`POST /v1/embeddings`).

OpenAI's request (`input`, `model`, `encoding_format`, `dimensions`, `user`) plus NIM's extensions
(`input_type`, `truncate`, `modality`, `embedding_type`). `input` is checked by the route rather than by a
union type, so a client that sends token ids or a wrong type gets one clear sentence instead of pydantic's
list of every union member it failed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from openrerank.wire.checks import Count, Text

_INPUT_SCHEMA = {
    "anyOf": [{"type": "string", "minLength": 1},
              {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}],
    "description": "A text, or a list of texts (at most --max-inputs). Token-id lists are refused.",
}


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "input": ["What is the capital of France?", "Paris is the capital of France."],
                "input_type": "passage",
                "encoding_format": "float",
            }]
        },
    )
    input: Annotated[Any, WithJsonSchema(_INPUT_SCHEMA)] = Field(...)
    model: Text | None = Field(
        default=None,
        description="Served embedding model id; omit to use the first served embedding model. NIM's "
        "'<id>-query' / '<id>-passage' names set input_type.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: lists of numbers; base64: little-endian float32 bytes, base64.")
    dimensions: Count | None = Field(
        default=None,
        description="Keep the leading N dimensions: Matryoshka models only (any other model accepts only "
        "its own size).")
    user: str | None = Field(default=None, description="Accepted and ignored (OpenAI compatibility).")
    input_type: Literal["query", "passage"] | None = Field(
        default=None,
        description="NIM: apply the model's query or passage prompt (config_sentence_transformers.json "
        "'prompts'); a no-op for models without prompts.")
    truncate: Literal["NONE", "START", "END"] = Field(
        default="NONE",
        description="NONE: a text over the model window fails the request (400). START: keep its end. "
        "END: keep its start.")
    modality: Literal["text"] | list[Literal["text"]] | None = Field(
        default=None, description="NIM: only 'text' is served here.")
    embedding_type: Literal["float"] = Field(default="float", description="NIM: only 'float' is served here.")


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or a base64 string with encoding_format=base64")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingsUsage

