"""Infinity (michaelfeil/infinity) rerank wire models: `POST /rerank` with `documents`, Cohere-shaped answer.

TEI posts `texts` to the same path; the route tells the two apart by which field the body has.
Like Infinity (pydantic's default), unknown request fields are ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from openrerank.wire.checks import Count, Flag

#: Infinity's default `model` value; it means "the one served model".
INFINITY_UNSPECIFIED_MODEL = "default/not-specified"


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
    model: str | None = Field(default=None, description="Served model id; absent (or Infinity's "
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
