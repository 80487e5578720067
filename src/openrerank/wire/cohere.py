"""Cohere (and Jina / vLLM-compatible) rerank wire models: `POST /v1/rerank`, `POST /v2/rerank`.

vLLM serves its RerankRequest on both routes: its options (`VllmScoringOptions`) are read here too.

Unknown fields are ignored rather than rejected: the official SDK sends `priority` and
`relevant_spans`, Jina and LangChain clients send their own extras, and Cohere-compatible servers
(vLLM, Infinity, Jina) accept them. Wrong types and missing required fields are still a 400.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from openrerank.wire.checks import INSTRUCTION_DESCRIPTION, Count, Document, Flag, Text, json_integer
from openrerank.wire.score import VllmScoringOptions

_QUERY = Field(min_length=1, description="The search query; must not be empty.")
#: vLLM's rule (its RerankRequest, served on these routes): 0 or less is "all". Cohere itself refuses below 1,
#: so no Cohere client sends one.
_TopN = Annotated[int, BeforeValidator(json_integer)]
_TOP_N = Field(default=None, description="Return only the best `top_n` results; absent, 0 or less = all.")
_RETURN_DOCS = Field(default=False, description="Include each result's document in the response.")
_INSTRUCTION = Field(default=None, description="openrerank extension (vLLM's field name): " + INSTRUCTION_DESCRIPTION)


class CohereV1RerankRequest(VllmScoringOptions):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "query": "What is the capital of France?",
                "documents": ["Paris is the capital of France.", "Bananas are yellow.",
                              {"text": "Berlin is in Germany.", "id": "doc-3"}],
                "top_n": 2,
                "return_documents": True,
            }]
        },
    )
    model: Text | None = Field(default=None, description="Served model id; omit to use the first model.")
    query: Text = _QUERY
    documents: list[Document] = Field(
        min_length=1,
        description="Strings, or objects with a `text` field (other fields are kept and returned).",
    )
    top_n: _TopN | None = _TOP_N
    rank_fields: list[Text] | None = Field(
        default=None, min_length=1,
        description="Object fields to rank on (default `text`); several are joined as `key: value` lines.",
    )
    return_documents: Flag = _RETURN_DOCS
    max_chunks_per_doc: Count | None = Field(
        default=None, description="Most chunks scored per long document (default 10)."
    )
    instruction: Text | None = _INSTRUCTION


class CohereV2RerankRequest(VllmScoringOptions):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "query": "What is the capital of France?",
                "documents": ["Paris is the capital of France.", "Bananas are yellow."],
                "top_n": 1,
            }]
        },
    )
    model: Text = Field(description="Served model id (required by Cohere v2); see GET /v1/models.")
    query: Text = _QUERY
    documents: list[Text] = Field(min_length=1, description="Texts to rank against the query.")
    top_n: _TopN | None = _TOP_N
    return_documents: Flag = _RETURN_DOCS
    max_tokens_per_doc: Count | None = Field(
        default=None,
        description="Only each document's first N tokens are considered (default 4096); "
        "within them, windows longer than the model's are chunked and scored by the best chunk.",
    )
    instruction: Text | None = _INSTRUCTION


class CohereDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str | None = None


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None


class CohereApiVersion(BaseModel):
    version: str


class CohereBilledUnits(BaseModel):
    search_units: int = Field(description="Cohere's unit: one query with up to 100 documents, each chunk of a "
                              "long document counting as a document of its own (ceil(chunks / 100)).")


class CohereTokens(BaseModel):
    input_tokens: int = Field(description="Tokens the model read: prompts, queries and documents as scored.")
    output_tokens: int = 0


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits
    tokens: CohereTokens


class CohereUsage(BaseModel):
    """Jina's `total_tokens` and vLLM's `prompt_tokens` (the same number: a reranker generates nothing)."""

    prompt_tokens: int
    total_tokens: int


class CohereRerankResponse(BaseModel):
    """Cohere's response plus Jina's and vLLM's `model` and `usage`, so their clients parse it too."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{
                "id": "4a1ba6a1-6f2b-4f5e-9a51-2d8f7a4c1c0e",
                "results": [{"index": 0, "relevance_score": 0.93,
                             "document": {"text": "Paris is the capital of France."}}],
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                         "tokens": {"input_tokens": 42, "output_tokens": 0}},
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "usage": {"prompt_tokens": 42, "total_tokens": 42},
            }]
        }
    )
    id: str
    results: list[CohereResult]
    meta: CohereMeta
    model: str
    usage: CohereUsage


class CohereError(BaseModel):
    message: str


class CohereV1Error(CohereError):
    """/v1/rerank is Jina's route too: Jina's clients (LlamaIndex's JinaRerank, LangChain's JinaRerank) read an
    error's text from `detail`, Cohere's SDK from `message`; both carry it."""

    detail: str
