"""NVIDIA Retriever Reranking NIM wire models (`POST /v1/ranking`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openrerank.wire.checks import INSTRUCTION_DESCRIPTION, Count, Text


class NimText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text = Field(min_length=1, description="The text; must not be empty.")


class NimPassage(BaseModel):
    """A passage: text, an image, or both (the Reranking NIM's VLM requests; images need a model that reads
    them). An image-only passage omits `text`; an empty `text` is refused, as the NIM refuses it."""

    model_config = ConfigDict(extra="forbid")
    text: Text | None = Field(default=None, min_length=1, description="The text; omit it for an image-only passage.")
    image: Text | None = Field(
        default=None, min_length=1,
        description="A PNG or JPEG page image as a base64 data URL (`data:image/png;base64,...`); the server "
        "fetches no URLs. Only models that read images take one (see /v1/models).")

    @model_validator(mode="after")
    def _text_or_image(self) -> NimPassage:
        if self.text is None and self.image is None:
            raise ValueError("a passage needs text, an image, or both")
        return self


class NimRankingRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "query": {"text": "which way should i go?"},
                "passages": [{"text": "Turn left at the church."}, {"text": "Bananas are yellow."}],
                "truncate": "END",
            }]
        },
    )
    model: Text | None = Field(default=None, description="Served model id; omit to use the first model.")
    query: NimText
    passages: list[NimPassage] = Field(min_length=1)
    truncate: Literal["NONE", "END", "CHUNK"] = Field(
        default="NONE",
        description="NONE: over-long pairs fail the request. END: cut the passage end. "
        "CHUNK (openrerank extension): score overlapping windows, passage = best window.",
    )
    max_chunks_per_passage: Count | None = Field(
        default=None,
        description="openrerank extension, with CHUNK: most windows scored per passage (default and "
        "maximum: the server's --max-chunks-per-passage, 16 unless changed).",
    )
    instruction: Text | None = Field(
        default=None, description="openrerank extension (vLLM's field name): " + INSTRUCTION_DESCRIPTION)


class NimRanking(BaseModel):
    index: int
    logit: float


class NimUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class NimRankingResponse(BaseModel):
    rankings: list[NimRanking]
    usage: NimUsage


class HealthResponse(BaseModel):
    object: Literal["health.response"] = "health.response"
    message: str
    status: str
